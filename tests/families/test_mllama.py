"""Mllama (Llama 3.2 Vision): the image reaches the LLM only through gated cross-attention layers, as tiles.
Explained end to end on a tiny random ``MllamaForConditionalGeneration`` with its real processor
(tests/families/tiny_mllama.py), against references written out here in plain torch (float64): the bi-modal GAE
over the text stream and the cross-attention keys; the tile layout against the model (pixels of one patch's box in
the original image → that patch's embedding only; a change at one projector input token → exactly the key the
layout maps to that patch); a planted model whose evidence is one known patch of one tile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from family_checks import assert_close_relative, changed_rows
from gae_oracle import cam, normalize, recorded_forward
from tiny_mllama import tiny_image, tiny_mllama

from rgae import Explanation
from rgae.adapters import families, get_adapter
from rgae.methods import RGAE, AttentionRollout, GradCAM, Occlusion, RawAttention

TARGET = "red circle on the left"


@pytest.fixture(scope="module")
def mllama():
    return tiny_mllama()


def bimodal_oracle(model, inputs) -> torch.Tensor:
    """``[T, K]`` Text-to-Query over the cross-attention keys by the bi-modal GAE rules, as slowly as it reads: every
    decoder layer's attention recorded by hooks (self-attention ``[S, S]`` or cross-attention ``[S, K]``), per target
    token the gradient of its raw logit, ``cam = mean_h (G ⊙ A)+``, then in layer order ``R_tt += cam·R_tt``,
    ``R_tk += cam·R_tk`` (self) or ``R_tk += R̄_ttᵀ·cam`` (cross, ``R_kk = I``); the predicting row of ``R_tk``."""
    layers = model.model.language_model.layers
    kinds = ["cross" if hasattr(layer, "cross_attn") else "self" for layer in layers]
    modules = [getattr(layer, "cross_attn", None) or layer.self_attn for layer in layers]
    logits, seen = recorded_forward(model, inputs, modules)
    n_text = inputs.input_ids.shape[1]
    n_keys = next(a.shape[-1] for k, a in zip(kinds, seen) if k == "cross")
    rows = []
    for pos, tok in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
        grads = torch.autograd.grad(logits[0, pos, tok], seen, retain_graph=True, allow_unused=True)
        R_tt, R_tk = torch.eye(n_text, dtype=torch.float64), torch.zeros(n_text, n_keys, dtype=torch.float64)
        for kind, a, g in zip(kinds, seen, grads):
            c = cam(a, g)
            if kind == "self":
                R_tt, R_tk = R_tt + c @ R_tt, R_tk + c @ R_tk
            else:
                R_tk = R_tk + normalize(R_tt).T @ c
        rows.append(R_tk[pos])
    return torch.stack(rows)


# ---- the adapter and the layout -----------------------------------------------------------------------------------
def test_family_is_listed_and_found(mllama):
    model, _ = mllama
    assert "mllama" in [f.name for f in families()]
    ad = get_adapter(model)
    assert ad.llm_attention_kinds == ("self", "cross", "self")
    assert ad.sees_image_through_cross_attention
    assert (ad.patch_grid, ad.vision_prefix, ad.projector_kind) == ((2, 2), 1, "linear")


@pytest.mark.parametrize("hw, tiles, real", [((24, 40), (2, 2), 4), ((20, 40), (1, 2), 2), ((16, 16), (1, 1), 1)])
def test_layout_tiles_from_the_processor(mllama, hw, tiles, real):
    """24×40 → resized to 19×32 on a 2×2-tile canvas (bottom tiles mostly padding); 20×40 → 16×32 on 1×2 tiles
    (two padding tiles of the 4 the model always reads); 16×16 → one tile."""
    model, processor = mllama
    layout = RGAE(model, processor).prepare(tiny_image(*hw), TARGET, None).layout
    rows, cols = tiles
    assert [v.name for v in layout.views] == [f"tile {i},{j}" for i in range(rows) for j in range(cols)]
    assert layout.n_tokens == 4 * 5 and layout.n_patches == real * 4
    q2p = layout.query_to_patch
    # Key k = tile t's token j (CLS j = 0, then the 2×2 patches row-major); padding tiles carry nothing.
    for t in range(4):
        for j in range(5):
            expected = torch.zeros(layout.n_patches, dtype=torch.float64)
            if t < real and j > 0:
                expected[t * 4 + j - 1] = 1.0
            assert torch.equal(q2p[t * 5 + j], expected)
    assert layout.placeholder.tolist() == [bool(q2p[k].sum() == 0) for k in range(20)]
    # The canvas is cut into tiles after resizing: tile (i, j) spans the resized image's pixels [16 j, 16 (j+1)).
    h, w = hw
    canvas_scale = {(24, 40): (19 / 24, 32 / 40), (20, 40): (16 / 20, 32 / 40), (16, 16): (1.0, 1.0)}[hw]
    for view, (i, j) in zip(layout.views, [(i, j) for i in range(rows) for j in range(cols)]):
        sy, sx = canvas_scale
        assert view.box == pytest.approx((16 * j / sx, 16 * i / sy, 16 * (j + 1) / sx, 16 * (i + 1) / sy))


def _patch_embeddings(model, processor, image) -> torch.Tensor:
    out = {}
    handle = model.model.vision_model.patch_embedding.register_forward_hook(
        lambda mod, args, y: out.setdefault("y", y.detach()))
    try:
        batch = processor.image_processor(image, return_tensors="pt")
        with torch.no_grad():
            model.model.vision_model(pixel_values=batch["pixel_values"].to(model.dtype),
                                     aspect_ratio_ids=batch["aspect_ratio_ids"],
                                     aspect_ratio_mask=batch["aspect_ratio_mask"])
    finally:
        handle.remove()
    return out["y"].flatten(2).transpose(1, 2).reshape(-1, out["y"].shape[1])  # [tiles · patches, D], tile-major


def test_pixels_of_one_patch_box_change_only_that_patch(mllama):
    """On the 24×40 image (4 tiles, resized 40 → 32 and 24 → 19 bilinearly, reach < 1.3 px), perturbing a patch
    box's inner pixels (2 px from its edges) in the ORIGINAL image changes exactly that patch's embedding."""
    model, processor = mllama
    image = tiny_image(24, 40, seed=1)
    layout = RGAE(model, processor).prepare(image, TARGET, None).layout
    before = _patch_embeddings(model, processor, image)
    boxes = layout.patch_boxes()
    for p in (0, 3, 5, 6):  # tiles 0 and 1 lie inside the image
        x0, y0, x1, y1 = boxes[p].tolist()
        bumped = image.copy()
        region = (slice(int(np.ceil(y0)) + 2, int(y1) - 2), slice(int(np.ceil(x0)) + 2, int(x1) - 2))
        bumped[region] = 255 - bumped[region]
        assert changed_rows(before, _patch_embeddings(model, processor, bumped)) == [p]


def test_change_at_one_projector_input_reaches_exactly_its_key(mllama):
    """A unit change at one projector input token (tile t, patch p) changes exactly the cross-attention key the
    layout maps to that patch (the keys the LLM reads: ``cross_attention_states``)."""
    model, processor = mllama
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(24, 40), TARGET, None)
    q2p = inputs.layout.query_to_patch

    def keys(tile=None, patch=None):
        seen = {}

        def bump(mod, args):
            x = args[0].clone()
            if tile is not None:
                x[0, 0, tile, 1 + patch, 0] += 1.0
            return (x,)

        def grab(mod, args, kwargs):
            seen["k"] = kwargs["cross_attention_states"].detach()

        h1 = model.model.multi_modal_projector.register_forward_pre_hook(bump)
        h2 = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs.model_kwargs(), use_cache=False)
        finally:
            h1.remove()
            h2.remove()
        return seen["k"].reshape(-1, seen["k"].shape[-1])

    base = keys()
    for tile, patch in ((0, 0), (1, 3), (3, 2)):
        column = tile * 4 + patch
        assert changed_rows(base, keys(tile, patch)) == q2p[:, column].nonzero().flatten().tolist()


def test_target_rows_of_the_cross_attention_mask_see_what_the_prompt_end_sees(mllama):
    """Teacher forcing extends ``cross_attention_mask`` over the target as the processor marks the whole text."""
    model, processor = mllama
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(20, 40), TARGET, None)
    full = processor(images=tiny_image(20, 40), text=inputs.prompt + TARGET, return_tensors="pt")
    assert torch.equal(full["input_ids"], inputs.input_ids)
    assert torch.equal(inputs.model_kwargs()["cross_attention_mask"], full["cross_attention_mask"])


# ---- exactness and end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hw, n_layers, cross_layers", [((24, 40), 3, (1,)), ((20, 40), 4, (0, 2))])
def test_text_to_query_equals_bimodal_oracle(hw, n_layers, cross_layers):
    """A cross-attention layer between self-attention layers is where R̄_ttᵀ matters (dropping the transpose or
    R̄_tt changes these maps by 0.4-2 %): the rule is checked there, and first and in the middle of four layers."""
    model, processor = tiny_mllama(text_layers=n_layers, cross_attention_layers=cross_layers)
    ex = RGAE(model, processor)
    inputs = ex.prepare(tiny_image(*hw), TARGET, None)
    result = ex.compute(inputs)
    oracle = bimodal_oracle(model, inputs)
    assert_close_relative(result["text_to_query"], oracle, 1e-6)
    assert_close_relative(result["text_to_patch"], oracle @ inputs.layout.query_to_patch, 1e-6)
    assert_close_relative(ex.compute(inputs, grad_batch=3)["text_to_query"], result["text_to_query"], 1e-12)


@pytest.mark.slow
def test_end_to_end_image_map_figures_and_generated_target(mllama, tmp_path):
    from rgae.viz import save_figures

    model, processor = mllama
    ex = RGAE(model, processor)
    e = ex.attribute(tiny_image(24, 40), target=TARGET)
    assert e.text_to_query.shape == (len(e.output_tokens), 20) and e.text_to_patch.shape == (len(e.output_tokens), 16)
    assert e.patch_grid is None and len(e.layout.views) == 4
    assert tuple(e.image_map().shape) == (24, 40) and tuple(e.image_map(word="circle").shape) == (24, 40)
    assert float(e.image_map().sum()) > 0
    paths = save_figures(e, tmp_path, dpi=50, words=False)
    assert paths and all(p.stat().st_size > 0 for p in paths)
    again = Explanation.load(e.save(tmp_path / "explanation"))
    assert torch.equal(again.image_map(), e.image_map()) and again.layout.views == e.layout.views
    # target=None: the greedy answer, which teacher forcing reproduces token for token.
    inputs = ex.prepare(tiny_image(24, 40), None, None, max_new_tokens=3)
    with torch.no_grad():
        logits = model(**inputs.model_kwargs(), use_cache=False).logits
    assert logits[0, inputs.predicting_positions].argmax(-1).tolist() == inputs.target_ids.tolist()
    assert ex._attribute(inputs).text_to_patch.shape == (inputs.target_ids.numel(), 16)


def test_raw_attention_reads_the_last_cross_attention_layer(mllama):
    model, processor = mllama
    ex = RawAttention(model, processor)
    inputs = ex.prepare(tiny_image(24, 40), TARGET, None)
    _, seen = recorded_forward(model, inputs, [model.model.language_model.layers[1].cross_attn], grad=False)
    expected = seen[0][0].mean(0)[inputs.predicting_positions]
    # Eager reads the very probabilities recorded; the interface capture recomputes them in float64, where Mllama's
    # eager kernel takes its softmax in float32: equal to float32 rounding.
    for capture, tol in (("eager", 1e-12), ("interface", 1e-6)):
        e = ex._attribute(inputs, capture=capture)
        assert torch.allclose(e.text_to_query, expected, rtol=tol, atol=1e-12), capture
        assert torch.allclose(e.text_to_patch, expected @ inputs.layout.query_to_patch, rtol=tol, atol=1e-12), capture


def test_rollout_refuses_clearly(mllama):
    model, processor = mllama
    with pytest.raises(ValueError, match="rollout is not defined"):
        AttentionRollout(model, processor).attribute(tiny_image(24, 40), target=TARGET)


def test_gradcam_and_occlusion_map_the_tiles(mllama):
    # Grad-CAM on the projector's input keys (CLS and padding tiles left out), one weight vector per tile; occlusion
    # of original-image regions (tests/families/test_multiview_baselines.py checks both against references).
    model, processor = mllama
    cam = GradCAM(model, processor).attribute(tiny_image(24, 40), target=TARGET)
    assert cam.text_to_patch.shape == (len(cam.output_tokens), cam.layout.n_patches) and len(cam.layout.views) > 1
    assert float(cam.text_to_patch.abs().max()) > 0 and cam.image_map().shape == (24, 40)
    occlusion = Occlusion(model, processor).attribute(tiny_image(24, 40), target=TARGET, backend="torch", grid=(2, 2))
    assert occlusion.patch_grid == (2, 2) and float(occlusion.text_to_patch.abs().max()) > 0


def test_through_vision_is_refused_clearly(mllama):
    model, processor = mllama
    with pytest.raises(ValueError, match="through_vision=True is not supported yet"):
        RGAE(model, processor).attribute(tiny_image(24, 40), target=TARGET, through_vision=True)


# ---- planted evidence ----------------------------------------------------------------------------------------------
def planted_mllama():
    """Vision evidence exactly where the image is bright: no position/tile embeddings, no CLS content, no vision
    residual branches (a token's features are layer norms of its patch embedding, 0 for a black patch), no
    layer-norm or projector bias (a black patch's key and value are 0), processor mean 0 / std 1."""
    model, processor = tiny_mllama(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    vision = model.model.vision_model
    with torch.no_grad():
        vision.class_embedding.zero_()
        for module in (vision.gated_positional_embedding, vision.pre_tile_positional_embedding,
                       vision.post_tile_positional_embedding):
            for p in module.parameters():
                p.zero_()
        vision.layernorm_pre.bias.zero_()
        vision.layernorm_post.bias.zero_()
        for layer in [*vision.transformer.layers, *vision.global_transformer.layers]:
            for p in [*layer.self_attn.o_proj.parameters(), *layer.mlp.fc2.parameters()]:
                p.zero_()
        model.model.multi_modal_projector.bias.zero_()
    return model, processor


@pytest.mark.parametrize("patch", [1, 6])
def test_planted_patch_of_one_tile_lights_up(patch):
    model, processor = planted_mllama()
    image = np.zeros((24, 40, 3), dtype=np.uint8)
    ex = RGAE(model, processor)
    box = ex.prepare(image, TARGET, None).layout.patch_boxes()[patch].tolist()
    x0, y0, x1, y1 = box
    image[int(np.ceil(y0)) + 2 : int(y1) - 2, int(np.ceil(x0)) + 2 : int(x1) - 2] = 255
    e = ex.attribute(image, target=TARGET)
    assert e.text_to_patch.shape[1] == 16
    assert float(e.text_to_patch[:, patch].sum()) > 0
    others = torch.ones(16, dtype=torch.bool)
    others[patch] = False
    assert float(e.text_to_patch[:, others].abs().max()) == 0.0
    heat = e.image_map()
    ys, xs = slice(int(np.floor(y0)), int(np.ceil(y1))), slice(int(np.floor(x0)), int(np.ceil(x1)))
    assert float(heat[ys, xs].sum() / heat.sum()) > 1 - 1e-9
    y, x = divmod(int(heat.argmax()), heat.shape[1])  # the pointing point
    assert x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1
