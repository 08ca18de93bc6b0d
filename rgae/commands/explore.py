"""``rgae explore``: a browsable site of an explanation store — an interactive explorer page per record and an
``index.html`` sorted by a per-record metric (the worst first, by default), to find the records worth a look.

Examples::

    rgae explore runs/shapes-mlp --out sites/shapes-mlp                        # sorted by the pointing game
    rgae explore runs/refs --report reports/refs --sort-by deletion_auc --descending --limit 100 --out sites/refs

Without ``--report`` the metrics are the localization ones computed from the store's boxes and masks (no model
needed); with ``--report`` (an ``rgae evaluate`` folder) they are the report's, deletion/insertion AUCs included.
A record's metrics are the means over its scored words: pointing, pointing_mask, energy, energy_mask, words
(the count), deletion_auc, insertion_auc. The folder can be moved or served as it is (relative links).
"""

from __future__ import annotations

import argparse

from rgae.cli_base import HelpFormatter, UsageError, check_input_folder, check_output_folder, help_text, user_errors


def run(args: argparse.Namespace) -> int:
    from rgae.datasets.site import report_record_metrics, store_record_metrics, write_store_site
    from rgae.datasets.store import ExplanationStore, StoreError

    check_input_folder(args.store, "STORE", what="an explanation store (rgae explain-dataset --out)")
    out = check_output_folder(args.out, "--out")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    with user_errors(StoreError):
        store = ExplanationStore(args.store)
    if not len(store):
        raise UsageError(f"{store.path} holds no explanations ({len(store.failures)} failures)")
    if args.report is not None:
        with user_errors(ValueError):  # the report's file: missing, not a report, or of other stores
            metrics = report_record_metrics(args.report, store)
    else:
        metrics = store_record_metrics(store)
    sort_by = args.sort_by
    if sort_by is None and any("pointing" in m for m in metrics.values()):
        sort_by = "pointing"
    with user_errors(ValueError):  # --sort-by names no metric of the records
        index = write_store_site(store, out, metrics, sort_by=sort_by, descending=args.descending, limit=args.limit)
    pages = min(len(store), args.limit or len(store))
    order = f"sorted by {sort_by}" + (" (descending)" if args.descending else "") if sort_by else "in record order"
    print(f"{pages} pages of {len(store)} records, {order}: {index}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explore",
        help="a browsable site of an explanation store: a page per record, an index sorted by a metric",
        description=help_text(__doc__),
        formatter_class=HelpFormatter,
    )
    p.add_argument("store", metavar="STORE", help="an explanation store (rgae explain-dataset --out)")
    p.add_argument("--out", required=True, help="the site folder: index.html and pages/ (created if missing)")
    p.add_argument("--report", default=None, metavar="REPORT",
                   help="an rgae evaluate report (folder or its metrics.json) to read the metrics from")
    p.add_argument("--sort-by", default=None, metavar="METRIC",
                   help="the metric the index is sorted by (default: pointing when the records have it, else the "
                        "record order)")
    p.add_argument("--descending", action="store_true", help="the highest values first (default: the lowest)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="write only the first N records in that order (default: all)")
    p.set_defaults(func=run)
    return p
