"""Figures of an :class:`~rgae.explanation.Explanation`: each function returns a matplotlib ``Figure``.

Figures are built with ``matplotlib.figure.Figure`` directly (not ``pyplot``): nothing is registered with a GUI
backend, nothing needs closing, they render headless (Agg) and notebooks display the returned figure once.

Panels (names from the DeCo paper, Figure 3; the original tool's file prefixes in brackets):

- Text-to-Image ``R_t2i`` [``R_t_i``]: the sentence (or one word's) Text-to-Patch map over the image;
- per-word maps: subword tokens merged into words (``Explanation.words``);
- Text-to-Query ``R_t2q`` [``R_t_q``]: query importances on the √M×√M query grid, as a heatmap or as a grid map
  (cell values and query indices, top-k framed in red);
- Query-to-Image ``R_q2i`` [``R_q_i``]: √M×√M small multiples, each one query's Query-to-Patch row over the image
  (identity for a linear projector, a grating for pooling, learned patterns for a Q-Former);
- the three-panel decomposition ``R_t2i | R_t2q | R_q2i``;
- comparison grids: rows = methods or projectors, columns = words.

Example:
    >>> import numpy as np, torch
    >>> from rgae import Explanation
    >>> from rgae.viz import plot_decomposition
    >>> e = Explanation(method="rgae", target_text="a red circle", output_tokens=["a", "red", "circle"],
    ...                 text_to_patch=torch.rand(3, 16), patch_grid=(4, 4), text_to_query=torch.rand(3, 4),
    ...                 query_to_patch=torch.rand(4, 16), query_grid=(2, 2))
    >>> fig = plot_decomposition(e)
    >>> len(fig.axes) >= 3
    True
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rgae.viz.overlay import colorize, normalize_map, overlay, to_numpy_map, upsample

# Sizes in points, chosen for a 7-inch (two-column) or 3.3-inch (one-column) paper figure printed at 100%.
_RC = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "figure.titlesize": 10.5,
    "legend.fontsize": 8,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.03,
}
_HIGHLIGHT = "#e8112d"  # the paper frames top queries in red
_PANEL_TITLES = {
    "t2i": r"$R_{t2i}$ (Text-to-Image)",
    "t2q": r"$R_{t2q}$ (Text-to-Query)",
    "q2i": r"$R_{q2i}$ (Query-to-Image)",
}
_DEFAULT_PATCH_PX = 16  # background resolution per patch when the explanation carries no image


# ---- small helpers --------------------------------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float]):
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=figsize, layout="constrained")
    # The default 3-pt pads let a suptitle touch the panel titles under it (mathtext subscripts measure short).
    fig.get_layout_engine().set(h_pad=0.08, w_pad=0.05)
    return fig


def _freeze_layout(fig):
    """Run constrained layout to convergence, then fix it: every later save (PNG, PDF, SVG, any dpi) gets the
    same geometry. Constrained layout moves axes by a few pixels on its first draws with fixed-aspect images."""
    for _ in range(2):  # the second pass moves axes by < 1 px; later passes change nothing visible
        fig.draw_without_rendering()
    fig.set_layout_engine("none")
    return fig


def _escape(text: str) -> str:
    """User text shown in a title: an unescaped ``$`` would switch matplotlib into math mode."""
    return str(text).replace("$", r"\$")


def _caption(text: str, width: int = 60, prefix: str = "", max_chars: int = 160) -> str:
    """``prefix “text”`` wrapped to ``width`` characters, shortened with … beyond ``max_chars``, escaped."""
    short = textwrap.shorten(" ".join(str(text).split()), width=max_chars, placeholder=" …")
    return _escape("\n".join(textwrap.wrap(f"{prefix}“{short}”", width=max(width, 20))))


def _with_note(title: str, note: str | None, width: int = 60) -> str:
    """``title`` with ``note`` (e.g. "out of domain: ...") as its last line(s), in brackets."""
    if not note:
        return title
    return title + "\n" + _escape("\n".join(textwrap.wrap(f"[{note}]", width=max(width, 20))))


def _flat_map_note(ax, values: np.ndarray, normalize: str = "per_map") -> bool:
    """Write a visible note on a panel whose map has no range, and say whether it did.

    Min–max display paints an all-zero map the colormap's low end, which reads as "low relevance everywhere" and
    not as "none"; a constant map has no spatial information at all. On a shared (global) scale a constant non-zero
    map is a real value, so only an all-zero one gets the note there."""
    lo, hi = float(values.min()), float(values.max())
    if hi > lo or (normalize == "global" and hi != 0.0):
        return False
    text = "no relevance\n(all-zero map)" if hi == 0.0 else f"constant map\n({hi:.3g} everywhere)"
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=7.5, color="black",
            zorder=6, bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "0.35", "alpha": 0.9})
    return True


def _chars_per_line(width_in: float, fontsize: float = 10.5) -> int:
    # DejaVu Sans averages ~0.55 em per character; keep a margin so wrapped titles stay inside the figure.
    return int(width_in * 72.0 / (fontsize * 0.6))


def _short(word: str, max_chars: int = 16) -> str:
    word = str(word)
    return _escape(word if len(word) <= max_chars else word[: max_chars - 1] + "…")


def _background(expl) -> np.ndarray:
    """The original image, or a neutral gray canvas of its size when the explanation carries none."""
    if expl.image is not None:
        from rgae.viz.overlay import to_rgb_image

        return to_rgb_image(np.asarray(expl.image))
    h, w = expl.image_layout.image_size
    scale = _DEFAULT_PATCH_PX if expl.layout is None else 1
    return np.full((h * scale, w * scale, 3), 200, np.uint8)


def _display_map(expl, values, interpolation: str = "bilinear", size: tuple[int, int] | None = None) -> np.ndarray:
    """``[..., H, W]`` per-patch maps ``[..., N]`` drawn over the background (or at ``size``): the layout's rendering,
    smoothed for ``"bilinear"``, in units of relevance per patch of the first view, so a single-grid model's
    colorbar shows its Text-to-Patch values."""
    layout = expl.image_layout
    if size is None:
        size = _background(expl).shape[:2]
    rendered = layout.render(torch.as_tensor(values), smooth=interpolation != "nearest", size=size).numpy()
    (x0, y0, x1, y1), (rows, cols) = layout.views[0].box, layout.views[0].grid
    scale_y, scale_x = size[0] / layout.image_size[0], size[1] / layout.image_size[1]
    return rendered * ((x1 - x0) * scale_x / cols) * ((y1 - y0) * scale_y / rows)


def _hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _resolve_query_grid(expl) -> tuple[int, int]:
    m = expl.text_to_query.shape[1] if expl.text_to_query is not None else expl.query_to_patch.shape[0]
    if expl.query_grid is not None:
        qh, qw = expl.query_grid
        if qh * qw != m:
            raise ValueError(f"query_grid {expl.query_grid} does not hold the M={m} queries of the explanation")
        return qh, qw
    side = math.isqrt(m)
    return (side, side) if side * side == m else (1, m)


def _is_strip(qh: int, qw: int) -> bool:
    """The queries have no grid: one row of tokens (:func:`_resolve_query_grid`'s fallback)."""
    return qh == 1 and qw > 1


def _require_queries(expl, what: str) -> None:
    if expl.text_to_query is None:
        raise ValueError(
            f"{what} needs a Text-to-Query map, but this {expl.method!r} explanation has none "
            "(methods without a query stage, such as GradCAM, only have Text-to-Patch)"
        )


def _require_q2p(expl, what: str) -> None:
    if expl.query_to_patch is None:
        raise ValueError(
            f"{what} needs a Query-to-Patch map, but this {expl.method!r} explanation has none "
            f"(projector {expl.projector_type!r})"
        )


def _select_map(expl, word: int | str | None, token: int | None,
                interpolation: str = "bilinear") -> tuple[np.ndarray, str]:
    if word is not None and token is not None:
        raise ValueError("give word= or token=, not both")
    values = expl.patch_values(token=token, word=word)
    if token is not None:
        label = f"token “{_escape(expl.output_tokens[token])}”"
    elif word is not None:
        label = f"word “{_escape(expl.words[word] if isinstance(word, int) else word)}”"
    else:
        label = "sentence"
    return _display_map(expl, values, interpolation), label


def _colorbar(fig, axes, cmap, lo: float, hi: float, label: str, orientation: str = "vertical", **kw):
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    flat = not hi > lo
    value = lo
    if flat:  # constant map: the colormap on a unit range, one tick saying the only value there is
        lo, hi = 0.0, 1.0
    mappable = ScalarMappable(norm=Normalize(lo, hi), cmap=cmap)
    cbar = fig.colorbar(mappable, ax=axes, orientation=orientation, **kw)
    cbar.set_label(f"{label} (constant map)" if flat else label)
    if flat:
        cbar.set_ticks([0.0], labels=[f"{value:.3g}"])
    cbar.ax.tick_params(labelsize=7)
    return cbar


def _low_high_colorbar(fig, axes, cmap, label: str, orientation: str = "vertical", **kw):
    cbar = _colorbar(fig, axes, cmap, 0.0, 1.0, label, orientation=orientation, **kw)
    cbar.set_ticks([0.0, 1.0], labels=["low", "high"])
    return cbar


def _text_color(rgb: np.ndarray) -> str:
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "black" if luminance > 0.55 else "white"


def _top_k(values: np.ndarray, k: int) -> list[int]:
    if k <= 0 or not values.max() > values.min():
        return []  # a constant map has no top queries: framing the first k would mark arbitrary ones
    order = np.argsort(-values.ravel(), kind="stable")
    return [int(i) for i in order[: min(k, values.size)]]


# ---- panel drawers (draw into a given Axes; the public functions wrap them in a Figure) ------------------------
def _draw_text_to_image(
    ax, expl, word=None, token=None, alpha=0.5, cmap="jet", interpolation="bilinear", normalize="per_map",
    vmin=None, vmax=None, crop_to_content=False,
) -> tuple[float, float]:
    patch_map, _ = _select_map(expl, word, token, interpolation)
    if normalize == "global" and (vmin is None or vmax is None):
        vmin, vmax = float(patch_map.min()), float(patch_map.max())
    kwargs = {"vmin": vmin, "vmax": vmax} if normalize == "global" else {}
    rgb = overlay(_background(expl), patch_map, alpha=alpha, cmap=cmap, interpolation=interpolation,
                  normalize=normalize, **kwargs)
    ax.imshow(rgb, interpolation="nearest")
    _hide_ticks(ax)
    _flat_map_note(ax, patch_map, normalize)
    if normalize == "global":
        return float(vmin), float(vmax)
    if normalize in (None, "none"):
        return 0.0, 1.0
    return float(patch_map.min()), float(patch_map.max())


def _draw_text_to_query(ax, expl, style="heatmap", top_k=5, word=None, token=None, cmap="jet",
                        annotate=True, panel_in=3.0, normalize="per_map", vmin=None, vmax=None,
                        frame_top=None) -> tuple[float, float]:
    """Draw R_t2q; returns the value range the colors span. ``frame_top`` (default: only for the grid style) frames
    the ``top_k`` queries in red; ``normalize="global"`` colors with the caller's ``vmin``/``vmax``."""
    _require_queries(expl, "the Text-to-Query panel")
    if style not in ("heatmap", "grid"):
        raise ValueError(f"style must be 'heatmap' or 'grid', got {style!r}")
    qh, qw = _resolve_query_grid(expl)
    values = to_numpy_map(expl.query_values(token=token, word=word).reshape(qh, qw), name="text_to_query")
    if normalize == "global" and (vmin is None or vmax is None):
        vmin, vmax = float(values.min()), float(values.max())
    unit = normalize_map(values, normalize, **({"vmin": vmin, "vmax": vmax} if normalize == "global" else {}))
    strip = _is_strip(qh, qw)
    # Tokens without a grid (several views, placeholders) are a strip in sequence order: drawn as a band as tall as
    # the panel allows, not as square cells (1×M squares collapse to a hairline).
    ax.imshow(colorize(unit, cmap), interpolation="nearest", extent=(-0.5, qw - 0.5, qh - 0.5, -0.5),
              aspect="auto" if strip else None)
    ax.set_xlim(-0.5, qw - 0.5)
    ax.set_ylim(qh - 0.5, -0.5)
    _flat_map_note(ax, values, normalize)
    top = _top_k(values, top_k) if (style == "grid" if frame_top is None else frame_top) else []
    for q in top:
        r, c = divmod(q, qw)
        _frame(ax, (c - 0.5, r - 0.5), 1, 1)
    span = (float(vmin), float(vmax)) if normalize == "global" else (float(values.min()), float(values.max()))
    if style == "heatmap":
        step = max(1, math.ceil(max(qh, qw) / 8))
        ax.set_xticks(range(0, qw, step))
        ax.set_yticks([] if strip else range(0, qh, step))
        ax.set_xlabel("image token (sequence order)" if strip else "query column")
        ax.set_ylabel("" if strip else "query row")
        return span
    # Grid map: white cell borders, each cell labelled with its flat query index and its displayed (0-1) value.
    _hide_ticks(ax)
    for r in range(1, qh):
        ax.axhline(r - 0.5, color="white", lw=0.6)
    for c in range(1, qw):
        ax.axvline(c - 0.5, color="white", lw=0.6)
    if annotate:
        # Font from the cell size (the caller knows the panel's size in inches; positions are not laid out yet):
        # two lines, "index" over "value", fit in a cell at about a fifth of its side.
        cell_pt = 72.0 * panel_in / max(qw, qh, 1)
        size = float(min(cell_pt / 5.0, 9.0))
        # Below ~4.5 pt nothing is readable in print: label only the framed top-k cells, a bit larger.
        cells = [divmod(q, qw) for q in range(qh * qw)] if size >= 4.5 else [divmod(q, qw) for q in top]
        size = max(size, 4.5)
        colors = colorize(unit, cmap)
        for r, c in cells:
            ax.text(c, r, f"{r * qw + c}\n{unit[r, c]:.2f}", ha="center", va="center", fontsize=size,
                    color=_text_color(colors[r, c]), linespacing=1.0)
    return span


def _emphasis_overlay(image, patch_map, alpha, cmap, interpolation, normalize, vmin=None, vmax=None):
    """Overlay whose opacity grows with the value, from ``alpha/2`` (cold) to ``min(1, 1.3·alpha)`` (hot).

    Small multiples are viewed small: with one uniform alpha a query's few hot patches drown in the colormap's
    tint over the rest of the tile; letting the photo through where the map is cold keeps them visible.
    """
    unit = normalize_map(to_numpy_map(patch_map), normalize, vmin=vmin, vmax=vmax)
    big = np.clip(upsample(unit, image.shape[:2], interpolation), 0.0, 1.0)
    weight = (alpha / 2 + (min(1.0, 1.3 * alpha) - alpha / 2) * big)[..., None]
    blended = (1.0 - weight) * image.astype(np.float64) + weight * colorize(big, cmap) * 255.0
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def query_mosaic(
    expl, alpha=0.5, cmap="jet", interpolation="bilinear", normalize="per_map", crop_to_content=False,
    tile_px: int | None = None, gap_px: int = 2, grayscale: bool = True, queries: Sequence[int] | None = None,
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """The Query-to-Image small multiples as one RGB image (white gaps between tiles).

    Opacity grows with the value (``alpha/2`` where a query's map is cold, ``min(1, 1.3·alpha)`` where it is hot),
    so a query's few hot patches stay visible at small-multiple size. ``grayscale=True`` draws the photo in gray
    under the maps: at small-multiple size a colored photo competes with
    the colormap (a red pooling window vanishes on a red object). ``normalize="global"`` puts every tile on the
    scale of the whole Query-to-Patch map (the shown tiles and the others), so weak queries look weak.

    ``queries``: the query indices to tile, in that order, on a near-square grid (default: all M on the query grid).

    Returns ``(mosaic uint8 [.., .., 3], (tile_h, tile_w), (rows, cols))``; tile ``(r, c)`` starts at pixel
    ``(r·(tile_h+gap), c·(tile_w+gap))`` and shows query ``r·cols + c`` (or ``queries[r·cols + c]``).
    """
    _require_q2p(expl, "the Query-to-Image panel")
    import cv2

    q2p = expl.query_to_patch
    m = q2p.shape[0]
    if queries is None:
        qh, qw = _resolve_query_grid(expl) if expl.text_to_query is not None or expl.query_grid else (1, m)
        if qh * qw != m:
            raise ValueError(f"query grid {(qh, qw)} does not hold the M={m} rows of query_to_patch")
        shown = list(range(m))
    else:
        shown = [int(q) for q in queries]
        if not shown or any(not 0 <= q < m for q in shown):
            raise ValueError(f"queries must be a non-empty list of indices in [0, {m}), got {list(queries)}")
        qw = math.ceil(math.sqrt(len(shown)))
        qh = math.ceil(len(shown) / qw)
    background = _background(expl)
    height, width = background.shape[:2]
    if tile_px is None:
        tile_px = int(np.clip(1200 // max(qh, qw), 32, 160))
    scale = tile_px / max(height, width)  # tiles keep the image's aspect ratio
    full_h, full_w = max(1, round(height * scale)), max(1, round(width * scale))
    small = cv2.resize(background, (full_w, full_h), interpolation=cv2.INTER_AREA)  # explicit (W, H); stays RGB
    if grayscale:
        small = np.repeat(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    maps = _display_map(expl, q2p.reshape(m, -1), interpolation, size=small.shape[:2])
    kwargs = {}
    if normalize == "global":
        kwargs = {"vmin": float(maps.min()), "vmax": float(maps.max())}
    tiles = [
        _emphasis_overlay(small, maps[q], alpha, cmap, interpolation, normalize, **kwargs) for q in shown
    ]
    tile_h, tile_w = tiles[0].shape[:2]
    mosaic = np.full((qh * (tile_h + gap_px) - gap_px, qw * (tile_w + gap_px) - gap_px, 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, qw)
        y, x = r * (tile_h + gap_px), c * (tile_w + gap_px)
        mosaic[y: y + tile_h, x: x + tile_w] = tile
    return mosaic, (tile_h, tile_w), (qh, qw)


# More queries than this make Query-to-Image tiles too small to read in a decomposition panel: it shows the top ones.
MAX_DECOMPOSITION_TILES = 36
TOP_QUERY_TILES = 16


def top_queries(expl, k: int) -> list[int]:
    """The ``k`` queries with the highest sentence Text-to-Query relevance, most relevant first."""
    _require_queries(expl, "choosing the top queries")
    values = to_numpy_map(expl.sentence_text_to_query.reshape(1, -1)).ravel()
    return [int(i) for i in np.argsort(-values, kind="stable")[: max(0, k)]]


def _frame(ax, xy, width, height, lw=2.0):
    """A red frame with a thin white halo: visible on the red (hot) end of the colormap too."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    rect = Rectangle(xy, width, height, fill=False, edgecolor=_HIGHLIGHT, lw=lw, zorder=5)
    rect.set_path_effects([patheffects.withStroke(linewidth=lw + 1.6, foreground="white"), patheffects.Normal()])
    ax.add_patch(rect)


def _draw_query_to_image(ax, expl, top_k=5, alpha=0.65, cmap="jet", interpolation="nearest", normalize="per_map",
                         crop_to_content=False, label_queries=True, gap_px=2, queries=None) -> None:
    """Draw the Query-to-Image mosaic: all queries on their grid (rows labelled by first index, columns by offset),
    or the chosen ``queries`` each labelled with its index. The ``top_k`` queries by sentence R_t2q are framed."""
    mosaic, (tile_h, tile_w), (qh, qw) = query_mosaic(
        expl, alpha=alpha, cmap=cmap, interpolation=interpolation, normalize=normalize,
        crop_to_content=crop_to_content, gap_px=gap_px, queries=queries,
    )
    ax.imshow(mosaic, interpolation="antialiased")
    _hide_ticks(ax)
    fig_w_in = ax.figure.get_size_inches()[0]
    tile_pt = 72.0 * fig_w_in * ax.get_position().width / max(qw, 1)
    shown = list(range(qh * qw)) if queries is None else [int(q) for q in queries]
    if label_queries and queries is not None:
        size = float(np.clip(tile_pt / 4.5, 5.0, 8.0))
        for k, q in enumerate(shown):
            r, c = divmod(k, qw)
            ax.text(c * (tile_w + gap_px) + 1.5, r * (tile_h + gap_px) + 1.5, str(q), ha="left", va="top",
                    fontsize=size, color="black", zorder=6,
                    bbox={"boxstyle": "square,pad=0.12", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    elif label_queries:
        # Query index = row·q_w + col: rows are labelled with their first index, columns with the offset, so no
        # label covers a tile's content (query 0's window is the top-left corner).
        # Column labels like "+10" need ~16 pt side by side at 6.5 pt; thin them out on small panels.
        step_c = max(1, math.ceil(qw / 12), math.ceil(16.0 / max(tile_pt, 1e-3)))
        step_r = max(1, math.ceil(qh / 12), math.ceil(9.0 / max(tile_pt, 1e-3)))
        ax.set_yticks([r * (tile_h + gap_px) + tile_h / 2 for r in range(0, qh, step_r)],
                      labels=[str(r * qw) for r in range(0, qh, step_r)])
        ax.set_xticks([c * (tile_w + gap_px) + tile_w / 2 for c in range(0, qw, step_c)],
                      labels=[f"+{c}" for c in range(0, qw, step_c)])
        ax.tick_params(length=0, pad=1.5, labelsize=6.5 if max(qh, qw) > 8 else 7.5)
    if expl.text_to_query is not None:
        for q in _top_k(to_numpy_map(expl.sentence_text_to_query.reshape(1, -1)), top_k):
            if q not in shown:
                continue
            r, c = divmod(shown.index(q), qw)
            _frame(ax, (c * (tile_w + gap_px) - 0.5, r * (tile_h + gap_px) - 0.5), tile_w, tile_h, lw=1.5)


def _query_selection(expl, queries) -> list[int] | None:
    """``queries`` of the Query-to-Image panels: None (all), ``"top"`` (all up to MAX_DECOMPOSITION_TILES queries,
    else the TOP_QUERY_TILES with the highest R_t2q), an int k (the top k by R_t2q) or explicit indices."""
    m = expl.query_to_patch.shape[0]
    if queries is None:
        return None
    if isinstance(queries, str):
        if queries != "top":
            raise ValueError(f"queries must be None, 'top', an int or a list of query indices, got {queries!r}")
        if m <= MAX_DECOMPOSITION_TILES or expl.text_to_query is None:
            return None
        return top_queries(expl, TOP_QUERY_TILES)
    if isinstance(queries, int) and not isinstance(queries, bool):
        if queries < 1:
            raise ValueError(f"queries must be >= 1, got {queries}")
        return None if queries >= m else top_queries(expl, queries)
    return [int(q) for q in queries]


def _q2i_colorbar_label(normalize: str) -> str:
    return ("Query-to-Patch weight (one scale for all queries)" if normalize == "global"
            else "Query-to-Patch weight (min–max per query)")


# ---- public figures --------------------------------------------------------------------------------------------
_SCALE_LABELS = {"per_map": "relevance (min–max of each map)", "global": "relevance (one scale for all panels)"}
NORMALIZE_CHOICES = ("per_map", "global")


def _check_normalize(normalize: str) -> None:
    if normalize not in NORMALIZE_CHOICES:
        raise ValueError(f"normalize must be 'per_map' or 'global', got {normalize!r}")


def plot_text_to_image(
    expl, word: int | str | None = None, token: int | None = None, alpha: float = 0.5, cmap: Any = "jet",
    interpolation: str = "bilinear", normalize: str = "per_map", crop_to_content: bool = False,
    colorbar: bool = True, title: str | None = None, note: str | None = None,
):
    """Text-to-Image ``R_t2i``: the sentence map (default), one word's or one token's map over the image.

    ``crop_to_content`` is kept for callers of the earlier API and changes nothing: maps are drawn over the original
    image (every view warped back to it), so there is no padding to crop.
    The colorbar shows the map's own relevance range. ``note`` (e.g. "out of domain: ...") is added to the title.
    An all-zero map says so on the panel.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> e = synthetic_explanation()
        >>> fig = plot_text_to_image(e, word="green")
    """
    width_in = 3.4
    bg = _background(expl)
    h, w = bg.shape[:2]
    fig = _new_figure((width_in, width_in * h / w * 0.82 + 0.75))
    ax = fig.add_subplot()
    lo, hi = _draw_text_to_image(ax, expl, word=word, token=token, alpha=alpha, cmap=cmap,
                                 interpolation=interpolation, normalize=normalize, crop_to_content=crop_to_content)
    _, label = _select_map(expl, word, token)
    chars = _chars_per_line(width_in, 9.5)
    ax.set_title(_with_note(title if title is not None else f"{_PANEL_TITLES['t2i']}, {label}\n"
                            f"{_caption(expl.target_text, chars)}", note, chars))
    if colorbar:
        _colorbar(fig, ax, cmap, lo, hi, "relevance", shrink=0.85, pad=0.02)
    return _freeze_layout(fig)


def plot_words(
    expl, words: Sequence[int | str] | None = None, include_sentence: bool = True, ncols: int = 5,
    alpha: float = 0.5, cmap: Any = "jet", interpolation: str = "bilinear", normalize: str = "per_map",
    crop_to_content: bool = False, note: str | None = None,
):
    """Per-word Text-to-Image maps (subword tokens merged via ``expl.words``), one panel per word.

    ``normalize="global"`` puts all panels on one scale with one shared colorbar in relevance units; ``"per_map"``
    stretches each (the colorbar says which).

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> e = synthetic_explanation()
        >>> fig = plot_words(e, normalize="global")
    """
    _check_normalize(normalize)
    chosen: list[int | None] = list(range(len(expl.words))) if words is None else [
        expl.words.index(w) if isinstance(w, str) and w in expl.words else w for w in words
    ]
    for w in chosen:
        if isinstance(w, str):
            raise KeyError(f"word {w!r} is not in the target; words are {expl.words}")
        if not 0 <= w < len(expl.words):
            raise IndexError(f"word index {w} out of range (the target has {len(expl.words)} words)")
    panels: list[int | None] = ([None] if include_sentence else []) + chosen
    if not panels:
        raise ValueError("nothing to plot: no words selected and include_sentence=False")
    maps = [_select_map(expl, w, None, interpolation)[0] for w in panels]
    vmin = float(min(m.min() for m in maps)) if normalize == "global" else None
    vmax = float(max(m.max() for m in maps)) if normalize == "global" else None
    # Balanced rows: 6 panels with at most 5 columns are 2×3, not 5 + an orphan.
    nrows = math.ceil(len(panels) / max(1, ncols))
    ncols = math.ceil(len(panels) / nrows)
    bg = _background(expl)
    h, w = bg.shape[:2]
    panel_in = 1.45
    fig = _new_figure((panel_in * ncols + 0.8, (panel_in * h / w + 0.3) * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_axis_off()
            continue
        w_idx = panels[k]
        _draw_text_to_image(ax, expl, word=w_idx, alpha=alpha, cmap=cmap, interpolation=interpolation,
                            normalize=normalize, vmin=vmin, vmax=vmax, crop_to_content=crop_to_content)
        ax.set_title("sentence" if w_idx is None else f"“{_short(expl.words[w_idx])}”", fontsize=9)
    chars = _chars_per_line(fig.get_size_inches()[0])
    fig.suptitle(_with_note(f"{_PANEL_TITLES['t2i']} per word\n{_caption(expl.target_text, chars)}", note, chars))
    _scale_colorbar(fig, axes, cmap, normalize, vmin, vmax, shrink=0.8, pad=0.01)
    return _freeze_layout(fig)


def _scale_colorbar(fig, axes, cmap, normalize, vmin, vmax, **kw):
    """The colorbar of figures whose panels share a normalization: relevance values for one shared scale,
    low/high for per-map scales; the label says which."""
    if normalize == "global":
        return _colorbar(fig, axes, cmap, vmin, vmax, _SCALE_LABELS["global"], **kw)
    return _low_high_colorbar(fig, axes, cmap, _SCALE_LABELS["per_map"], **kw)


def plot_text_to_query(expl, style: str = "heatmap", top_k: int = 5, word: int | str | None = None,
                       token: int | None = None, cmap: Any = "jet", note: str | None = None):
    """Text-to-Query ``R_t2q`` on the √M×√M query grid.

    ``style="heatmap"``: the query importances with row/column indices. ``style="grid"``: a grid map whose cells
    carry the flat query index (``row·q_w + col``, the LLM's image-token order) and the min–max normalized value;
    the ``top_k`` most relevant queries are framed in red.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> e = synthetic_explanation()
        >>> fig = plot_text_to_query(e, style="grid", top_k=3)
    """
    _require_queries(expl, "plot_text_to_query")
    qh, qw = _resolve_query_grid(expl)
    side = float(np.clip(0.42 * max(qh, qw), 3.0, 6.5)) if style == "grid" else 3.2
    height = side * qh / max(qh, qw)
    if _is_strip(qh, qw):  # a band with room for its title, axis label and colorbar
        height = max(height, 1.6)
    fig = _new_figure((side * qw / max(qh, qw) + 0.9, height + 0.7))
    ax = fig.add_subplot()
    lo, hi = _draw_text_to_query(ax, expl, style=style, top_k=top_k, word=word, token=token, cmap=cmap,
                                 panel_in=side)
    what = "sentence" if word is None and token is None else (
        f"word “{_escape(word if isinstance(word, str) else expl.words[word])}”" if word is not None
        else f"token “{_escape(expl.output_tokens[token])}”")
    extra = f", top-{top_k} framed" if style == "grid" and top_k > 0 else ""
    count = f"{qw} image tokens (no query grid)" if _is_strip(qh, qw) else f"{qh}×{qw} queries"
    ax.set_title(_with_note(f"{_PANEL_TITLES['t2q']}, {what}{extra}\n{count}", note, _chars_per_line(side + 0.9)))
    # A band's colorbar goes under it: a vertical one would be as short as the band.
    bar = {"orientation": "horizontal", "shrink": 0.6, "aspect": 30} if _is_strip(qh, qw) else {"shrink": 0.85}
    if style == "grid":
        _low_high_colorbar(fig, ax, cmap, "relevance (min–max; cell values)", pad=0.02, **bar)
    else:
        _colorbar(fig, ax, cmap, lo, hi, "relevance", pad=0.02, **bar)
    return _freeze_layout(fig)


def plot_query_to_image(expl, top_k: int = 5, alpha: float = 0.65, cmap: Any = "jet",
                        interpolation: str = "nearest", normalize: str = "per_map", crop_to_content: bool = False,
                        label_queries: bool = True, queries: int | str | Sequence[int] | None = None,
                        note: str | None = None):
    """Query-to-Image ``R_q2i``: √M×√M small multiples, tile ``q`` = query ``q``'s Query-to-Patch row over the image.

    For a linear projector every tile shows one patch (the identity); for adaptive pooling a 2-D grating; for a
    Q-Former the learned patterns. Tiles are labelled with their flat query index; when the explanation has a
    Text-to-Query map, the ``top_k`` most relevant queries for the sentence are framed in red. The figure grows with
    the query grid (12×12 queries: 0.6-inch tiles); ``queries=k`` shows only the k queries with the highest R_t2q,
    each labelled with its index (``"top"``: all up to 36 queries, else the top 16). ``normalize="global"`` puts
    every tile on one scale (weak queries look weak); ``"per_map"`` stretches each query's map.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> e = synthetic_explanation()
        >>> fig = plot_query_to_image(e, queries=4, normalize="global")
    """
    _require_q2p(expl, "plot_query_to_image")
    _check_normalize(normalize)
    chosen = _query_selection(expl, queries)
    m = expl.query_to_patch.shape[0]
    n_tiles = m if chosen is None else len(chosen)
    side = float(np.clip(0.6 * math.ceil(math.sqrt(n_tiles)), 4.0, 10.0))
    fig = _new_figure((side, side + 0.6))
    ax = fig.add_subplot()
    _draw_query_to_image(ax, expl, top_k=top_k, alpha=alpha, cmap=cmap, interpolation=interpolation,
                         normalize=normalize, crop_to_content=crop_to_content, label_queries=label_queries,
                         queries=chosen)
    framed = (f"; red: the top-{top_k} queries by sentence $R_{{t2q}}$" if expl.text_to_query is not None and top_k
              else "")
    what = (f"the {n_tiles} of {m} queries with the highest $R_{{t2q}}$, labelled by index" if chosen is not None
            else "one tile per query (index = row label + column offset)")
    ax.set_title(_with_note(f"{_PANEL_TITLES['q2i']}: {what}\n{framed.lstrip('; ')}".rstrip(), note,
                            _chars_per_line(side)))
    _query_colorbar(fig, ax, cmap, normalize, expl, shrink=0.6, pad=0.02)
    return _freeze_layout(fig)


def _query_colorbar(fig, axes, cmap, normalize, expl, **kw):
    if normalize == "global":
        q2p = to_numpy_map(expl.query_to_patch.reshape(expl.query_to_patch.shape[0], -1), name="query_to_patch")
        return _colorbar(fig, axes, cmap, float(q2p.min()), float(q2p.max()), _q2i_colorbar_label(normalize), **kw)
    return _low_high_colorbar(fig, axes, cmap, _q2i_colorbar_label(normalize), **kw)


def plot_decomposition(expl, style: str = "heatmap", top_k: int = 5, alpha: float = 0.5, cmap: Any = "jet",
                       interpolation: str = "bilinear", crop_to_content: bool = False,
                       q2i_interpolation: str = "nearest", q2i_alpha: float = 0.65, normalize: str = "per_map",
                       queries: int | str | Sequence[int] | None = "top", note: str | None = None):
    """The paper's Figure 3 row: ``R_t2i | R_t2q | R_q2i`` (``R_t2i = R_t2q · R_q2i``), with titles.

    Explanations without a query stage (e.g. GradCAM) get the ``R_t2i`` panel alone (with a note), so that
    ``Explanation._repr_png_`` works for every method. ``style="grid"`` draws the middle panel as a grid map.
    ``interpolation``/``alpha`` are for ``R_t2i``; ``q2i_interpolation`` (default ``nearest``: pooling windows stay
    sharp squares) and ``q2i_alpha`` (stronger, so small windows stay visible in small tiles) for ``R_q2i``.

    The red frames mark the same ``top_k`` queries (highest sentence R_t2q) in the R_t2q and R_q2i panels; the
    title says so. ``queries`` picks the R_q2i tiles (default ``"top"``: all up to 36 queries, else the 16 with the
    highest R_t2q, labelled by index, so a 12×12 grid stays readable; ``None``: all; an int k: the top k).
    ``normalize="per_map"`` stretches each panel (and each R_q2i tile) to its own range; ``"global"`` draws R_t2i
    and R_t2q on one relevance scale and all R_q2i tiles on one Query-to-Patch scale, with colorbars in those units.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> e = synthetic_explanation()
        >>> fig = plot_decomposition(e, style="grid", normalize="global")
    """
    _check_normalize(normalize)
    has_t2q = expl.text_to_query is not None
    has_q2p = expl.query_to_patch is not None
    n_panels = 1 + int(has_t2q) + int(has_q2p)
    panel_in = 2.45 if n_panels > 1 else 3.2
    fig = _new_figure((panel_in * n_panels + 0.3, panel_in + 1.15 + (0.35 if normalize == "global" else 0.0)))
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    vmin = vmax = None
    if normalize == "global":
        values = [to_numpy_map(expl.patch_map())]
        if has_t2q:
            values.append(to_numpy_map(expl.sentence_text_to_query.reshape(1, -1), name="text_to_query"))
        vmin, vmax = float(min(v.min() for v in values)), float(max(v.max() for v in values))
    _draw_text_to_image(axes[0], expl, alpha=alpha, cmap=cmap, interpolation=interpolation,
                        crop_to_content=crop_to_content, normalize=normalize, vmin=vmin, vmax=vmax)
    axes[0].set_title(_PANEL_TITLES["t2i"])
    k = 1
    if has_t2q:
        _draw_text_to_query(axes[k], expl, style=style, top_k=top_k, cmap=cmap, panel_in=0.9 * panel_in,
                            normalize=normalize, vmin=vmin, vmax=vmax, frame_top=True)
        axes[k].set_title(_PANEL_TITLES["t2q"])
        k += 1
    chosen = None
    if has_q2p:
        chosen = _query_selection(expl, queries)
        _draw_query_to_image(axes[k], expl, top_k=top_k, alpha=q2i_alpha, cmap=cmap, interpolation=q2i_interpolation,
                             crop_to_content=crop_to_content, normalize=normalize, queries=chosen)
        m = expl.query_to_patch.shape[0]
        axes[k].set_title(_PANEL_TITLES["q2i"] + (f"\ntop {len(chosen)} of {m} queries" if chosen else ""))
    prefix = f"{expl.method}, projector {expl.projector_type}" if expl.projector_type else f"{expl.method}"
    note_line = "" if n_panels > 1 else f"\n(no query stage for method {_escape(expl.method)})"
    if has_t2q and top_k > 0:
        note_line += f"\nred frames: the top-{top_k} queries by sentence $R_{{t2q}}$"
    chars = _chars_per_line(fig.get_size_inches()[0])
    fig.suptitle(_with_note(_caption(expl.target_text, chars, prefix=f"{prefix}: ") + note_line, note, chars))
    relevance_axes = list(axes[: 1 + int(has_t2q)])
    bar = {"orientation": "horizontal", "aspect": 30, "pad": 0.03}
    if normalize == "global":
        _colorbar(fig, relevance_axes, cmap, vmin, vmax, "relevance (one scale for $R_{t2i}$ and $R_{t2q}$)",
                  shrink=0.7, **bar)
        if has_q2p:
            _query_colorbar(fig, [axes[-1]], cmap, normalize, expl, shrink=0.9, **bar)
    else:
        _low_high_colorbar(fig, list(axes), cmap, "relevance (min–max of each panel; $R_{q2i}$: of each query)",
                           shrink=0.35 if n_panels > 1 else 0.7, **bar)
    return _freeze_layout(fig)


def _row_label(ax, label: str, row_in: float, fontsize: float = 9.5) -> None:
    """A row's label left of its first panel: along it when it fits the row's height, else across (wrapped)."""
    lines = str(label).split("\n")
    if len(lines) == 1 and len(label) * fontsize * 0.6 / 72.0 <= row_in:
        ax.set_ylabel(_escape(label), fontsize=fontsize)
        return
    wrapped = "\n".join(part for line in lines for part in (textwrap.wrap(line, 16) or [""]))
    ax.set_ylabel(_escape(wrapped), fontsize=fontsize, rotation=0, ha="right", va="center", labelpad=4)


_ROW_LABELS = {
    "method": lambda e: e.method,
    "projector": lambda e: e.projector_type,
    "model": lambda e: e.model_name or e.projector_type,
}


def plot_comparison(
    explanations: Sequence[Any] | Mapping[str, Any], rows: str = "method",
    words: Sequence[int | str | None] | None = None,
    normalize: str = "per_map", show_image: bool = True, alpha: float = 0.5, cmap: Any = "jet",
    interpolation: str = "bilinear", crop_to_content: bool = False, note: str | None = None,
):
    """Comparison grid: one row per explanation (labelled by method, projector or model), one column per word.

    Every row is drawn over its own explanation's original image through its own layout
    (:meth:`~rgae.Explanation.image_map`), so rows of different model families — one patch grid, anyres tiles,
    tiles + thumbnail — compare on the same pixels when they explain the same image.

    Args:
        explanations: a list of Explanations, or ``{row label: Explanation}``.
        rows: ``"method"``, ``"projector"`` or ``"model"`` (the model's name, else its projector) — what labels the
            rows (ignored for a mapping).
        words: words (text or index into the first explanation's words; ``None`` = the sentence map).
            Default: all words of the first explanation. Words are matched by text in the other rows; a row
            without that word shows an empty cell.
        normalize: ``"per_map"`` (each cell min–max) or ``"global"`` (every cell on one scale, one shared
            colorbar in relevance units); the colorbar's label says which.
        note: a line added to the title (e.g. that the image is out of the models' domain).

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> a, b = synthetic_explanation(seed=0), synthetic_explanation(method="rollout", seed=1)
        >>> fig = plot_comparison([a, b], rows="method", words=["pot", "plants"], normalize="global")
    """
    if rows not in _ROW_LABELS:
        raise ValueError(f"rows must be one of {tuple(_ROW_LABELS)}, got {rows!r}")
    _check_normalize(normalize)
    if isinstance(explanations, Mapping):
        labels, expls = [str(k) for k in explanations], list(explanations.values())
    else:
        expls = list(explanations)
        labels = [str(_ROW_LABELS[rows](e) or "?") for e in expls]
    if not expls:
        raise ValueError("plot_comparison needs at least one explanation")
    first = expls[0]
    columns: list[str | None] = list(first.words) if words is None else [
        first.words[w] if isinstance(w, int) else w for w in words
    ]
    if not columns:
        raise ValueError("no words to compare")

    def cell_map(e, word):
        if word is not None and word not in e.words:
            return None
        return _select_map(e, word, None, interpolation)[0]

    maps = [[cell_map(e, w) for w in columns] for e in expls]
    present = [m for row in maps for m in row if m is not None]
    if not present:
        raise ValueError(f"none of the words {columns} occur in the explanations")
    vmin = float(min(m.min() for m in present)) if normalize == "global" else None
    vmax = float(max(m.max() for m in present)) if normalize == "global" else None
    ncols = len(columns) + int(show_image)
    bg = _background(first)
    h, w = bg.shape[:2]
    panel_in = 1.35
    fig = _new_figure((panel_in * ncols + 1.2, (panel_in * h / w + 0.1) * len(expls) + 0.7))
    axes = fig.subplots(len(expls), ncols, squeeze=False)
    for r, (e, label) in enumerate(zip(expls, labels)):
        if show_image:
            ax = axes[r, 0]
            ax.imshow(_background(e))
            _hide_ticks(ax)
            if r == 0:
                ax.set_title("image")
        for c, word in enumerate(columns):
            ax = axes[r, c + int(show_image)]
            if maps[r][c] is None:
                _hide_ticks(ax)
                ax.text(0.5, 0.5, "word not\nin target", ha="center", va="center", fontsize=7, color="0.4",
                        transform=ax.transAxes)
            else:
                _draw_text_to_image(ax, e, word=word, alpha=alpha, cmap=cmap, interpolation=interpolation,
                                    normalize=normalize, vmin=vmin, vmax=vmax, crop_to_content=crop_to_content)
            if r == 0:
                ax.set_title("sentence" if word is None else f"“{_short(word)}”")
        _row_label(axes[r, 0], label, panel_in * h / w)
    _scale_colorbar(fig, axes, cmap, normalize, vmin, vmax, shrink=0.8, pad=0.01)
    chars = _chars_per_line(fig.get_size_inches()[0])
    fig.suptitle(_with_note(_caption(first.target_text, chars), note, chars))
    return _freeze_layout(fig)


PLOT_KINDS = ("decomposition", "text_to_image", "words", "text_to_query", "query_grid", "query_to_image")


def plot(explanation, kind: str = "decomposition", **kwargs):
    """One figure of an explanation by name; ``Explanation.plot(kind)`` calls this.

    Kinds: ``decomposition`` (:func:`plot_decomposition`), ``text_to_image``, ``words``, ``text_to_query``
    (heatmap), ``query_grid`` (Text-to-Query grid map), ``query_to_image``.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> e = synthetic_explanation()
        >>> fig = plot(e, kind="query_grid", top_k=3)
    """
    if kind == "decomposition":
        return plot_decomposition(explanation, **kwargs)
    if kind == "text_to_image":
        return plot_text_to_image(explanation, **kwargs)
    if kind == "words":
        return plot_words(explanation, **kwargs)
    if kind == "text_to_query":
        return plot_text_to_query(explanation, **{"style": "heatmap", **kwargs})
    if kind == "query_grid":
        return plot_text_to_query(explanation, **{"style": "grid", **kwargs})
    if kind == "query_to_image":
        return plot_query_to_image(explanation, **kwargs)
    raise ValueError(f"kind must be one of {PLOT_KINDS}, got {kind!r}")
