"""Scoring a store: localization of every scored word against its boxes and masks, perturbation curves of every
record, and their summaries (means with clustered bootstrap intervals, per word kind, two stores paired).

Localization (no model needed), per (record, target word, box whose ``words`` contain it), on the word's map over
the **original** image's pixels (:func:`word_image_map`, i.e. :meth:`rgae.Explanation.image_map`: tiled and
multi-view models included, boxes in original-image pixels):

- ``pointing``: the map points into the box (:func:`rgae.metrics.image_pointing_game`: the centroid of its maximal
  pixels, for a single-grid model the top patch's center; a map with all values equal is a miss);
  ``pointing_random``: the hit rate of a uniformly random patch (:func:`rgae.metrics.layout_random_pointing`);
- ``energy``: the share of the map's positive mass inside the box (:func:`rgae.metrics.image_energy_in_box`);
- with a mask, ``pointing_mask`` / ``pointing_mask_random`` / ``energy_mask``: the same against the object's mask
  pixels (:func:`region_scores`). A mask that is exactly an integer box gives exactly the box numbers.

These are the functions ``examples/shapes_table.py`` scores with (``rgae.metrics.word_pointing_game``), so a
shapes store reproduces its pointing game.

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
    image_energy_in_box,
    image_point,
    image_pointing_game,
    insertion_deletion,
    layout_patch_centers,
    layout_random_pointing,
)

__all__ = ["METRICS", "StoreEvaluation", "WordScore", "check_perturbable", "compare", "evaluate_store",
           "localization_scores", "region_scores", "summarize", "word_image_map"]

METRICS = ("pointing", "energy", "deletion", "insertion")
LOCALIZATION = ("pointing", "pointing_random", "energy", "pointing_mask", "pointing_mask_random", "energy_mask")
PERTURBATION = ("deletion", "insertion")


# ------------------------------------------------------------------------------------------------ the word's map


def word_image_map(explanation, word: int, original_hw: tuple[int, int] | None = None) -> np.ndarray:
    """The one place where an explanation and a word become a pixel map for the metrics:
    ``float64 [H, W]`` relevance over the **original** image's pixels (:meth:`rgae.Explanation.image_map`: every
    view's patches warped back, tiles included), so boxes and masks are read in original-image pixels for every model
    family. ``original_hw``, when given, must be the explanation's image size.

    Example:
        >>> import torch
        >>> from rgae import Explanation
        >>> e = Explanation(method="rgae", target_text="a dog", output_tokens=["a", "dog"],
        ...                 text_to_patch=torch.tensor([[0., 0.], [4., 0.]]), patch_grid=(1, 2),
        ...                 image=np.zeros((2, 4, 3), np.uint8))
        >>> word_image_map(e, 1).tolist()   # patch 0's relevance spread over its 2 x 2 pixels
        [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]
    """
    if explanation.image is None and explanation.layout is None:
        raise ValueError("the explanation has no image or layout: boxes cannot be placed on it")
    hw = tuple(explanation.image_layout.image_size)
    if original_hw is not None and tuple(int(v) for v in original_hw) != hw:
        raise ValueError(f"the record's image is {tuple(original_hw)} (H, W) but the explanation's is {hw}")
    return explanation.image_map(word=word).numpy()


def region_scores(image_map: np.ndarray, region: np.ndarray, layout) -> tuple[float, float, float]:
    """``(pointing, random baseline, energy)`` of an ``[H, W]`` map against a pixel region (``bool [H, W]``, e.g. an
    object's mask): the pixel under :func:`rgae.metrics.image_point` is on the region (a map with all pixels equal
    is a miss); the share of ``layout``'s patches whose center (:func:`rgae.metrics.layout_patch_centers`) is on it;
    the share of the map's positive mass on it. A region that is an integer box gives exactly
    :func:`~rgae.metrics.image_pointing_game`, :func:`~rgae.metrics.layout_random_pointing` and
    :func:`~rgae.metrics.image_energy_in_box` of that box.

    Example:
        >>> import torch
        >>> from rgae.layout import ImageLayout, View
        >>> layout = ImageLayout((4, 4), (View("image", (2, 2), (0, 0, 4, 4)),), [0, 1, 2, 3])
        >>> m = layout.render(torch.tensor([0.0, 4.0, 0.0, 0.0])).numpy()   # all mass in the top-right patch
        >>> region = np.zeros((4, 4), bool); region[0:2, 2] = True          # half of it, not its center pixel
        >>> region_scores(m, region, layout)
        (0.0, 0.0, 0.5)
    """
    region = np.asarray(region, dtype=bool)
    if region.shape != image_map.shape:
        raise ValueError(f"region is {region.shape} but the map is {image_map.shape} (both original-image pixels)")
    h, w = region.shape
    point = image_point(image_map)
    pointing = 0.0 if point is None else float(region[min(int(point[1]), h - 1), min(int(point[0]), w - 1)])
    cx, cy, visible = layout_patch_centers(layout)
    on = region[np.clip(np.floor(cy).astype(np.int64), 0, h - 1), np.clip(np.floor(cx).astype(np.int64), 0, w - 1)]
    random = float((on & visible).sum() / max(int(visible.sum()), 1))
    positive = np.clip(image_map, 0, None)
    total = positive.sum()
    energy = 0.0 if total <= 0 else float(positive[region].sum() / total)
    return pointing, random, energy


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
    maps: dict[int, np.ndarray] = {}
    layout = explanation.image_layout
    for i, word in enumerate(explanation.words):
        w = normalize_word(word)
        for j, box in enumerate(record.boxes):
            if not w or w not in box.words:
                continue
            if i not in maps:
                maps[i] = word_image_map(explanation, i, record.original_hw)
            image_map = maps[i]
            score = WordScore(
                record=record.id, word_index=i, word=w, box_index=j, kind=box.kind(w),
                pointing=float(image_pointing_game(image_map, box.box)),
                pointing_random=layout_random_pointing(layout, box.box),
                energy=image_energy_in_box(image_map, box.box),
            )
            if record.mask is not None:
                score.pointing_mask, score.pointing_mask_random, score.energy_mask = region_scores(
                    image_map, record.mask_region(record.mask, box), layout)
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


def check_perturbable(explanation) -> None:
    """Deletion and insertion (:func:`rgae.metrics.insertion_deletion`) replace patches of the model-seen pixels,
    which needs one patch grid over one image and the explanation's inputs; ``ValueError`` saying so otherwise
    (tiled and multi-view models: their localization metrics still work)."""
    layout = explanation.layout
    if explanation.patch_grid is None or (layout is not None and not layout.is_single_grid):
        views = ", ".join(v.name for v in explanation.image_layout.views)
        raise ValueError(f"deletion/insertion perturb one patch grid; this {explanation.model_name or 'model'} sees "
                         f"the image as several views ({views}): score it with --metrics pointing,energy")
    if explanation.pixel_values is None or explanation.input_ids is None:
        raise ValueError("deletion/insertion re-run the model on the explanation's inputs, and this one has no "
                         "pixel_values/input_ids")


def _perturbation_share(store, ids, model, processor, steps, baseline, batch_size, state, progress, board_dir):
    from rgae.datasets.processes import ProgressBoard

    share = ids[state.process_index :: state.num_processes]
    board = ProgressBoard(board_dir, state, total=len(ids), desc=f"deletion/insertion ({state.num_processes} proc)",
                          enabled=progress)
    out = []
    for rid in share:
        explanation = store[rid]
        check_perturbable(explanation)
        curves = insertion_deletion(model, processor, explanation, steps=steps, baseline=baseline,
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
    ev = StoreEvaluation(name=name or store.path.name, path=str(store.path.resolve()), manifest=store.manifest,
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
