"""The cross-family comparison figure (examples/family_comparison.py → docs/families.png): it builds, warning-free,
for models of different layouts, each row over the same original image; the planted square lights up in each."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import matplotlib
import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "family_comparison.py"
FAMILIES = ["llava-onevision", "mistral3", "blip2"]  # anyres base + tiles, one view with row breaks, a Q-Former


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("family_comparison", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rows(example):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown-word notices of the tiny tokenizers
        return example.explain_families(FAMILIES)


def test_each_family_puts_its_relevance_on_the_planted_square(example, rows):
    assert [label.split("\n")[0] for label in rows] == FAMILIES
    assert sorted(len(e.layout.views) for e in rows.values()) == [1, 1, 3]
    x0, y0, x1, y1 = example.REGION
    share = (x1 - x0) * (y1 - y0) / (32 * 64)
    for label, e in rows.items():
        heat = e.image_map()
        assert tuple(heat.shape) == (32, 64), label
        # Random models: the tokens at the square's edges count as much as those inside, so the peak may sit on an
        # edge token; the square holds at least twice its share of the map's mass.
        assert float(heat[y0:y1, x0:x1].sum()) >= 2 * share * float(heat.sum()) > 0, label


def test_the_figure_builds_without_warnings_for_three_families(rows, tmp_path):
    from rgae.viz import plot_comparison
    from rgae.viz.export import save_figure

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constrained_layout collapses, tight_layout notices, ...
        fig = plot_comparison(rows, rows="model")
        path = save_figure(fig, tmp_path / "families.png", dpi=40)
    assert isinstance(fig, matplotlib.figure.Figure) and path.stat().st_size > 0
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == len(FAMILIES) * (1 + 3)  # the image and one map per word, per row
    # Every row over the same original image (its own explanation's, warped through its own layout).
    for ax in images:
        assert ax.images[0].get_array().shape[:2] == (32, 64)
    labels = [ax.get_ylabel() for ax in images if ax.get_ylabel()]
    assert [label.split("\n")[0] for label in labels] == FAMILIES


def test_model_rows_are_labelled_by_model_name_or_projector():
    from rgae.viz import plot_comparison, synthetic_explanation

    a, b = synthetic_explanation(seed=0), synthetic_explanation(seed=1, projector="mlp2x_gelu", query_grid=(8, 8))
    def labels(fig):
        return [ax.get_ylabel() for ax in fig.axes if ax.images and ax.get_ylabel()]

    assert labels(plot_comparison([a, b], rows="model", words=["pot"])) == ["synthetic", "synthetic"]
    b.model_name = None
    assert labels(plot_comparison([a, b], rows="model", words=["pot"])) == ["synthetic", "mlp2x_gelu"]
    with pytest.raises(ValueError, match="rows must be one of"):
        plot_comparison([a], rows="family")
