"""Evaluation of deco models: scorers with documented conventions (VQAv2/VizWiz/TextVQA accuracy, GQA exact match,
POPE, RefCOCO Acc@IoU), batched greedy generation over question files, and an lmms-eval plugin
(:mod:`deco_models.eval.lmms_plugin`, imported only by lmms-eval).

Example:
    >>> from deco_models.eval import vqa_accuracy, pope_metrics, rec_accuracy
    >>> vqa_accuracy("Two", ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"])
    1.0
    >>> pope_metrics(["Yes", "No"], ["yes", "yes"])["recall"]
    0.5
    >>> rec_accuracy([(0.0, 0.0, 0.5, 0.5)], [(0.0, 0.0, 0.5, 0.5)])
    1.0
"""

from deco_models.eval.rec import (
    box_iou,
    coco_xywh_to_normalized,
    original_to_padded,
    padded_to_original,
    parse_box,
    rec_accuracy,
)
from deco_models.eval.scorers import (
    gqa_accuracy,
    gqa_normalize,
    normalize_vqa_answer,
    parse_pope_answer,
    pope_metrics,
    vqa_accuracy,
)
from deco_models.eval.tasks import TASKS, score_predictions

# Generation needs torch/transformers: imported on first use so the scorers stay cheap to import.
_LAZY = {
    "generate_answers": "deco_models.eval.generation",
    "load_questions": "deco_models.eval.generation",
    "read_predictions": "deco_models.eval.generation",
    "render_prompt": "deco_models.eval.generation",
    "generate_batch": "deco_models.eval.generation",
    "pad_for_processor": "deco_models.eval.generation",
    "MissingImageError": "deco_models.eval.generation",
}

__all__ = [
    "TASKS",
    "box_iou",
    "coco_xywh_to_normalized",
    "gqa_accuracy",
    "gqa_normalize",
    "normalize_vqa_answer",
    "original_to_padded",
    "padded_to_original",
    "parse_box",
    "parse_pope_answer",
    "pope_metrics",
    "rec_accuracy",
    "score_predictions",
    "vqa_accuracy",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deco_models.eval' has no attribute {name!r}")
