"""InternVL: tiles + thumbnail, CLS dropped, 2×2 pixel shuffle + MLP → the block rule (rgae/adapters/internvl.py)."""

from __future__ import annotations

import pytest

from rgae import RGAE, AttentionRollout, RawAttention
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
from tests.families.tiny_internvl import tiny_image, tiny_internvl


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_internvl()
    return model, processor, RGAE(model, processor)


def _connector_input(model):
    # The connector's patch features are the vision tower's output (CLS first, dropped by the model).
    return ConnectorInput(model.model.vision_tower, where="output", prefix=1)


def test_the_family_is_found_and_its_layout_is_tiles_plus_thumbnail(tiny):
    model, processor, explainer = tiny
    assert "internvl" in [f.name for f in families()]
    assert type(get_adapter(model)).__name__ == "InternVLAdapter"
    layout = explainer.prepare(tiny_image(24, 40), "a red circle", None).layout  # non-square: 1×2 tiles + thumbnail
    assert [v.name for v in layout.views] == ["tile 0,0", "tile 0,1", "thumbnail"]
    assert [v.box for v in layout.views] == [(0, 0, 20, 24), (20, 0, 40, 24), (0, 0, 40, 24)]
    assert layout.rule == "block" and layout.n_tokens == 12 and not bool(layout.placeholder.any())
    single = explainer.prepare(tiny_image(30, 30), "a", None).layout  # fits one tile: no thumbnail
    assert [v.name for v in single.views] == ["image"] and single.views[0].box == (0, 0, 30, 30)


def test_text_to_query_is_the_full_matrix_oracle_and_text_to_patch_composes(tiny):
    _, _, explainer = tiny
    check_exact_maps(explainer, explainer.prepare(tiny_image(24, 40), "a red circle", None))


def test_query_to_patch_is_the_connectors_jacobian_block(tiny):
    model, _, explainer = tiny
    inputs = explainer.prepare(tiny_image(24, 40), "a", None)
    check_query_to_patch_is_the_block_rule(model, inputs, _connector_input(model))


def test_a_unit_change_at_one_connector_patch_reaches_exactly_its_tokens(tiny):
    model, _, explainer = tiny
    inputs = explainer.prepare(tiny_image(24, 40), "a", None)
    check_unit_change_at_connector_input(model, inputs, _connector_input(model), patches=[0, 7, 21, 42])


@pytest.mark.parametrize("patch", [4, 16 + 11])  # tile 0 row 1 col 0; tile 1 row 2 col 3
def test_perturbing_one_patch_box_changes_that_patch_in_each_view(tiny, patch):
    model, _, explainer = tiny
    # 32×64: the tiles are crops at scale 1, the thumbnail halves the width (bicubic).
    changed = check_pixels_of_one_patch(explainer, tiny_image(32, 64, seed=1), patch,
                                        model.model.vision_tower.embeddings.patch_embeddings, 8, "bicubic")
    assert len(changed) == 2 and changed[0] == patch and changed[1] >= 32  # the tile's patch and the thumbnail's


def test_end_to_end_maps_figures_and_generated_target(tiny, tmp_path):
    from rgae.viz import save_figures

    model, processor, explainer = tiny
    image = tiny_image(24, 40)
    e = explainer.attribute(image, target="a red circle")
    assert e.image_map().shape == (24, 40) and e.image_map(word="red").shape == (24, 40)
    assert e.text_to_patch.shape == (3, 48) and e.patch_grid is None
    assert save_figures(e, tmp_path, dpi=50)
    generated = explainer.attribute(image, max_new_tokens=3)
    assert generated.text_to_query.shape[1] == 12 and generated.image_map().shape == (24, 40)
    for method in (RawAttention, AttentionRollout):
        assert method(model, processor).attribute(image, target="a red").image_map().shape == (24, 40)


def test_planted_region_lights_up():
    model, processor = tiny_internvl(text_layers=1, processor_kwargs={"image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    inner = model.model
    plant(model, inner.vision_tower, inner.multi_modal_projector, inner.language_model,
          inner.vision_tower.embeddings.patch_embeddings.projection)
    region = (0, 0, 16, 16)  # tile 0's first 2×2 block; the thumbnail's first block
    e = check_planted(RGAE(model, processor), planted_image(32, 64, region), region, 8, "bicubic")
    assert int((e.text_to_query.mean(0) != 0).sum()) == 2
