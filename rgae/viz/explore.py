"""An interactive explorer: a self-contained HTML page where hovering or clicking a word shows where the model looked.

The page needs no server and no network (no CDN, no external fonts, no requests): the maps are embedded as small
grayscale PNGs of colormap indices, computed by the project's own code (the figures' rendering of a map over the
original image through its layout, :func:`~rgae.viz.overlay.normalize_map` and the colormap of
:func:`~rgae.viz.overlay.colorize`), and a short inline
script colours and blends them exactly as :func:`~rgae.viz.overlay.overlay` does. It works the same in a notebook cell
(``Explanation._repr_html_``), attached to an e-mail, or opened from a cluster's file system.

What a page shows, per explorer:

- the target text as buttons, one per word (hover previews, click selects, click again or *whole sentence* returns
  to the sentence map; arrow keys move, Escape clears);
- per explanation (a *panel*; several explanations of one target sit side by side and share the selection): the
  Text-to-Image overlay of the selected word (the sentence map when none is selected); for explanations with a query
  stage the Text-to-Query grid (click a cell) and that query's Query-to-Image map (the top query of the selection
  until one is clicked); the teacher-forced token probabilities; method, model, projector and options;
- a toggle between per-map colour scales (each map min–max) and one shared scale per panel (the sentence and every
  word of that panel on one range); each map's colorbar says which, with the range in relevance units.

A URL fragment opens a page at a selection: ``page.html#word=3``, ``#word=3&query=5``, ``#scale=shared``; on a page
with several explorers (:func:`explore_sections`) ``#1.word=3`` addresses the second one. Clicking updates the
fragment, so a link to a view can be copied from the address bar.

Example:
    >>> from rgae.viz import explore, synthetic_explanation
    >>> page = explore([synthetic_explanation(), synthetic_explanation(method="rawattn", seed=1)])
    >>> "rgae-explore" in page._repr_html_() and page.html.startswith("<!DOCTYPE html>")
    True
    >>> import os, tempfile
    >>> path = page.save(os.path.join(tempfile.mkdtemp(), "page.html"))  # open it in any browser, offline
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgae.viz.figures import _background, _display_map, _resolve_query_grid
from rgae.viz.overlay import colorize, normalize_map, to_numpy_map

_LUT_SIZE = 256  # colormap entries; a map value u in [0, 1] shows entry min(floor(u * 256), 255), as matplotlib does
DEFAULT_DISPLAY_PX = 336


# ---- the one place where an explanation + a selection becomes a map over the displayed image -------------------------
def selection_map(expl, word: int | None = None, token: int | None = None,
                  size: tuple[int, int] | None = None) -> np.ndarray:
    """The 2-D relevance map that the explorer shows over :func:`display_image` for one selection.

    ``word=None, token=None`` is the sentence map. It is what the figures draw: the Text-to-Patch map rendered over
    the original image by the explanation's layout (every view, tiles included), smoothed bilinearly, at ``size``
    (default: the image's size).
    """
    return _display_map(expl, expl.patch_values(token=token, word=word), "bilinear", size=size)


def display_image(expl, display_px: int = DEFAULT_DISPLAY_PX) -> np.ndarray:
    """``uint8 [h, w, 3]``: the image the model saw, at the size the page shows it.

    An image smaller than ``display_px`` is enlarged by the largest whole factor that fits (each pixel a clean block,
    so a 96 px shapes scene shows at 288 px); a larger one is shrunk to ``display_px`` on its long side. Without an
    image the panel shows a gray canvas of 16 px per patch.
    """
    image = _background(expl)
    side = max(image.shape[:2])
    if side <= display_px:
        k = display_px // side
        return np.repeat(np.repeat(image, k, axis=0), k, axis=1)
    from PIL import Image

    scale = display_px / side
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


# ---- encoding -------------------------------------------------------------------------------------------------------
def _png_uri(array: np.ndarray) -> str:
    """A ``data:`` URI of a ``uint8`` PNG (``[H, W]`` grayscale or ``[H, W, 3]`` RGB), written without gamma or colour
    profile chunks so that a browser decodes the exact byte values."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=6)  # 9: 6% smaller, 12x slower
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _lut_indices(unit: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → the colormap entry matplotlib would pick for them (``int(u * N)``, 1.0 → N − 1)."""
    return np.minimum(np.floor(np.clip(unit, 0.0, 1.0) * _LUT_SIZE), _LUT_SIZE - 1).astype(np.uint8)


def _rows(values: np.ndarray) -> dict:
    """``[R, K]`` maps, each row min–max normalized on its own → one PNG of colormap indices + each row's range (the
    shared range is the min/max of those) and each row's top entry."""
    values = np.asarray(values, dtype=np.float64)
    unit = np.stack([normalize_map(row[None, :])[0] for row in values])
    return {"png": _png_uri(_lut_indices(unit)), "lo": _floats(values.min(axis=1)), "hi": _floats(values.max(axis=1)),
            "top": [int(i) for i in values.argmax(axis=1)]}


def _floats(values) -> list[float]:
    # 6 significant digits: the page shows 3; JSON of full float64 reprs would double the numeric part of the page.
    return [float(f"{float(v):.6g}") for v in values]


def _lut(cmap: Any) -> list[list[float]]:
    """The colormap sampled at each entry's center, in 0..255 (what :func:`~rgae.viz.overlay.overlay` multiplies)."""
    rgb = colorize((np.arange(_LUT_SIZE) + 0.5) / _LUT_SIZE, cmap) * 255.0
    return [[float(c) for c in entry] for entry in rgb]  # exact: the page's pixels equal overlay()'s


# ---- one panel (one explanation) -----------------------------------------------------------------------------------
def _panel_data(expl, images: dict, display_px: int) -> dict:
    base = display_image(expl, display_px)
    key = f"i{len(images)}"
    uri = _png_uri(base)
    for k, v in images.items():  # methods compared on one image share one embedded copy of it
        if v == uri:
            key = k
            break
    images[key] = uri
    h, w = base.shape[:2]
    selections = [None, *range(len(expl.words))]
    maps = [selection_map(expl, word=s, size=(h, w)) for s in selections]
    if not all(np.isfinite(m).all() for m in maps):
        raise ValueError("the explanation's Text-to-Patch map holds NaN or infinity: nothing to show")
    t2i = {"png": [_png_uri(_lut_indices(normalize_map(m))) for m in maps],
           "lo": _floats([m.min() for m in maps]), "hi": _floats([m.max() for m in maps])}
    panel: dict = {"image": key, "size": [h, w], "views": _view_boxes(expl.image_layout, (h, w)), "t2i": t2i}
    if expl.text_to_query is not None:
        qh, qw = _resolve_query_grid(expl)
        t2q = np.stack([to_numpy_map(expl.query_values(word=s)[None, :])[0] for s in selections])
        panel["t2q"] = {**_rows(t2q), "grid": [qh, qw]}
        if expl.query_to_patch is not None:
            q2p = to_numpy_map(expl.query_to_patch)
            panel["q2p"] = {**_rows(q2p), "view": _query_views(expl.image_layout, q2p)}
    return panel


def _view_boxes(layout, size: tuple[int, int]) -> list[list[float]]:
    """Per view ``[x0, y0, x1, y1, rows, cols, first patch]`` in display pixels: where the page draws a query's
    Query-to-Patch row (each display pixel takes the value of the patch of that view under it)."""
    (height, width), (h, w) = layout.image_size, size
    out, first = [], 0
    for view in layout.views:
        x0, y0, x1, y1 = view.box
        rows, cols = view.grid
        out.append([x0 * w / width, y0 * h / height, x1 * w / width, y1 * h / height, rows, cols, first])
        first += rows * cols
    return out


def _query_views(layout, q2p: np.ndarray) -> list[int]:
    """Per query, the view holding most of its Query-to-Patch mass: every connector here maps a query into one view
    (a tile's tokens read that tile), and the page draws the query over that view's box."""
    bounds = np.cumsum([0] + [rows * cols for rows, cols in (v.grid for v in layout.views)])
    mass = np.stack([np.abs(q2p[:, a:b]).sum(axis=1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    return [int(v) for v in mass.argmax(axis=1)]


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return f"{float(value):.4g}"
    return str(value)


def _colorbar(view: str) -> str:
    return (f'<div class="rx-cbar" data-view="{view}"><span class="rx-lo"></span><canvas class="rx-strip" '
            f'width="{_LUT_SIZE}" height="1"></canvas><span class="rx-hi"></span><div class="rx-mode"></div></div>')


def _panel_html(index: int, label: str, expl, panel: dict) -> str:
    h, w = panel["size"]
    sub = " · ".join(_e(v) for v in (expl.model_name, expl.projector_type) if v)
    parts = [f'<div class="rx-panel" data-panel="{index}"><div class="rx-label"><b>{_e(label)}</b>'
             f'<span class="rx-sub">{sub}</span></div>',
             f'<figure><figcaption class="rx-cap" data-view="t2i"></figcaption>'
             f'<canvas class="rx-t2i" width="{w}" height="{h}"></canvas>{_colorbar("t2i")}</figure>']
    if "t2q" in panel:
        qh, qw = panel["t2q"]["grid"]
        cell = max(4, 192 // max(qh, qw))
        parts.append(f'<figure><figcaption class="rx-cap" data-view="t2q"></figcaption><canvas class="rx-t2q" '
                     f'width="{qw * cell}" height="{qh * cell}" title="click a query"></canvas>{_colorbar("t2q")}'
                     "</figure>")
        if "q2p" in panel:
            parts.append(f'<figure><figcaption class="rx-cap" data-view="q2i"></figcaption>'
                         f'<canvas class="rx-q2i" width="{w}" height="{h}"></canvas>{_colorbar("q2i")}</figure>')
        else:
            parts.append('<p class="rx-note">No Query-to-Patch map: this projector has none.</p>')
    else:
        parts.append(f'<p class="rx-note">No query stage: {_e(expl.method)} maps text to patches directly.</p>')
    probs = None if expl.token_probs is None else [float(p) for p in expl.token_probs]
    tokens = []
    for t, (tok, wid) in enumerate(zip(expl.output_tokens, expl.word_ids)):
        p = "" if probs is None else f"<small>{probs[t]:.2f}</small>"
        bar = "" if probs is None else f' style="--p:{probs[t]:.3f}"'
        tokens.append(f'<span class="rx-tok" data-word="{int(wid)}"{bar}>{_e(tok)}{p}</span>')
    caption = "token probabilities (teacher-forced)" if probs is not None else "tokens (no probabilities recorded)"
    parts.append(f'<div class="rx-tokens" title="{caption}">{"".join(tokens)}</div>')
    meta = [("method", expl.method), ("model", expl.model_name), ("projector", expl.projector_type),
            ("patch grid", "×".join(map(str, expl.patch_grid)) if expl.patch_grid is not None
             else f"{len(expl.image_layout.views)} views, {expl.n_patches} patches"),
            ("query grid", "×".join(map(str, panel["t2q"]["grid"])) if "t2q" in panel else None),
            ("target", expl.target_text), ("prompt", expl.prompt)]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in meta if v is not None)
    options = json.dumps(expl.options, indent=1, sort_keys=True, default=str)
    parts.append(f"<details><summary>method, model, options</summary><table>{rows}</table>"
                 f"<pre>{_e(options)}</pre></details></div>")
    return "".join(parts)


def _panels(explanations) -> tuple[list[str], list]:
    """``(labels, explanations)`` from one Explanation, a list of them, or a dict ``label -> Explanation``; checked."""
    from rgae.explanation import Explanation

    if isinstance(explanations, Explanation):
        explanations = [explanations]
    if isinstance(explanations, Mapping):
        labels, items = [str(k) for k in explanations], list(explanations.values())
    elif isinstance(explanations, Sequence) and not isinstance(explanations, str):
        labels, items = None, list(explanations)
    else:
        raise ValueError(f"explore expects an Explanation, a list of them or a dict label -> Explanation, "
                         f"got {type(explanations).__name__}")
    if not items:
        raise ValueError("explore needs at least one Explanation")
    bad = [type(e).__name__ for e in items if not isinstance(e, Explanation)]
    if bad:
        raise ValueError(f"explore expects Explanations (one, a list, or a dict label -> Explanation), got {bad}")
    words = items[0].words
    for e in items[1:]:
        if e.words != words:
            raise ValueError(
                "explanations shown side by side share the word selection, so they must explain the same words; "
                f"got {words} and {e.words}"
            )
    if labels is None:
        models = {e.model_name for e in items}
        labels = [e.method if len(models) <= 1 else f"{e.method} · {e.model_name}" for e in items]
    return labels, items


def _explorer_html(explanations, title: str | None, metrics: Mapping | None, alpha: float, cmap: Any,
                   display_px: int) -> str:
    labels, items = _panels(explanations)
    images: dict[str, str] = {}
    panels = [_panel_data(e, images, display_px) for e in items]
    data = {"alpha": float(alpha), "lut": _lut(cmap), "images": images, "panels": panels,
            "nWords": len(items[0].words)}
    first = items[0]
    words = []
    for i, word in enumerate(first.words):
        toks = [first.output_tokens[t] for t in first.word_tokens(i)]
        words.append(f'<button type="button" class="rx-word" data-word="{i}" title="{_e("tokens: " + " ".join(toks))}">'
                     f"{_e(word)}</button>")
    head = _e(title if title is not None else first.target_text)
    panels_html = "".join(_panel_html(i, lab, e, p) for i, (lab, e, p) in enumerate(zip(labels, items, panels)))
    metric_html = ""
    if metrics:
        metric_html = '<table class="rx-metrics">' + "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in _flatten(metrics).items()) + "</table>"
    return (
        f'<div class="rgae-explore"><script type="application/json" class="rx-data">{_json_for_script(data)}</script>'
        f'<div class="rx-head"><span class="rx-title">{head}</span><label class="rx-toggle"><input type="checkbox" '
        f'class="rx-shared"> shared colour scale</label></div>{metric_html}'
        f'<div class="rx-words"><button type="button" class="rx-word rx-sentence" data-word="">whole sentence</button>'
        f'{" ".join(words)}</div>'
        f'<div class="rx-panels">{panels_html}'
        "</div></div>"
    )


def _json_for_script(data) -> str:
    # Inside <script> only "</script" or "<!--" could end or confuse the element: escape every <, > and & (JSON
    # allows \\u escapes anywhere in strings; the data holds only numbers and base64 anyway).
    text = json.dumps(data, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _flatten(metrics: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


# ---- pages ----------------------------------------------------------------------------------------------------------
def _write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically, with the umask's normal permissions (a page is meant to be shared)."""
    from rgae.io import atomic_write

    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class ExplorerPage:
    """A self-contained explorer page: ``.html`` (the whole document), ``.save(path)``, and ``_repr_html_`` for
    notebooks (the explorers without the document around them, URL fragment left alone)."""

    def __init__(self, sections: list[tuple[str | None, str]], title: str, nav: str = ""):
        self._sections = sections
        self.title = title
        self._nav = nav

    def _body(self) -> str:
        return "".join((f"<h2>{_e(heading)}</h2>" if heading else "") + widget for heading, widget in self._sections)

    @property
    def html(self) -> str:
        """The standalone document (UTF-8), with fragment support (``#word=3``)."""
        # One explorer heads itself (its title line); a page of several gets the page title above them.
        heading = f"<h1>{_e(self.title)}</h1>" if len(self._sections) > 1 else ""
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            # No network from this page, ever: a Content-Security-Policy that allows only inline code and data: URIs.
            '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">"
            f"<title>{_e(self.title)}</title><style>{_CSS}</style></head>"
            f'<body class="rx-page" data-sync-url="1">{self._nav}{heading}{self._body()}'
            f"<script>{_JS}</script></body></html>\n"
        )

    def _repr_html_(self) -> str:
        return f"<style>{_CSS}</style>{self._body()}<script>{_JS}</script>"

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page atomically (UTF-8) and return its path."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; give the path of the .html file to write")
        return _write_text(path, self.html)

    def __len__(self) -> int:
        return len(self.html.encode("utf-8"))

    def __repr__(self) -> str:
        return f"ExplorerPage({self.title!r}, {len(self._sections)} explorer(s))"


def explore(
    explanations,
    *,
    title: str | None = None,
    metrics: Mapping[str, Any] | None = None,
    alpha: float = 0.5,
    cmap: Any = "jet",
    display_px: int = DEFAULT_DISPLAY_PX,
) -> ExplorerPage:
    """An interactive page for one Explanation or several of the same target (methods or models, side by side).

    Args:
        explanations: an :class:`~rgae.Explanation`, a list of them, or a dict ``label -> Explanation`` (the labels
            head the panels; by default the method, plus the model when the models differ). All must have the same
            words: the selection is shared.
        title: the page's heading (default: the target text). metrics: shown under the heading (nested dicts are
            flattened to ``a.b`` keys).
        alpha, cmap: the overlay's blend weight and colormap, as in :func:`~rgae.viz.overlay.overlay`.
        display_px: the size the image is shown at (see :func:`display_image`); the page grows with its square.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> page = explore(synthetic_explanation(), title="<b>not bold</b>")
        >>> "&lt;b&gt;not bold&lt;/b&gt;" in page.html
        True
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(display_px, int) or display_px < 16:
        raise ValueError(f"display_px must be an integer of at least 16 pixels, got {display_px!r}")
    widget = _explorer_html(explanations, title, metrics, alpha, cmap, display_px)
    _, items = _panels(explanations)
    return ExplorerPage([(None, widget)], title if title is not None else items[0].target_text)


def explore_sections(sections: Mapping[str, Any], *, title: str = "rgae explorer", **kwargs) -> ExplorerPage:
    """One page with several explorers, each under its heading (``heading -> explanations`` as :func:`explore` takes
    them): e.g. a scene explained by every model, then a photo per model. ``#1.word=3`` selects in the second one.

    Example:
        >>> from rgae.viz import synthetic_explanation
        >>> page = explore_sections({"scene": synthetic_explanation(), "other": synthetic_explanation("a cat")})
        >>> page.html.count('class="rgae-explore"')
        2
    """
    if not sections:
        raise ValueError("explore_sections needs at least one section")
    return ExplorerPage([(str(h), explore(e, **kwargs)._sections[0][1]) for h, e in sections.items()], title)


def _sort_key(value: Any) -> tuple[int, Any]:
    """Records without the metric (or with NaN) sort last; numbers (numpy's too) before text."""
    if value is None:
        return (2, 0)
    if isinstance(value, numbers.Real):
        return (2, 0) if math.isnan(float(value)) else (0, float(value))
    return (1, str(value))


_BACK_TO_INDEX = '<nav><a href="../index.html">← index</a></nav>'


def write_site(
    records: Iterable[tuple[str, Any, Mapping[str, Any]]],
    out_dir: str | os.PathLike,
    sort_by: str | None = None,
    descending: bool = False,
    title: str = "rgae explorer",
    **kwargs,
) -> Path:
    """Write one explorer page per record and an ``index.html`` linking to them (relative links: the folder can be
    moved, zipped or served as it is). Returns the index's path.

    Args:
        records: ``(record_id, explanations, metrics)`` triples; ``explanations`` as :func:`explore` takes them,
            ``metrics`` a dict of numbers or text (nested dicts become ``a.b`` columns). Pages are written as the
            records come, so a large store is never held in memory.
        out_dir: the site folder: ``index.html`` and ``pages/<id>.html``.
        sort_by: the metric the index is sorted by (ascending by default: the worst pointing game first); records
            without it come last. ``None`` keeps the records' order.
        kwargs: passed to :func:`explore` (``alpha``, ``cmap``, ``display_px``).

    Example:
        >>> import tempfile
        >>> from rgae.viz import synthetic_explanation
        >>> records = [("a", synthetic_explanation(), {"pg": 0.5}), ("b", synthetic_explanation(seed=1), {"pg": 0.1})]
        >>> index = write_site(records, tempfile.mkdtemp(), sort_by="pg")
        >>> [p.name for p in sorted(index.parent.rglob("*.html"))]
        ['index.html', 'a.html', 'b.html']
    """
    from rgae.viz.naming import slugify

    out_dir = Path(out_dir)
    rows: list[dict] = []
    used: set[str] = set()
    for record in records:
        try:
            record_id, explanations, metrics = record
        except (TypeError, ValueError):
            raise ValueError(f"each record must be (id, explanations, metrics), got {type(record).__name__}") from None
        record_id = str(record_id)
        if any(r["id"] == record_id for r in rows):
            raise ValueError(f"record id {record_id!r} appears twice; ids name the pages and must be unique")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise ValueError(f"record {record_id!r}: metrics must be a dict, got {type(metrics).__name__}")
        metrics = _flatten(metrics or {})
        slug = slugify(record_id, max_bytes=64)
        name, n = slug, 1
        while name.lower() in used:  # case-insensitive file systems: "A" and "a" would be one file
            n += 1
            name = f"{slug}-{n}"
        used.add(name.lower())
        page = explore(explanations, title=record_id, metrics=metrics, **kwargs)
        ExplorerPage(page._sections, page.title, nav=_BACK_TO_INDEX).save(out_dir / "pages" / f"{name}.html")
        _, items = _panels(explanations)
        rows.append({"id": record_id, "href": f"pages/{name}.html", "metrics": metrics,
                     "target": items[0].target_text,
                     "panels": ", ".join(sorted({f"{e.method}" + (f" · {e.model_name}" if e.model_name else "")
                                                 for e in items}))})
    columns = list(dict.fromkeys(k for r in rows for k in r["metrics"]))  # first-seen order
    if sort_by is not None:
        if rows and sort_by not in columns:
            raise ValueError(f"sort_by={sort_by!r} is not a metric of any record; metrics are {columns}")
        present = [r for r in rows if _sort_key(r["metrics"].get(sort_by))[0] < 2]
        missing = [r for r in rows if _sort_key(r["metrics"].get(sort_by))[0] == 2]
        present.sort(key=lambda r: _sort_key(r["metrics"][sort_by]), reverse=descending)
        rows = present + missing
    header = "".join(f"<th>{_e(c)}</th>" for c in ["record", *columns, "target", "explanations"])
    body = "".join(
        f'<tr><td><a href="{_e(r["href"])}">{_e(r["id"])}</a></td>'
        + "".join(f"<td>{_e(_fmt(r['metrics'].get(c, '—')))}</td>" for c in columns)
        + f"<td>{_e(r['target'])}</td><td>{_e(r['panels'])}</td></tr>"
        for r in rows)
    order = f"sorted by {sort_by} ({'descending' if descending else 'ascending'})" if sort_by else "in record order"
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body class=\"rx-page\"><h1>{_e(title)}</h1>"
        f'<p>{len(rows)} records, {_e(order)}.</p><table class="rx-index"><thead><tr>{header}</tr></thead>'
        f"<tbody>{body}</tbody></table></body></html>\n"
    )
    return _write_text(out_dir / "index.html", document)


_CSS = """
.rgae-explore{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
margin:8px 0 20px}
.rx-page{font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:16px;color:#222}
.rx-page h1{font-size:17px;margin:0 0 8px}.rx-page h2{font-size:15px;margin:18px 0 4px}
.rx-head{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}.rx-title{font-weight:600}
.rx-words{margin:8px 0;display:flex;flex-wrap:wrap;gap:4px;position:sticky;top:0;z-index:1;background:#fff;
padding:4px 0}
.rx-word{font:inherit;border:1px solid #bbb;background:#f7f7f7;border-radius:4px;padding:2px 7px;cursor:pointer}
.rx-word:hover{background:#e6eefc}.rx-word.rx-on{background:#1f5fbf;border-color:#1f5fbf;color:#fff}
.rx-panels{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.rx-panel{border:1px solid #ddd;border-radius:6px;padding:8px;max-width:100%}
.rx-label{margin-bottom:4px}.rx-sub{color:#666;margin-left:6px}
.rx-panel figure{margin:6px 0}.rx-cap{font-size:12px;color:#333;margin-bottom:2px;max-width:360px}
.rx-panel canvas{display:block;max-width:100%}.rx-t2q{cursor:pointer;image-rendering:pixelated}
.rx-cbar{display:flex;align-items:center;gap:4px;font-size:11px;color:#444;flex-wrap:wrap;max-width:360px}
.rx-strip{width:140px;height:10px;image-rendering:pixelated}.rx-mode{flex-basis:100%}
.rx-tokens{display:flex;flex-wrap:wrap;gap:2px;max-width:360px;margin-top:4px}
.rx-tok{font-size:11px;padding:1px 3px;border-radius:3px;white-space:pre;
background:linear-gradient(90deg,#cfe0f7 calc(var(--p,0)*100%),#f3f3f3 0)}
.rx-tok small{margin-left:3px;color:#555}.rx-tok.rx-on{outline:2px solid #1f5fbf}
.rx-note{color:#666;font-size:12px;max-width:360px}
.rx-panel details{font-size:11px;max-width:360px}.rx-panel pre{white-space:pre-wrap;margin:2px 0}
.rx-panel table,.rx-metrics{border-collapse:collapse;font-size:11px}
.rx-panel th,.rx-panel td,.rx-metrics th,.rx-metrics td{text-align:left;padding:1px 6px 1px 0;vertical-align:top}
.rx-index{border-collapse:collapse}.rx-index th,.rx-index td{border-bottom:1px solid #e3e3e3;padding:3px 8px;
text-align:left}
"""

# The page's script: decodes the embedded index PNGs once, then colours and blends with the same arithmetic as
# rgae.viz.overlay.overlay: out = rint((1 - alpha) * image + alpha * lut[index]).
_JS = r"""
(function () {
  "use strict";
  function pixels(uri) {
    return new Promise(function (resolve, reject) {
      var img = new Image();
      img.onload = function () {
        var c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        var ctx = c.getContext("2d", {willReadFrequently: true});
        ctx.drawImage(img, 0, 0);
        resolve(ctx.getImageData(0, 0, c.width, c.height));
      };
      img.onerror = function () { reject(new Error("rgae explorer: an embedded image did not decode")); };
      img.src = uri;
    });
  }
  function channel(d) {
    var out = new Uint8Array(d.width * d.height);
    for (var i = 0; i < out.length; i++) out[i] = d.data[4 * i];
    return {w: d.width, h: d.height, v: out};
  }
  function rangeOf(lo, hi) {
    var a = Infinity, b = -Infinity;
    for (var i = 0; i < lo.length; i++) { a = Math.min(a, lo[i]); b = Math.max(b, hi[i]); }
    return [a, b];
  }
  // Colormap index of a per-map value (its own [lo, hi]) on another range [glo, ghi].
  function remap(lo, hi, range) {
    var t = new Uint8Array(256), glo = range[0], ghi = range[1];
    for (var k = 0; k < 256; k++) {
      var u = ghi > glo ? (lo + (k + 0.5) / 256 * (hi - lo) - glo) / (ghi - glo) : 0;
      t[k] = Math.max(0, Math.min(255, Math.floor(u * 256)));
    }
    return t;
  }
  // numpy's rint (halves to even), which rgae.viz.overlay uses; Math.round sends every half up.
  function rint(x) {
    var r = Math.round(x);
    return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }
  var IDENTITY = new Uint8Array(256);
  for (var k0 = 0; k0 < 256; k0++) IDENTITY[k0] = k0;
  function fmt(v) {
    return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : +v.toPrecision(3) + "";
  }

  function readHash() {
    var m = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var i = part.indexOf("=");
      if (i <= 0) return;
      try {
        m[decodeURIComponent(part.slice(0, i))] = decodeURIComponent(part.slice(i + 1));
      } catch (e) { /* a malformed %-escape: not ours, ignore it */ }
    });
    return m;
  }
  function index(text, n) {
    if (text === undefined || !/^\d+$/.test(text)) return null;
    var v = parseInt(text, 10);
    return v < n ? v : null;
  }

  function Explorer(root, n, multi, sync) {
    var self = this, data = JSON.parse(root.querySelector("script.rx-data").textContent);
    this.root = root; this.data = data; this.n = n; this.multi = multi; this.sync = sync;
    this.st = {word: null, query: null, shared: false, hoverWord: null, hoverQuery: null};
    var lut = data.lut, alpha = data.alpha;
    this.lutCss = lut.map(function (c) { return "rgb(" + c.map(Math.round).join(",") + ")"; });
    root.querySelectorAll(".rx-strip").forEach(function (c) {
      var ctx = c.getContext("2d");
      for (var x = 0; x < 256; x++) { ctx.fillStyle = self.lutCss[x]; ctx.fillRect(x, 0, 1, 1); }
    });
    this.blend = function (base, out, idxAt, table) {
      var b = base.data, o = out.data;
      for (var p = 0, q = 0; p < idxAt.length; p++, q += 4) {
        var c = lut[table[idxAt[p]]];
        o[q] = rint((1 - alpha) * b[q] + alpha * c[0]);
        o[q + 1] = rint((1 - alpha) * b[q + 1] + alpha * c[1]);
        o[q + 2] = rint((1 - alpha) * b[q + 2] + alpha * c[2]);
        o[q + 3] = 255;
      }
    };
    var images = {};
    var jobs = Object.keys(data.images).map(function (key) {
      return pixels(data.images[key]).then(function (d) { images[key] = d; });
    });
    data.panels.forEach(function (p, i) {
      p.el = root.querySelector('.rx-panel[data-panel="' + i + '"]');
      jobs.push(Promise.all(p.t2i.png.map(pixels)).then(function (ds) { p.t2iIdx = ds.map(channel); }));
      p.t2i.range = rangeOf(p.t2i.lo, p.t2i.hi);
      if (p.t2q) {
        p.t2q.range = rangeOf(p.t2q.lo, p.t2q.hi);
        jobs.push(pixels(p.t2q.png).then(function (d) { p.t2qIdx = channel(d); }));
      }
      if (p.q2p) {
        p.q2p.range = rangeOf(p.q2p.lo, p.q2p.hi);
        jobs.push(pixels(p.q2p.png).then(function (d) { p.q2pIdx = channel(d); }));
      }
    });
    Promise.all(jobs).then(function () {
      data.panels.forEach(function (p) { self.setupPanel(p, images[p.image]); });
      self.bind();
      if (self.sync) self.fromHash();
      self.render();
    }).catch(function (err) {
      root.setAttribute("data-error", String(err));
      console.error(err);
    });
  }

  Explorer.prototype.setupPanel = function (p, base) {
    var h = p.size[0], w = p.size[1];
    p.base = base;
    p.t2iCanvas = p.el.querySelector(".rx-t2i");
    p.t2iOut = p.t2iCanvas.getContext("2d").createImageData(w, h);
    if (p.q2p) {
      // Per view, the patch under each display pixel (-1 outside the view's box), with rgae.viz.overlay's integer
      // rule: pixel x -> floor((x - x0) * cols / (x1 - x0)).
      p.patchOf = p.views.map(function (v) {
        var x0 = v[0], y0 = v[1], bw = v[2] - v[0], bh = v[3] - v[1], rows = v[4], cols = v[5], first = v[6];
        var out = new Int32Array(w * h);
        for (var y = 0; y < h; y++) for (var x = 0; x < w; x++) {
          var r = Math.floor((y - y0) * rows / bh), c = Math.floor((x - x0) * cols / bw);
          out[y * w + x] = (r >= 0 && r < rows && c >= 0 && c < cols) ? first + r * cols + c : -1;
        }
        return out;
      });
      p.nPatches = p.views.reduce(function (n, v) { return n + v[4] * v[5]; }, 0);
      p.q2iCanvas = p.el.querySelector(".rx-q2i");
      p.q2iOut = p.q2iCanvas.getContext("2d").createImageData(w, h);
      p.q2iIdx = new Uint8Array(w * h);
    }
    if (p.t2q) p.t2qCanvas = p.el.querySelector(".rx-t2q");
  };

  Explorer.prototype.bind = function () {
    var self = this, st = this.st, root = this.root;
    root.querySelectorAll(".rx-word").forEach(function (b) {
      var w = b.getAttribute("data-word") === "" ? null : +b.getAttribute("data-word");
      b.addEventListener("click", function () {
        st.word = (w === null || st.word === w) ? null : w;
        st.hoverWord = null; self.render(true);
      });
      b.addEventListener("mouseenter", function () { st.hoverWord = w; self.render(); });
      b.addEventListener("mouseleave", function () { st.hoverWord = null; self.render(); });
      b.addEventListener("keydown", function (ev) {
        var n = self.data.nWords, cur = st.word === null ? -1 : st.word;
        if (ev.key === "ArrowRight" || ev.key === "ArrowLeft") {
          st.word = Math.max(0, Math.min(n - 1, cur + (ev.key === "ArrowRight" ? 1 : -1)));
        } else if (ev.key === "Escape") {
          st.word = null;
        } else { return; }
        ev.preventDefault();
        var next = root.querySelector('.rx-word[data-word="' + (st.word === null ? "" : st.word) + '"]');
        if (next) next.focus();
        self.render(true);
      });
    });
    root.querySelectorAll(".rx-tok").forEach(function (t) {
      t.addEventListener("click", function () { st.word = +t.getAttribute("data-word"); self.render(true); });
    });
    var toggle = root.querySelector(".rx-shared");
    toggle.addEventListener("change", function () { st.shared = toggle.checked; self.render(true); });
    this.data.panels.forEach(function (p) {
      if (!p.t2qCanvas) return;
      var qh = p.t2q.grid[0], qw = p.t2q.grid[1];
      function cellAt(ev) {
        var r = p.t2qCanvas.getBoundingClientRect();
        var col = Math.floor((ev.clientX - r.left) / r.width * qw);
        var row = Math.floor((ev.clientY - r.top) / r.height * qh);
        return Math.max(0, Math.min(qh - 1, row)) * qw + Math.max(0, Math.min(qw - 1, col));
      }
      p.t2qCanvas.addEventListener("click", function (ev) {
        var q = cellAt(ev);
        st.query = st.query === q ? null : q; st.hoverQuery = null; self.render(true);
      });
      p.t2qCanvas.addEventListener("mousemove", function (ev) {
        var q = cellAt(ev);
        if (q !== st.hoverQuery) { st.hoverQuery = q; self.render(); }
      });
      p.t2qCanvas.addEventListener("mouseleave", function () { st.hoverQuery = null; self.render(); });
    });
    if (this.sync) window.addEventListener("hashchange", function () { self.fromHash(); self.render(); });
  };

  Explorer.prototype.fromHash = function () {
    var h = readHash(), pre = this.n + ".";
    function get(k) { return h[pre + k] !== undefined ? h[pre + k] : h[k]; }
    var maxQ = 0;
    this.data.panels.forEach(function (p) { if (p.t2q) maxQ = Math.max(maxQ, p.t2q.grid[0] * p.t2q.grid[1]); });
    this.st.word = index(get("word"), this.data.nWords);
    this.st.query = index(get("query"), maxQ);
    this.st.shared = get("scale") === "shared";
    this.root.querySelector(".rx-shared").checked = this.st.shared;
  };

  Explorer.prototype.toHash = function () {
    var h = readHash(), pre = this.multi ? this.n + "." : "", st = this.st;
    function set(k, v) { if (v === null) delete h[pre + k]; else h[pre + k] = String(v); }
    set("word", st.word); set("query", st.query); set("scale", st.shared ? "shared" : null);
    var text = Object.keys(h).map(function (k) {
      return encodeURIComponent(k) + "=" + encodeURIComponent(h[k]);
    }).join("&");
    history.replaceState(null, "", text ? "#" + text : location.pathname + location.search);
  };

  Explorer.prototype.colorbar = function (p, view, lo, hi, what) {
    var bar = p.el.querySelector('.rx-cbar[data-view="' + view + '"]');
    bar.querySelector(".rx-lo").textContent = fmt(lo);
    bar.querySelector(".rx-hi").textContent = fmt(hi);
    bar.querySelector(".rx-mode").textContent = this.st.shared
      ? "shared scale: one range for " + what + " of this panel"
      : "per-map scale: this map's own min–max";
  };

  Explorer.prototype.render = function (committed) {
    var self = this, st = this.st, words = this.root.querySelectorAll(".rx-word");
    var word = st.hoverWord !== null ? st.hoverWord : st.word;
    var sel = word === null ? 0 : word + 1;
    var wordText = word === null ? "sentence" : "word \u201c" + words[word + 1].textContent + "\u201d";
    words.forEach(function (b) {
      var w = b.getAttribute("data-word") === "" ? null : +b.getAttribute("data-word");
      b.classList.toggle("rx-on", w === st.word);
    });
    var shown = [];
    this.data.panels.forEach(function (p) {
      p.el.querySelectorAll(".rx-tok").forEach(function (t) {
        t.classList.toggle("rx-on", word !== null && +t.getAttribute("data-word") === word);
      });
      var t2i = p.t2i, lo = t2i.lo[sel], hi = t2i.hi[sel];
      self.blend(p.base, p.t2iOut, p.t2iIdx[sel].v, st.shared ? remap(lo, hi, t2i.range) : IDENTITY);
      p.t2iCanvas.getContext("2d").putImageData(p.t2iOut, 0, 0);
      p.el.querySelector('.rx-cap[data-view="t2i"]').textContent = "Text-to-Image: " + wordText;
      if (st.shared) self.colorbar(p, "t2i", t2i.range[0], t2i.range[1], "the sentence and every word");
      else self.colorbar(p, "t2i", lo, hi);
      var view = {word: word, query: null};
      if (p.t2q) {
        var qh = p.t2q.grid[0], qw = p.t2q.grid[1], m = qh * qw, row = p.t2qIdx.v.subarray(sel * m, sel * m + m);
        var want = st.hoverQuery !== null ? st.hoverQuery : st.query;
        var q = want !== null && want < m ? want : p.t2q.top[sel];
        var table = st.shared ? remap(p.t2q.lo[sel], p.t2q.hi[sel], p.t2q.range) : IDENTITY;
        var ctx = p.t2qCanvas.getContext("2d"), cw = p.t2qCanvas.width / qw, ch = p.t2qCanvas.height / qh;
        for (var i = 0; i < m; i++) {
          ctx.fillStyle = self.lutCss[table[row[i]]];
          ctx.fillRect((i % qw) * cw, Math.floor(i / qw) * ch, cw, ch);
        }
        ctx.lineWidth = 2; ctx.strokeStyle = "#fff";
        ctx.strokeRect((q % qw) * cw + 1, Math.floor(q / qw) * ch + 1, cw - 2, ch - 2);
        p.el.querySelector('.rx-cap[data-view="t2q"]').textContent = "Text-to-Query: " + wordText + " (click a query)";
        if (st.shared) self.colorbar(p, "t2q", p.t2q.range[0], p.t2q.range[1], "the sentence and every word");
        else self.colorbar(p, "t2q", p.t2q.lo[sel], p.t2q.hi[sel]);
        if (p.q2p) {
          var n = p.nPatches, qrow = p.q2pIdx.v.subarray(q * n, q * n + n), under = p.patchOf[p.q2p.view[q]];
          for (var j = 0; j < under.length; j++) p.q2iIdx[j] = under[j] < 0 ? 0 : qrow[under[j]];
          self.blend(p.base, p.q2iOut, p.q2iIdx, st.shared ? remap(p.q2p.lo[q], p.q2p.hi[q], p.q2p.range) : IDENTITY);
          p.q2iCanvas.getContext("2d").putImageData(p.q2iOut, 0, 0);
          var how = want === null ? " (the selection's top query)" : want < m ? "" : " (query " + want +
            " is not in this panel's " + m + "; its top query)";
          p.el.querySelector('.rx-cap[data-view="q2i"]').textContent = "Query-to-Image: query " + q + " (row " +
            Math.floor(q / qw) + ", column " + (q % qw) + ")" + how;
          if (st.shared) self.colorbar(p, "q2i", p.q2p.range[0], p.q2p.range[1], "every query");
          else self.colorbar(p, "q2i", p.q2p.lo[q], p.q2p.hi[q]);
        }
        view.query = q;
      }
      shown.push(view);
    });
    this.root.setAttribute("data-state", JSON.stringify({word: st.word, query: st.query, shared: st.shared,
                                                          shown: shown}));
    if (committed && this.sync) this.toHash();
  };

  var roots = document.querySelectorAll(".rgae-explore");
  var sync = !!(document.body && document.body.getAttribute("data-sync-url") === "1");
  roots.forEach(function (root, n) {
    if (root.getAttribute("data-rx-init")) return;
    root.setAttribute("data-rx-init", "1");
    new Explorer(root, n, roots.length > 1, sync);
  });
})();
"""
