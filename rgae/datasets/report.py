"""The evaluation report of one store or two stores side by side: ``metrics.json``, ``report.md`` and figures.

Figures (pyplot-free matplotlib, saved with :func:`rgae.viz.save_figure`):

- ``pointing.png``: pointing game per word kind with 95% intervals, beside the random baseline;
- ``energy-hist.png``: the distribution of energy in box over scored words; ``auc-hist.png``: of the deletion and
  insertion AUCs over records;
- ``curves.png``: mean deletion and insertion curves with 95% bootstrap bands;
- ``gallery-<store>.png``: the best and worst scored words (by energy in box) with their map over the image
  (:func:`rgae.viz.overlay`) and the ground-truth box.

Example:
    >>> write_report("report", [ev], [summarize(ev)])  # doctest: +SKIP
    ['report/metrics.json', 'report/report.md', 'report/pointing.png', ...]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from rgae.datasets.evaluation import StoreEvaluation, WordScore, scores_table, word_image_map
from rgae.datasets.store import write_bytes_atomic

__all__ = ["METRIC_NAMES", "markdown", "write_report"]

METRIC_NAMES = {
    "pointing": "pointing game (box)",
    "pointing_random": "random baseline (box)",
    "pointing_mask": "pointing game (mask)",
    "pointing_mask_random": "random baseline (mask)",
    "energy": "energy in box",
    "energy_mask": "energy in mask",
    "deletion_auc": "deletion AUC (lower is better)",
    "insertion_auc": "insertion AUC (higher is better)",
}
_COLORS = ("#1f77b4", "#d62728")


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}"


def _stat_cell(stat: dict | None) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    lo, hi = stat["ci"]
    return f"{_fmt(stat['mean'])} [{_fmt(lo)}, {_fmt(hi)}]"


def _p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def markdown(evaluations: list[StoreEvaluation], summaries: list[dict], comparison: dict | None,
             settings: dict, figures: list[str]) -> str:
    """The report as markdown: the stores, each metric with its 95% interval, per word kind, the paired comparison,
    the figures and the failures."""
    names = [e.name for e in evaluations]
    conf = int(round(settings["confidence"] * 100))
    lines = ["# Explanation evaluation", ""]
    lines += ["| store | model | method | records | failed | scored words |", "|---|---|---|---|---|---|"]
    for e, s in zip(evaluations, summaries):
        lines.append(f"| {e.name} (`{e.path}`) | {e.manifest.get('model')} | {e.manifest.get('method')} | "
                     f"{s['records']} | {s['failures']} | {s['scored_words']} |")
    lines += ["", f"Means with {conf}% bootstrap intervals (records resampled with all their words, "
                  f"{settings['bootstrap']} resamples, seed {settings['seed']}).", ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    keys = [k for k in METRIC_NAMES if any(k in s["metrics"] for s in summaries)]
    for k in keys:
        lines.append(f"| {METRIC_NAMES[k]} | " + " | ".join(_stat_cell(s["metrics"].get(k)) for s in summaries) + " |")
    kinds = list(dict.fromkeys(k for s in summaries for k in s["by_kind"]))
    if kinds:
        lines += ["", "## By word kind", "", "| kind | metric | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for kind in kinds:
            for k in ("pointing", "pointing_random", "pointing_mask", "energy"):
                cells = [s["by_kind"].get(kind, {}).get(k) for s in summaries]
                if any(cells):
                    n = max((c or {}).get("n", 0) for c in cells)
                    lines.append(f"| {kind} ({n}) | {METRIC_NAMES[k]} | " + " | ".join(map(_stat_cell, cells)) + " |")
    if comparison is not None:
        a, b = comparison["a"], comparison["b"]
        lines += ["", f"## {b} vs {a} (paired)", "",
                  f"{comparison['pairs']} word/box pairs scored in both stores. Difference = {b} − {a} with its "
                  f"{conf}% bootstrap interval; p = two-sided sign-flip permutation test over records "
                  f"({settings['permutations']} random flips, exact for ≤ 16 records).", "",
                  f"| metric | {a} | {b} | difference [{conf}% CI] | p | pairs |", "|---|---|---|---|---|---|"]
        for k, r in comparison["metrics"].items():
            lines.append(f"| {METRIC_NAMES.get(k, k)} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_fmt(r['difference'])} "
                         f"[{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}] | {_p(r['p_value'])} | {r['n']} |")
        for kind, res in comparison["by_kind"].items():
            r = res.get("pointing")
            if r:
                lines.append(f"| pointing game, {kind} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_fmt(r['difference'])} "
                             f"[{_fmt(r['ci'][0])}, {_fmt(r['ci'][1])}] | {_p(r['p_value'])} | {r['n']} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    for e in evaluations:
        if e.failures:
            lines += ["", f"## Failed records of {e.name} ({len(e.failures)})", ""]
            lines += [f"- `{rid}`: {err}" for rid, err in list(e.failures.items())[:20]]
            if len(e.failures) > 20:
                lines.append(f"- … and {len(e.failures) - 20} more (metrics.json lists them all)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------- figures


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _pointing_figure(names, summaries):
    kinds = ["all", *dict.fromkeys(k for s in summaries for k in s["by_kind"])]
    fig = _figure((1.2 + 1.1 * len(kinds), 3.0))
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for n, (name, s) in enumerate(zip(names, summaries)):
        stats = [s["metrics"].get("pointing") if k == "all" else s["by_kind"].get(k, {}).get("pointing") for k in kinds]
        rand = [s["metrics"].get("pointing_random") if k == "all" else s["by_kind"].get(k, {}).get("pointing_random")
                for k in kinds]
        x = np.arange(len(kinds)) + (n - (len(names) - 1) / 2) * width
        means = np.array([st["mean"] if st else np.nan for st in stats], dtype=float)
        err = np.array([[st["mean"] - st["ci"][0], st["ci"][1] - st["mean"]] if st else [0, 0] for st in stats]).T
        ax.bar(x, means, width * 0.9, yerr=err, capsize=3, color=_COLORS[n % 2], label=name)
        ax.scatter(x, [r["mean"] if r else np.nan for r in rand], marker="_", s=200, color="k", zorder=3,
                   label="random" if n == 0 else None)
    ax.set_xticks(np.arange(len(kinds)), kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pointing game (box)")
    ax.legend(fontsize=7, loc="upper right")
    return fig


def _histograms(evaluations, attr_sets):
    fig = _figure((3.2 * len(attr_sets), 2.6))
    for k, (title, getter) in enumerate(attr_sets):
        ax = fig.add_subplot(1, len(attr_sets), k + 1)
        values = [getter(e) for e in evaluations]
        finite = [v for vs in values for v in vs]
        if not finite:
            continue
        bins = np.histogram_bin_edges(finite, bins=20)
        for n, (e, v) in enumerate(zip(evaluations, values)):
            ax.hist(v, bins=bins, alpha=0.55, color=_COLORS[n % 2], label=e.name)
        ax.set_title(title)
        ax.set_ylabel("count")
        ax.legend(fontsize=7)
    return fig


def _curves_figure(evaluations, summaries):
    kinds = [k for k in ("deletion", "insertion") if any(k in s["curves"] for s in summaries)]
    fig = _figure((3.2 * len(kinds), 2.6))
    for k, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), k + 1)
        for n, (e, s) in enumerate(zip(evaluations, summaries)):
            c = s["curves"].get(kind)
            if c:
                ax.plot(c["fractions"], c["mean"], color=_COLORS[n % 2], label=e.name)
                ax.fill_between(c["fractions"], c["ci_low"], c["ci_high"], color=_COLORS[n % 2], alpha=0.25)
        ax.set_title(f"{kind} (mean, 95% band)")
        ax.set_xlabel("fraction of patches " + ("removed" if kind == "deletion" else "inserted"))
        ax.set_ylabel("target log-likelihood / token")
        ax.legend(fontsize=7)
    return fig


def _gallery_figure(store, ev: StoreEvaluation, k: int):
    from matplotlib.patches import Rectangle

    from rgae.viz import overlay

    ranked = sorted(ev.scores, key=lambda s: (-s.energy, s.record, s.word_index))
    picks: list[tuple[str, WordScore]] = [("best", s) for s in ranked[:k]]
    picks += [("worst", s) for s in ranked[::-1][:k] if s not in ranked[:k]]
    cols = max(1, min(k, len(picks)))
    rows = math.ceil(len(picks) / cols)
    fig = _figure((1.9 * cols, 2.1 * rows))
    fig.suptitle(f"{ev.name}: best and worst words by energy in box", fontsize=9)
    for n, (label, s) in enumerate(picks):
        expl, record = store[s.record], store.record(s.record)
        image_map = word_image_map(expl, s.word_index, record.original_hw)
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.imshow(overlay(expl.image, image_map, interpolation="nearest"))
        x0, y0, x1, y1 = record.boxes[s.box_index].box
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5, ec="white"))
        ax.set_title(f"{label}: {s.record} '{s.word}'\nE={s.energy:.2f} hit={int(s.pointing)}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def write_report(out, evaluations: list[StoreEvaluation], summaries: list[dict], comparison: dict | None = None,
                 settings: dict | None = None, stores=None, gallery: int = 4) -> list[str]:
    """Write ``metrics.json``, ``report.md`` and the figures to the folder ``out``; returns the written paths.
    ``stores`` (the :class:`~rgae.datasets.store.ExplanationStore` of each evaluation) are needed for the gallery."""
    from rgae.viz import save_figure

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"bootstrap": 2000, "permutations": 10000, "confidence": 0.95, "seed": 0, **(settings or {})}
    names = [e.name for e in evaluations]
    figures = []
    specs = []
    if any(s["metrics"].get("pointing") for s in summaries):
        specs.append(("pointing.png", lambda: _pointing_figure(names, summaries)))
    if any(e.scores and "energy" in e.metrics for e in evaluations):
        specs.append(("energy-hist.png", lambda: _histograms(evaluations, [
            ("energy in box", lambda e: [s.energy for s in e.scores])])))
    if any(e.curves for e in evaluations):
        specs.append(("auc-hist.png", lambda: _histograms(evaluations, [
            (f"{k} AUC", lambda e, k=k: [c[k]["auc"] for c in e.curves.values() if k in c])
            for k in ("deletion", "insertion") if any(k in c for e in evaluations for c in e.curves.values())])))
        specs.append(("curves.png", lambda: _curves_figure(evaluations, summaries)))
    if stores is not None and gallery > 0:
        for store, ev in zip(stores, evaluations):
            if ev.scores:
                specs.append((f"gallery-{_slug(ev.name)}.png", lambda store=store, ev=ev: _gallery_figure(store, ev,
                                                                                                           gallery)))
    for name, build in specs:
        figures.append(str(save_figure(build(), out / name, dpi=110)))
    metrics = {
        "settings": settings,
        "stores": {e.name: {"path": e.path, "model": e.manifest.get("model"), "method": e.manifest.get("method"),
                            "options": e.manifest.get("options"), "failures": e.failures} for e in evaluations},
        "summaries": dict(zip(names, summaries)),
        "comparison": comparison,
        "scores": {e.name: scores_table(e) for e in evaluations},
        "curves": {e.name: e.curves for e in evaluations},
        "figures": [Path(f).name for f in figures],
    }
    write_bytes_atomic(out / "metrics.json", (json.dumps(metrics, indent=1) + "\n").encode())
    report = markdown(evaluations, summaries, comparison, settings, figures)
    write_bytes_atomic(out / "report.md", report.encode())
    return [str(out / "metrics.json"), str(out / "report.md"), *figures]


def _slug(text: str) -> str:
    from rgae.viz import slugify

    return slugify(text, max_bytes=48)
