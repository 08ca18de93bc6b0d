"""Benchmark the row trick: ``propagate_rows`` (O(L·n²)) against the full product ``propagate`` (O(L·n³)).

An LLM explanation needs one row of ``R = (I + cam_L) ... (I + cam_1)`` per generated token (the position that
predicts it), so the row trick is what makes R-GAE cheap. This script times both on random causal layer maps and
prints a markdown table (medians after warm-up; the speedups come from the same run).

Usage:
    OMP_NUM_THREADS=1 python bench/bench_rules.py                    # L = 32, n in {256, 700, 1400}, float32
    python bench/bench_rules.py --sizes 256 --repeats 3 --check 0    # quick smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
from tqdm import tqdm

from rgae.rules import propagate, propagate_rows


def causal_layer_maps(n_layers: int, n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Non-negative, lower-triangular (causal) maps with rows of sum ~1, like mean_h (G ⊙ A)+ of a decoder."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, n).tril()
    cams = []
    for _ in range(n_layers):
        cam = torch.rand(n, n, generator=g) * mask
        cams.append((cam / cam.sum(-1, keepdim=True)).to(dtype))
    return cams


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="number of layers L (default 32)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 700, 1400], help="sequence lengths n")
    parser.add_argument("--rows", type=int, default=16, help="row count of the multi-row case (default 16)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up runs per timing (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per timing, median reported (default 5)")
    parser.add_argument(
        "--full-repeats-large",
        type=int,
        default=3,
        help="timed runs of the slow full product for n >= --large (default 3; the table says so)",
    )
    parser.add_argument("--large", type=int, default=1400, help="n from which --full-repeats-large applies")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--check", type=float, default=20.0, help="fail (exit 1) if the one-row speedup at n=700 is below this; 0 = off"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rows_table = []
    with tqdm(total=len(args.sizes) * 3, desc="bench", file=sys.stderr) as bar:
        for n in args.sizes:
            cams = causal_layer_maps(args.layers, n, dtype, args.seed)
            one_row = [n - 1]
            many_rows = list(range(n - min(args.rows, n), n))
            full_repeats = args.full_repeats_large if n >= args.large else args.repeats

            t_one = median_seconds(lambda: propagate_rows(cams, one_row), args.warmup, args.repeats)  # noqa: B023
            bar.update()
            t_many = median_seconds(lambda: propagate_rows(cams, many_rows), args.warmup, args.repeats)  # noqa: B023
            bar.update()
            t_full = median_seconds(lambda: propagate(cams), args.warmup, full_repeats)  # noqa: B023
            bar.update()

            full = propagate(cams)[many_rows]
            trick = propagate_rows(cams, many_rows)
            rel_err = float(((trick - full).abs().max() / full.abs().max()).item())
            rows_table.append((n, t_full, t_one, t_many, full_repeats, rel_err))

    print(
        f"\nL = {args.layers} layers, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}); "
        f"{args.warmup} warm-up runs, medians over {args.repeats} runs "
        f"({args.full_repeats_large} for the full product at n >= {args.large})\n"
    )
    print(
        f"| n | propagate (full) ms | propagate_rows 1 row ms | propagate_rows {args.rows} rows ms "
        f"| speedup 1 row | speedup {args.rows} rows | full-product runs | max rel. diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, t_full, t_one, t_many, full_repeats, rel_err in rows_table:
        print(
            f"| {n} | {t_full * 1e3:.1f} | {t_one * 1e3:.2f} | {t_many * 1e3:.2f} | {t_full / t_one:.0f}× "
            f"| {t_full / t_many:.0f}× | {full_repeats} | {rel_err:.1e} |"
        )

    if args.check > 0:
        at_700 = [(t_full / t_one) for n, t_full, t_one, *_ in rows_table if n == 700]
        if at_700:
            ok = at_700[0] >= args.check
            print(f"\nrow trick at n=700: {at_700[0]:.0f}× (required ≥ {args.check:.0f}×): {'PASS' if ok else 'FAIL'}")
            if not ok:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
