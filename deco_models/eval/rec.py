"""Referring expression comprehension (RefCOCO / RefCOCO+ / RefCOCOg): box parsing, IoU, Acc@IoU, and the
coordinate frames.

Frames. LLaVA-1.5 (and so the DeCo models) sees an image padded to a square by ``expand2square``: the short side is
padded symmetrically, the image pasted at offset ``(S - short) // 2`` (integer division) with ``S = max(width,
height)``, and the boxes in its training data and answers are normalized to that padded square. Ground-truth boxes
are normalized to the original image. :func:`padded_to_original` / :func:`original_to_padded` convert between the two
(all boxes here are ``(x1, y1, x2, y2)``, normalized to [0, 1]).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "parse_box",
    "box_iou",
    "rec_accuracy",
    "padded_to_original",
    "original_to_padded",
    "coco_xywh_to_normalized",
]

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_SPLIT_DECIMAL = re.compile(r"(\d)\.\s+(\d)")
_BOX = re.compile(r"\[\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*,\s*(" + _NUM + r")\s*\]")


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``[x1, y1, x2, y2]`` in a model answer, or None when the answer holds no such box.

    Example:
        >>> parse_box("The dog is at [0.12, 0.3, 0.5, 0.77].")
        (0.12, 0.3, 0.5, 0.77)
        >>> parse_box("no box here") is None
        True
        >>> parse_box("[ 0. 26, 0. 55, 0. 59, 0. 89 ]")  # a word-level tokenizer's decoding of [0.26, ...]
        (0.26, 0.55, 0.59, 0.89)
    """
    if not isinstance(text, str):
        raise ValueError(f"expected the model's answer text, got {type(text).__name__}: {text!r}")
    # Tokenizers that split "0.26" into "0" "." "26" decode it with a space after the point.
    match = _BOX.search(_SPLIT_DECIMAL.sub(r"\1.\2", text))
    if match is None:
        return None
    return tuple(float(g) for g in match.groups())


def _check_box(box, what: str) -> tuple[float, float, float, float]:
    if isinstance(box, str) or not isinstance(box, Sequence) or len(box) != 4:
        raise ValueError(f"{what} must be 4 numbers (x1, y1, x2, y2), got {box!r}")
    values = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{what} has a non-finite coordinate: {box!r}")
    return values


def box_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes (continuous coordinates, no +1 pixel convention).

    A box with x2 < x1 or y2 < y1 has zero area. When the union has zero area (two degenerate boxes) the IoU is 0.

    Example:
        >>> box_iou((0, 0, 1, 1), (0.5, 0, 1.5, 1))
        0.3333333333333333
    """
    ax1, ay1, ax2, ay2 = _check_box(box_a, "box_a")
    bx1, by1, bx2, by2 = _check_box(box_b, "box_b")
    area_a = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1)
    area_b = max(0.0, bx2 - bx1) * max(0.0, by2 - by1)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def rec_accuracy(pred_boxes: Sequence, gt_boxes: Sequence, iou: float = 0.5) -> float:
    """Acc@IoU: the fraction of predictions whose IoU with the ground truth is at least ``iou`` (≥, so exactly 0.5
    counts).

    Predictions may be boxes, answer strings (read with :func:`parse_box`) or None; an answer without a box is a miss.
    Both sides must be in the same frame (normalized to the original image: convert predictions first with
    :func:`padded_to_original`).

    Example:
        >>> rec_accuracy([(0, 0, 1, 1), "[0, 0, 0.4, 1]", None], [(0, 0, 1, 1)] * 3)
        0.3333333333333333
    """
    pred_boxes, gt_boxes = list(pred_boxes), list(gt_boxes)
    if len(pred_boxes) != len(gt_boxes):
        raise ValueError(f"got {len(pred_boxes)} predicted boxes for {len(gt_boxes)} ground-truth boxes")
    if not gt_boxes:
        raise ValueError("rec_accuracy needs at least one box")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"iou threshold must be in (0, 1], got {iou}")
    hits = 0
    for i, (pred, gt) in enumerate(zip(pred_boxes, gt_boxes)):
        gt = _check_box(gt, f"ground-truth box {i}")
        if isinstance(pred, str):
            pred = parse_box(pred)
        if pred is None:
            continue
        hits += box_iou(pred, gt) >= iou
    return hits / len(gt_boxes)


def _canvas_geometry(width: int, height: int, target_hw=None) -> tuple[int, int, int, int]:
    """(canvas_w, canvas_h, x0, y0): the padded canvas and the image's offset in it, as deco_models.processing's
    ``pad_to_aspect`` builds it (LLaVA's expand2square when the target is square)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    th, tw = (1, 1) if target_hw is None else target_hw
    if th <= 0 or tw <= 0:
        raise ValueError(f"target_hw must be a positive (height, width), got {target_hw!r}")
    if width * th >= height * tw:
        cw, ch = width, max(height, round(width * th / tw))
    else:
        ch, cw = height, max(width, round(height * tw / th))
    # The image is pasted at ((canvas - size) // 2) on each axis: one of the two offsets is 0.
    return cw, ch, (cw - width) // 2, (ch - height) // 2


def padded_to_original(
    box: Sequence[float], width: int, height: int, clip: bool = True, target_hw: tuple[int, int] | None = None
) -> tuple[float, ...]:
    """A box normalized to the expand2square-padded square → the same box normalized to the original
    ``width`` × ``height`` image. ``clip`` clamps to [0, 1] (a predicted box may reach into the padding).
    ``target_hw``: the model's (height, width) input size when it is not square (padding then reaches that aspect).

    Example:
        >>> padded_to_original((0.0, 0.25, 1.0, 0.75), width=200, height=100)  # the whole 200x100 image
        (0.0, 0.0, 1.0, 1.0)
    """
    x1, y1, x2, y2 = _check_box(box, "box")
    cw, ch, x0, y0 = _canvas_geometry(width, height, target_hw)
    out = ((x1 * cw - x0) / width, (y1 * ch - y0) / height, (x2 * cw - x0) / width, (y2 * ch - y0) / height)
    if clip:
        out = tuple(min(1.0, max(0.0, v)) for v in out)
    return out


def original_to_padded(
    box: Sequence[float], width: int, height: int, target_hw: tuple[int, int] | None = None
) -> tuple[float, ...]:
    """A box normalized to the original ``width`` × ``height`` image → normalized to the expand2square-padded square
    (the frame of LLaVA's training answers). Inverse of :func:`padded_to_original` for boxes inside the image.

    Example:
        >>> original_to_padded((0.0, 0.0, 1.0, 1.0), width=100, height=200)
        (0.25, 0.0, 0.75, 1.0)
    """
    x1, y1, x2, y2 = _check_box(box, "box")
    cw, ch, x0, y0 = _canvas_geometry(width, height, target_hw)
    return ((x1 * width + x0) / cw, (y1 * height + y0) / ch, (x2 * width + x0) / cw, (y2 * height + y0) / ch)


def coco_xywh_to_normalized(box: Sequence[float], width: int, height: int) -> tuple[float, ...]:
    """A COCO/RefCOCO ``[x, y, w, h]`` pixel box → ``(x1, y1, x2, y2)`` normalized to the image.

    Example:
        >>> coco_xywh_to_normalized([10, 20, 30, 40], width=100, height=200)
        (0.1, 0.1, 0.4, 0.3)
    """
    x, y, w, h = _check_box(box, "COCO box")
    _canvas_geometry(width, height)
    return (x / width, y / height, (x + w) / width, (y + h) / height)
