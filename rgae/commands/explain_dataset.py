"""rgae explain-dataset: explain every record of a dataset into a resumable, sharded store.

Examples:

    rgae explain-dataset --model shapes-mini-mlp2x_gelu --data shapes:12345:100 --out runs/shapes-mlp
    rgae explain-dataset --model ckpt/deco --data refs.jsonl --image-folder coco/val2014 --out runs/refs
    torchrun --nproc_per_node 2 -m rgae.cli explain-dataset --model ... --data ... --out ...   # 2 processes

Re-running the same command resumes: finished records are skipped, a record a killed run left half written is
redone. Records that fail (unreadable image, target longer than the context) are recorded with their error and
counted; --fail-fast stops at the first one. A store made with another model, method or options is refused.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

from rgae.commands.explain import DTYPES, METHODS


class UsageError(ValueError):
    """A mistake in the command line or its input files: one line on stderr and exit code 2, no traceback."""


def one_line_errors(prog: str, run) -> int:
    """``run()``, with user mistakes (``UsageError`` and the library's ``ValueError`` / ``FileNotFoundError`` for
    bad input) printed as one line and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        return run()
    except (ValueError, FileNotFoundError) as exc:
        print(f"rgae {prog}: error: {exc}", file=sys.stderr)
        return 2


def data_identity(spec: str) -> str:
    """What the store records as its data: file specs by absolute path (the same file from another folder is the
    same data), reader specs as given."""
    scheme, _, rest = spec.partition(":")
    if scheme in ("jsonl", "rec"):
        return f"{scheme}:{os.path.abspath(rest)}"
    if Path(spec).exists() or not rest:
        return os.path.abspath(spec)
    return spec


def default_image_folder(spec: str) -> str | None:
    """The folder of a data file (its image paths are relative to it by default); None for reader specs."""
    scheme, _, rest = spec.partition(":")
    path = Path(rest) if scheme in ("jsonl", "rec") else Path(spec)
    return str(path.parent) if path.is_file() else None


def attribute_options(args: argparse.Namespace) -> dict:
    """The ``attribute(**options)`` of ``args.method`` (what ``rgae explain`` passes, without progress bars)."""
    options: dict = {"max_new_tokens": args.max_new_tokens}
    if args.method == "rgae":
        options["through_vision"] = args.through_vision
    if args.method == "rawattn" and args.layer is not None:
        if args.layer != "mean":
            try:
                int(args.layer)
            except ValueError:
                raise UsageError(f"--layer must be an integer or 'mean', got {args.layer!r}") from None
        options["layer"] = args.layer if args.layer == "mean" else int(args.layer)
    return options


def run(args: argparse.Namespace) -> int:
    import rgae
    import rgae.methods as methods
    from rgae.commands.explain import load_model
    from rgae.datasets.processes import partial_state
    from rgae.datasets.readers import read_dataset
    from rgae.datasets.runner import RecordError, explain_dataset, model_fingerprint
    from rgae.datasets.store import check_manifest

    if args.batch_records < 1:
        raise UsageError(f"--batch-records must be >= 1, got {args.batch_records}")
    options = attribute_options(args)
    settings = {**options, "dtype": args.dtype, "prompt": args.prompt}
    manifest = {"model": args.model, "method": args.method, "options": settings, "data": data_identity(args.data)}
    # Cheap checks before a model is loaded: the data parses and the store (if any) was made the same way.
    image_folder = args.image_folder or default_image_folder(args.data)
    records = read_dataset(args.data, image_folder)
    check_manifest(args.out, manifest)

    state = partial_state()
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device or str(state.device))
    manifest.update(model_fingerprint=model_fingerprint(model), rgae_version=rgae.__version__,
                    created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    explainer = getattr(methods, METHODS[args.method])(model, processor, model_name=args.model)
    try:
        summary = explain_dataset(explainer, records, args.out, manifest=manifest, options=options,
                                  prompt=args.prompt, image_folder=image_folder, batch_records=args.batch_records,
                                  fail_fast=args.fail_fast, retry_failed=args.retry_failed,
                                  progress=not args.no_progress, state=state)
    except RecordError as exc:
        if isinstance(exc.error, ValueError | OSError):  # bad input data, not a bug: no traceback
            raise UsageError(f"--fail-fast: {exc}") from None
        raise exc.error from None  # a bug: its own traceback, not the wrapper's
    if state.is_main_process:
        print(f"explained {summary['explained']}, failed {summary['failed']}, skipped {summary['skipped']} (done "
              f"before) of {summary['records']} records with {summary['processes']} process(es) in "
              f"{summary['seconds']:.1f} s\nstore {args.out}: {summary['store_records']} explanations, "
              f"{summary['store_failures']} failures")
        if summary["store_failures"]:
            from rgae.datasets.store import ExplanationStore

            for rid, error in list(ExplanationStore(args.out).failures.items())[:5]:
                print(f"  failed {rid}: {error}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain-dataset",
        help="explain every record of a dataset (sharded over processes, resumable) into an explanation store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="zoo name (deco zoo) or a saved deco / llava-hf model folder")
    p.add_argument("--data", required=True,
                   help="records: a .jsonl in rgae's format (docs/datasets.md), a REC question file (rec:PATH), or "
                        "a reader spec such as shapes:SEED:N")
    p.add_argument("--image-folder", default=None,
                   help="folder the records' image and mask paths are relative to (default: the data file's folder)")
    p.add_argument("--out", required=True, help="the store folder (created; an existing store is resumed)")
    p.add_argument("--method", choices=sorted(METHODS), default="rgae", help="explainer (default: %(default)s)")
    p.add_argument("--prompt", default=None, help="instruction for records without a 'prompt'")
    p.add_argument("--through-vision", action="store_true", help="R-GAE: also propagate through the vision encoder")
    p.add_argument("--layer", default=None, help="rawattn: LLM layer index or 'mean' (default: last)")
    p.add_argument("--max-new-tokens", type=int, default=32,
                   help="records without 'text': answer length (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="default: %(default)s")
    p.add_argument("--device", default=None,
                   help="default: this process's accelerate device (cuda:LOCAL_RANK, or cpu)")
    p.add_argument("--batch-records", type=int, default=16,
                   help="records per shard file: the unit written atomically and redone after a crash "
                        "(default: %(default)s)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing record (after saving)")
    p.add_argument("--retry-failed", action="store_true", help="explain again the records that failed before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)
    return p


def _main(args) -> int:
    return one_line_errors("explain-dataset", lambda: run(args))
