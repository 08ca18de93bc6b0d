"""rgae evaluate: score an explanation store (or two, side by side) and write a report.

Examples:

    rgae evaluate runs/shapes-mlp --out reports/mlp                       # every metric
    rgae evaluate runs/avgpool runs/qformer --metrics pointing,energy --out reports/avgpool-vs-qformer
    torchrun --nproc_per_node 2 -m rgae.cli evaluate runs/mlp --metrics deletion,insertion --out reports/mlp

Pointing game (boxes and masks, with the random baseline) and energy in box need only the store. Deletion and
insertion re-run the model on masked images: the model the store was made with (its manifest), or --model; their
forwards are shared over the processes of torchrun / accelerate launch. Writes metrics.json,
report.md and figures to --out.
"""

from __future__ import annotations

import argparse

from rgae.cli_base import HelpFormatter, UsageError, check_device, check_output_folder, help_text, user_errors


def _metrics(text: str) -> tuple[str, ...]:
    from rgae.datasets.evaluation import METRICS

    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise UsageError(f"--metrics must be a comma-separated subset of {','.join(METRICS)}, got {text!r}")
    return names


def _store_names(stores, names) -> list[str]:
    if names:
        if len(names) != len(stores):
            raise UsageError(f"--names needs one name per store ({len(stores)}), got {len(names)}")
        return list(names)
    default = [s.path.name for s in stores]
    return default if len(set(default)) == len(default) else ["A", "B"][: len(stores)]


def _store_model(store, given: str | None) -> str:
    """The model deletion/insertion re-run for ``store``: ``--model`` or the manifest's, checked without loading."""
    from rgae.commands.explain import model_source

    name = given or store.manifest.get("model")
    try:
        model_source(name)
    except UsageError as exc:
        raise UsageError(f"deletion/insertion need the model of {store.path}: {exc} (pass --model, or --metrics "
                         f"pointing,energy)") from None
    return name


def _load_store_model(store, name: str, device):
    from rgae.commands.explain import load_model
    from rgae.datasets.runner import model_fingerprint

    dtype = (store.manifest.get("options") or {}).get("dtype", "float32")
    model, processor = load_model(name, dtype=dtype, device=device)
    expected = store.manifest.get("model_fingerprint")
    if expected and model_fingerprint(model) != expected:
        raise UsageError(f"--model {name!r} is not the model {store.path} was made with (its weights differ)")
    return model, processor


def run(args: argparse.Namespace) -> int:
    from rgae.datasets.evaluation import check_perturbable, compare, evaluate_store, summarize
    from rgae.datasets.processes import partial_state
    from rgae.datasets.report import write_report
    from rgae.datasets.store import ExplanationStore, StoreError

    metrics = _metrics(args.metrics)
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--bootstrap", args.bootstrap, 1), ("--permutations", args.permutations, 1),
                             ("--gallery", args.gallery, 0)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    if len(args.stores) > 2:
        raise UsageError(f"give one store, or two to compare; got {len(args.stores)}")
    out = check_output_folder(args.out, "--out")
    if len(args.model or []) > len(args.stores):
        raise UsageError(f"--model given {len(args.model)} times for {len(args.stores)} store(s)")
    if args.device is not None:
        args.device = check_device(args.device)
    with user_errors(StoreError):
        stores = [ExplanationStore(p) for p in args.stores]
    names = _store_names(stores, args.names)
    perturb = bool({"deletion", "insertion"} & set(metrics))
    model_names = []
    for k, store in enumerate(stores):
        if not len(store):
            raise UsageError(f"{store.path} holds no explanations ({len(store.failures)} failures)")
        if perturb:
            with user_errors(ValueError):  # a tiled model's store: deletion/insertion are single-grid only
                check_perturbable(store[store.ids()[0]])
            model_names.append(_store_model(store, (args.model or [])[k] if k < len(args.model or []) else None))
    state = partial_state()
    evaluations = []
    for k, store in enumerate(stores):
        model = processor = None
        if perturb:
            model, processor = _load_store_model(store, model_names[k], args.device or str(state.device))
        evaluations.append(evaluate_store(store, metrics, model=model, processor=processor, name=names[k],
                                          steps=args.steps, baseline=args.baseline, batch_size=args.batch_size,
                                          state=state, progress=not args.no_progress, work_dir=out))
        del model, processor
    if not state.is_main_process:
        return 0
    settings = {"metrics": list(metrics), "bootstrap": args.bootstrap, "permutations": args.permutations,
                "confidence": 0.95, "seed": args.seed, "steps": args.steps, "baseline": args.baseline}
    summaries = [summarize(ev, args.bootstrap, 0.95, args.seed) for ev in evaluations]
    comparison = None
    if len(evaluations) == 2:
        comparison = compare(*evaluations, n_boot=args.bootstrap, n_perm=args.permutations, seed=args.seed)
    written = write_report(out, evaluations, summaries, comparison, settings, stores=stores, gallery=args.gallery)
    for ev, s in zip(evaluations, summaries):
        parts = [f"{k} {s['metrics'][k]['mean']:.3f}" for k in ("pointing", "pointing_random", "energy",
                                                                 "deletion_auc", "insertion_auc") if k in s["metrics"]]
        print(f"{ev.name}: {s['records']} records, {s['scored_words']} scored words; " + ", ".join(parts))
    print(f"report: {out / 'report.md'} ({len(written)} files)")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="score explanation stores (pointing game, energy, deletion/insertion) and write a report",
        description=help_text(__doc__),
        formatter_class=HelpFormatter,
    )
    p.add_argument("stores", nargs="+", metavar="STORE", help="one store, or two to compare (same records)")
    p.add_argument("--out", required=True, help="report folder: metrics.json, report.md, figures")
    p.add_argument("--metrics", default="pointing,energy,deletion,insertion",
                   help="comma-separated subset of pointing,energy,deletion,insertion (default: all)")
    p.add_argument("--model", action="append", default=None,
                   help="the model of each store for deletion/insertion, in store order (default: the manifest's)")
    p.add_argument("--names", nargs="+", default=None, help="names of the stores in the report")
    p.add_argument("--steps", type=int, default=10, help="perturbation steps (default: %(default)s)")
    p.add_argument("--baseline", choices=("blur", "mean", "zero"), default="blur",
                   help="what removed patches become (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="masked images per forward (default: %(default)s)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--permutations", type=int, default=10000,
                   help="random sign flips of the paired test (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutations")
    p.add_argument("--gallery", type=int, default=4, help="best and worst words shown per store (0: none)")
    p.add_argument("--device", default=None, help="default: this process's accelerate device")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p
