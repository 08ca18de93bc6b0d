"""Scoring a store: localization of every scored word against its boxes and masks, perturbation curves of every
record, and their summaries (means with clustered bootstrap intervals, per word kind, two stores paired).

Localization (no model needed), per (record, target word, box whose ``words`` contain it):

- ``pointing``: the word map's top cell has its center inside the box (:func:`rgae.metrics.pointing_game`, the
  project's criterion; a map with all values equal is a miss); ``pointing_random``: the hit rate of a uniformly
  random cell (:func:`rgae.metrics.random_pointing_baseline`);
- ``energy``: the share of the map's positive mass inside the box (:func:`rgae.metrics.energy_in_box`);
- with a mask, ``pointing_mask`` / ``pointing_mask_random`` / ``energy_mask``: the same against the object's mask
  pixels (the top cell's center pixel lies on the mask; each cell's mass spread over its pixels). A mask that is
  exactly the box gives exactly the box numbers.

Perturbation (the model is needed): ``deletion`` and ``insertion`` curves of the sentence map
(:func:`rgae.metrics.insertion_deletion`, batched masked forwards) and their AUCs, on the mean per-token
log-likelihood of the target (higher insertion and lower deletion AUC are better).

Example:
    >>> from rgae.datasets import ExplanationStore
    >>> ev = evaluate_store(ExplanationStore("runs/shapes-mlp"), metrics=("pointing", "energy"))  # doctest: +SKIP
    >>> summarize(ev)["metrics"]["pointing"]["mean"]  # doctest: +SKIP
    0.81
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from rgae.datasets.records import WORD_KINDS, Record, normalize_word
from rgae.datasets.stats import bootstrap_means, mean_ci, paired_permutation_test, percentile_ci
from rgae.metrics import (
    box_to_model_frame,
    energy_in_box,
    insertion_deletion,
    patch_index_map,
    pointing_game,
    random_pointing_baseline,
)

__all__ = ["METRICS", "StoreEvaluation", "WordMap", "WordScore", "compare", "evaluate_store", "localization_scores",
           "mask_cells", "summarize", "word_map"]

METRICS = ("pointing", "energy", "deletion", "insertion")
LOCALIZATION = ("pointing", "pointing_random", "energy", "pointing_mask", "pointing_mask_random", "energy_mask")
PERTURBATION = ("deletion", "insertion")


# ------------------------------------------------------------------------------------------------ the word's map


@dataclass(frozen=True)
class WordMap:
    """A word's relevance ``values [h, w]`` on cells that tile the pixel frame ``frame_hw`` (``image`` is that frame
    as RGB, for display), with the original image at ``content_box = (x0, y0, x1, y1)`` inside the frame."""

    values: np.ndarray
    frame_hw: tuple[int, int]
    content_box: tuple[float, float, float, float]
    image: np.ndarray | None = None

    def to_frame(self, box, original_hw) -> tuple[float, float, float, float]:
        """An original-image pixel box in the frame's pixels."""
        return box_to_model_frame(box, original_hw, self.content_box)


def word_map(explanation, word: int) -> WordMap:
    """The one place where an explanation and a word become a pixel map for the metrics.

    Today: the word's Text-to-Patch map on the patch grid, whose patches tile the model-seen image
    (``explanation.image``), with the original image at ``explanation.content_box`` in it. When
    ``Explanation.image_map(word=...)`` (relevance over the original image's pixels) is available, this becomes
    ``WordMap(explanation.image_map(word=word), original_hw, (0, 0, W, H), original image)``.
    """
    if explanation.image is None:
        raise ValueError("the explanation has no image: its model-seen image size is needed to place the boxes")
    h, w = explanation.image.shape[:2]
    values = explanation.patch_map(word=word).detach().double().cpu().numpy()
    content = explanation.content_box or (0, 0, w, h)
    return WordMap(values=values, frame_hw=(int(h), int(w)), content_box=tuple(float(v) for v in content),
                   image=explanation.image)


def _top_cell(values: np.ndarray) -> int | None:
    """The first maximum in row-major order; None for a map with all values equal (it points nowhere)."""
    flat = values.reshape(-1)
    return None if flat.max() == flat.min() else int(np.argmax(flat))


def mask_cells(region: np.ndarray, wm: WordMap) -> tuple[np.ndarray, np.ndarray]:
    """For each cell of ``wm``: whether its center pixel lies on ``region`` (``bool [H0, W0]`` over the original
    image), and the fraction of its frame pixels that do (``[N]`` bool, ``[N]`` float). Frame pixels are mapped to
    the original pixel under their center; pixels outside the content box are off the region. Cells that tile the
    frame in whole pixels (patch grids, pixel maps) give exactly the box metrics for a rectangular region; other
    grids count each pixel in the cell :func:`rgae.metrics.patch_index_map` assigns it to.

    Example:
        >>> wm = WordMap(np.zeros((2, 2)), frame_hw=(4, 4), content_box=(0, 0, 4, 4))
        >>> region = np.zeros((4, 4), bool); region[:2, :3] = True
        >>> center, coverage = mask_cells(region, wm)
        >>> center.tolist(), coverage.tolist()
        ([True, False, False, False], [1.0, 0.5, 0.0, 0.0])
    """
    region = np.asarray(region, dtype=bool)
    h0, w0 = region.shape
    fh, fw = wm.frame_hw
    gh, gw = wm.values.shape
    x0, y0, x1, y1 = wm.content_box

    def lookup(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """``region`` at frame points ``(ys, xs)`` (broadcast), False outside the original image."""
        oy = np.floor((ys - y0) * h0 / (y1 - y0)).astype(np.int64)
        ox = np.floor((xs - x0) * w0 / (x1 - x0)).astype(np.int64)
        inside = (oy >= 0) & (oy < h0) & (ox >= 0) & (ox < w0)
        return inside & region[np.clip(oy, 0, h0 - 1), np.clip(ox, 0, w0 - 1)]

    cy, cx = (np.arange(gh) + 0.5) * fh / gh, (np.arange(gw) + 0.5) * fw / gw
    center = lookup(cy[:, None], cx[None, :]).reshape(-1)
    on = lookup((np.arange(fh) + 0.5)[:, None], (np.arange(fw) + 0.5)[None, :]).reshape(-1)
    cell = patch_index_map((fh, fw), (gh, gw)).reshape(-1).numpy()
    coverage = np.bincount(cell, weights=on, minlength=gh * gw) / np.bincount(cell, minlength=gh * gw)
    return center, coverage


# --------------------------------------------------------------------------------------------------- localization


@dataclass
class WordScore:
    """Localization of one target word against one box (and its mask region when the record has a mask)."""

    record: str
    word_index: int
    word: str
    box_index: int
    kind: str
    pointing: float
    pointing_random: float
    energy: float
    pointing_mask: float | None = None
    pointing_mask_random: float | None = None
    energy_mask: float | None = None

    @property
    def key(self) -> tuple:
        """What pairs the same word/box across two stores of the same records."""
        return (self.record, self.box_index, self.word, self.word_index)


def localization_scores(explanation, record: Record) -> list[WordScore]:
    """Every (word, box) score of one explanation, in word order then box order."""
    if record.original_hw is None:
        raise ValueError(f"record {record.id!r} has no original_hw (the size of its image)")
    out = []
    maps: dict[int, WordMap] = {}
    for i, word in enumerate(explanation.words):
        w = normalize_word(word)
        for j, box in enumerate(record.boxes):
            if not w or w not in box.words:
                continue
            wm = maps.setdefault(i, word_map(explanation, i))
            frame_box = wm.to_frame(box.box, record.original_hw)
            score = WordScore(
                record=record.id, word_index=i, word=w, box_index=j, kind=box.kind(w),
                pointing=float(pointing_game(wm.values, frame_box, image_hw=wm.frame_hw)),
                pointing_random=random_pointing_baseline(frame_box, wm.values.shape, wm.frame_hw),
                energy=energy_in_box(wm.values, frame_box, image_hw=wm.frame_hw),
            )
            if record.mask is not None:
                center, coverage = mask_cells(record.mask_region(record.mask, box), wm)
                top = _top_cell(wm.values)
                positive = np.clip(wm.values.reshape(-1), 0, None)
                score.pointing_mask = 0.0 if top is None else float(center[top])
                score.pointing_mask_random = float(center.mean())
                score.energy_mask = float((positive * coverage).sum() / positive.sum()) if positive.sum() > 0 else 0.0
            out.append(score)
    return out


# ---------------------------------------------------------------------------------------------------- evaluation


@dataclass
class StoreEvaluation:
    """Everything scored on one store: word scores (localization) and per-record perturbation curves."""

    name: str
    path: str
    manifest: dict
    record_ids: list[str]
    failures: dict[str, str]
    scores: list[WordScore] = field(default_factory=list)
    curves: dict[str, dict[str, dict]] = field(default_factory=dict)  # id -> {"deletion": curve dict, ...}
    metrics: tuple[str, ...] = METRICS  # what was asked for: the summaries report only these

    def localization_keys(self) -> tuple[str, ...]:
        """The :class:`WordScore` fields behind the requested ``pointing`` / ``energy`` metrics."""
        return tuple(k for k in LOCALIZATION if k.split("_")[0] in self.metrics)


def _perturbation_share(store, ids, model, processor, steps, baseline, batch_size, state, progress, board_dir):
    from rgae.datasets.processes import ProgressBoard

    share = ids[state.process_index :: state.num_processes]
    board = ProgressBoard(board_dir, state, total=len(ids), desc=f"deletion/insertion ({state.num_processes} proc)",
                          enabled=progress)
    out = []
    for rid in share:
        curves = insertion_deletion(model, processor, store[rid], steps=steps, baseline=baseline,
                                    batch_size=batch_size)
        out.append((rid, {k: c.to_dict() for k, c in curves.items()}))
        board.update()
    board.finish()
    return out


def evaluate_store(store, metrics=METRICS, model=None, processor=None, name: str | None = None, steps: int = 10,
                   baseline: str = "blur", batch_size: int = 8, state=None, progress: bool = False,
                   work_dir=None) -> StoreEvaluation | None:
    """Score ``store`` (an :class:`~rgae.datasets.store.ExplanationStore`) on ``metrics`` (any of
    :data:`METRICS`). ``deletion``/``insertion`` need the store's ``model`` and ``processor``; their forwards are
    shared over the processes of ``state`` (accelerate) and gathered on the main process, which alone gets the
    result (the others get None). ``work_dir`` holds the cross-process progress files."""
    from pathlib import Path

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; expected any of {', '.join(METRICS)}")
    ids = store.ids()
    ev = StoreEvaluation(name=name or store.path.name, path=str(store.path), manifest=store.manifest,
                         record_ids=ids, failures=dict(store.failures), metrics=tuple(metrics))
    if {"deletion", "insertion"} & set(metrics):
        if model is None or processor is None:
            raise ValueError("deletion/insertion need the model: pass model= and processor=")
        from rgae.datasets.processes import partial_state

        state = state if state is not None else partial_state()
        board_dir = Path(work_dir or store.path) / f".progress-{ev.name}"
        if state.is_main_process:
            board_dir.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        local = _perturbation_share(store, ids, model, processor, steps, baseline, batch_size, state, progress,
                                    board_dir)
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        import shutil

        shutil.rmtree(board_dir, ignore_errors=True)
        wanted = {"deletion", "insertion"} & set(metrics)
        position = {rid: k for k, rid in enumerate(ids)}
        ev.curves = {rid: {k: v for k, v in c.items() if k in wanted}
                     for rid, c in sorted(local, key=lambda item: position[item[0]])}
    if state is not None and not state.is_main_process:
        return None
    if {"pointing", "energy"} & set(metrics):
        for rid in ids:
            ev.scores.extend(localization_scores(store[rid], store.record(rid)))
    return ev


# ------------------------------------------------------------------------------------------------------ summaries


def _stat(values, groups, n_boot, confidence, seed) -> dict:
    if not len(values):
        return {"mean": None, "ci": [None, None], "n": 0, "records": 0}
    mean, lo, hi = mean_ci(values, groups, n_boot, confidence, seed)
    return {"mean": mean, "ci": [lo, hi], "n": len(values), "records": len(set(groups))}


def _score_metrics(scores: list[WordScore], keys, n_boot, confidence, seed) -> dict:
    out = {}
    for metric in keys:
        rows = [(getattr(s, metric), s.record) for s in scores if getattr(s, metric) is not None]
        if rows:
            out[metric] = _stat([v for v, _ in rows], [g for _, g in rows], n_boot, confidence, seed)
    return out


def _curve_band(curves: list[dict], n_boot, confidence, seed) -> dict | None:
    fractions = curves[0]["fractions"]
    if any(c["fractions"] != fractions for c in curves):
        return None  # different patch counts: no common x axis
    scores = np.array([c["scores"] for c in curves])
    lo, hi = percentile_ci(bootstrap_means(scores, None, n_boot, seed), confidence)
    return {"fractions": fractions, "mean": scores.mean(0).tolist(), "ci_low": lo.tolist(), "ci_high": hi.tolist()}


def summarize(ev: StoreEvaluation, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Means with clustered bootstrap intervals: every localization metric overall and per word kind, the
    perturbation AUCs over records and the mean curves with bands."""
    keys = ev.localization_keys()
    metrics = _score_metrics(ev.scores, keys, n_boot, confidence, seed)
    kinds = [k for k in WORD_KINDS if any(s.kind == k for s in ev.scores)]
    kinds += sorted({s.kind for s in ev.scores} - set(kinds))
    by_kind = {k: _score_metrics([s for s in ev.scores if s.kind == k], keys, n_boot, confidence, seed)
               for k in kinds}
    curves = {}
    for kind in PERTURBATION:
        per_record = [(rid, c[kind]) for rid, c in ev.curves.items() if kind in c]
        if per_record:
            metrics[f"{kind}_auc"] = _stat([c["auc"] for _, c in per_record], [rid for rid, _ in per_record],
                                           n_boot, confidence, seed)
            band = _curve_band([c for _, c in per_record], n_boot, confidence, seed)
            if band is not None:
                curves[kind] = band
    return {"records": len(ev.record_ids), "failures": len(ev.failures), "scored_words": len(ev.scores),
            "words_by_kind": dict(Counter(s.kind for s in ev.scores)), "metrics": metrics, "by_kind": by_kind,
            "curves": curves}


def _paired(a_vals, b_vals, groups, n_boot, n_perm, confidence, seed) -> dict:
    diff = np.asarray(b_vals, dtype=np.float64) - np.asarray(a_vals, dtype=np.float64)
    d_mean, lo, hi = mean_ci(diff, groups, n_boot, confidence, seed)
    return {"a": float(np.mean(a_vals)), "b": float(np.mean(b_vals)), "difference": d_mean, "ci": [lo, hi],
            "p_value": paired_permutation_test(diff, groups, n_perm, seed), "n": int(diff.size),
            "records": len(set(groups))}


def compare(a: StoreEvaluation, b: StoreEvaluation, n_boot: int = 2000, n_perm: int = 10000,
            confidence: float = 0.95, seed: int = 0) -> dict:
    """Paired comparison of two evaluations of the same records: for each metric the means on the pairs both
    scored, the difference ``b - a`` with its clustered bootstrap interval and the sign-flip permutation p-value
    (:func:`~rgae.datasets.stats.paired_permutation_test`, records as clusters)."""
    b_scores = {s.key: s for s in b.scores}
    pairs = [(s, b_scores[s.key]) for s in a.scores if s.key in b_scores]
    out: dict = {"a": a.name, "b": b.name, "pairs": len(pairs), "metrics": {}, "by_kind": {}}

    keys = [k for k in a.localization_keys() if k in b.localization_keys()]

    def paired_metrics(subset) -> dict:
        res = {}
        for metric in keys:
            rows = [(getattr(x, metric), getattr(y, metric), x.record) for x, y in subset
                    if getattr(x, metric) is not None and getattr(y, metric) is not None]
            if rows:
                res[metric] = _paired(*zip(*rows), n_boot=n_boot, n_perm=n_perm, confidence=confidence, seed=seed)
        return res

    out["metrics"] = paired_metrics(pairs)
    for kind in sorted({x.kind for x, _ in pairs}, key=lambda k: (k not in WORD_KINDS, k)):
        out["by_kind"][kind] = paired_metrics([(x, y) for x, y in pairs if x.kind == kind])
    for kind in PERTURBATION:
        common = [rid for rid in a.curves if kind in a.curves[rid] and kind in b.curves.get(rid, {})]
        if common:
            out["metrics"][f"{kind}_auc"] = _paired([a.curves[r][kind]["auc"] for r in common],
                                                    [b.curves[r][kind]["auc"] for r in common], common,
                                                    n_boot, n_perm, confidence, seed)
    return out


def scores_table(ev: StoreEvaluation) -> list[dict]:
    """The word scores as plain dicts (for JSON)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(s).items()}
            for s in ev.scores]
