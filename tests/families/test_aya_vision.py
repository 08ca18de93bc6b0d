"""Aya Vision: tiles + global image, 2×2 pixel shuffle in the projector + SwiGLU MLP → the block rule
(rgae/adapters/aya_vision.py). Cohere2 text, SigLIP vision (no CLS)."""

from __future__ import annotations

import pytest

from rgae import RGAE
from rgae.adapters import families, get_adapter
from tests.families.block_checks import (
    ConnectorInput,
    check_exact_maps,
    check_pixels_of_one_patch,
    check_planted,
    check_query_to_patch_is_the_block_rule,
    check_unit_change_at_connector_input,
    plant,
    planted_image,
)
from tests.families.tiny_aya_vision import tiny_aya_vision, tiny_image


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_aya_vision()
    return model, processor, RGAE(model, processor)


def _connector_input(model):
    return ConnectorInput(model.model.multi_modal_projector, where="input")


def test_the_family_is_found_and_its_layout_is_tiles_plus_global(tiny):
    model, _, explainer = tiny
    assert "aya-vision" in [f.name for f in families()]
    assert type(get_adapter(model)).__name__ == "AyaVisionAdapter"
    layout = explainer.prepare(tiny_image(24, 40), "a red circle", None).layout
    assert [v.name for v in layout.views] == ["tile 0,0", "tile 0,1", "global"]
    assert [v.box for v in layout.views] == [(0, 0, 20, 24), (20, 0, 40, 24), (0, 0, 40, 24)]
    assert layout.n_tokens == 12 and layout.rule == "block"
    tall = explainer.prepare(tiny_image(70, 30), "a", None).layout  # 2 rows of tiles
    assert [v.name for v in tall.views] == ["tile 0,0", "tile 1,0", "global"]


def test_text_to_query_is_the_full_matrix_oracle_and_text_to_patch_composes(tiny):
    _, _, explainer = tiny
    check_exact_maps(explainer, explainer.prepare(tiny_image(24, 40), "a red circle", None))


def test_query_to_patch_is_the_connectors_jacobian_block(tiny):
    model, _, explainer = tiny
    check_query_to_patch_is_the_block_rule(model, explainer.prepare(tiny_image(24, 40), "a", None),
                                           _connector_input(model))


def test_a_unit_change_at_one_connector_patch_reaches_exactly_its_tokens(tiny):
    model, _, explainer = tiny
    inputs = explainer.prepare(tiny_image(24, 40), "a", None)
    check_unit_change_at_connector_input(model, inputs, _connector_input(model), patches=[1, 14, 19, 40])


@pytest.mark.parametrize("patch", [4, 16 + 11])
def test_perturbing_one_patch_box_changes_that_patch_in_each_view(tiny, patch):
    model, _, explainer = tiny
    changed = check_pixels_of_one_patch(explainer, tiny_image(32, 64, seed=1), patch,
                                        model.model.vision_tower.embeddings.patch_embedding, 8, "bicubic")
    assert len(changed) == 2 and changed[0] == patch


def test_end_to_end_maps_figures_and_generated_target(tiny, tmp_path):
    from rgae.viz import save_figures

    _, _, explainer = tiny
    image = tiny_image(24, 40)
    e = explainer.attribute(image, target="a red circle")
    assert e.image_map().shape == (24, 40) and e.text_to_patch.shape == (3, 48)
    assert save_figures(e, tmp_path, dpi=50, words=False)
    assert explainer.attribute(image, max_new_tokens=3).image_map().shape == (24, 40)


def test_planted_region_lights_up():
    model, processor = tiny_aya_vision(text_layers=1,
                                       processor_kwargs={"image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    inner = model.model
    plant(model, inner.vision_tower, inner.multi_modal_projector, inner.language_model,
          inner.vision_tower.embeddings.patch_embedding)
    region = (16, 16, 32, 32)  # tile 0's last 2×2 block
    check_planted(RGAE(model, processor), planted_image(32, 64, region), region, 8, "bicubic")
