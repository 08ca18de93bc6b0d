"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL: dynamic resolution, 2×2 merge blocks in merge-block order (the block rule), packed
vision attention split by cu_seqlens, Qwen2.5-VL's window order, Qwen3-VL's DeepStack, several images per prompt
(rgae/adapters/qwen_vl_base.py, qwen2_vl.py, qwen2_5_vl.py, qwen3_vl.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rgae import RGAE
from rgae.adapters import families, get_adapter
from rgae.capture import AttentionCaptureError
from tests.families.block_checks import (
    FILTER_SUPPORT,
    ConnectorInput,
    _filter_reach,
    _overlapping,
    check_exact_maps,
    check_planted,
    edit_connector_input,
    plant,
    planted_image,
)
from tests.families.qwen_vl_checks import (
    branch_support,
    full_matrix_vision_query_to_patch,
    merge_order_by_hand,
    patch_tokens_by_hand,
    vision_records,
)
from tests.families.tiny_qwen_vl import tiny_image, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl, tiny_qwen3_vl_moe
from tests.family_checks import assert_close_relative, changed_rows, full_matrix_text_to_query

#: builder, family name, adapter class, two image sizes of different aspect ratios (whole merge blocks: the
#: processor keeps them at scale 1), patch size.
CASES = {
    "qwen2_vl": (tiny_qwen2_vl, "qwen2-vl", "QwenVLAdapter", [(56, 84), (112, 56)], 14),
    "qwen2_5_vl": (tiny_qwen2_5_vl, "qwen2.5-vl", "Qwen2_5_VLAdapter", [(84, 112), (112, 56)], 14),
    "qwen3_vl": (tiny_qwen3_vl, "qwen3-vl", "Qwen3VLAdapter", [(64, 96), (128, 64)], 16),
    # Qwen3-VL-MoE (the 30B-A3B / 235B-A22B class): Qwen3-VL's vision side, an LLM of sparse expert MLPs.
    "qwen3_vl_moe": (tiny_qwen3_vl_moe, "qwen3-vl", "Qwen3VLAdapter", [(64, 96), (128, 64)], 16),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request):
    build, family, adapter_class, sizes, patch = CASES[request.param]
    model, processor = build()
    return request.param, model, processor, RGAE(model, processor), sizes, patch


def test_the_family_is_found_and_each_image_is_one_view_at_its_own_resolution(tiny):
    name, model, processor, explainer, sizes, patch = tiny
    _, family, adapter_class, _, _ = CASES[name]
    assert family in [f.name for f in families()] and type(get_adapter(model)).__name__ == adapter_class
    tok = processor.tokenizer
    for hw in sizes:
        inputs = explainer.prepare(tiny_image(*hw), "a red circle", None)
        layout = inputs.layout
        grid = (hw[0] // patch, hw[1] // patch)
        assert inputs.extra["image_grid_thw"].tolist() == [[1, *grid]]
        assert [v.grid for v in layout.views] == [grid] and layout.views[0].box == (0, 0, hw[1], hw[0])
        assert layout.query_grid == (grid[0] // 2, grid[1] // 2) and layout.n_tokens == math.prod(grid) // 4
        ids = inputs.input_ids[0]
        first, last = int(layout.positions[0]), int(layout.positions[-1])
        assert tok.convert_ids_to_tokens([int(ids[first - 1]), int(ids[last + 1])]) == ["<|vision_start|>",
                                                                                          "<|vision_end|>"]
        assert bool((ids[layout.positions] == tok.convert_tokens_to_ids("<|image_pad|>")).all())
        # The forward's M-RoPE input: 1 at the image tokens, 0 elsewhere, extended with 0 over the target.
        mm = inputs.model_kwargs()["mm_token_type_ids"][0]
        assert mm.shape == ids.shape and torch.equal(mm.nonzero().flatten(), layout.positions)


def test_tokens_are_blocks_in_raster_order_and_the_sequence_is_in_merge_block_order(tiny):
    name, _, _, explainer, sizes, _ = tiny
    ad = explainer.adapter
    for hw in sizes:
        inputs = explainer.prepare(tiny_image(*hw), "a", None)
        grid = inputs.extra["image_grid_thw"][0].cpu()
        h, w = (int(v) for v in grid[1:])
        # The adapter reads the order from the model's vision position ids; the processor documents its reshape.
        assert torch.equal(ad.sequence_order(grid), merge_order_by_hand((h, w)))
        q2p = inputs.layout.query_to_patch
        for t, (br, bc) in enumerate(np.ndindex(h // 2, w // 2)):
            block = [(2 * br + i) * w + 2 * bc + j for i in range(2) for j in range(2)]
            assert torch.nonzero(q2p[t]).flatten().tolist() == block and bool((q2p[t, block] == 0.25).all())


def test_text_to_query_is_the_full_matrix_oracle_with_both_captures(tiny):
    _, model, _, explainer, sizes, _ = tiny
    inputs = explainer.prepare(tiny_image(*sizes[0]), "a red circle", None)
    check_exact_maps(explainer, inputs)
    eager = explainer.compute(inputs, capture="eager")["text_to_query"]
    assert_close_relative(eager, full_matrix_text_to_query(model, inputs), 1e-6)


def _patch_embeddings(model, inputs) -> torch.Tensor:
    seen = {}
    handle = model.model.visual.patch_embed.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        with torch.no_grad():
            model(**inputs.model_kwargs(), use_cache=False)
    finally:
        handle.remove()
    return seen["out"].detach()


def _changed_patches_for_pixels(explainer, image: np.ndarray, patch: int, patch_px: int,
                                margin: int = 2) -> tuple[list, list]:
    """Perturb patch ``patch``'s box (shrunk by ``margin`` px) in the original image: (raster patches whose
    embedding changed, read through the adapter's sequence order; the patches the layout's boxes say)."""
    base = explainer.prepare(image, "a", None)
    layout = base.layout
    boxes = layout.patch_boxes()
    bx0, by0, bx1, by1 = boxes[patch].tolist()
    region = (math.ceil(bx0) + margin, math.ceil(by0) + margin, math.floor(bx1) - margin, math.floor(by1) - margin)
    expected = _overlapping(boxes, region)
    reach = _overlapping(boxes, region, _filter_reach(layout, patch_px, FILTER_SUPPORT["bicubic"]))
    assert expected == reach, "test design: the region is within the resampling filter's reach of other patches"
    bumped = image.copy()
    x0, y0, x1, y1 = region
    bumped[y0:y1, x0:x1] = 255 - bumped[y0:y1, x0:x1]
    after = explainer.prepare(bumped, "a", None)
    changed = changed_rows(_patch_embeddings(explainer.model, base), _patch_embeddings(explainer.model, after))
    order = explainer.adapter.sequence_order(base.extra["image_grid_thw"][0].cpu())
    return sorted(int(order[s]) for s in changed), expected


def test_perturbing_one_patch_box_changes_exactly_that_patch_for_two_aspect_ratios(tiny):
    _, _, _, explainer, sizes, patch_px = tiny
    for hw in sizes:
        n = (hw[0] // patch_px) * (hw[1] // patch_px)
        for patch in (1, n // 2 + 1, n - 2):
            changed, expected = _changed_patches_for_pixels(explainer, tiny_image(*hw, seed=1), patch, patch_px)
            assert changed == expected == [patch], (hw, patch)


def test_a_resized_image_still_maps_each_patch_box_to_its_patch(tiny):
    name, _, _, explainer, _, patch_px = tiny
    hw = (60, 90) if patch_px == 14 else (70, 100)  # not whole merge blocks: smart_resize stretches it
    inputs = explainer.prepare(tiny_image(*hw), "a", None)
    grid = tuple(int(v) for v in inputs.extra["image_grid_thw"][0, 1:])
    assert inputs.layout.views[0].box == (0, 0, hw[1], hw[0]) and grid[0] * patch_px != hw[0]
    changed, expected = _changed_patches_for_pixels(explainer, tiny_image(*hw, seed=2), grid[1] + 2, patch_px,
                                                    margin=4)  # bicubic reaches 3 px
    assert changed == expected == [grid[1] + 2]


def test_query_to_patch_is_the_mergers_jacobian_block_in_raster_order(tiny):
    name, model, _, explainer, sizes, _ = tiny
    visual = model.model.visual
    for hw in sizes:
        inputs = explainer.prepare(tiny_image(*hw), "a", None)
        layout = inputs.layout
        tokens = explainer.adapter.vision_tokens(layout, inputs)
        support = branch_support(model, inputs, visual.merger, tokens)
        assert torch.equal(support, layout.query_to_patch > 0), hw
        # Qwen3-VL: every DeepStack merger packs the same blocks; its features reach the LLM at the same positions
        # (added after decoder layer k, so they show at the input of layer k + 1).
        for k, merger in enumerate(getattr(visual, "deepstack_merger_list", [])):
            assert torch.equal(branch_support(model, inputs, merger, tokens, at_layer=k + 1),
                               layout.query_to_patch > 0), (hw, k)


def test_end_to_end_maps_figures_and_generated_target(tiny, tmp_path):
    from rgae.viz import save_figures

    _, _, _, explainer, sizes, _ = tiny
    image = tiny_image(*sizes[1])
    e = explainer.attribute(image, target="a red circle")
    layout = e.layout
    assert e.image_map().shape == sizes[1] and e.patch_map().shape == layout.views[0].grid
    assert e.text_to_query.shape == (3, layout.n_tokens) and e.query_map(token=0).shape == layout.query_grid
    assert e.options["query_to_patch_rule"] == "block"
    assert save_figures(e, tmp_path, dpi=50, words=False)
    from rgae import Explanation

    loaded = Explanation.load(e.save(tmp_path / "explanation"))
    assert loaded.layout.views == layout.views and torch.allclose(loaded.image_map(), e.image_map())
    assert explainer.adapter.describe()["patch_grid"] == "per image (image_grid_thw)"
    generated = explainer.attribute(image, max_new_tokens=3)
    assert generated.image_map().shape == sizes[1] and 1 <= len(generated.output_tokens) <= 3


# ---- through_vision ----------------------------------------------------------------------------------------------
VISION_CASES = {
    "qwen2_vl": lambda: (*tiny_qwen2_vl(), (56, 84)),
    # 84×112: 3×4 merge blocks in windows of 2×2 blocks (four windows, two of them partial); layer 1 attends fully.
    "qwen2_5_vl": lambda: (*tiny_qwen2_5_vl(), (84, 112)),
    "qwen3_vl_without_deepstack": lambda: (*tiny_qwen3_vl(deepstack_visual_indexes=()), (64, 96)),
}


@pytest.fixture(scope="module", params=sorted(VISION_CASES))
def vision_case(request):
    model, processor, hw = VISION_CASES[request.param]()
    explainer = RGAE(model, processor)
    return request.param, explainer, explainer.prepare(tiny_image(*hw), "a red circle", None)


def test_through_vision_equals_the_block_diagonal_full_matrix_oracle(vision_case):
    name, explainer, inputs = vision_case
    out = explainer.compute(inputs, through_vision=True)
    oracle = full_matrix_vision_query_to_patch(explainer.model, inputs)
    per_token = out["query_to_patch_per_token"]
    assert per_token is not None and per_token.shape == oracle.shape
    assert_close_relative(per_token, oracle, 1e-6)
    assert_close_relative(out["text_to_patch"], torch.einsum("tm,tmn->tn", out["text_to_query"].double(), oracle))
    assert not torch.allclose(per_token[0], inputs.layout.query_to_patch)  # the tower moved relevance


def test_qwen2_5_windows_are_undone(vision_case):
    name, explainer, inputs = vision_case
    tokens = explainer.adapter.patch_tokens(inputs.layout, inputs)
    sequence = torch.empty_like(tokens)
    sequence[explainer.adapter.sequence_order(inputs.extra["image_grid_thw"][0].cpu())] = torch.arange(tokens.numel())
    if name != "qwen2_5_vl":
        assert torch.equal(tokens, sequence)  # no reordering: the attention runs in merge-block order
        return
    # Window (0, 0) (merge blocks (0,0), (0,1), (1,0), (1,1): patch rows 0-3, columns 0-3) comes first.
    assert sorted(tokens.view(6, 8)[:4, :4].flatten().tolist()) == list(range(16))
    assert not torch.equal(tokens, sequence)


def test_through_vision_needs_the_interface_capture(vision_case):
    _, explainer, inputs = vision_case
    with pytest.raises(AttentionCaptureError, match="returned no attention probabilities.*use capture='interface'"):
        explainer.compute(inputs, through_vision=True, capture="eager")


def test_through_vision_is_refused_for_qwen3_vl_with_deepstack():
    model, processor = tiny_qwen3_vl()
    explainer = RGAE(model, processor)
    with pytest.raises(ValueError, match=r"not supported for Qwen3VLForConditionalGeneration with DeepStack.*\[0\]"):
        explainer.attribute(tiny_image(64, 96), target="a", through_vision=True)


# ---- several images ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_images():
    model, processor = tiny_qwen2_5_vl()
    explainer = RGAE(model, processor)
    images = [tiny_image(84, 112), tiny_image(56, 84, seed=1)]
    return explainer, images, explainer.prepare_images(images, "a red circle", None)


def test_each_image_of_a_prompt_gets_its_own_layout_and_exact_maps(two_images):
    explainer, images, prepared = two_images
    first, second = (p.layout for p in prepared)
    assert [v.grid for v in first.views] == [(6, 8)] and [v.grid for v in second.views] == [(4, 6)]
    assert int(first.positions[-1]) < int(second.positions[0]) and prepared[1].image.shape == (56, 84, 3)
    for p in prepared:
        check_exact_maps(explainer, p)
    out = explainer.compute(prepared[1], through_vision=True)
    assert_close_relative(out["query_to_patch_per_token"], full_matrix_vision_query_to_patch(
        explainer.model, prepared[1], image=1), 1e-6)
    # The second image's patches follow the first image's 48 in the packed vision sequence.
    assert int(explainer.adapter.patch_tokens(second, prepared[1]).min()) == 48


def test_attribute_images_returns_one_explanation_per_image(two_images):
    explainer, images, _ = two_images
    explanations = explainer.attribute_images(images, target="a red circle")
    assert [e.image_map().shape for e in explanations] == [(84, 112), (56, 84)]
    assert explanations[0].target_text == explanations[1].target_text == "a red circle"
    from tests.families.tiny_llava_next import tiny_llava_next, tiny_llava_next_processor

    with pytest.raises(ValueError, match="LlavaNextForConditionalGeneration: one image per prompt is explained for "
                                         "this family, got 2"):
        RGAE(tiny_llava_next(dtype=torch.float64), tiny_llava_next_processor()).attribute_images(images, target="a")


# ---- inputs and errors -------------------------------------------------------------------------------------------
def test_mm_token_type_ids_are_made_when_a_processor_gives_none(tiny):
    _, model, processor, explainer, sizes, _ = tiny
    batch = processor(images=tiny_image(*sizes[0]), text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]}], add_generation_prompt=True), return_tensors="pt")
    given = batch.pop("mm_token_type_ids")
    assert torch.equal(explainer.adapter.model_inputs(batch)["mm_token_type_ids"], given.to(torch.int32))


def test_prompts_the_processor_did_not_build_are_refused(tiny):
    _, model, processor, explainer, sizes, _ = tiny
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}],
                                         add_generation_prompt=True)
    batch = processor(images=tiny_image(*sizes[0]), text=text, return_tensors="pt")
    video = dict(batch, image_grid_thw=torch.tensor([[2, *batch["image_grid_thw"][0, 1:].tolist()]]))
    with pytest.raises(ValueError, match="one temporal patch"):
        explainer.adapter.layout(processor, video, sizes[0])
    ids = batch["input_ids"].clone()
    ids[ids == processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")] = 0
    with pytest.raises(ValueError, match="not between <.vision_start.>"):
        explainer.adapter.layout(processor, dict(batch, input_ids=ids), sizes[0])
    with pytest.raises(ValueError, match="needs the processor's image_grid_thw"):
        explainer.adapter.layout(processor, {"input_ids": batch["input_ids"]}, sizes[0])


# ---- planted -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_planted_region_lights_up(name):
    build, _, _, sizes, patch = CASES[name]
    model, processor = build(text_layers=1, processor_kwargs={"image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    visual = model.model.visual
    plant(model, visual, visual.merger, model.model.language_model, visual.patch_embed.proj)
    with torch.no_grad():
        for name_, p in visual.named_parameters():
            if "pos_embed" in name_ or (".mlp." in name_ and "blocks" in name_):  # Qwen3's position table, Qwen2's Mlp
                p.zero_()
    h, w = sizes[0]
    block = 2 * patch
    region = (block, block, 2 * block, 2 * block)  # merge block (1, 1): one LLM token
    e = check_planted(RGAE(model, processor), planted_image(h, w, region), region, patch, "bicubic")
    cols = w // block
    assert torch.nonzero(e.text_to_query.mean(0)).flatten().tolist() == [cols + 1]


def test_docstring_examples():
    import rgae.adapters.qwen_vl_base
    import tests.families.tiny_qwen_vl
    from tests.families.layout_probes import run_doctests

    run_doctests(rgae.adapters.qwen_vl_base, tests.families.tiny_qwen_vl)


def test_the_baselines_read_the_layout_or_say_they_cannot():
    import rgae

    model, processor = tiny_qwen2_vl()
    image = tiny_image(56, 84)
    for cls in (rgae.RawAttention, rgae.AttentionRollout):
        e = cls(model, processor).attribute(image, target="a red circle")
        assert e.image_map().shape == (56, 84) and float(e.text_to_patch.sum()) > 0
    e = rgae.GradCAM(model, processor).attribute(image, target="a red circle")
    assert e.image_map().shape == (56, 84) and float(e.text_to_patch.sum()) > 0
    # Occlusion blanks cells of the original image and runs the processor again: no internal order involved.
    e = rgae.Occlusion(model, processor).attribute(image, target="a red circle", backend="torch")
    assert e.image_map().shape == (56, 84) and float(e.text_to_patch.abs().sum()) > 0


# ---- Grad-CAM and the gradient split on the merger's packed input --------------------------------------------------
def _rows_by_hand(model, inputs, image: int = 0) -> torch.Tensor:
    """``[N]``: the row of the merger's input holding each raster patch of image ``image``: the merger reads the tower's
    output in its attention order (Qwen2.5-VL: windows), which the tower's own gradient tells (qwen_vl_checks)."""
    return patch_tokens_by_hand(vision_records(model, inputs), inputs.extra["image_grid_thw"].cpu(), image)


def reference_gradcam(model, inputs, patch_rows: torch.Tensor) -> torch.Tensor:
    """``[T, N]`` float64 by the definition: ``ReLU(Σ_c w_c (A_c − Ā_c))``, A = the merger's input rows of the
    layout's patches (raster order), w = the target logit's gradient averaged over those rows."""
    seen = {}

    def leaf(x):
        seen["x"] = x.detach().requires_grad_(True)
        return seen["x"]

    with torch.enable_grad(), edit_connector_input(ConnectorInput(model.model.visual.merger, where="input"), leaf):
        logits = model(**inputs.model_kwargs(), use_cache=False).logits
    x = seen["x"][0]  # [R, C]: the merger's packed input
    a = x.detach()[patch_rows].double()
    a = a - a.mean(0)
    maps = []
    for pos, tok in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
        (g,) = torch.autograd.grad(logits[0, pos, tok], seen["x"], retain_graph=True)
        maps.append((a * g[0, patch_rows].double().mean(0)).sum(-1).clamp(min=0))
    return torch.stack(maps)


def test_gradcam_reads_the_mergers_packed_input_in_raster_order(tiny):
    import rgae

    _, model, processor, explainer, sizes, _ = tiny
    gradcam = rgae.GradCAM(model, processor)
    for hw in sizes:
        inputs = gradcam.prepare(tiny_image(*hw), "a red circle", None)
        got = gradcam._attribute(inputs).text_to_patch
        expected = reference_gradcam(model, inputs, _rows_by_hand(model, inputs))
        assert float(expected.amax()) > 0 and got.shape == expected.shape
        assert_close_relative(got, expected, 1e-9)


def test_gradcam_of_one_image_of_several_reads_only_its_rows(two_images):
    import rgae

    explainer, images, _ = two_images
    gradcam = rgae.GradCAM(explainer.model, explainer.processor)
    for i, inputs in enumerate(gradcam.prepare_images(images, "a red circle", None)):
        expected = reference_gradcam(explainer.model, inputs, _rows_by_hand(explainer.model, inputs, i))
        assert_close_relative(gradcam._attribute(inputs).text_to_patch, expected, 1e-9)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl_without_deepstack"])
def test_gradient_split_equals_the_per_query_reference(name):
    from tests.families.test_gradient_split import check_against_reference

    if name == "qwen3_vl_without_deepstack":
        (model, processor), hw = tiny_qwen3_vl(deepstack_visual_indexes=()), (64, 96)
    else:
        (model, processor), hw = CASES[name][0](), CASES[name][3][0]
    explainer = RGAE(model, processor)
    inputs = explainer.prepare(tiny_image(*hw), "a red circle", None)
    check_against_reference(explainer, inputs, ConnectorInput(model.model.visual.merger, where="input"),
                            patch_rows=_rows_by_hand(model, inputs))


def test_gradient_split_of_the_second_image_equals_the_reference(two_images):
    from tests.families.test_gradient_split import check_against_reference

    explainer, _, prepared = two_images
    model = explainer.model
    check_against_reference(explainer, prepared[1], ConnectorInput(model.model.visual.merger, where="input"),
                            patch_rows=_rows_by_hand(model, prepared[1], 1))


def test_gradient_split_is_refused_for_qwen3_vl_with_deepstack():
    model, processor = tiny_qwen3_vl()
    with pytest.raises(ValueError, match=r"q2p_rule='gradient' is not supported for Qwen3VLForConditionalGeneration"
                                         r" with DeepStack.*\[0\]"):
        RGAE(model, processor).attribute(tiny_image(64, 96), target="a", q2p_rule="gradient")


def test_qwen3_vl_moe_with_the_grouped_experts_kernel_gives_the_float64_maps(monkeypatch):
    """In float32 the experts run transformers' grouped matmul (what a user's model runs); the maps equal the float64
    per-expert loop's to float32 precision."""
    import torch.nn.functional as F

    calls = []
    grouped = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped(*a, **k))
    reference, processor = tiny_qwen3_vl_moe()
    model, _ = tiny_qwen3_vl_moe(dtype=torch.float32)
    model.config.text_config._experts_implementation = "grouped_mm"
    image = tiny_image(64, 96)
    got = RGAE(model, processor).attribute(image, target="a red circle").text_to_patch
    assert calls, "the grouped experts kernel did not run"
    expected = RGAE(reference, processor).attribute(image, target="a red circle").text_to_patch
    assert_close_relative(got.double(), expected, 1e-5)
