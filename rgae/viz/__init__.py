"""Figures of R-GAE explanations: overlays, query grids, the three-panel decomposition, comparisons, export.

Every plotting function returns a ``matplotlib.figure.Figure`` (never shows it; works headless). Maps are
normalized for display only (``per_map`` min–max by default, ``global`` on a shared range, or ``none``).

Example:
    >>> import numpy as np, torch
    >>> from rgae import Explanation, viz
    >>> e = Explanation(method="rgae", target_text="A pot of green plants",
    ...                 output_tokens=["A", "pot", "of", "green", "plants"], text_to_patch=torch.rand(5, 16),
    ...                 patch_grid=(4, 4), image=np.zeros((64, 64, 3), np.uint8))
    >>> viz.overlay(e.image, e.patch_map()).shape
    (64, 64, 3)
    >>> fig = viz.plot(e, kind="words")
    >>> page = viz.explore(e)  # an interactive HTML page: page.save("e.html"), or shown inline in a notebook
"""

from rgae.viz.explore import ExplorerPage, explore, explore_sections, write_site
from rgae.viz.export import FORMATS, figure_specs, save_figure, save_figures
from rgae.viz.figures import (
    PLOT_KINDS,
    plot,
    plot_comparison,
    plot_decomposition,
    plot_query_to_image,
    plot_text_to_image,
    plot_text_to_query,
    plot_words,
    query_mosaic,
)
from rgae.viz.naming import figure_filename, figure_stem, slugify
from rgae.viz.overlay import colorize, crop_to_box, normalize_map, overlay, upsample
from rgae.viz.synthetic import synthetic_explanation

__all__ = [
    "FORMATS",
    "ExplorerPage",
    "PLOT_KINDS",
    "colorize",
    "crop_to_box",
    "explore",
    "explore_sections",
    "figure_filename",
    "figure_specs",
    "figure_stem",
    "normalize_map",
    "overlay",
    "plot",
    "plot_comparison",
    "plot_decomposition",
    "plot_query_to_image",
    "plot_text_to_image",
    "plot_text_to_query",
    "plot_words",
    "query_mosaic",
    "save_figure",
    "save_figures",
    "slugify",
    "synthetic_explanation",
    "upsample",
    "write_site",
]
