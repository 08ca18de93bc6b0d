"""rgae.adapters.blocks / tiling (the concatenating connectors' shared pieces) against hand-computable cases and a
slow reference; the docstring examples of group B's adapter and test-helper modules."""

from __future__ import annotations

import doctest
import importlib
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgae.adapters.blocks import block_query_to_patch, blocks_from_packed, image_layout, patch_indices, token_runs
from rgae.adapters.tiling import grid_tile_boxes
from rgae.layout import View


def test_a_packing_that_mixes_or_repeats_patches_is_refused():
    with pytest.raises(ValueError, match="not integers"):
        blocks_from_packed(torch.tensor([[0.5, 1.0]], dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="exactly once"):
        blocks_from_packed(torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64), 4)


def test_block_rows_are_uniform_and_offset_into_the_view():
    q2p = block_query_to_patch(torch.tensor([[0, 1, 4, 5]]), 16, offset=16, total=32)
    assert q2p.shape == (1, 32) and q2p.sum().item() == 1.0
    assert torch.nonzero(q2p[0]).flatten().tolist() == [16, 17, 20, 21]


def test_placeholders_are_merged_in_sequence_order_with_zero_rows():
    view = View("v", (2, 2), (0, 0, 4, 4))
    q2p = torch.eye(4, dtype=torch.float64)
    layout = image_layout((4, 4), [view], torch.tensor([3, 4, 6, 7]), q2p, torch.tensor([5, 8]), query_grid=(2, 3))
    assert layout.positions.tolist() == [3, 4, 5, 6, 7, 8]
    assert layout.placeholder.tolist() == [False, False, True, False, False, True]
    assert layout.query_to_patch[2].abs().sum() == 0 and layout.query_to_patch[3, 2] == 1


def test_tile_boxes_cover_the_image_once():
    boxes = torch.tensor(grid_tile_boxes((30, 50), 3, 2), dtype=torch.float64)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert float(area) == pytest.approx(30 * 50) and boxes[-1].tolist() == [25, 20, 50, 30]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.booleans(), min_size=0, max_size=30))
def test_token_runs_against_a_loop(values):
    runs, start = [], None
    for i, v in enumerate([*values, False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    assert token_runs(torch.tensor(values, dtype=torch.bool)) == runs


def _packers():
    """Each family's own packing code, as its adapter calls it, for a grid of (rows, cols) patches."""
    from transformers.models.aya_vision.modeling_aya_vision import AyaVisionMultiModalProjector
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    from transformers.models.internvl.modeling_internvl import InternVLModel
    from transformers.models.mistral3.modeling_mistral3 import Mistral3PatchMerger

    def internvl(rows, cols):
        x = patch_indices((rows, cols)).reshape(1, rows, cols, 1)
        return InternVLModel.pixel_shuffle(None, x, scale_factor=0.5).reshape(1, -1, 4)

    def idefics3(rows, cols):
        return Idefics3Connector.pixel_shuffle(None, patch_indices((rows, cols)), 2)

    def aya(rows, cols):
        stand_in = type("P", (), {"downsample_factor": 2})()
        return AyaVisionMultiModalProjector.pixel_shuffle(stand_in, patch_indices((rows, cols)))

    def mistral3(rows, cols):
        stand_in = SimpleNamespace(patch_size=4, spatial_merge_size=2, merging_layer=torch.nn.Identity())
        sizes = torch.tensor([[rows * 4, cols * 4]])
        return Mistral3PatchMerger.forward(stand_in, patch_indices((rows, cols))[0], sizes)

    return {"internvl": (internvl, True), "idefics3": (idefics3, True), "aya": (aya, True),
            "mistral3": (mistral3, False)}


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(["internvl", "idefics3", "aya", "mistral3"]), rows=st.integers(1, 4),
       cols=st.integers(1, 4))
def test_every_token_is_one_aligned_2x2_square_in_row_major_block_order(family, rows, cols):
    """Slow reference: token t of a (2R × 2C) grid is the square of patches (2r..2r+1, 2c..2c+1), t = r·C + c."""
    pack, square_only = _packers()[family]
    if square_only:
        cols = rows
    r2, c2 = 2 * rows, 2 * cols
    blocks = blocks_from_packed(pack(r2, c2), r2 * c2)
    for t, block in enumerate(blocks.tolist()):
        r, c = divmod(t, cols)
        assert sorted(block) == sorted(p * c2 + q for p in (2 * r, 2 * r + 1) for q in (2 * c, 2 * c + 1)), (t, block)


@pytest.mark.parametrize("name", [
    "rgae.adapters.blocks", "rgae.adapters.tiling", "tests.families.word_tokenizer", "tests.families.tiny_internvl",
    "tests.families.tiny_aya_vision", "tests.families.tiny_idefics3", "tests.families.tiny_mistral3",
])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0, (name, result)
