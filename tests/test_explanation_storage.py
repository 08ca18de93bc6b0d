"""Explanation.save stores Query-to-Patch maps sparsely where that is smaller (and the explanation's once when it is
the layout's); Explanation.load restores every tensor exactly, also from files written before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import rgae.explanation as explanation_module
from rgae import Explanation
from rgae.adapters.blocks import image_layout, views_query_to_patch
from rgae.layout import View

TENSORS = ("text_to_query", "query_to_patch", "text_to_patch", "token_ids", "token_probs", "input_ids",
           "pixel_values", "target_positions", "image_positions")


def tiled_explanation(q2p_rule: str = "structural", seed: int = 0) -> Explanation:
    """Three views of 4×4 patches with 2×2 blocks (InternVL-like), one placeholder token per view."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
    views = [View("tile 0,0", (4, 4), (0, 0, 20, 24)), View("tile 0,1", (4, 4), (20, 0, 40, 24)),
             View("thumbnail", (4, 4), (0, 0, 40, 24))]
    layout = image_layout((24, 40), views, torch.tensor([3, 4, 5, 6, 8, 9, 10, 11, 13, 14, 15, 16]),
                          views_query_to_patch(blocks, 16, 3), torch.tensor([2, 7, 12]))
    q2p = layout.query_to_patch.clone()
    if q2p_rule == "gradient":  # a per-target split of each block: the same support, other weights
        q2p = q2p * torch.rand(q2p.shape, generator=gen, dtype=torch.float64)
        q2p = q2p / q2p.sum(1, keepdim=True).clamp(min=1e-300)
    t2q = torch.rand(3, layout.n_tokens, generator=gen, dtype=torch.float64)
    return Explanation(
        method="rgae", target_text="a red circle", output_tokens=["a", "red", "circle"], text_to_patch=t2q @ q2p,
        layout=layout, text_to_query=t2q, query_to_patch=q2p, token_ids=torch.tensor([7, 8, 9]),
        token_probs=torch.rand(3, generator=gen), image=np.full((24, 40, 3), 90, np.uint8),
        input_ids=torch.arange(20).view(1, -1), pixel_values=torch.rand(3, 3, 8, 8, generator=gen),
        target_positions=torch.tensor([17, 18, 19]), image_positions=layout.positions,
        options={"q2p_rule": q2p_rule},
    )


def assert_same(a: Explanation, b: Explanation) -> None:
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert torch.equal(a.layout.query_to_patch, b.layout.query_to_patch)
    assert a.layout.query_to_patch.dtype == b.layout.query_to_patch.dtype
    assert torch.equal(a.layout.positions, b.layout.positions)
    assert torch.equal(a.layout.placeholder, b.layout.placeholder)
    assert a.layout.views == b.layout.views and a.layout.rule == b.layout.rule
    assert np.array_equal(a.image, b.image) and a.options == b.options and a.words == b.words


def stored_keys(path) -> set[str]:
    with safe_open(str(path / "tensors.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("q2p_rule", ["structural", "gradient"])
def test_query_to_patch_maps_are_stored_sparsely_and_load_exactly(tmp_path, q2p_rule):
    e = tiled_explanation(q2p_rule)
    path = e.save(tmp_path / "e")
    keys = stored_keys(path)
    assert {"layout.query_to_patch.index", "layout.query_to_patch.values"} <= keys
    assert "layout.query_to_patch" not in keys and "query_to_patch" not in keys
    # The structural map is the layout's: stored once.
    assert ("query_to_patch.index" in keys) == (q2p_rule == "gradient")
    assert_same(e, Explanation.load(path))


def test_dense_maps_stay_dense_when_that_is_smaller(tmp_path):
    e = tiled_explanation()
    e.query_to_patch = torch.rand(e.query_to_patch.shape, dtype=torch.float64) + 0.1
    path = e.save(tmp_path / "e")
    assert "query_to_patch" in stored_keys(path)
    assert_same(e, Explanation.load(path))


def test_files_written_before_sparse_storage_still_load(tmp_path, monkeypatch):
    e = tiled_explanation("gradient")
    monkeypatch.setattr(explanation_module, "_pack_maps", lambda tensors: None)  # the former save
    path = e.save(tmp_path / "old")
    assert {"query_to_patch", "layout.query_to_patch"} <= stored_keys(path)
    monkeypatch.undo()
    assert_same(e, Explanation.load(path))


def test_sparse_storage_is_smaller_for_a_tiled_layout(tmp_path, monkeypatch):
    e = tiled_explanation()
    sparse = (e.save(tmp_path / "sparse") / "tensors.safetensors").stat().st_size
    monkeypatch.setattr(explanation_module, "_pack_maps", lambda tensors: None)
    dense = (e.save(tmp_path / "dense") / "tensors.safetensors").stat().st_size
    assert sparse < dense


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.floats(0.0, 1.0), st.sampled_from([torch.float32, torch.float64]),
       st.integers(0, 2**31 - 1))
def test_any_map_round_trips(m, n, density, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q2p = torch.randn(m, n, generator=gen, dtype=torch.float64).to(dtype)
    q2p[torch.rand(m, n, generator=gen) >= density] = 0
    tensors = {"query_to_patch": q2p.clone(), "layout.query_to_patch": (q2p * 2).to(torch.float64)}
    record = explanation_module._pack_maps(tensors)
    explanation_module._unpack_maps(tensors, record)
    assert tensors["query_to_patch"].dtype == dtype and torch.equal(tensors["query_to_patch"], q2p)
    assert torch.equal(tensors["layout.query_to_patch"], (q2p * 2).to(torch.float64))
