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
from pathlib import Path

from rgae.cli_base import (
    HelpFormatter,
    UsageError,
    check_device,
    check_input_file,
    check_input_folder,
    check_output_folder,
    help_text,
    user_errors,
)
from rgae.commands.explain import DTYPES, METHODS, check_layer, method_options, model_source


def data_identity(spec: str) -> str:
    """What the store records as its data: file specs by absolute path (the same file from another folder is the
    same data), reader specs as given."""
    from rgae.datasets.readers import data_file

    file = data_file(spec)
    if file is None:
        return spec
    scheme, _, rest = spec.partition(":")
    if scheme in ("jsonl", "rec") and file == Path(rest):
        return f"{scheme}:{os.path.abspath(file)}"
    return os.path.abspath(file)


def check_arguments(args: argparse.Namespace) -> tuple[list, dict, dict, str | None]:
    """Every check that needs no model: ``(records, options, manifest, image folder)``."""
    from rgae.datasets.readers import data_file, read_dataset
    from rgae.datasets.store import StoreError, check_manifest

    model_source(args.model)
    if args.batch_records < 1:
        raise UsageError(f"--batch-records must be >= 1, got {args.batch_records}")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty: give an instruction, or leave --prompt out for the default one")
    options = method_options(args)
    file = data_file(args.data)
    if file is not None:
        check_input_file(file, "--data", what="a records file (JSON Lines)")
    if args.image_folder is not None:
        check_input_folder(args.image_folder, "--image-folder", what="the folder of the records' images")
    check_output_folder(args.out, "--out")
    if args.device is not None:
        args.device = check_device(args.device)
    # A data file's image paths are relative to its folder unless --image-folder says otherwise.
    image_folder = args.image_folder or (str(file.parent) if file is not None else None)
    with user_errors(ValueError):  # the data's records: a bad line is the user's, named by file and line
        records = read_dataset(args.data, image_folder)
    manifest = {"model": args.model, "method": args.method,
                "options": {**options, "dtype": args.dtype, "prompt": args.prompt},
                "data": data_identity(args.data)}
    with user_errors(StoreError):
        check_manifest(args.out, manifest)
    return records, options, manifest, image_folder


def run(args: argparse.Namespace) -> int:
    import rgae
    import rgae.methods as methods
    from rgae.commands.explain import load_model
    from rgae.datasets.processes import partial_state
    from rgae.datasets.runner import RecordError, explain_dataset, model_fingerprint
    from rgae.datasets.store import ExplanationStore, StoreError

    records, options, manifest, image_folder = check_arguments(args)
    state = partial_state()
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device or str(state.device))
    check_layer(model, options.get("layer"))
    manifest.update(model_fingerprint=model_fingerprint(model), rgae_version=rgae.__version__,
                    created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    explainer = getattr(methods, METHODS[args.method])(model, processor, model_name=args.model)
    try:
        with user_errors(StoreError):  # another run holds the store, or made it meanwhile with other settings
            summary = explain_dataset(explainer, records, args.out, manifest=manifest, options=options,
                                      prompt=args.prompt, image_folder=image_folder,
                                      batch_records=args.batch_records, fail_fast=args.fail_fast,
                                      retry_failed=args.retry_failed, progress=not args.no_progress, state=state)
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
            for rid, error in list(ExplanationStore(args.out).failures.items())[:5]:
                print(f"  failed {rid}: {error}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain-dataset",
        help="explain every record of a dataset (sharded over processes, resumable) into an explanation store",
        description=help_text(__doc__),
        formatter_class=HelpFormatter,
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
    p.set_defaults(func=run)
    return p
