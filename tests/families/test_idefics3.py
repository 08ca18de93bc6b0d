"""Idefics3 and SmolVLM: tiles + global image with <row_r_col_c>/<global-img> tags (placeholders), pixel shuffle 2×2
+ linear → the block rule, pixel_attention_mask padding (rgae/adapters/idefics3.py, smolvlm.py)."""

from __future__ import annotations

import pytest
import torch

from rgae import RGAE
from rgae.adapters import families, get_adapter
from rgae.methods.base import PreparedInputs
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
from tests.families.tiny_idefics3 import tiny_idefics3, tiny_image, tiny_smolvlm
from tests.family_checks import changed_rows, llm_image_embeddings

BUILDERS = {"idefics3": tiny_idefics3, "smolvlm": tiny_smolvlm}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request):
    model, processor = BUILDERS[request.param]()
    return request.param, model, processor, RGAE(model, processor)


def _connector_input(model):
    return ConnectorInput(model.model.connector, where="input")


def test_the_family_is_found_and_the_tags_are_placeholders(tiny):
    name, model, processor, explainer = tiny
    assert name in [f.name for f in families()]
    assert type(get_adapter(model)).__name__ == "Idefics3Adapter"
    inputs = explainer.prepare(tiny_image(24, 64), "a red circle", None)  # non-square: 1×2 tiles + global
    layout = inputs.layout
    assert [v.name for v in layout.views] == ["tile 0,0", "tile 0,1", "global"]
    assert [v.box for v in layout.views] == [(0, 0, 32, 24), (32, 0, 64, 24), (0, 0, 64, 24)]
    tags = processor.tokenizer.convert_ids_to_tokens(inputs.input_ids[0, layout.positions[layout.placeholder]])
    assert tags == ["<row_1_col_1>", "<row_1_col_2>", "<global-img>"]
    assert layout.n_tokens == 15 and bool((layout.query_to_patch[layout.placeholder] == 0).all())
    grid = explainer.prepare(tiny_image(64, 64), "a", None).layout
    assert [v.name for v in grid.views] == ["tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1", "global"]
    assert [v.box for v in grid.views][1:3] == [(32, 0, 64, 32), (0, 32, 32, 64)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_without_splitting_the_global_image_is_the_only_view(name):
    model, processor = BUILDERS[name](processor_kwargs={"do_image_splitting": False})
    inputs = RGAE(model, processor).prepare(tiny_image(20, 30), "a", None)
    assert [v.name for v in inputs.layout.views] == ["global"] and inputs.layout.views[0].box == (0, 0, 30, 20)
    assert inputs.layout.n_tokens == 5 and inputs.layout.placeholder.tolist() == [True, False, False, False, False]


def test_text_to_query_is_the_full_matrix_oracle_and_text_to_patch_composes(tiny):
    *_, explainer = tiny
    check_exact_maps(explainer, explainer.prepare(tiny_image(24, 64), "a red circle", None))


def test_query_to_patch_is_the_connectors_jacobian_block(tiny):
    _, model, _, explainer = tiny
    check_query_to_patch_is_the_block_rule(model, explainer.prepare(tiny_image(24, 64), "a", None),
                                           _connector_input(model))


def test_a_unit_change_at_one_connector_patch_reaches_exactly_its_tokens(tiny):
    _, model, _, explainer = tiny
    inputs = explainer.prepare(tiny_image(24, 64), "a", None)
    check_unit_change_at_connector_input(model, inputs, _connector_input(model), patches=[0, 6, 25, 47])


@pytest.mark.parametrize("patch", [4, 16 + 11])
def test_perturbing_one_patch_box_changes_that_patch_in_each_view(tiny, patch):
    _, model, _, explainer = tiny
    # 32×64: the tiles are crops at scale 1, the global image halves the width (Lanczos).
    changed = check_pixels_of_one_patch(explainer, tiny_image(32, 64, seed=1), patch,
                                        model.model.vision_model.embeddings.patch_embedding, 8, "lanczos")
    assert len(changed) == 2 and changed[0] == patch


def test_padded_pixels_lie_outside_the_image_and_reach_only_their_tokens(tiny):
    """A frame whose lower half is padding (as the processor pads frames of different sizes in one batch): its box
    extends below the image, and changing the padded pixels changes exactly the LLM tokens of padded patches."""
    _, model, processor, explainer = tiny
    image = tiny_image(24, 64)
    inputs = explainer.prepare(image, "a", None)
    pixel_values = inputs.pixel_values.clone()
    mask = inputs.extra["pixel_attention_mask"].clone()
    pixel_values[0, 2, :, 16:] = 0  # the global frame: rows 16-31 are padding
    mask[0, 2, 16:] = 0
    batch = {"input_ids": inputs.input_ids[:, : inputs.prompt_len], "pixel_values": pixel_values,
             "pixel_attention_mask": mask}
    layout = explainer.adapter.layout(processor, batch, (24, 64))
    assert layout.views[2].box == (0, 0, 64, 48)
    padded = PreparedInputs(inputs.input_ids, pixel_values, inputs.prompt_len, inputs.target_ids, "a", inputs.prompt,
                            layout, inputs.image, None, {"pixel_attention_mask": mask})
    bumped = pixel_values.clone()
    bumped[0, 2, :, 16:] = torch.rand_like(bumped[0, 2, :, 16:])
    lm = model.model.text_model
    changed = changed_rows(llm_image_embeddings(model, padded, lm), llm_image_embeddings(model, padded, lm,
                                                                                          pixel_values=bumped))
    boxes = layout.patch_boxes()
    feeds = layout.query_to_patch > 0
    outside = [q for q in range(layout.n_tokens) if bool(feeds[q].any()) and bool((boxes[feeds[q], 1] >= 24).all())]
    assert changed == outside and len(outside) == 2  # the global frame's bottom row of 2×2 blocks
    assert float(layout.render(layout.query_to_patch[outside].sum(0)).sum()) == 0  # no mass inside the image


def test_end_to_end_maps_figures_and_generated_target(tiny, tmp_path):
    from rgae.viz import save_figures

    *_, explainer = tiny
    image = tiny_image(24, 64)
    e = explainer.attribute(image, target="a red circle")
    assert e.image_map().shape == (24, 64) and e.text_to_query.shape == (3, 15)
    assert save_figures(e, tmp_path, dpi=50, words=False)
    assert explainer.attribute(image, max_new_tokens=3).image_map().shape == (24, 64)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_planted_region_lights_up(name):
    model, processor = BUILDERS[name](text_layers=1,
                                      processor_kwargs={"image_mean": [0, 0, 0], "image_std": [1, 1, 1]})
    inner = model.model
    plant(model, inner.vision_model, inner.connector, inner.text_model, inner.vision_model.embeddings.patch_embedding)
    region = (48, 16, 64, 32)  # tile 0,1's last 2×2 block
    check_planted(RGAE(model, processor), planted_image(32, 64, region), region, 8, "lanczos")
