"""LLaVA-NeXT (and LLaVA-NeXT-Video's image path): anyres layout, identity Query-to-Patch, R-GAE against the
full-matrix oracle, end to end, planted region. Tiny real models (tests/families/tiny_llava_next.py)."""

from __future__ import annotations

import pytest
import torch

from rgae import RGAE
from rgae.viz import save_figures
from tests.families import layout_probes as probes
from tests.families.tiny_llava_next import (
    TILE,
    tiny_llava_next,
    tiny_llava_next_processor,
    tiny_llava_next_video_processor,
)
from tests.family_checks import assert_close_relative, full_matrix_text_to_query

# 40×88: best pinpoint 32×96, resized to 32×71 and padded 12 | 13 px: a base view + 3 tiles, padding on both sides.
IMAGE_HW = (40, 88)


def noise(hw=IMAGE_HW, seed=0):
    return probes.noise_image(hw, seed)


@pytest.fixture(scope="module")
def model64():
    return tiny_llava_next(dtype=torch.float64)


@pytest.fixture(scope="module")
def explainer(model64):
    return RGAE(model64, tiny_llava_next_processor())


def test_layout_of_a_wide_image_is_base_plus_padded_tiles(explainer):
    layout = explainer.prepare(noise(), "a red circle", None).layout
    assert [v.name for v in layout.views] == ["base", "tile 0,0", "tile 0,1", "tile 0,2"]
    assert layout.views[0].box == (0.0, 0.0, 88.0, 40.0)
    # The resized image is 71 px wide on a 96-px canvas, pasted at x = 12: the first tile starts 12 · 88/71 px left
    # of the image, the last ends 13 · 88/71 px right of it.
    assert layout.views[1].box[0] == pytest.approx(-12 * 88 / 71)
    assert layout.views[3].box[2] == pytest.approx(88 + 13 * 88 / 71)
    q2p, placeholder = layout.query_to_patch, layout.placeholder
    # 16 base tokens, then the 4×12 stitched tile grid unpadded to 4×8 (the processor's count), a newline per row.
    assert layout.n_tokens == 16 + 4 * 8 + 4 and int(placeholder.sum()) == 4
    assert torch.nonzero(placeholder).flatten().tolist() == [16 + 9 * r + 8 for r in range(4)]
    assert layout.rule == "identity"
    rows = q2p[~placeholder]
    assert bool((rows.sum(1) == 1).all()) and bool(((rows == 0) | (rows == 1)).all())
    # Base tokens are the base view's patches in order; the stitched grid's row 0 runs over tiles 0..2, skipping the
    # two padded patch columns at each end (tile 0's columns 0-1 and tile 2's columns 2-3).
    assert rows[:16].argmax(1).tolist() == list(range(16))
    assert rows[16:24].argmax(1).tolist() == [16 + 2, 16 + 3, 32, 33, 34, 35, 48, 49]
    assert int(q2p.sum(0).ne(0).sum()) == 16 + 32  # 16 padded tile patches reach no token


def test_a_pixel_reaches_exactly_its_patch_in_the_base_and_in_its_tile(explainer):
    patches = probes.check_pixel_reaches_its_patches(explainer, noise(), (TILE, TILE))
    assert len(patches) == 2 and patches[0] < 16 <= patches[1]


@pytest.mark.parametrize("patch", [5, 16 + 2, 16 + 16 + 7, 16 + 0])
def test_a_connector_patch_reaches_exactly_its_token(explainer, patch):
    tokens = probes.check_patch_reaches_its_tokens(explainer, noise(), patch, linear=True)
    assert len(tokens) == (0 if patch == 16 else 1)  # tile 0's column 0 is padding: unpadded away


def test_text_to_query_equals_the_full_matrix_oracle_and_text_to_patch_composes(explainer, model64):
    inputs = explainer.prepare(noise(), "a red circle", None)
    out = explainer.compute(inputs)
    assert_close_relative(out["text_to_query"], full_matrix_text_to_query(model64, inputs), 1e-6)
    q2p = inputs.layout.query_to_patch
    torch.testing.assert_close(out["text_to_patch"], out["text_to_query"] @ q2p, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out["query_to_patch"], q2p)


def test_end_to_end_teacher_forced_and_generated(explainer):
    e = explainer.attribute(noise(), target="a red circle")
    assert e.text_to_patch.shape == (3, 64) and e.patch_grid is None
    assert e.image_map().shape == IMAGE_HW and e.image_map(word="red").shape == IMAGE_HW
    assert float(e.image_map().sum()) > 0
    g = explainer.attribute(noise(), target=None, max_new_tokens=3)
    assert g.text_to_query.shape[1] == 52 and g.image_map().shape == IMAGE_HW


def test_the_video_model_explains_images_with_the_same_layout(explainer):
    model = tiny_llava_next(video=True, dtype=torch.float64)
    video_explainer = RGAE(model, tiny_llava_next_video_processor())
    inputs = video_explainer.prepare(noise(), "a red circle", None)
    assert torch.equal(inputs.layout.query_to_patch, explainer.prepare(noise(), "a", None).layout.query_to_patch)
    out = video_explainer.compute(inputs)
    assert_close_relative(out["text_to_query"], full_matrix_text_to_query(model, inputs), 1e-6)


@pytest.mark.slow
def test_figures_are_written(explainer, tmp_path):
    e = explainer.attribute(noise(), target="a red circle")
    paths = save_figures(e, tmp_path, dpi=30, words=False)
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_processor_and_model_that_disagree_are_refused(model64):
    other = RGAE(model64, tiny_llava_next_processor(image_grid_pinpoints=[[32, 32], [64, 64]]))
    with pytest.raises(ValueError, match="image_grid_pinpoints agree"):
        other.prepare(noise(), "a", None)
    cls_kept = tiny_llava_next(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_select_strategy='full'"):
        RGAE(cls_kept, tiny_llava_next_processor()).prepare(noise(), "a", None)


def test_attention_baselines_read_the_same_layout(model64):
    from rgae.methods import AttentionRollout, RawAttention

    for cls in (RawAttention, AttentionRollout):
        e = cls(model64, tiny_llava_next_processor()).attribute(noise(), target="a red")
        assert e.text_to_patch.shape == (2, 64) and e.image_map().shape == IMAGE_HW
        assert float(e.text_to_patch[:, 16:32].abs().sum()) > 0  # a tile reached through the packing


def test_planted_region_lights_up_in_the_image_map():
    model = tiny_llava_next(dtype=torch.float64, text_layers=1, seed=1)
    processor = tiny_llava_next_processor(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    explainer = RGAE(model, processor)
    probes.plant(model, explainer.adapter)
    # 32×64 fits the 32×64 pinpoint exactly: the region is base patch (1, 1) and tile 0,0's patches (1, 2), (1, 3).
    region = (16, 8, 32, 16)  # x0, y0, x1, y1
    dark, bright = probes.bright_square(32, 64, region)
    target = probes.planted_target(explainer, dark, bright)
    e = explainer.attribute(bright, target=target)
    image_map = e.image_map()
    assert probes.pointing_in(image_map, region)
    inside = image_map[region[1]:region[3], region[0]:region[2]].sum()
    assert float(inside) > 0.5 * float(image_map.sum())


def test_docstring_examples():
    import rgae.adapters.llava_next as module
    import tests.families.tiny_llava_next as tiny

    probes.run_doctests(module, tiny)

