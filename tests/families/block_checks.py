"""Checks the family tests of the concatenating connectors (InternVL, Idefics3/SmolVLM, Aya Vision, Mistral3) share:
the layout against the model itself (pixels → patch embeddings, connector input → LLM image tokens, the connector's
Jacobian), the explainer end to end, and the "planted" model whose target depends on one image region only.

Everything is measured on the real model with hooks; the layout under test only says what to expect.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from tests.family_checks import assert_close_relative, changed_rows, full_matrix_text_to_query, llm_image_embeddings

#: Radius of PIL's resampling filters in output pixels (scaled by the reduction factor when downsampling).
FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}


@dataclass
class ConnectorInput:
    """Where the connector's patch features can be changed: ``module``'s first input (``where="input"``) or its
    output (``"output"``: a tensor or an output with ``last_hidden_state``), laid out ``[views, prefix + per_view, C]``
    (or ``[per_view, C]`` for one view); ``prefix`` non-patch tokens (CLS) come first in each view."""

    module: torch.nn.Module
    where: str = "input"
    prefix: int = 0


def language_model_of(model):
    """The LLM module (``language_model``; Idefics3/SmolVLM call it ``text_model``)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", None) or inner.text_model


def _features(value):
    return value.last_hidden_state if hasattr(value, "last_hidden_state") else value


@contextlib.contextmanager
def edit_connector_input(spec: ConnectorInput, edit):
    """Run ``edit(x) -> x`` on the connector's patch features ``[views, prefix + per_view, C]`` during forwards."""

    def apply(value):
        x = _features(value)
        shaped = x if x.ndim == 3 else x.unsqueeze(0)
        new = edit(shaped)
        new = new if x.ndim == 3 else new.squeeze(0)
        if hasattr(value, "last_hidden_state"):
            value.last_hidden_state = new
            return value
        return new

    if spec.where == "input":
        handle = spec.module.register_forward_pre_hook(lambda m, args: (apply(args[0]), *args[1:]))
    else:
        handle = spec.module.register_forward_hook(lambda m, args, out: apply(out))
    try:
        yield
    finally:
        handle.remove()


def _unit_at(patch: int, prefix: int):
    def edit(x):
        per_view = x.shape[1] - prefix
        x = x.clone()
        x[patch // per_view, prefix + patch % per_view] += 1.0
        return x

    return edit


def check_unit_change_at_connector_input(model, inputs, spec: ConnectorInput, patches) -> None:
    """A unit change at one connector input patch changes exactly the LLM image tokens whose Query-to-Patch row has
    that patch (placeholders never)."""
    layout = inputs.layout
    lm = language_model_of(model)
    base = llm_image_embeddings(model, inputs, lm)
    for p in patches:
        with edit_connector_input(spec, _unit_at(p, spec.prefix)):
            after = llm_image_embeddings(model, inputs, lm)
        expected = torch.nonzero(layout.query_to_patch[:, p]).flatten().tolist()
        assert expected, f"patch {p} feeds no token in the layout"
        assert changed_rows(base, after) == expected, p


def connector_jacobian_support(model, inputs, spec: ConnectorInput) -> torch.Tensor:
    """``[M, N]`` bool: which connector input patches each LLM image position depends on, by autograd through the
    model's own connector (random weights make every structural dependence non-zero)."""
    layout = inputs.layout
    lm = language_model_of(model)
    seen = {}

    def leaf(x):
        seen["x"] = x.detach().requires_grad_(True)
        return seen["x"]

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs.get("inputs_embeds", args[0] if args else None)

    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.enable_grad(), edit_connector_input(spec, leaf):
            model(**inputs.model_kwargs(), use_cache=False)
    finally:
        handle.remove()
    x, embeds = seen["x"], seen["embeds"][0]
    rows = []
    for pos in layout.positions.tolist():
        (g,) = torch.autograd.grad(embeds[pos].sum(), x, retain_graph=True, allow_unused=True)
        g = torch.zeros_like(x) if g is None else g
        rows.append(g[:, spec.prefix:].abs().sum(-1).flatten() > 0)
    return torch.stack(rows)


def check_query_to_patch_is_the_block_rule(model, inputs, spec: ConnectorInput) -> None:
    """The layout's Query-to-Patch equals the ``block`` rule derived independently: each token uniform over the
    patches its LLM embedding depends on (the connector's Jacobian support), placeholders zero."""
    support = connector_jacobian_support(model, inputs, spec).double()
    layout = inputs.layout
    assert not bool(support[layout.placeholder].any()), "a placeholder token depends on patches"
    sizes = support.sum(1, keepdim=True)
    expected = support / torch.where(sizes > 0, sizes, torch.ones_like(sizes))
    assert bool((sizes[~layout.placeholder] > 0).all()), "an image token depends on no patch"
    torch.testing.assert_close(layout.query_to_patch, expected, rtol=0, atol=1e-12)


def check_exact_maps(explainer, inputs) -> dict:
    """Text-to-Query against the float64 full-matrix oracle (≤ 1e-6 relative), Text-to-Patch = T2Q · Q2P."""
    result = explainer.compute(inputs)
    assert_close_relative(result["text_to_query"], full_matrix_text_to_query(explainer.model, inputs), 1e-6)
    torch.testing.assert_close(result["query_to_patch"], inputs.layout.query_to_patch.to(result["query_to_patch"]))
    torch.testing.assert_close(result["text_to_patch"], result["text_to_query"] @ result["query_to_patch"])
    return result


# ---- pixels → patch embeddings ---------------------------------------------------------------------------------
def patch_embeddings(model, inputs, module) -> torch.Tensor:
    """``[N, D]``: ``module``'s output (the vision tower's patch embedding, conv ``[V, D, h, w]`` or ``[V, S, D]``)
    for one forward, one row per patch in the layout's numbering (views in order, row-major)."""
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.__setitem__("out", out))
    try:
        with torch.no_grad():
            model(**inputs.model_kwargs(), use_cache=False)
    finally:
        handle.remove()
    out = seen["out"]
    if out.ndim == 4:
        out = out.permute(0, 2, 3, 1)
    return out.reshape(-1, out.shape[-1]).detach()


def _overlapping(boxes: torch.Tensor, region, reach_xy=None) -> list[int]:
    x0, y0, x1, y1 = region
    rx, ry = (torch.zeros(len(boxes), dtype=torch.float64),) * 2 if reach_xy is None else reach_xy
    hit = (boxes[:, 0] < x1 + rx) & (boxes[:, 2] > x0 - rx) & (boxes[:, 1] < y1 + ry) & (boxes[:, 3] > y0 - ry)
    return torch.nonzero(hit).flatten().tolist()


def _filter_reach(layout, patch_px: int, support: float):
    """Per patch, how far (original pixels, x and y) a resampling filter spreads a pixel change in its view: nothing
    when the view shows the image at scale 1, else the filter's support times the reduction factor, plus a pixel."""
    rx, ry = [], []
    for view in layout.views:
        x0, y0, x1, y1 = view.box
        for extent, cells, out in ((x1 - x0, view.grid[1], rx), (y1 - y0, view.grid[0], ry)):
            scale = extent / (cells * patch_px)
            reach = 0.0 if math.isclose(scale, 1.0) else support * max(1.0, scale) + 1.0
            out.extend([reach] * view.n_patches)
    return torch.tensor(rx, dtype=torch.float64), torch.tensor(ry, dtype=torch.float64)


def check_pixels_of_one_patch(explainer, image: np.ndarray, patch: int, module, patch_px: int, filter_name: str,
                              margin: int = 2) -> list[int]:
    """Perturbing the pixels of patch ``patch``'s box (shrunk by ``margin``) in the ORIGINAL image changes exactly
    that region's patches — one per view that shows it — in the vision tower's patch embeddings. The region is
    checked to lie farther than the resampling filter's reach from every other patch of every view, so the
    expectation is exact. Returns the changed patches."""
    model = explainer.model
    base = explainer.prepare(image, "a", None)
    layout = base.layout
    boxes = layout.patch_boxes()
    bx0, by0, bx1, by1 = boxes[patch].tolist()
    region = (math.ceil(bx0) + margin, math.ceil(by0) + margin, math.floor(bx1) - margin, math.floor(by1) - margin)
    assert region[2] > region[0] and region[3] > region[1], "the patch box is too small for the margin"
    strict = _overlapping(boxes, region)
    loose = _overlapping(boxes, region, _filter_reach(layout, patch_px, FILTER_SUPPORT[filter_name]))
    assert strict == loose, f"test design: {region} is within the filter's reach of {set(loose) - set(strict)}"
    slices = [layout.view_slice(i) for i in range(len(layout.views))]
    views = [next(i for i, s in enumerate(slices) if s.start <= q < s.stop) for q in strict]
    assert patch in strict and len(set(views)) == len(views), "one patch per view"
    bumped = image.copy()
    x0, y0, x1, y1 = region
    bumped[y0:y1, x0:x1] = 255 - bumped[y0:y1, x0:x1]
    after = explainer.prepare(bumped, "a", None)
    changed = changed_rows(patch_embeddings(model, base, module), patch_embeddings(model, after, module))
    assert changed == strict, (changed, strict)
    return changed


# ---- the planted model -----------------------------------------------------------------------------------------
def plant(model, vision_tower, connector, language_model, patch_conv) -> None:
    """Make the image tokens of dark patches exactly zero vectors, in place: the vision tower's residual branches
    (every attention and MLP), position embeddings, CLS token and biases are zeroed, as are the connector's and the
    LLM attention's biases, and the patch embedding ignores the blue channel. With the processor's mean 0 / std 1,
    a pure-blue pixel then embeds to 0 (a blue background is "dark" without being all-zero, which Idefics3 would
    drop as batch padding), so only tokens whose blocks hold other colours carry value vectors."""
    with torch.no_grad():
        for module in vision_tower.modules():
            if type(module).__name__.endswith(("Attention", "MLP")):
                for p in module.parameters():
                    p.zero_()
        for name, p in vision_tower.named_parameters():
            if any(k in name for k in ("bias", "position", "cls_token")):
                p.zero_()
        for name, p in connector.named_parameters():
            if "bias" in name:
                p.zero_()
        for module in language_model.modules():
            if type(module).__name__.endswith("Attention"):
                for name, p in module.named_parameters():
                    if "bias" in name:
                        p.zero_()
        patch_conv.weight[:, 2] = 0


def planted_image(height: int, width: int, region) -> np.ndarray:
    """Pure blue with a white ``region = (x0, y0, x1, y1)``."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 2] = 255
    x0, y0, x1, y1 = region
    image[y0:y1, x0:x1] = 255
    return image


def check_planted(explainer, image: np.ndarray, region, patch_px: int, filter_name: str,
                  target: str = "a red circle"):
    """The planted model's map lights up the region: Text-to-Query is exactly zero on every image token whose block
    lies farther from the region than the resampling filter reaches, positive on the others, and the peak of
    ``image_map`` falls inside the region."""
    e = explainer.attribute(image, target=target)
    layout = e.layout
    t2q = e.text_to_query.mean(0)
    near = _overlapping(layout.patch_boxes(), region, _filter_reach(layout, patch_px, FILTER_SUPPORT[filter_name]))
    touching = layout.query_to_patch[:, near].sum(1) > 0
    carrying = ~layout.placeholder
    assert float(t2q[carrying & ~touching].abs().max()) == 0.0, "a token away from the region has relevance"
    assert float(t2q[carrying & touching].max()) > 0, "no relevance on the region's tokens"
    m = e.image_map()
    assert tuple(m.shape) == image.shape[:2]
    y, x = np.unravel_index(int(m.argmax()), tuple(m.shape))
    assert region[0] <= x < region[2] and region[1] <= y < region[3], ((x, y), region)
    return e
