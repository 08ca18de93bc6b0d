"""Batched greedy generation over a JSONL of questions, resumable, in LLaVA's question/answer file formats.

A question is one JSON object per line, LLaVA's ``model_vqa_loader`` layout::

    {"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog in the image?"}

(``id`` and ``question`` are accepted for ``question_id`` and ``text``; ``image`` may be absent for text-only
questions; any other fields — ground truth, category — are ignored here and read by the scorers). Each answer is
written as LLaVA writes it, ``{"question_id", "prompt", "text", "model_id", "metadata"}``, so LLaVA's own scripts
(``eval_pope.py``, ``convert_*_for_submission.py``) read our files too.

Example (``model, processor = deco_models.load("checkpoints/deco-avgpool")``)::

    questions = load_questions("pope.jsonl")
    answers = generate_answers(model, processor, questions, "val2014", predictions_path="pope.answers.jsonl")
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from deco_models.io import atomic_write, read_json_lines

logger = logging.getLogger(__name__)

__all__ = [
    "load_questions",
    "read_predictions",
    "render_prompt",
    "generate_answers",
    "generate_batch",
    "MissingImageError",
    "pad_for_processor",
]

IMAGE_PLACEHOLDER = "<image>"
ON_MISSING_IMAGE = ("skip", "error")


class MissingImageError(FileNotFoundError):
    """A question's image is missing or unreadable; the message names the question id and the path."""


def _question_id(question: dict, index: int):
    for key in ("question_id", "id"):
        if key in question:
            return question[key]
    raise ValueError(f"question {index} has no 'question_id' (or 'id') field: {question!r}")


def _question_text(question: dict, index: int) -> str:
    for key in ("text", "question"):
        if isinstance(question.get(key), str):
            return question[key]
    raise ValueError(f"question {index} has no 'text' (or 'question') string: {question!r}")


def load_questions(path: str | os.PathLike) -> list[dict]:
    """Read a questions JSONL (one object per line; a ``.json`` list also works) and check ids are present and unique.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "q.jsonl"
        >>> _ = p.write_text('{"question_id": 1, "image": "a.jpg", "text": "Is there a dog?"}\\n')
        >>> load_questions(p)[0]["text"]
        'Is there a dog?'
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        questions = json.loads(text)
        if not isinstance(questions, list):
            raise ValueError(f"{path}: expected a JSON list of questions, got {type(questions).__name__}")
    else:
        questions = read_json_lines(text, path)
    seen = set()
    for index, question in enumerate(questions):
        if not isinstance(question, dict):
            raise ValueError(f"{path}: question {index} is not a JSON object: {question!r}")
        qid = _question_id(question, index)
        _question_text(question, index)
        if qid in seen:
            raise ValueError(f"{path}: duplicate question id {qid!r}")
        seen.add(qid)
    return questions


def read_predictions(path: str | os.PathLike, repair: bool = False) -> dict[Any, dict]:
    """Answers already in a predictions JSONL, by question id.

    A run killed while appending can leave a truncated last line: it is ignored (and cut off when ``repair`` is set,
    atomically), so the question is simply answered again. A bad line elsewhere is an error.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"
        >>> _ = p.write_text('{"question_id": 1, "text": "Yes"}\\n{"question_id": 2, "te')
        >>> list(read_predictions(p))
        [1]
    """
    path = Path(path)
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    answers: dict[Any, dict] = {}
    good_lines = []
    for line_number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            answers[record["question_id"]] = record
            good_lines.append(line)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            if line_number == len(lines):
                logger.warning("%s: ignoring a truncated last line (an interrupted run): %.80s", path, line)
                continue
            raise ValueError(f"{path}:{line_number}: not an answer record ({exc})") from None
    if repair and len(good_lines) != sum(1 for line in lines if line.strip()):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(g + "\n" for g in good_lines), encoding="utf-8"))
    return answers


def render_prompt(
    question: str, template: str | Callable[[str], str] | None = None, with_image: bool = True, processor=None
) -> str:
    """The model prompt for one question, with ``<image>\\n`` in front (as LLaVA's model_vqa_loader does, unless the
    question already holds the placeholder).

    ``template``: a name of :data:`deco_models.conversation.TEMPLATES` (``vicuna_v1``, ``plain``), a callable taking
    the question (placeholder included) and returning the prompt, or None for the processor's own template
    (``processor.render_prompt``, a DecoProcessor) and ``vicuna_v1`` otherwise.

    Example:
        >>> render_prompt("Is there a dog?", "plain")
        '<image>\\nIs there a dog?\\n'
        >>> render_prompt("Is there a dog?", "vicuna_v1").endswith(" USER: <image>\\nIs there a dog? ASSISTANT:")
        True
    """
    from deco_models.conversation import render_prompt as render_conversation_prompt

    if callable(template):
        if with_image and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        return template(question)
    if template is None and processor is not None and hasattr(processor, "render_prompt"):
        return processor.render_prompt(question, image=with_image)
    return render_conversation_prompt(question, template or "vicuna_v1", image=with_image)


def _mean_color(image_processor) -> tuple[int, int, int]:
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    # int(), not round(): LLaVA's expand2square background is tuple(int(x * 255) for x in image_mean).
    return tuple(int(float(m) * 255) for m in mean)


def pad_for_processor(image, processor, pad_to_square: bool | None = None):
    """Pad ``image`` to a square like LLaVA-1.5's expand2square (the processor's mean colour) unless the processor
    does it itself. ``pad_to_square=None``: pad only for processors without their own ``image_aspect`` handling
    (a DecoProcessor pads or not by its ``image_aspect``; a stock LlavaProcessor does not pad)."""
    if pad_to_square is None:
        pad_to_square = not hasattr(processor, "image_aspect")
    if not pad_to_square:
        return image
    from deco_models.data.llava import expand_to_square

    return expand_to_square(image, _mean_color(getattr(processor, "image_processor", None)))


def _load_image(question: dict, qid, image_folder: str | os.PathLike | None):
    from PIL import Image

    path = Path(image_folder or ".") / question["image"]
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise MissingImageError(f"question {qid!r}: cannot read image {path}: {exc}") from None


def _model_id(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or type(model).__name__)


def _batches(items: Sequence, batch_size: int) -> Iterable[list]:
    # Image and text-only questions cannot share a processor call, so a batch never mixes them.
    batch: list = []
    for item in items:
        if batch and (len(batch) == batch_size or (batch[-1][2] is None) != (item[2] is None)):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def generate_batch(model, processor, prompts: Sequence[str], images: Sequence | None = None, max_new_tokens: int = 32):
    """Greedy continuations of ``prompts`` (rendered, with ``<image>`` placeholders) in one left-padded batch.

    ``images`` holds one PIL image per placeholder, in order, or None for text-only prompts. Returns the decoded new
    text of each prompt, stripped, without special tokens.

    Example (see :func:`generate_answers` for the question-file loop)::

        generate_batch(model, processor, [render_prompt("What color is the cat?")], [image])
    """
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    old_padding_side = getattr(tokenizer, "padding_side", None)
    # Left padding: generated tokens of every row then start at the same position, right after the prompt.
    tokenizer.padding_side = "left"
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    try:
        if images:
            inputs = processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        else:
            inputs = processor(text=list(prompts), return_tensors="pt", padding=True)
        inputs = inputs.to(getattr(model, "device", torch.device("cpu")))
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(getattr(model, "dtype", torch.float32))
        with torch.inference_mode():
            output = model.generate(
                **inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad_token_id
            )
    finally:
        if old_padding_side is not None:
            tokenizer.padding_side = old_padding_side
        model.train(was_training)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]


def generate_answers(
    model,
    processor,
    questions: Sequence[dict],
    image_folder: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    template: str | Callable[[str], str] | None = None,
    predictions_path: str | os.PathLike | None = None,
    on_missing_image: str = "skip",
    pad_to_square: bool | None = None,
    progress: bool = True,
) -> list[dict]:
    """Greedy answers to ``questions`` (dicts as read by :func:`load_questions`), ``batch_size`` at a time with left
    padding, returned in question order as LLaVA answer records ``{"question_id", "prompt", "text", "model_id",
    "metadata"}``.

    ``predictions_path``: each batch's answers are appended (flushed and fsync'ed) as they come; when the file already
    exists its answered ids are skipped, so a killed run resumes where it stopped. ``on_missing_image``: "skip" leaves
    the question out (its id is logged; it is absent from the result) or "error" raises :class:`MissingImageError`
    naming the id. ``template``: see :func:`render_prompt` (None: the processor's chat template). ``pad_to_square``:
    see :func:`pad_for_processor` (None: as the processor is configured, i.e. as the model was trained).

    Example (any LLaVA-style model and processor; see ``tests/test_eval.py``)::

        answers = generate_answers(model, processor, [{"question_id": 0, "image": "cat.png", "text": "Color?"}], ".")
        answers[0]["text"]
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")
    if on_missing_image not in ON_MISSING_IMAGE:
        raise ValueError(f"on_missing_image must be one of {ON_MISSING_IMAGE}, got {on_missing_image!r}")
    done = read_predictions(predictions_path, repair=True) if predictions_path else {}
    model_id = _model_id(model)

    todo = []
    for index, question in enumerate(questions):
        qid = _question_id(question, index)
        if qid in done:
            continue
        has_image = bool(question.get("image"))
        prompt = render_prompt(_question_text(question, index), template, with_image=has_image, processor=processor)
        todo.append((qid, prompt, question if has_image else None))
    if done:
        logger.info("resuming: %d of %d questions already answered in %s", len(done), len(questions), predictions_path)

    skipped = []
    out_file = None
    if predictions_path and todo:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        out_file = open(predictions_path, "a", encoding="utf-8")  # closed in the finally below
    try:
        with tqdm(total=len(todo), desc="generating", unit="q", disable=not progress or not todo) as bar:
            for batch in _batches(todo, batch_size):
                images, kept = [], []
                for qid, prompt, question in batch:
                    if question is not None:
                        try:
                            image = _load_image(question, qid, image_folder)
                            images.append(pad_for_processor(image, processor, pad_to_square))
                        except MissingImageError as exc:
                            if on_missing_image == "error":
                                raise
                            logger.warning("skipping: %s", exc)
                            skipped.append(qid)
                            continue
                    kept.append((qid, prompt))
                bar.update(len(batch) - len(kept))
                if not kept:
                    continue
                texts = generate_batch(
                    model, processor, [prompt for _, prompt in kept], images or None, max_new_tokens=max_new_tokens
                )
                records = [
                    {"question_id": qid, "prompt": prompt, "text": text.strip(), "model_id": model_id, "metadata": {}}
                    for (qid, prompt), text in zip(kept, texts)
                ]
                for record in records:
                    done[record["question_id"]] = record
                if out_file is not None:
                    out_file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                    out_file.flush()
                    os.fsync(out_file.fileno())
                bar.update(len(kept))
    finally:
        if out_file is not None:
            out_file.close()
    if skipped:
        logger.warning("%d question(s) skipped for missing/unreadable images: %s", len(skipped), skipped[:20])
    return [done[qid] for qid in (_question_id(q, i) for i, q in enumerate(questions)) if qid in done]
