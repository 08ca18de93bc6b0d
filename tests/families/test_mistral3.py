"""Mistral3 (Pixtral vision): one view at the image's own size, RMSNorm + 2×2 patch merger + MLP → the block rule,
rows ended by [IMG_BREAK]/[IMG_END] placeholders (rgae/adapters/mistral3.py)."""

from __future__ import annotations

import pytest
import torch

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
from tests.families.tiny_mistral3 import tiny_image, tiny_mistral3


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_mistral3()
    return model, processor, RGAE(model, processor)


def _connector_input(model):
    return ConnectorInput(model.model.multi_modal_projector, where="input")


@pytest.mark.parametrize(("image_hw", "grid"), [((24, 40), (4, 6)), ((100, 60), (8, 6)), ((16, 16), (2, 2))])
def test_the_family_is_found_and_its_view_has_the_images_own_size(tiny, image_hw, grid):
    model, processor, explainer = tiny
    assert "mistral3" in [f.name for f in families()]
    assert type(get_adapter(model)).__name__ == "Mistral3Adapter"
    inputs = explainer.prepare(tiny_image(*image_hw), "a red circle", None)
    layout = inputs.layout
    assert [v.grid for v in layout.views] == [grid] and layout.views[0].box == (0, 0, image_hw[1], image_hw[0])
    rows, cols = grid[0] // 2, grid[1] // 2
    assert layout.n_tokens == rows * (cols + 1) and layout.query_grid == (rows, cols + 1)
    ends = processor.tokenizer.convert_ids_to_tokens(inputs.input_ids[0, layout.positions[layout.placeholder]])
    assert ends == ["[IMG_BREAK]"] * (rows - 1) + ["[IMG_END]"]
    assert layout.placeholder.view(rows, cols + 1)[:, -1].all() and layout.placeholder.sum() == rows


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
    check_unit_change_at_connector_input(model, inputs, _connector_input(model), patches=[0, 7, 17, 23])


@pytest.mark.parametrize("patch", [7, 22])
def test_perturbing_one_patch_box_changes_that_patch(tiny, patch):
    model, _, explainer = tiny
    # 32×48 is a whole number of merge blocks: the processor keeps it at scale 1.
    changed = check_pixels_of_one_patch(explainer, tiny_image(32, 48, seed=1), patch,
                                        model.model.vision_tower.patch_conv, 8, "bicubic")
    assert changed == [patch]


def test_several_images_are_refused_with_a_clear_error(tiny):
    _, processor, explainer = tiny
    batch = processor(images=tiny_image(24, 40), text="[INST][IMG][/INST]", return_tensors="pt")
    batch["image_sizes"] = torch.tensor([[32, 48], [16, 16]])
    with pytest.raises(ValueError, match="one image per prompt is explained; the processor gave 2"):
        explainer.adapter.layout(processor, batch, (24, 40))


def test_end_to_end_maps_figures_and_generated_target(tiny, tmp_path):
    from rgae.viz import save_figures

    _, _, explainer = tiny
    image = tiny_image(24, 40)
    e = explainer.attribute(image, target="a red circle")
    assert e.image_map().shape == (24, 40) and e.patch_map().shape == (4, 6)  # a single grid: patch maps work
    assert e.query_grid == (2, 4) and e.text_to_query.shape == (3, 8)
    assert save_figures(e, tmp_path, dpi=50, words=False)
    assert explainer.attribute(image, max_new_tokens=3).image_map().shape == (24, 40)


def test_planted_region_lights_up():
    model, processor = tiny_mistral3(text_layers=1,
                                     processor_kwargs={"image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    inner = model.model
    plant(model, inner.vision_tower, inner.multi_modal_projector, inner.language_model, inner.vision_tower.patch_conv)
    region = (16, 16, 32, 32)  # the second block of the second row of merged tokens
    e = check_planted(RGAE(model, processor), planted_image(32, 48, region), region, 8, "bicubic")
    assert torch.nonzero(e.text_to_query.mean(0)[~e.layout.placeholder]).flatten().tolist() == [4]
