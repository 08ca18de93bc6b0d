"""Probes of an image layout against the model itself, for any family (tests of families group A use them; they know
no family): where a pixel of the original image lands among the vision tower's patch embeddings, which LLM image
tokens a connector input patch reaches, and "planted" models whose answer depends on one image region only.

* :func:`check_pixel_reaches_its_patches` perturbs one pixel of the original image, chosen farther from every patch
  edge of every view than the image processor's resampling filter reaches, and checks that exactly the patches whose
  boxes contain it (one per view that shows it) change in the vision tower's patch-embedding output.
* :func:`check_patch_reaches_its_tokens` adds a unit vector to one patch feature at the connector's input and checks
  that exactly the LLM image tokens with a non-zero Query-to-Patch entry for that patch change — for linear rules
  (identity, bilinear) by exactly ``Q2P[m, p]`` times the patch's own change at the connector's output.
* :func:`plant` makes a model whose dark patches give exactly zero features all the way into the LLM (zero position
  embeddings, residual branches, biases); with one LLM layer, only the tokens of a bright region carry value vectors.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tests.family_checks import changed_rows, llm_image_embeddings

#: Half-width of PIL's resampling kernels, in output pixels (PIL scales it by the downsampling factor).
RESAMPLE_SUPPORT = {0: 0.5, 4: 0.5, 2: 1.0, 5: 1.0, 3: 2.0, 1: 3.0}  # NEAREST, BOX, BILINEAR, HAMMING, BICUBIC, LANCZOS


def patch_embedding_conv(vision_tower: nn.Module) -> nn.Conv2d:
    convs = [m for m in vision_tower.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise AssertionError(f"{type(vision_tower).__name__} has no Conv2d patch embedding")
    return convs[0]


def patch_embeddings(model, adapter, kwargs: dict) -> torch.Tensor:
    """``[N, D]`` the vision tower's patch-embedding output for one forward, views in batch order, row-major."""
    seen = []
    handle = patch_embedding_conv(adapter.vision_tower).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(**kwargs, use_cache=False)
    finally:
        handle.remove()
    (out,) = seen
    return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1]).detach()


def isolated_pixel(layout, view_pixels: tuple[int, int], support: float):
    """``((y, x), [patch indices])``: the pixel of the original image farthest (relative to the resampling reach)
    from every patch edge of every view, and the patches whose boxes contain it; None if no pixel is far enough.

    A view of ``view_pixels`` (h, w) model pixels over a box of ``box_w`` original pixels has ``f = box_w / w``
    original pixels per model pixel; PIL's kernel of half-width ``support`` reaches ``support · max(f, 1)`` original
    pixels, so a pixel whose center is more than that minus half a model pixel from a patch edge only touches model
    pixels of that patch (half an original pixel of slack on top)."""
    h, w = layout.image_size
    cy, cx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    slack = np.full((h, w), np.inf)
    inside = []
    for i, view in enumerate(layout.views):
        x0, y0, x1, y1 = view.box
        rows, cols = view.grid
        fx, fy = (x1 - x0) / view_pixels[1], (y1 - y0) / view_pixels[0]
        need_x = support * max(fx, 1.0) - fx / 2 + 0.5
        need_y = support * max(fy, 1.0) - fy / 2 + 0.5
        px, py = (x1 - x0) / cols, (y1 - y0) / rows
        u, v = (cx - x0) / px, (cy - y0) / py  # position in patch units
        in_view = (u >= 0) & (u < cols) & (v >= 0) & (v < rows)
        # Inside: distance to the nearest patch edge on each axis; outside: distance to the view on the far axis.
        dx_in = np.minimum(u - np.floor(u), np.ceil(u) - u) * px
        dy_in = np.minimum(v - np.floor(v), np.ceil(v) - v) * py
        dx_out = np.maximum(np.maximum(x0 - cx, cx - x1), 0)
        dy_out = np.maximum(np.maximum(y0 - cy, cy - y1), 0)
        view_slack = np.where(in_view, np.minimum(dx_in - need_x, dy_in - need_y),
                              np.maximum(dx_out - need_x, dy_out - need_y))
        slack = np.minimum(slack, view_slack)
        patch = np.floor(v).astype(int) * cols + np.floor(u).astype(int) + layout.view_slice(i).start
        inside.append((in_view, patch))
    y, x = np.unravel_index(int(np.argmax(slack)), slack.shape)
    if slack[y, x] <= 0:
        return None
    return (int(y), int(x)), sorted(int(p[y, x]) for m, p in inside if m[y, x])


def check_pixel_reaches_its_patches(explainer, image: np.ndarray, view_pixels: tuple[int, int]) -> list[int]:
    """Perturb the :func:`isolated_pixel` of ``image`` and check that exactly its patches change (returns them)."""
    processor, adapter = explainer.processor, explainer.adapter
    _, ids, kwargs, layout, _ = explainer.encode_prompt(image, None)
    support = RESAMPLE_SUPPORT[int(processor.image_processor.resample)]
    found = isolated_pixel(layout, view_pixels, support)
    assert found is not None, "no pixel of the test image is far enough from every patch edge: use a larger image"
    (y, x), expected = found
    assert expected, "the isolated pixel lies in no view"

    def embeddings(img):
        _, ids, kwargs, _, _ = explainer.encode_prompt(img, None)
        return patch_embeddings(explainer.model, adapter, {"input_ids": ids, **kwargs})

    before = embeddings(image)
    bumped = image.copy()
    bumped[y, x] = 255 - bumped[y, x]
    changed = changed_rows(before, embeddings(bumped))
    assert changed == expected, f"pixel {(y, x)}: patches {changed} changed, the layout says {expected}"
    return expected


def check_patch_reaches_its_tokens(explainer, image: np.ndarray, patch: int, linear: bool) -> list[int]:
    """Add a unit vector to connector input patch ``patch`` and check which LLM image tokens change (see module)."""
    inputs = explainer.prepare(image, "a", None)
    layout = inputs.layout
    per_view = layout.views[0].n_patches
    view, token = divmod(patch, per_view)
    outputs = []

    def bump(module, args):
        x = args[0].clone()
        x[view, token, 0] += 1.0
        return (x, *args[1:])

    def record(module, args, out):
        outputs.append(out.detach())

    projector = explainer.adapter.projector
    h_out = projector.register_forward_hook(record)
    try:
        before = llm_image_embeddings(explainer.model, inputs)
        h_in = projector.register_forward_pre_hook(bump)
        try:
            after = llm_image_embeddings(explainer.model, inputs)
        finally:
            h_in.remove()
    finally:
        h_out.remove()
    column = layout.query_to_patch[:, patch]
    expected = torch.nonzero(column).flatten().tolist()  # empty for a patch the connector drops (unpadding)
    changed = changed_rows(before, after)
    assert changed == expected, f"patch {patch}: tokens {changed} changed, the layout says {expected}"
    if linear:
        delta = (outputs[1] - outputs[0]).flatten(0, -2)[patch].double()
        torch.testing.assert_close((after - before).double(), column[:, None] * delta[None, :], rtol=1e-9, atol=1e-12)
    return expected


def plant(model, adapter) -> None:
    """Make dark patches give exactly zero features into the LLM (in place; see the module docs)."""
    with torch.no_grad():
        for name, module in adapter.vision_tower.named_modules():
            if isinstance(module, nn.Embedding) and "position" in name:
                module.weight.zero_()
            if isinstance(module, nn.Linear) and (name.endswith("out_proj") or name.endswith("fc2")):
                module.weight.zero_()  # the residual branches: every layer is the identity
                module.bias.zero_()
        conv = patch_embedding_conv(adapter.vision_tower)
        if conv.bias is not None:
            conv.bias.zero_()
        for module in adapter.projector.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        for name, module in adapter.language_model.named_modules():
            if name.endswith("v_proj") and getattr(module, "bias", None) is not None:
                module.bias.zero_()  # Qwen2: a value bias would give dark tokens a value vector


def planted_target(explainer, dark: np.ndarray, bright: np.ndarray) -> str:
    """The word whose next-token logit the bright region raises most (the planted model's answer to it)."""
    tok = explainer.processor.tokenizer
    logits = []
    for img in (dark, bright):
        _, ids, kwargs, _, _ = explainer.encode_prompt(img, None)
        with torch.no_grad():
            logits.append(explainer.model(input_ids=ids, **kwargs, use_cache=False).logits[0, -1].double())
    gain = logits[1] - logits[0]
    words = [i for i, t in enumerate(tok.convert_ids_to_tokens(range(len(gain))))
             if t.isalpha() and i not in tok.all_special_ids]
    return tok.convert_ids_to_tokens(words[int(gain[words].argmax())])


def pointing_in(image_map: torch.Tensor, box: tuple[int, int, int, int]) -> bool:
    """Whether the argmax pixel of ``image_map`` lies in ``box = (x0, y0, x1, y1)`` (pixels, end exclusive)."""
    y, x = np.unravel_index(int(torch.argmax(image_map)), tuple(image_map.shape))
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def bright_square(height: int, width: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(black image, the same with a white ``box``) as uint8 RGB arrays."""
    dark = np.zeros((height, width, 3), np.uint8)
    bright = dark.copy()
    x0, y0, x1, y1 = box
    bright[y0:y1, x0:x1] = 255
    return dark, bright


def noise_image(hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A random uint8 RGB image of ``hw``."""
    return np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)


def run_doctests(*modules) -> None:
    """Run the docstring examples of ``modules`` (each must have some, and all must pass)."""
    import doctest

    for module in modules:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
