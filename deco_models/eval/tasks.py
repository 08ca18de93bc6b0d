"""Scoring a whole benchmark: questions JSONL (with ground truth) + answers → metrics dict.

Ground-truth fields read from each question (other fields are ignored):

==========  ==============================================================================================
task        field
==========  ==============================================================================================
pope        ``label``: "yes"/"no" (or bool); optional ``category`` (random/popular/adversarial) for a breakdown
vqav2       ``answers``: the 10 human answers, strings or VQA-annotation dicts ``{"answer": ...}``
vizwiz      same as vqav2
textvqa     same as vqav2
gqa         ``answer``: the gold answer string
refcoco     ``bbox``: ``[x1, y1, x2, y2]`` normalized to the original image; ``width``/``height`` in pixels
            (read from the image file when absent and an image folder is given)
==========  ==============================================================================================

Questions without an answer (skipped for a missing image) are left out of the metrics and counted in ``n_missing``.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from deco_models.eval.rec import padded_to_original, parse_box, rec_accuracy
from deco_models.eval.scorers import gqa_accuracy, mean, pope_metrics, vqa_accuracy

__all__ = ["TASKS", "score_predictions"]

TASKS = ("pope", "vqav2", "vizwiz", "textvqa", "gqa", "refcoco")
BOX_FRAMES = ("padded", "original")


def _qid(question: dict):
    return question.get("question_id", question.get("id"))


def _field(question: dict, key: str, task: str):
    if key not in question:
        raise ValueError(f"{task}: question {_qid(question)!r} has no ground-truth field {key!r}")
    return question[key]


def _vqa_answers(question: dict, task: str) -> list[str]:
    answers = _field(question, "answers", task)
    return [a["answer"] if isinstance(a, dict) else a for a in answers]


def _image_size(question: dict, image_folder) -> tuple[int, int]:
    if "width" in question and "height" in question:
        return int(question["width"]), int(question["height"])
    if image_folder is None or not question.get("image"):
        raise ValueError(
            f"refcoco: question {_qid(question)!r} needs 'width'/'height' or an image folder to read the size from"
        )
    from PIL import Image

    with Image.open(Path(image_folder) / question["image"]) as img:  # reads the header only
        return img.size


def score_predictions(
    task: str,
    questions: Sequence[dict],
    predictions: dict,
    box_frame: str = "padded",
    iou: float = 0.5,
    image_folder: str | os.PathLike | None = None,
    target_hw: tuple[int, int] | None = None,
) -> dict:
    """Metrics of ``task`` for answers ``predictions`` (question id → answer text, or LLaVA answer record).

    ``box_frame`` (refcoco): "padded" when the model's boxes are normalized to the expand2square-padded square
    (LLaVA-1.5 and the DeCo models), "original" when they are normalized to the original image; ``target_hw`` is the
    model's (height, width) input size when it is not square (the padding then reaches that aspect ratio).

    Example:
        >>> qs = [{"question_id": 1, "label": "yes"}, {"question_id": 2, "label": "no"}]
        >>> score_predictions("pope", qs, {1: "Yes, there is.", 2: "Yes."})["metrics"]["accuracy"]
        0.5
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if box_frame not in BOX_FRAMES:
        raise ValueError(f"box_frame must be one of {BOX_FRAMES}, got {box_frame!r}")
    texts = {qid: (p["text"] if isinstance(p, dict) else p) for qid, p in predictions.items()}
    answered = [q for q in questions if _qid(q) in texts]
    result = {"task": task, "n_questions": len(questions), "n_scored": len(answered)}
    result["n_missing"] = len(questions) - len(answered)
    if not answered:
        raise ValueError(f"{task}: none of the {len(questions)} questions has an answer to score")

    if task == "pope":
        result["metrics"] = pope_metrics(
            [texts[_qid(q)] for q in answered], [_field(q, "label", task) for q in answered]
        )
        by_category = defaultdict(list)
        for q in answered:
            if "category" in q:
                by_category[q["category"]].append(q)
        if by_category:
            result["per_category"] = {
                cat: pope_metrics([texts[_qid(q)] for q in qs], [q["label"] for q in qs])
                for cat, qs in sorted(by_category.items())
            }
    elif task in ("vqav2", "vizwiz", "textvqa"):
        result["metrics"] = {"accuracy": mean(vqa_accuracy(texts[_qid(q)], _vqa_answers(q, task)) for q in answered)}
    elif task == "gqa":
        result["metrics"] = {
            "accuracy": mean(gqa_accuracy(texts[_qid(q)], _field(q, "answer", task)) for q in answered)
        }
    else:
        pred_boxes, gt_boxes, unparsed = [], [], 0
        for q in answered:
            box = parse_box(texts[_qid(q)])
            gt_boxes.append(_field(q, "bbox", task))
            if box is None:
                unparsed += 1
            elif box_frame == "padded":
                box = padded_to_original(box, *_image_size(q, image_folder), target_hw=target_hw)
            pred_boxes.append(box)
        result["metrics"] = {f"acc@{iou:g}": rec_accuracy(pred_boxes, gt_boxes, iou=iou), "unparsed": unparsed}
    return result
