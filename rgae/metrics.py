"""Explanation-quality metrics: localization against ground-truth boxes, perturbation curves, the model-randomization
sanity check, and projector diagnostics of the "double abstraction".

Conventions shared by every function here:

- Explanations: the ``word_*`` functions and the ``image_*`` ones read :meth:`~rgae.Explanation.image_map`, relevance
  over the **original** image's pixels for every model family (tiles and views warped back), with boxes
  ``(x0, y0, x1, y1)`` in original-image pixels, end exclusive.
- The patch-grid functions (:func:`pointing_game`, :func:`energy_in_box`, ...) take a *patch map* ``[N]`` (row-major
  over ``grid_hw = (grid_h, grid_w)``) or ``[grid_h, grid_w]`` and boxes in the pixels of the grid's image: patch
  ``(i, j)`` covers ``[j·W/gw, (j+1)·W/gw) × [i·H/gh, (i+1)·H/gh)`` of an ``H×W`` image. :func:`box_to_model_frame`
  moves a box of the original image into a padded model image.
- Pointing game ties: the top patch is the **first** maximum in row-major order (``argmax``), so the result is
  deterministic. A map with no information (all entries equal, e.g. all zero) is a **miss** by default
  (``empty="miss"``); ``empty="random"`` instead draws one patch uniformly with ``seed``.

Example:
    >>> import torch
    >>> m = torch.zeros(2, 3); m[1, 2] = 1.0            # top patch: row 1, column 2 of a 2x3 grid
    >>> pointing_game(m, box=(60, 30, 90, 60), image_hw=(60, 90))   # its center (75, 45) is inside
    True
    >>> round(energy_in_box(m, box=(0, 0, 45, 60), image_hw=(60, 90)), 3)
    0.0
    >>> random_pointing_baseline((0, 0, 45, 60), grid_hw=(2, 3), image_hw=(60, 90))
    0.3333333333333333
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "PerturbationCurve",
    "RandomizationResult",
    "box_to_model_frame",
    "energy_in_box",
    "image_energy_in_box",
    "image_point",
    "image_pointing_game",
    "insertion_deletion",
    "layout_patch_centers",
    "layout_random_pointing",
    "patch_boxes",
    "perturbation_curve",
    "pointing_game",
    "projector_diagnostics",
    "query_entropy",
    "query_locality",
    "query_redundancy",
    "random_pointing_baseline",
    "randomization_check",
    "spearman",
    "ssim",
    "word_energy_in_box",
    "word_pointing_game",
    "word_random_baseline",
]


# ------------------------------------------------------------------------------------------------ input handling


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        # Straight to float64: image maps are rendered in float64, and a float32 detour would merge near-ties.
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _flat_map(patch_map, grid_hw) -> tuple[np.ndarray, tuple[int, int]]:
    """The map as ``float64 [N]`` and the grid it lives on."""
    arr = _as_numpy(patch_map)
    if arr.ndim == 2:
        grid = (int(arr.shape[0]), int(arr.shape[1]))
        if grid_hw is not None and tuple(int(v) for v in grid_hw) != grid:
            raise ValueError(f"patch_map has shape {grid} but grid_hw is {tuple(grid_hw)}")
    elif arr.ndim == 1:
        if grid_hw is None:
            raise ValueError("a flat [N] patch_map needs grid_hw=(grid_h, grid_w)")
        grid = (int(grid_hw[0]), int(grid_hw[1]))
        if grid[0] * grid[1] != arr.size:
            raise ValueError(f"patch_map has {arr.size} entries but grid_hw {grid} has {grid[0] * grid[1]} patches")
    else:
        raise ValueError(f"patch_map must be [N] or [grid_h, grid_w], got shape {arr.shape}")
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"grid must have positive sides, got {grid}")
    flat = arr.reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("patch_map contains NaN or inf")
    return flat, grid


def _check_box(box) -> tuple[float, float, float, float]:
    if box is None or len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1) in pixels, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must satisfy x1 > x0 and y1 > y0, got {box!r}")
    return x0, y0, x1, y1


def _check_hw(image_hw) -> tuple[float, float]:
    if image_hw is None or len(image_hw) != 2 or min(float(v) for v in image_hw) <= 0:
        raise ValueError(f"image_hw must be (height, width) of the model-seen image, got {image_hw!r}")
    return float(image_hw[0]), float(image_hw[1])


def patch_boxes(grid_hw: tuple[int, int], image_hw: tuple[float, float]) -> np.ndarray:
    """``float64 [N, 4]`` pixel box ``(x0, y0, x1, y1)`` of every patch, row-major.

    Example:
        >>> patch_boxes((1, 2), (10, 20)).tolist()
        [[0.0, 0.0, 10.0, 10.0], [10.0, 0.0, 20.0, 10.0]]
    """
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    h, w = _check_hw(image_hw)
    i, j = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    i, j = i.reshape(-1).astype(np.float64), j.reshape(-1).astype(np.float64)
    return np.stack([j * w / gw, i * h / gh, (j + 1) * w / gw, (i + 1) * h / gh], axis=1)


def _patch_in_box(grid_hw, image_hw, box, criterion: str) -> np.ndarray:
    """``bool [N]``: whether each patch counts as inside ``box`` under ``criterion``."""
    x0, y0, x1, y1 = _check_box(box)
    pb = patch_boxes(grid_hw, image_hw)
    if criterion == "center":
        cx, cy = (pb[:, 0] + pb[:, 2]) / 2, (pb[:, 1] + pb[:, 3]) / 2
        # Half-open like the box itself: a center on the right/bottom edge is outside.
        return (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    if criterion == "overlap":
        overlap_x = np.minimum(pb[:, 2], x1) > np.maximum(pb[:, 0], x0)
        return overlap_x & (np.minimum(pb[:, 3], y1) > np.maximum(pb[:, 1], y0))
    raise ValueError(f"criterion must be 'center' or 'overlap', got {criterion!r}")


# ---------------------------------------------------------------------------------------------------- localization


def pointing_game(
    patch_map,
    box,
    grid_hw: tuple[int, int] | None = None,
    image_hw: tuple[float, float] | None = None,
    criterion: str = "center",
    empty: str = "miss",
    seed: int = 0,
) -> bool:
    """Whether the map's top patch lands in the ground-truth ``box``.

    Args:
        patch_map: ``[N]`` (with ``grid_hw``) or ``[grid_h, grid_w]`` relevance.
        box: ``(x0, y0, x1, y1)`` pixels of the model-seen image, end exclusive.
        image_hw: ``(H, W)`` of the model-seen image.
        criterion: ``"center"`` — the top patch's center lies in the box (the project's criterion);
            ``"overlap"`` — the top patch overlaps the box at all (lenient).
        empty: what a map with all entries equal (e.g. all zero) scores: ``"miss"`` (default: a map that points
            nowhere cannot hit) or ``"random"`` (one patch drawn uniformly with ``seed``).

    Ties between maxima go to the first one in row-major order.

    Example:
        >>> pointing_game([0.0, 0.0, 0.0, 0.0], (0, 0, 8, 8), grid_hw=(2, 2), image_hw=(8, 8))
        False
        >>> pointing_game([1.0, 1.0, 0.0, 0.0], (4, 0, 8, 4), grid_hw=(2, 2), image_hw=(8, 8))  # tie -> patch 0
        False
    """
    flat, grid = _flat_map(patch_map, grid_hw)
    inside = _patch_in_box(grid, image_hw, box, criterion)
    if empty not in ("miss", "random"):
        raise ValueError(f"empty must be 'miss' or 'random', got {empty!r}")
    if flat.max() == flat.min():
        if empty == "miss":
            return False
        return bool(inside[np.random.default_rng(seed).integers(flat.size)])
    return bool(inside[int(np.argmax(flat))])


def random_pointing_baseline(
    box, grid_hw: tuple[int, int], image_hw: tuple[float, float], criterion: str = "center"
) -> float:
    """Expected pointing-game hit rate of a uniformly random top patch: the fraction of patches that count as inside.

    Example:
        >>> random_pointing_baseline((0, 0, 4, 4), grid_hw=(2, 2), image_hw=(8, 8))
        0.25
    """
    return float(_patch_in_box(grid_hw, image_hw, box, criterion).mean())


def energy_in_box(
    patch_map, box, grid_hw: tuple[int, int] | None = None, image_hw: tuple[float, float] | None = None
) -> float:
    """Fraction of the map's **positive** relevance mass that falls in ``box``.

    Each patch's positive relevance is spread uniformly over its pixels, so a patch half inside the box contributes
    half its mass. A map without positive mass scores 0.0.

    Example:
        >>> energy_in_box([1.0, 3.0], (0, 0, 15, 10), grid_hw=(1, 2), image_hw=(10, 20))  # 1 + 3/2 of 4
        0.625
    """
    flat, grid = _flat_map(patch_map, grid_hw)
    x0, y0, x1, y1 = _check_box(box)
    pb = patch_boxes(grid, image_hw)
    ow = np.clip(np.minimum(pb[:, 2], x1) - np.maximum(pb[:, 0], x0), 0, None)
    oh = np.clip(np.minimum(pb[:, 3], y1) - np.maximum(pb[:, 1], y0), 0, None)
    frac = ow * oh / ((pb[:, 2] - pb[:, 0]) * (pb[:, 3] - pb[:, 1]))
    pos = np.clip(flat, 0, None)
    total = pos.sum()
    return 0.0 if total <= 0 else float((pos * frac).sum() / total)


def box_to_model_frame(box, original_hw: tuple[int, int], content_box: tuple[float, float, float, float]):
    """Move a pixel box of the original image into the model-seen image, where the original occupies
    ``content_box = (x0, y0, x1, y1)`` (an :class:`~rgae.explanation.Explanation`'s ``content_box``).

    Example:
        >>> box_to_model_frame((0, 0, 10, 5), original_hw=(10, 20), content_box=(0, 5, 20, 15))
        (0.0, 5.0, 10.0, 10.0)
    """
    bx0, by0, bx1, by1 = _check_box(box)
    h, w = _check_hw(original_hw)
    cx0, cy0, cx1, cy1 = (float(v) for v in content_box)
    sx, sy = (cx1 - cx0) / w, (cy1 - cy0) / h
    return (cx0 + bx0 * sx, cy0 + by0 * sy, cx0 + bx1 * sx, cy0 + by1 * sy)


# ------------------------------------------------------------------------ maps over the original image (any family)


def _image_map_array(image_map) -> np.ndarray:
    arr = _as_numpy(image_map)
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"image_map must be [H, W] relevance over the image's pixels, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image_map contains NaN or inf")
    return arr


def _box_mask(shape: tuple[int, int], box) -> np.ndarray:
    """``bool [H, W]``: pixels whose centers lie in the half-open ``box``."""
    x0, y0, x1, y1 = _check_box(box)
    ys, xs = np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def image_point(image_map) -> tuple[float, float] | None:
    """``(x, y)`` where an ``[H, W]`` map points: the centroid of its maximal pixels (pixel centers at +0.5), or
    None for a map with no information (all pixels equal). For a single-grid model's
    :meth:`~rgae.Explanation.image_map` the maximal pixels are the top patch's, so this is its center.

    Example:
        >>> m = np.zeros((4, 6)); m[2:4, 4:6] = 1.0
        >>> image_point(m)
        (5.0, 3.0)
    """
    arr = _image_map_array(image_map)
    top = arr.max()
    if top == arr.min():
        return None
    # Ties within rounding: a patch's pixels carry one value up to float error in the rendering.
    ys, xs = np.nonzero(arr >= top - 1e-12 * max(abs(top), 1e-300))
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


def image_pointing_game(image_map, box, criterion: str = "center", empty: str = "miss", seed: int = 0) -> bool:
    """Whether an ``[H, W]`` map over the original image points into ``box`` (original-image pixels, end exclusive).

    ``criterion="center"``: :func:`image_point` lies in the box; ``"overlap"``: any maximal pixel does. A map with
    all pixels equal is a miss (``empty="miss"``) or points at a uniformly random pixel (``"random"``, ``seed``).

    Example:
        >>> m = np.zeros((4, 6)); m[2:4, 4:6] = 1.0
        >>> image_pointing_game(m, (4, 2, 6, 4)), image_pointing_game(m, (0, 0, 4, 4))
        (True, False)
    """
    if empty not in ("miss", "random"):
        raise ValueError(f"empty must be 'miss' or 'random', got {empty!r}")
    if criterion not in ("center", "overlap"):
        raise ValueError(f"criterion must be 'center' or 'overlap', got {criterion!r}")
    arr = _image_map_array(image_map)
    inside = _box_mask(arr.shape, box)
    point = image_point(arr)
    if point is None:
        if empty == "miss":
            return False
        return bool(inside.reshape(-1)[np.random.default_rng(seed).integers(arr.size)])
    if criterion == "overlap":
        top = arr.max()
        return bool(inside[arr >= top - 1e-12 * max(abs(top), 1e-300)].any())
    x, y = point
    x0, y0, x1, y1 = _check_box(box)
    return bool(x0 <= x < x1 and y0 <= y < y1)


def image_energy_in_box(image_map, box) -> float:
    """Fraction of an ``[H, W]`` map's **positive** relevance on the pixels of ``box`` (0.0 without positive mass).
    For a single-grid model's image map this equals :func:`energy_in_box` of its patch map.

    Example:
        >>> round(image_energy_in_box(np.array([[1.0, 3.0]]), (0, 0, 1, 1)), 3)
        0.25
    """
    arr = np.clip(_image_map_array(image_map), 0, None)
    total = arr.sum()
    return 0.0 if total <= 0 else float(arr[_box_mask(arr.shape, box)].sum() / total)


def layout_patch_centers(layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x [N], y [N], visible [N])``: where each patch of ``layout`` (every view's) points in the original image —
    the center of its part inside the image, as :func:`image_point` finds it — and whether any of it is inside.

    Example:
        >>> from rgae.layout import ImageLayout, View
        >>> layout = ImageLayout((4, 8), (View("image", (1, 2), (0, -4, 8, 4)),), [0])  # padded above
        >>> [a.tolist() for a in layout_patch_centers(layout)]
        [[2.0, 6.0], [2.0, 2.0], [True, True]]
    """
    boxes = layout.patch_boxes().numpy()
    h, w = layout.image_size
    # A patch partly on padding points at the center of its part inside the image (as image_point does).
    cx = (np.clip(boxes[:, 0], 0, w) + np.clip(boxes[:, 2], 0, w)) / 2
    cy = (np.clip(boxes[:, 1], 0, h) + np.clip(boxes[:, 3], 0, h)) / 2
    visible = (np.clip(boxes[:, 2], 0, w) > np.clip(boxes[:, 0], 0, w)) & (
        np.clip(boxes[:, 3], 0, h) > np.clip(boxes[:, 1], 0, h))
    return cx, cy, visible


def layout_random_pointing(layout, box) -> float:
    """Expected pointing-game hit rate of a uniformly random top patch of ``layout`` (every view's patches): the
    fraction of patches whose center, within the image, lies in ``box`` (original-image pixels)."""
    x0, y0, x1, y1 = _check_box(box)
    cx, cy, visible = layout_patch_centers(layout)
    hit = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1) & visible
    return float(hit.sum() / max(int(visible.sum()), 1))


def _original_box(explanation, box, original_hw):
    if explanation.image is None and explanation.layout is None:
        raise ValueError("the explanation has no image or layout: boxes cannot be placed on it")
    hw = explanation.image_layout.image_size
    if original_hw is not None and tuple(int(v) for v in original_hw) != tuple(hw):
        raise ValueError(f"original_hw {tuple(original_hw)} is not the explanation's image size {tuple(hw)}")
    return box


def word_pointing_game(explanation, word: int | str, box, original_hw: tuple[int, int] | None = None,
                       criterion: str = "center", empty: str = "miss") -> bool:
    """Pointing game of one word's :meth:`~rgae.Explanation.image_map` against ``box`` in original-image pixels
    (any model family: tiles and views are warped back to the image first). ``original_hw``, when given, is checked
    against the explanation's image size.

    Example:
        >>> word_pointing_game(expl, "circle", scene.objects[0].box)  # doctest: +SKIP
        True
    """
    box = _original_box(explanation, box, original_hw)
    return image_pointing_game(explanation.image_map(word=word), box, criterion=criterion, empty=empty)


def word_energy_in_box(explanation, word: int | str, box) -> float:
    """:func:`image_energy_in_box` of one word's image map (``box`` in original-image pixels)."""
    return image_energy_in_box(explanation.image_map(word=word), _original_box(explanation, box, None))


def word_random_baseline(explanation, box) -> float:
    """:func:`layout_random_pointing` of the explanation's layout (``box`` in original-image pixels)."""
    return layout_random_pointing(explanation.image_layout, _original_box(explanation, box, None))


# ---------------------------------------------------------------------------------------------------- perturbation


@dataclass
class PerturbationCurve:
    """A perturbation curve: ``scores[k]`` is the target's mean per-token log-likelihood with ``fractions[k]`` of the
    patches changed (removed for ``deletion``/``positive``/``negative``, inserted for ``insertion``); ``auc`` is the
    trapezoid area over fractions in [0, 1]."""

    fractions: np.ndarray
    scores: np.ndarray
    order: str
    baseline: str
    n_patches: int

    @property
    def auc(self) -> float:
        f, s = self.fractions, self.scores
        return float(np.sum((f[1:] - f[:-1]) * (s[1:] + s[:-1]) / 2))

    def to_dict(self) -> dict:
        return {"order": self.order, "baseline": self.baseline, "n_patches": self.n_patches, "auc": self.auc,
                "fractions": self.fractions.tolist(), "scores": self.scores.tolist()}


def _processor_stats(processor, channels: int):
    ip = getattr(processor, "image_processor", processor)
    mean = getattr(ip, "image_mean", None) or [0.0] * channels
    std = getattr(ip, "image_std", None) or [1.0] * channels
    scale = getattr(ip, "rescale_factor", None) or 1 / 255
    as_column = lambda v: torch.tensor(v, dtype=torch.float64).view(-1, 1, 1)  # noqa: E731
    return as_column(mean), as_column(std), float(scale)


def _baseline_pixels(pixel_values: torch.Tensor, processor, baseline: str) -> torch.Tensor:
    """``[1, C, H, W]`` replacement values in the processor's normalized space."""
    pv = pixel_values.double()
    c = pv.shape[1]
    if baseline == "mean":
        # The processor's mean colour: 0 after normalization (what Occlusion uses).
        return torch.zeros_like(pv)
    if baseline == "zero":
        mean, std, _ = _processor_stats(processor, c)
        return ((0.0 - mean) / std).expand_as(pv[0]).unsqueeze(0).clone()
    if baseline == "blur":
        # Normalization is affine per channel, so blurring normalized values equals blurring the pixels.
        h, w = pv.shape[-2:]
        sigma = max(h, w) / 16
        radius = max(1, int(3 * sigma))
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        k = torch.exp(-(x**2) / (2 * sigma**2))
        k = k / k.sum()
        padded = torch.nn.functional.pad(pv, (radius, radius, radius, radius), mode="replicate")
        out = torch.nn.functional.conv2d(padded, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    raise ValueError(f"baseline must be 'mean', 'blur' or 'zero', got {baseline!r}")


def patch_index_map(pixel_hw: tuple[int, int], grid_hw: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` long: the row-major patch of every pixel (patch (i, j) covers rows [i·H/gh, (i+1)·H/gh))."""
    h, w = pixel_hw
    gh, gw = grid_hw
    rows = torch.clamp(torch.arange(h) * gh // h, max=gh - 1)
    cols = torch.clamp(torch.arange(w) * gw // w, max=gw - 1)
    return rows[:, None] * gw + cols[None, :]


def _forward_kwargs(explanation, extra: dict | None):
    for name in ("input_ids", "pixel_values", "target_positions", "token_ids"):
        if getattr(explanation, name) is None:
            raise ValueError(f"the explanation has no {name}: perturbation metrics need an Explanation produced by an "
                             f"rgae method (it records the teacher-forced forward)")
    return dict(extra or {})


@torch.no_grad()
def _target_loglik(model, explanation, pixel_batch: torch.Tensor, token_index: Sequence[int], batch_size: int,
                   extra: dict, progress: bool, desc: str) -> np.ndarray:
    """Mean log-probability of the chosen target tokens for each of the ``[B, C, H, W]`` pixel variants."""
    from tqdm.auto import tqdm

    param = next(model.parameters())
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    ids = explanation.input_ids.to(param.device)
    positions = explanation.target_positions.to(param.device)[list(token_index)]
    targets = ids[0, positions]
    scores = []
    starts = range(0, pixel_batch.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        pv = pixel_batch[start : start + batch_size].to(param.device, dtype)
        b = pv.shape[0]
        batch_ids = ids.expand(b, -1)
        out = model(input_ids=batch_ids, pixel_values=pv, attention_mask=torch.ones_like(batch_ids), use_cache=False,
                    **extra)
        logp = out.logits[:, positions - 1].float().log_softmax(-1)
        scores.append(logp.gather(-1, targets.view(1, -1, 1).expand(b, -1, 1)).squeeze(-1).mean(-1).cpu())
    return torch.cat(scores).double().numpy()


def _relevance_for(explanation, word) -> tuple[np.ndarray, list[int]]:
    if word is None:
        return _as_numpy(explanation.sentence_text_to_patch), list(range(len(explanation.output_tokens)))
    return _as_numpy(explanation.word_text_to_patch(word)), explanation.word_tokens(word)


def _fractions(steps: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    counts = np.unique(np.round(np.linspace(0, n, int(steps) + 1)).astype(int))
    return counts, counts / n


def _curves(model, processor, explanation, kinds: Sequence[str], steps: int, baseline: str, word, batch_size: int,
            forward_kwargs, progress: bool) -> dict[str, PerturbationCurve]:
    extra = _forward_kwargs(explanation, forward_kwargs)
    relevance, token_index = _relevance_for(explanation, word)
    n = relevance.size
    counts, fractions = _fractions(steps, n)
    # Stable sorts: equal relevance keeps row-major order, so curves are deterministic.
    most_first = np.argsort(-relevance, kind="stable")
    least_first = np.argsort(relevance, kind="stable")
    pv = explanation.pixel_values.double()
    base = _baseline_pixels(pv, processor, baseline)
    index = patch_index_map(tuple(pv.shape[-2:]), explanation.patch_grid)
    variants, spans = [], {}
    for kind in kinds:
        keeps = []
        for c in counts:
            keep = torch.ones(n, dtype=torch.float64)
            if kind in ("positive", "deletion"):
                keep[most_first[:c]] = 0
            elif kind == "negative":
                keep[least_first[:c]] = 0
            elif kind == "insertion":
                keep.zero_()
                keep[most_first[:c]] = 1
            else:
                raise ValueError(f"order must be 'positive' or 'negative', got {kind!r}")
            keeps.append(keep)
        spans[kind] = (len(variants), len(variants) + len(keeps))
        for keep in keeps:
            pixel_keep = keep[index]
            variants.append(pv[0] * pixel_keep + base[0] * (1 - pixel_keep))
    scores = _target_loglik(model, explanation, torch.stack(variants), token_index, batch_size, extra, progress,
                            desc="perturbation")
    return {kind: PerturbationCurve(fractions=fractions, scores=scores[a:b], order=kind, baseline=baseline, n_patches=n)
            for kind, (a, b) in spans.items()}


def perturbation_curve(model, processor, explanation, order: str = "positive", steps: int = 10,
                       baseline: str = "mean", word: int | str | None = None, batch_size: int = 8,
                       forward_kwargs: dict | None = None, progress: bool = False) -> PerturbationCurve:
    """Positive / negative perturbation test: remove patches from the most (``"positive"``) or least
    (``"negative"``) relevant first and follow the target's log-likelihood.

    Patches are replaced in the model-seen pixels (``explanation.pixel_values``) by ``baseline``: ``"mean"`` (the
    processor's mean colour), ``"zero"`` (black) or ``"blur"`` (a Gaussian-blurred copy of the image, sigma = 1/16 of
    the image side). The forward is teacher-forced on the same target (``explanation.input_ids``), the masked images
    in batches of ``batch_size``. Scores are the **mean per-token log-probability** of the target (of ``word``'s
    tokens and with ``word``'s map when given). A faithful map gives a lower positive AUC than negative AUC.

    Example:
        >>> curve = perturbation_curve(model, processor, expl, order="positive", steps=8)  # doctest: +SKIP
        >>> curve.auc <= perturbation_curve(model, processor, expl, order="negative").auc  # doctest: +SKIP
        True
    """
    if order not in ("positive", "negative"):
        raise ValueError(f"order must be 'positive' or 'negative', got {order!r}")
    return _curves(model, processor, explanation, [order], steps, baseline, word, batch_size, forward_kwargs,
                   progress)[order]


def insertion_deletion(model, processor, explanation, steps: int = 10, baseline: str = "blur",
                       word: int | str | None = None, batch_size: int = 8, forward_kwargs: dict | None = None,
                       progress: bool = False) -> dict[str, PerturbationCurve]:
    """Insertion and deletion curves (RISE): ``deletion`` removes the most relevant patches first from the image;
    ``insertion`` starts from the ``baseline`` image (blurred by default) and puts the most relevant patches back
    first. Higher insertion AUC and lower deletion AUC are better. All masked forwards run in one batched pass.

    Example:
        >>> curves = insertion_deletion(model, processor, expl, steps=8)  # doctest: +SKIP
        >>> curves["insertion"].auc, curves["deletion"].auc  # doctest: +SKIP
    """
    return _curves(model, processor, explanation, ["insertion", "deletion"], steps, baseline, word, batch_size,
                   forward_kwargs, progress)


# --------------------------------------------------------------------------------------------------- randomization


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation with average ranks for ties; 0.0 when either input is constant.

    Example:
        >>> spearman([1, 2, 3, 4], [10, 20, 30, 40]), spearman([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    x, y = _as_numpy(a).reshape(-1), _as_numpy(b).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"spearman needs inputs of equal size, got {x.size} and {y.size}")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return 0.0 if den == 0 else float((rx * ry).sum() / den)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def ssim(a, b, window: int = 3) -> float:
    """Mean structural similarity of two ``[h, w]`` maps after min–max normalization to [0, 1] (data range 1,
    uniform ``window × window`` windows, C1 = 0.01², C2 = 0.03²; the window shrinks to the map's size).

    Example:
        >>> import numpy as np
        >>> m = np.arange(16.0).reshape(4, 4)
        >>> round(ssim(m, m), 6), ssim(m, -m) < 0
        (1.0, True)
    """
    x, y = _as_numpy(a), _as_numpy(b)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"ssim needs two [h, w] maps of the same shape, got {x.shape} and {y.shape}")
    x, y = _minmax(x), _minmax(y)
    kh, kw = min(window, x.shape[0]), min(window, x.shape[1])
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for i in range(x.shape[0] - kh + 1):
        for j in range(x.shape[1] - kw + 1):
            px, py = x[i : i + kh, j : j + kw], y[i : i + kh, j : j + kw]
            mx, my = px.mean(), py.mean()
            vx, vy = px.var(), py.var()
            cov = ((px - mx) * (py - my)).mean()
            vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


@dataclass
class RandomizationResult:
    """Maps of the trained model and after each randomization stage, with their similarity to the trained map.

    ``stages[k]`` names what was randomized (cumulatively, for ``"cascading"``); ``maps[k]`` is the ``[h, w]`` map
    then; ``spearman[k]`` / ``ssim[k]`` compare it with ``original``."""

    original: torch.Tensor
    stages: list[str] = field(default_factory=list)
    maps: list[torch.Tensor] = field(default_factory=list)
    spearman: list[float] = field(default_factory=list)
    ssim: list[float] = field(default_factory=list)

    def changed(self, threshold: float = 0.5) -> bool:
        """True when the fully randomized map's rank correlation with the original is below ``threshold``."""
        return bool(self.spearman) and self.spearman[-1] < threshold

    def to_dict(self) -> dict:
        return {"stages": self.stages, "spearman": self.spearman, "ssim": self.ssim}


def _stage_modules(model) -> list[tuple[str, list[torch.nn.Module]]]:
    """Model parts from the output towards the input (Adebayo et al.'s cascading order): the LM head, the LLM's
    decoder layers last to first, the projector, the vision encoder's layers last to first."""
    stages: list[tuple[str, list[torch.nn.Module]]] = []
    head = getattr(model, "lm_head", None)
    if head is not None:
        stages.append(("lm_head", [head]))
    layer_lists = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) > 0:
            layer_lists.append((name, module))
    vision = [(n, m) for n, m in layer_lists if "vision" in n]
    # Q-Former layers live in the projector and are randomized with it.
    text = [(n, m) for n, m in layer_lists if "vision" not in n and "projector" not in n]
    for name, layers in text:
        for k in reversed(range(len(layers))):
            stages.append((f"{name}.{k}", [layers[k]]))
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    if projector is not None:
        stages.append(("multi_modal_projector", [projector]))
    for name, layers in vision:
        for k in reversed(range(len(layers))):
            stages.append((f"{name}.{k}", [layers[k]]))
    return stages


@torch.no_grad()
def _randomize(modules: Sequence[torch.nn.Module], generator: torch.Generator) -> None:
    # Weight matrices are redrawn from N(0, their own std) so activations keep their scale; 1-D parameters (norm
    # scales, biases) are kept, as re-initialization would set them to constants anyway.
    for module in modules:
        for p in module.parameters():
            if p.ndim >= 2:
                std = float(p.float().std()) or 0.02
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * std)


def randomization_check(method_cls: Callable, model, processor, image, target: str, prompt: str | None = None,
                        layers: str = "cascading", word: int | str | None = None, seed: int = 0,
                        progress: bool = False, **attribute_kwargs) -> RandomizationResult:
    """Model-randomization sanity check (Adebayo et al. 2018): explain with the trained model, then with a deep copy
    whose weights are redrawn at random — ``"all"`` at once, or ``"cascading"`` from the LM head down through the
    LLM, the projector and the vision encoder, cumulatively — and compare the maps (Spearman, SSIM).
    A method that passes produces maps that change. ``model`` itself is never modified.

    Example:
        >>> from rgae import RGAE
        >>> res = randomization_check(RGAE, model, processor, image, "a red circle", layers="all")  # doctest: +SKIP
        >>> res.changed()  # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    if layers not in ("cascading", "all"):
        raise ValueError(f"layers must be 'cascading' or 'all', got {layers!r}")

    def explain(m) -> torch.Tensor:
        expl = method_cls(m, processor).attribute(image, target=target, prompt=prompt, **attribute_kwargs)
        flat = expl.sentence_text_to_patch if word is None else expl.word_text_to_patch(word)
        return flat.detach().float().reshape(expl.patch_grid)

    original = explain(model)
    result = RandomizationResult(original=original)
    generator = torch.Generator().manual_seed(seed)
    randomized = copy.deepcopy(model)
    stages = _stage_modules(randomized)
    if layers == "all":
        embeddings = [m for m in randomized.modules() if isinstance(m, torch.nn.Embedding)]
        stages = [("all", [m for _, mods in stages for m in mods] + embeddings)]
    for name, modules in tqdm(stages, desc="randomization", disable=not progress, leave=False):
        _randomize(modules, generator)
        current = explain(randomized)
        result.stages.append(name)
        result.maps.append(current)
        result.spearman.append(spearman(original, current))
        result.ssim.append(ssim(original, current))
    return result


# ------------------------------------------------------------------------------------------- projector diagnostics


def _q2p(query_to_patch) -> np.ndarray:
    arr = _as_numpy(query_to_patch)
    if arr.ndim != 2:
        raise ValueError(f"query_to_patch must be [M, N], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("query_to_patch contains NaN or inf")
    return arr


def query_entropy(query_to_patch) -> np.ndarray:
    """``[M]`` normalized spatial entropy of each query's positive Query-to-Patch mass, in [0, 1]: 0 = one patch,
    1 = uniform over all N patches. Rows without positive mass give NaN.

    Example:
        >>> import numpy as np
        >>> query_entropy(np.eye(3)).tolist(), query_entropy(np.ones((2, 4))).round(6).tolist()
        ([0.0, 0.0, 0.0], [1.0, 1.0])
    """
    q = np.clip(_q2p(query_to_patch), 0, None)
    n = q.shape[1]
    totals = q.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = q / totals
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    # + 0.0 turns the -0.0 of a one-patch row into 0.0.
    h = (h / math.log(n) if n > 1 else np.zeros_like(h)) + 0.0
    h[totals[:, 0] <= 0] = np.nan
    return h


def _window(grid_hw, query_grid, window) -> tuple[int, int]:
    if window is not None:
        k = (int(window), int(window)) if np.isscalar(window) else (int(window[0]), int(window[1]))
    elif query_grid is not None:
        k = (math.ceil(grid_hw[0] / int(query_grid[0])), math.ceil(grid_hw[1] / int(query_grid[1])))
    else:
        raise ValueError("give query_grid=(q_h, q_w) or window=k to set the window size")
    if k[0] < 1 or k[1] < 1 or k[0] > grid_hw[0] or k[1] > grid_hw[1]:
        raise ValueError(f"window {k} must fit in the patch grid {tuple(grid_hw)}")
    return k


def query_locality(query_to_patch, patch_grid: tuple[int, int], query_grid: tuple[int, int] | None = None,
                   window: int | tuple[int, int] | None = None) -> np.ndarray:
    """``[M]`` fraction of each query's positive mass inside its best ``kh × kw`` window of the patch grid.

    The window defaults to the patch/query stride, ``(ceil(grid_h / q_h), ceil(grid_w / q_w))``: a pooling
    projector whose windows tile the grid scores 1. Rows without positive mass give NaN.

    Example:
        >>> import numpy as np
        >>> query_locality(np.eye(4), (2, 2), window=1).tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    q = np.clip(_q2p(query_to_patch), 0, None)
    gh, gw = int(patch_grid[0]), int(patch_grid[1])
    if q.shape[1] != gh * gw:
        raise ValueError(f"query_to_patch has {q.shape[1]} patch columns but patch_grid {patch_grid} has {gh * gw}")
    kh, kw = _window((gh, gw), query_grid, window)
    maps = q.reshape(-1, gh, gw)
    # Summed-area table: every window's mass in O(1).
    sat = np.zeros((maps.shape[0], gh + 1, gw + 1))
    sat[:, 1:, 1:] = maps.cumsum(axis=1).cumsum(axis=2)
    sums = sat[:, kh:, kw:] - sat[:, :-kh, kw:] - sat[:, kh:, :-kw] + sat[:, :-kh, :-kw]
    best = sums.reshape(sums.shape[0], -1).max(axis=1)
    totals = maps.reshape(maps.shape[0], -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.minimum(best / totals, 1.0)
    out[totals <= 0] = np.nan
    return out


def query_redundancy(query_to_patch) -> float:
    """Mean pairwise cosine similarity of the Query-to-Patch rows (i < j): 0 = queries see disjoint patches,
    1 = every query sees the same thing. A zero row has similarity 0 with everything; one query gives 0.0.

    Example:
        >>> import numpy as np
        >>> query_redundancy(np.eye(3)), round(query_redundancy(np.ones((3, 5))), 6)
        (0.0, 1.0)
    """
    q = _q2p(query_to_patch)
    m = q.shape[0]
    if m < 2:
        return 0.0
    norms = np.linalg.norm(q, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    unit = q / safe[:, None]
    sim = unit @ unit.T
    iu = np.triu_indices(m, k=1)
    return float(sim[iu].mean())


def projector_diagnostics(query_to_patch, patch_grid: tuple[int, int] | None = None,
                          query_grid: tuple[int, int] | None = None,
                          window: int | tuple[int, int] | None = None) -> dict:
    """The "double abstraction" numbers of a projector's Query-to-Patch map ``[M, N]`` (or an Explanation):
    mean normalized entropy (low = local), mean best-window locality (high = local), redundancy between queries
    (high = queries repeat each other), plus the per-query arrays.

    Example:
        >>> import numpy as np
        >>> d = projector_diagnostics(np.eye(4), patch_grid=(2, 2), query_grid=(2, 2))
        >>> d["entropy"], d["locality"], d["redundancy"]
        (0.0, 1.0, 0.0)
    """
    if hasattr(query_to_patch, "query_to_patch"):  # an Explanation
        expl = query_to_patch
        if expl.query_to_patch is None:
            raise ValueError(f"the {expl.method!r} explanation has no query_to_patch map")
        patch_grid = patch_grid or expl.patch_grid
        query_grid = query_grid or expl.query_grid
        query_to_patch = expl.query_to_patch
    if patch_grid is None:
        raise ValueError("patch_grid=(grid_h, grid_w) is needed")
    ent = query_entropy(query_to_patch)
    loc = query_locality(query_to_patch, patch_grid, query_grid, window)
    return {
        "entropy": float(np.nanmean(ent)) if np.isfinite(ent).any() else float("nan"),
        "locality": float(np.nanmean(loc)) if np.isfinite(loc).any() else float("nan"),
        "redundancy": query_redundancy(query_to_patch),
        "per_query_entropy": ent.tolist(),
        "per_query_locality": loc.tolist(),
    }
