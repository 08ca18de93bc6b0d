"""Gemma3: the AvgPool2d connector's pooling operator, the bidirectional image block (token_type_ids) the explainer
passes and the oracle sees, pan-and-scan crops as views; R-GAE against the full-matrix oracle, end to end, planted
region. Tiny real models (tests/families/tiny_gemma3.py)."""

from __future__ import annotations

import pytest
import torch

from rgae import RGAE
from rgae.adapters.gemma3 import pooling_jacobian
from rgae.rules import pooling_map
from rgae.viz import save_figures
from tests.families import layout_probes as probes
from tests.families.tiny_gemma3 import IMAGE, tiny_gemma3, tiny_gemma3_processor
from tests.family_checks import assert_close_relative, full_matrix_text_to_query

# 48×80: aspect 1.67, so pan-and-scan cuts two 40×48 crops; every view is resized (squashed) to 32×32.
IMAGE_HW = (48, 80)


def noise(hw=IMAGE_HW, seed=0):
    return probes.noise_image(hw, seed)


@pytest.fixture(scope="module")
def model64():
    return tiny_gemma3(dtype=torch.float64)


@pytest.fixture(scope="module")
def explainer(model64):
    return RGAE(model64, tiny_gemma3_processor())


@pytest.fixture(scope="module")
def pas_explainer(model64):
    return RGAE(model64, tiny_gemma3_processor(pan_and_scan=True))


def test_query_to_patch_is_the_avg_pool_jacobian(explainer, model64):
    layout = explainer.prepare(noise(), "a", None).layout
    assert layout.rule == "pooling" and layout.query_grid == (4, 4) and layout.views[0].grid == (8, 8)
    # Against the adaptive-pooling operator (windows [floor(i·8/4), ceil((i+1)·8/4))) and autograd through the model's
    # own connector module on random features.
    torch.testing.assert_close(layout.query_to_patch, pooling_map((8, 8), (4, 4), dtype=torch.float64))
    pool = model64.model.multi_modal_projector.avg_pool
    jac = torch.autograd.functional.jacobian(lambda x: pool(x.view(1, 1, 8, 8)).flatten(),
                                             torch.randn(64, dtype=torch.float64))
    torch.testing.assert_close(layout.query_to_patch, jac, rtol=0, atol=1e-15)
    assert pooling_jacobian(torch.nn.AvgPool2d(3), (7, 7)).sum(1).tolist() == [1.0] * 4  # floor windows of 3


def test_the_image_block_is_bidirectional_only_with_token_type_ids(explainer, model64):
    inputs = explainer.prepare(noise(), "a red circle", None)
    assert "token_type_ids" in inputs.extra
    kwargs = inputs.model_kwargs()
    assert kwargs["token_type_ids"][0, inputs.prompt_len:].tolist() == [0, 0, 0]  # the target is text
    first, last = inputs.layout.positions[0], inputs.layout.positions[-1]
    with torch.no_grad():
        full = model64(**kwargs, output_attentions=True).attentions[-1][0]  # the full-attention layer
        causal = model64(**{k: v for k, v in kwargs.items() if k != "token_type_ids"},
                         output_attentions=True).attentions[-1][0]
    assert bool((full[:, first, last] > 0).all()) and bool((causal[:, first, last] == 0).all())
    t = int(inputs.target_positions[0])
    assert bool((full[:, t, t + 1:] == 0).all())  # the target stays causal


def test_text_to_query_equals_the_full_matrix_oracle_and_text_to_patch_composes(explainer, model64):
    inputs = explainer.prepare(noise(), "a red circle", None)
    out = explainer.compute(inputs)
    assert_close_relative(out["text_to_query"], full_matrix_text_to_query(model64, inputs), 1e-6)
    torch.testing.assert_close(out["text_to_patch"], out["text_to_query"] @ inputs.layout.query_to_patch,
                               rtol=1e-12, atol=1e-15)


def test_a_pixel_reaches_exactly_its_patch(explainer):
    assert len(probes.check_pixel_reaches_its_patches(explainer, noise(), (IMAGE, IMAGE))) == 1


@pytest.mark.parametrize("patch", [0, 27, 63])
def test_a_connector_patch_reaches_exactly_its_pooling_window_token(explainer, patch):
    tokens = probes.check_patch_reaches_its_tokens(explainer, noise(), patch, linear=False)
    row, col = divmod(patch, 8)
    assert tokens == [(row // 2) * 4 + col // 2]


def test_pan_and_scan_crops_are_views(pas_explainer, model64):
    inputs = pas_explainer.prepare(noise(), "a red circle", None)
    layout = inputs.layout
    assert [(v.name, v.box) for v in layout.views] == [
        ("image", (0.0, 0.0, 80.0, 48.0)), ("crop 0", (0.0, 0.0, 40.0, 48.0)), ("crop 1", (40.0, 0.0, 80.0, 48.0))]
    block = pooling_map((8, 8), (4, 4), dtype=torch.float64)
    torch.testing.assert_close(layout.query_to_patch, torch.block_diag(block, block, block))
    out = pas_explainer.compute(inputs)
    assert_close_relative(out["text_to_query"], full_matrix_text_to_query(model64, inputs), 1e-6)
    patches = probes.check_pixel_reaches_its_patches(pas_explainer, noise(), (IMAGE, IMAGE))
    assert len(patches) == 2 and patches[0] < 64 <= patches[1]
    assert probes.check_patch_reaches_its_tokens(pas_explainer, noise(), 64 + 9, linear=False) == [16]


def test_end_to_end_teacher_forced_generated_and_through_vision(explainer):
    e = explainer.attribute(noise(), target="a red circle")
    assert e.patch_grid == (8, 8) and e.query_grid == (4, 4)
    assert e.image_map().shape == IMAGE_HW and e.image_map(word="red").shape == IMAGE_HW
    g = explainer.attribute(noise(), target=None, max_new_tokens=3)
    assert g.text_to_query.shape[1] == 16 and g.image_map().shape == IMAGE_HW
    v = explainer.attribute(noise(), target="a red circle", through_vision=True)  # one view: the ViT is propagated
    assert v.text_to_patch.shape == (3, 64) and not torch.equal(v.text_to_patch, e.text_to_patch)


@pytest.mark.slow
def test_figures_are_written(explainer, tmp_path):
    e = explainer.attribute(noise(), target="a red circle")
    paths = save_figures(e, tmp_path, dpi=30, words=False)
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_planted_region_lights_up_in_the_image_map():
    model = tiny_gemma3(dtype=torch.float64, text_layers=1, seed=1)
    explainer = RGAE(model, tiny_gemma3_processor(image_mean=[0.0] * 3, image_std=[1.0] * 3))
    probes.plant(model, explainer.adapter)
    region = (8, 16, 16, 24)  # one 2×2 pooling window (4-px patches) of a 32×32 image: soft token 9
    dark, bright = probes.bright_square(IMAGE, IMAGE, region)
    e = explainer.attribute(bright, target=probes.planted_target(explainer, dark, bright))
    assert torch.nonzero(e.text_to_query[0]).flatten().tolist() == [9]
    assert probes.pointing_in(e.image_map(), region)


def test_docstring_examples():
    import rgae.adapters.gemma3 as module
    import tests.families.tiny_gemma3 as tiny

    probes.run_doctests(module, tiny)
