"""Write an explanation's figure set to disk with the original R-GAE tool's file names.

Files (``{stem}`` = ``{method}-{slug of the target text}-{projector}``, projector ``unknown`` when not set), each in
every requested format:

==========================================  ===================================================================
``R_t_i-{stem}-.{ext}``                     Text-to-Image: the sentence map over the image (original name)
``R_t_i-{stem}-_words.{ext}``               all per-word maps on one page (``words=True``)
``R_t_i-{stem}-_w{ii}-{word}.{ext}``        one per-word map per file, ``ii`` = word index (``words=True``)
``R_t_q-{stem}-.{ext}``                     Text-to-Query heatmap (original name)
``R_t_q-{stem}-_grid.{ext}``                Text-to-Query grid map with values, indices, top-k (original name)
``R_q_i-{stem}-.{ext}``                     Query-to-Image small multiples (original name)
``decomposition-{stem}-.{ext}``             three panels R_t2i | R_t2q | R_q2i (the paper's Figure 3 row)
``decomposition-{stem}-_grid.{ext}``        the same with the grid-map middle panel
==========================================  ===================================================================

Explanations without a query stage (GradCAM, occlusion...) have no Text-to-Query / Query-to-Patch maps: the
``R_t_q``, ``R_q_i`` and ``decomposition`` files are skipped for them (only ``R_t_i`` files are written), and a
projector without a Query-to-Patch map skips ``R_q_i``. Every file is written atomically (temporary file + rename).

Example:
    >>> import torch, tempfile
    >>> from rgae import Explanation
    >>> from rgae.viz import save_figures
    >>> e = Explanation(method="rgae", target_text="A pot of green plants",
    ...                 output_tokens=["A", "pot", "of", "green", "plants"], text_to_patch=torch.rand(5, 16),
    ...                 patch_grid=(4, 4), text_to_query=torch.rand(5, 4), query_to_patch=torch.rand(4, 16),
    ...                 query_grid=(2, 2), projector_type="qformer2_144")
    >>> paths = save_figures(e, tempfile.mkdtemp(), words=False)
    >>> sorted(p.name for p in paths)[2]
    'R_t_q-rgae-A-pot-of-green-plants-qformer2_144-.png'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from rgae.io import atomic_write
from rgae.viz import figures
from rgae.viz.naming import figure_filename, slugify

FORMATS = ("png", "pdf", "svg")
# Dates in PDF/SVG metadata would make identical figures differ byte for byte.
_METADATA = {"png": {}, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
# TrueType fonts in PDFs stay editable (journals and Illustrator prefer them to Type 3).
_SAVE_RC = {"pdf.fonttype": 42, "ps.fonttype": 42}


def save_figure(fig, path: str | os.PathLike, fmt: str | None = None, dpi: int = 150) -> Path:
    """Save one Figure atomically; ``fmt`` defaults to the path's extension."""
    import matplotlib

    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")

    def write(tmp: str) -> None:
        with matplotlib.rc_context(_SAVE_RC):
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.03, metadata=_METADATA[fmt])

    return atomic_write(path, write)


PLOT_OPTIONS = ("alpha", "cmap", "interpolation", "crop_to_content", "top_k", "normalize", "note")


def figure_specs(explanation, words: bool = True, **plot_kw) -> list[tuple[str, str, Callable[[], object]]]:
    """The figures :func:`save_figures` writes for this explanation: ``(prefix, suffix, make_figure)``.

    ``normalize`` reaches the figures with several panels (per-word page, Query-to-Image, decomposition); ``note``
    reaches every title."""
    e = explanation
    unknown = set(plot_kw) - set(PLOT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown plot options {sorted(unknown)}; expected some of {PLOT_OPTIONS}")
    common = {k: plot_kw[k] for k in ("alpha", "cmap", "interpolation", "crop_to_content", "note") if k in plot_kw}
    panels = {**common, **({"normalize": plot_kw["normalize"]} if "normalize" in plot_kw else {})}
    top_k = plot_kw.get("top_k", 5)
    query = {k: plot_kw[k] for k in ("cmap", "note") if k in plot_kw}
    specs: list[tuple[str, str, Callable[[], object]]] = [
        ("R_t_i", "", lambda: figures.plot_text_to_image(e, **common)),
    ]
    if words:
        specs.append(("R_t_i", "_words", lambda: figures.plot_words(e, **panels)))
        for idx, word in enumerate(e.words):
            suffix = f"_w{idx:02d}-{slugify(word, max_bytes=24)}"
            specs.append(("R_t_i", suffix, lambda idx=idx: figures.plot_text_to_image(e, word=idx, **common)))
    if e.text_to_query is not None:
        specs.append(("R_t_q", "", lambda: figures.plot_text_to_query(e, style="heatmap", top_k=top_k, **query)))
        specs.append(("R_t_q", "_grid", lambda: figures.plot_text_to_query(e, style="grid", top_k=top_k, **query)))
    if e.query_to_patch is not None:
        specs.append(("R_q_i", "", lambda: figures.plot_query_to_image(e, top_k=top_k, **panels)))
    if e.text_to_query is not None:
        specs.append(("decomposition", "", lambda: figures.plot_decomposition(e, style="heatmap", top_k=top_k,
                                                                              **panels)))
        specs.append(("decomposition", "_grid", lambda: figures.plot_decomposition(e, style="grid", top_k=top_k,
                                                                                   **panels)))
    return specs


def save_figures(
    explanation,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = ("png",),
    dpi: int = 150,
    words: bool = True,
    **plot_kw,
) -> list[Path]:
    """Write the explanation's figure set (see the module docstring for the names) and return the written paths.

    Args:
        explanation: an :class:`~rgae.explanation.Explanation`.
        out_dir: folder (created if missing).
        formats: any of ``"png"``, ``"pdf"``, ``"svg"``; each figure is rendered once and saved in each format.
        dpi: raster resolution (PNG, and images embedded in PDF/SVG).
        words: also write the per-word maps (one page with all words and one file per word).
        plot_kw: ``alpha``, ``cmap``, ``interpolation``, ``crop_to_content``, ``top_k``, ``normalize``
            (``"per_map"``/``"global"``, for the figures with several panels) and ``note`` (a line added to every
            title) passed to the figures.

    Example:
        >>> import tempfile
        >>> from rgae.viz import synthetic_explanation
        >>> paths = save_figures(synthetic_explanation(), tempfile.mkdtemp(), formats=("png", "pdf"), words=False)
        >>> len(paths)
        12
    """
    if isinstance(formats, str):
        formats = (formats,)
    fmts = [f.lower().lstrip(".") for f in formats]
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {tuple(formats)}")
    unknown = set(plot_kw) - set(PLOT_OPTIONS)
    if unknown:
        raise ValueError(f"unknown plot options {sorted(unknown)}; expected some of {PLOT_OPTIONS}")
    if int(dpi) <= 0:
        raise ValueError(f"dpi must be positive, got {dpi}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    e = explanation
    written: list[Path] = []
    for prefix, suffix, make in figure_specs(e, words=words, **plot_kw):
        fig = make()
        for fmt in dict.fromkeys(fmts):
            name = figure_filename(prefix, e.method, e.target_text, e.projector_type, suffix=suffix, ext=fmt)
            written.append(save_figure(fig, out_dir / name, fmt=fmt, dpi=dpi))
    return written
