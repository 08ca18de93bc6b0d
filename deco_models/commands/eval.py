"""``deco eval``: answer a benchmark's questions with a deco model (or read existing answers) and score them.

Examples::

    deco eval --task pope --data pope.jsonl --model checkpoints/deco-avgpool --image-folder val2014 --out pope.json
    deco eval --task vqav2 --data vqav2_val.jsonl --predictions answers.jsonl --out vqav2.json

Answers go to ``--answers-file`` (default: next to ``--out``, ``<out stem>.answers.jsonl``) as they are generated; run
the same command again after an interruption and answered questions are skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from deco_models.io import atomic_write
from rgae.cli_base import (
    HelpFormatter,
    UsageError,
    check_device,
    check_input_file,
    check_input_folder,
    check_output_file,
    help_text,
    user_errors,
)

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    from deco_models.conversation import TEMPLATES
    from deco_models.eval.generation import ON_MISSING_IMAGE
    from deco_models.eval.tasks import BOX_FRAMES, TASKS

    parser = subparsers.add_parser(
        "eval",
        help="score a model on POPE / VQAv2 / VizWiz / TextVQA / GQA / RefCOCO question files",
        description=help_text(__doc__),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="the benchmark whose scorer is used")
    parser.add_argument("--data", required=True, help="questions JSONL with ground truth (see deco_models.eval.tasks)")
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory for deco_models.load")
    source.add_argument("--predictions", help="score this existing answers JSONL instead of running a model")
    parser.add_argument("--image-folder", default=None, help="folder the questions' 'image' paths are relative to")
    parser.add_argument(
        "--answers-file", default=None, help="where generated answers go (default: <out>.answers.jsonl)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="questions generated together")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length limit of each answer")
    parser.add_argument(
        "--template", default=None, choices=sorted(TEMPLATES), help="chat template (default: the processor's own)"
    )
    parser.add_argument(
        "--image-aspect",
        default=None,
        choices=("pad", "square"),
        help="pad to square like LLaVA-1.5, or stretch to square (default: as the processor was saved)",
    )
    parser.add_argument("--on-missing-image", default="skip", choices=ON_MISSING_IMAGE,
                        help="a question whose image is missing: skip it (reported) or stop with an error")
    parser.add_argument(
        "--box-frame",
        default=None,
        choices=BOX_FRAMES,
        help="refcoco: frame of the model's boxes: the padded square (LLaVA-1.5; the default) or the original image "
        "(the default for a processor with image_aspect 'square')",
    )
    parser.add_argument("--iou", type=float, default=0.5, help="refcoco: IoU threshold (default 0.5)")
    parser.add_argument(
        "--input-size",
        default=None,
        metavar="HxW",
        help="refcoco with --predictions: the model's input size when not square (default: square, or the processor's)",
    )
    parser.add_argument("--device", default=None, help="torch device for generation (default: cuda if available)")
    parser.set_defaults(func=run)


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-size must look like 336x336 (height x width), got {text!r}") from None
    return h, w


def _default_answers_file(out: Path) -> Path:
    return out.with_name(out.stem + ".answers.jsonl")


def _print_table(result: dict) -> None:
    rows = [(name, value) for name, value in result["metrics"].items()]
    for category, metrics in result.get("per_category", {}).items():
        rows += [(f"{category}/{name}", value) for name, value in metrics.items()]
    width = max(len(name) for name, _ in rows)
    print(f"{result['task']}: {result['n_scored']} scored, {result['n_missing']} missing")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {name:<{width}}  {value}")


def _check_arguments(args) -> None:
    """The cheap checks, before questions are read or a model is loaded."""
    check_input_file(args.data, "--data", what="a questions file (JSONL)")
    check_output_file(args.out, "--out")
    if args.predictions:
        check_input_file(args.predictions, "--predictions", what="an answers file (JSONL)")
        return
    from deco_models.cli_base import check_model

    check_model(args.model)
    if args.image_folder is not None:
        check_input_folder(args.image_folder, "--image-folder", what="an image folder")
    if args.answers_file is not None:
        check_output_file(args.answers_file, "--answers-file")
    for option, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens)):
        if value < 1:
            raise UsageError(f"{option} must be >= 1, got {value}")


def run(args) -> int:
    from deco_models.eval.generation import load_questions, read_predictions
    from deco_models.eval.tasks import score_predictions

    _check_arguments(args)
    device = None if args.predictions else check_device(args.device)
    out = Path(args.out)
    target_hw = _parse_size(args.input_size) if args.input_size else None
    box_frame = args.box_frame
    with user_errors(ValueError):
        questions = load_questions(args.data)
    if args.predictions:
        with user_errors(ValueError):
            predictions = read_predictions(args.predictions)
        answers_file = Path(args.predictions)
    else:
        from deco_models import load
        from deco_models.eval.generation import MissingImageError, generate_answers
        from deco_models.loading import CheckpointError

        answers_file = Path(args.answers_file) if args.answers_file else _default_answers_file(out)
        with user_errors(CheckpointError):
            model, processor = load(args.model)
        pad_to_square = None  # the processor's own setting
        if args.image_aspect is not None:
            if hasattr(processor, "image_aspect"):
                processor.image_aspect = args.image_aspect  # a DecoProcessor pads (or not) itself
            else:
                pad_to_square = args.image_aspect == "pad"
        model.to(device)
        with user_errors(MissingImageError):  # --on-missing-image error: a question's image is missing or broken
            answers = generate_answers(
                model,
                processor,
                questions,
                args.image_folder,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                template=args.template,
                predictions_path=answers_file,
                on_missing_image=args.on_missing_image,
                pad_to_square=pad_to_square,
            )
        predictions = {a["question_id"]: a for a in answers}
        if box_frame is None and getattr(processor, "image_aspect", None) == "square":
            box_frame = "original"  # stretched, not padded: normalized boxes are the same in both frames
        if target_hw is None and isinstance(getattr(processor, "image_size", None), tuple):
            target_hw = tuple(processor.image_size)
    # Answers read from --predictions are the user's input: a file that answers none of the questions is theirs to fix.
    with user_errors(ValueError) if args.predictions else contextlib.nullcontext():
        result = score_predictions(
            args.task,
            questions,
            predictions,
            box_frame=box_frame or "padded",
            iou=args.iou,
            image_folder=args.image_folder,
            target_hw=target_hw,
        )
    result.update(data=str(args.data), model=args.model, answers_file=str(answers_file))
    if args.task == "refcoco":
        result.update(box_frame=box_frame or "padded", iou=args.iou, input_size=target_hw)
    if result["n_missing"]:
        print(f"warning: {result['n_missing']} question(s) have no answer and are not scored", file=sys.stderr)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8"))
    _print_table(result)
    print(f"results: {out}")
    return 0
