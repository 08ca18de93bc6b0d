"""examples/q2p_occlusion.py: the occlusion Query-to-Patch map recovers the structural maps' supports exactly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from deco_models import build_projector
from rgae.rules import pooling_map


def _module():
    path = Path(__file__).resolve().parent.parent / "examples" / "q2p_occlusion.py"
    spec = importlib.util.spec_from_file_location("q2p_occlusion", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("spec", "grid", "queries"), [("avgpool2_36", (12, 12), (6, 6)),
                                                       ("avgpool2_9", (7, 5), (3, 3))])
def test_average_pooling_reads_exactly_its_windows(spec, grid, queries):
    """Including PyTorch's overlapping windows when the grid is not divisible (7 -> 3, 5 -> 3)."""
    proj = build_projector(spec, 8, 12, grid).eval()
    q2p = _module().occlusion_query_to_patch(proj, torch.randn(1, grid[0] * grid[1], 8))
    assert torch.equal(q2p > 0, pooling_map(grid, queries) > 0)
    assert torch.allclose(q2p.sum(-1), torch.ones(q2p.shape[0]))


def test_a_per_patch_mlp_reads_only_its_own_patch():
    proj = build_projector("mlp2x_gelu", 8, 12, (4, 6)).eval()
    q2p = _module().occlusion_query_to_patch(proj, torch.randn(1, 24, 8), chunk=5)  # chunks do not matter
    assert torch.allclose(q2p, torch.eye(24))


def test_bad_features_shape():
    proj = build_projector("mlp2x_gelu", 8, 12, (4, 6))
    with pytest.raises(ValueError, match=r"\[1, N, C\]"):
        _module().occlusion_query_to_patch(proj, torch.randn(2, 24, 8))


@pytest.mark.slow
def test_compare_runs_on_a_tiny_abstractor_model(capsys):
    assert _module().main(["--tiny", "--scenes", "2", "--model", "tiny-cabstractor_36", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert '"projector": "cabstractor_36"' in out and "pointing_occlusion" in out
