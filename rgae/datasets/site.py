"""A browsable site of an explanation store: one explorer page per record (:func:`rgae.viz.write_site`) and an
``index.html`` sorted by a per-record metric — the worst pointing game first, by default — to find the records worth
looking at.

A record's metrics are the means over its scored words (``pointing``, ``energy`` and, with a mask,
``pointing_mask``, ``energy_mask``), its number of scored ``words``, and its ``deletion_auc`` / ``insertion_auc``:
read from an ``rgae evaluate`` report (:func:`report_record_metrics`) or computed from the store
(:func:`store_record_metrics`: the localization metrics, which need no model).

Example:
    >>> from rgae.datasets import ExplanationStore
    >>> store = ExplanationStore("runs/shapes-mlp")  # doctest: +SKIP
    >>> write_store_site(store, "site", store_record_metrics(store), sort_by="pointing", limit=50)  # doctest: +SKIP
    PosixPath('site/index.html')
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["RECORD_METRICS", "record_metrics", "report_record_metrics", "store_record_metrics", "write_store_site"]

# Per-word scores averaged per record, in the order the index shows them.
RECORD_METRICS = ("pointing", "pointing_mask", "energy", "energy_mask")
_CURVES = ("deletion", "insertion")


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def record_metrics(scores: Iterable[Mapping], curves: Mapping[str, Mapping] | None = None) -> dict[str, dict]:
    """``record id -> {metric: value}`` from word scores (dicts with ``record`` and the :data:`RECORD_METRICS`, as
    ``metrics.json`` lists them) and per-record perturbation curves (``id -> {"deletion": {"auc": ...}, ...}``).

    Example:
        >>> scores = [{"record": "a", "pointing": 1.0, "energy": 0.5}, {"record": "a", "pointing": 0.0,
        ...           "energy": 0.25}, {"record": "b", "pointing": 1.0, "energy": 1.0}]
        >>> per_record = record_metrics(scores, {"b": {"deletion": {"auc": 0.2}}})
        >>> per_record["a"], per_record["b"]["deletion_auc"]
        ({'pointing': 0.5, 'energy': 0.375, 'words': 2}, 0.2)
    """
    sums: dict[str, dict[str, list[float]]] = {}
    for score in scores:
        per = sums.setdefault(str(score["record"]), {})
        for metric in RECORD_METRICS:
            value = score.get(metric)
            if value is not None and not math.isnan(float(value)):
                per.setdefault(metric, []).append(float(value))
        per.setdefault("words", []).append(1.0)
    out: dict[str, dict] = {}
    for rid, per in sums.items():
        out[rid] = {m: sum(per[m]) / len(per[m]) for m in RECORD_METRICS if per.get(m)}
        out[rid]["words"] = len(per["words"])
    for rid, by_kind in (curves or {}).items():
        for kind in _CURVES:
            if kind in by_kind and by_kind[kind].get("auc") is not None:
                out.setdefault(str(rid), {})[f"{kind}_auc"] = float(by_kind[kind]["auc"])
    return out


def store_record_metrics(store) -> dict[str, dict]:
    """The localization metrics of every record of ``store`` (its boxes and masks; no model needed)."""
    from rgae.datasets.evaluation import evaluate_store, scores_table

    return record_metrics(scores_table(evaluate_store(store, metrics=("pointing", "energy"))))


def report_record_metrics(report: str | os.PathLike, store) -> dict[str, dict]:
    """The per-record metrics of ``store`` in the ``rgae evaluate`` report ``report`` (its folder or its
    ``metrics.json``), whose store of the same path it reads. ``ValueError`` saying what was expected otherwise
    (a report of other stores included: record ids repeat across datasets, so a path is what identifies a store)."""
    path = Path(report)
    file = path / "metrics.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"--report {report}: no such report (expected an `rgae evaluate` folder with metrics.json)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        stores = data["stores"]
        scores, curves = data["scores"], data["curves"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--report {file} is not an `rgae evaluate` metrics.json ({type(exc).__name__}: {exc})"
                         ) from None
    here = Path(store.path).resolve()
    names = [n for n, s in stores.items() if Path(s.get("path", "")).resolve() == here]
    if not names:
        raise ValueError(f"--report {file} evaluates {', '.join(s['path'] for s in stores.values())}, not "
                         f"{store.path} (re-run rgae evaluate on this store)")
    return record_metrics(scores.get(names[0], []), curves.get(names[0], {}))


def _sorted_ids(ids: list[str], metrics: Mapping[str, Mapping], sort_by: str, descending: bool) -> list[str]:
    """``ids`` by ``metrics[id][sort_by]`` (stable; ids without it last, as :func:`rgae.viz.write_site` puts them)."""
    present = [rid for rid in ids if _number(metrics.get(rid, {}).get(sort_by)) is not None]
    missing = [rid for rid in ids if _number(metrics.get(rid, {}).get(sort_by)) is None]
    present.sort(key=lambda rid: float(metrics[rid][sort_by]), reverse=descending)
    return present + missing


def write_store_site(store, out: str | os.PathLike, metrics: Mapping[str, Mapping] | None = None,
                     sort_by: str | None = "pointing", descending: bool = False, limit: int | None = None,
                     title: str | None = None) -> Path:
    """Write a page per record of ``store`` (the first ``limit`` in ``sort_by`` order when given) and an index
    sorted by ``sort_by`` (``None``: dataset order) to the folder ``out``; returns the index's path. ``metrics``
    (``id -> {metric: value}``) are shown on each page and in the index."""
    metrics = dict(metrics or {})
    ids = store.ids()
    if sort_by is not None:
        known = sorted({k for m in metrics.values() for k in m})
        if sort_by not in known:
            raise ValueError(f"--sort-by {sort_by!r} is not a metric of the records (they have: "
                             f"{', '.join(known) or 'none; give --report or a store with boxes'})")
        ids = _sorted_ids(ids, metrics, sort_by, descending)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        ids = ids[:limit]
    manifest = store.manifest
    title = title or f"{Path(store.path).name}: {manifest.get('method')} · {manifest.get('model')}"
    from rgae.viz import write_site

    # A generator: write_site writes each page as it comes, so only one explanation is in memory at a time.
    pages = ((rid, store[rid], metrics.get(rid, {})) for rid in ids)
    return write_site(pages, out, sort_by=sort_by, descending=descending, title=title)
