"""Parameters and CPU forward time of every projector at the DeCo paper's size.

CLIP ViT-L/14-336 patches (1024-d, 24×24 = 576) -> Vicuna-7B embeddings (4096-d); compressing projectors output
144 tokens (12×12), ``linear``/``mlp2x_gelu`` keep 576. float32, ``torch.no_grad``, warm-up runs then the median of
timed runs (first iterations in a fresh process are several times slower).

Usage:
    OMP_NUM_THREADS=1 python bench/bench_projectors.py --threads 1 --batch-sizes 1 4 --out bench/projectors.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from tqdm import tqdm

from deco_models import build_projector

SPECS = ["linear", "mlp2x_gelu", "avgpool2_{M}", "maxpool2_{M}", "qformer2_{M}", "cabstractor_{M}", "dabstractor_{M}"]


def time_forward(module: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """Median wall time of ``module(x)`` in milliseconds after ``warmup`` untimed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            module(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            module(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vision-hidden", type=int, default=1024)
    parser.add_argument("--llm-hidden", type=int, default=4096)
    parser.add_argument("--grid", type=int, nargs=2, default=[24, 24], metavar=("H", "W"))
    parser.add_argument("--queries", type=int, default=144)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--specs", nargs="+", default=None, help="spec strings; {M} is replaced by --queries")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    grid = tuple(args.grid)
    specs = [s.replace("{M}", str(args.queries)) for s in (args.specs or SPECS)]
    header = "| projector | kind | tokens out | params (M) | " + " | ".join(
        f"forward ms, batch {b}" for b in args.batch_sizes
    )
    lines = [header + " |", "|" + "---|" * (4 + len(args.batch_sizes))]
    jobs = tqdm(specs, desc="projectors", unit="proj")
    for spec in jobs:
        jobs.set_postfix_str(spec)
        proj = build_projector(spec, args.vision_hidden, args.llm_hidden, grid).eval()
        params = sum(p.numel() for p in proj.parameters()) / 1e6
        cells = []
        for batch in args.batch_sizes:
            x = torch.randn(batch, grid[0] * grid[1], args.vision_hidden)
            cells.append(f"{time_forward(proj, x, args.warmup, args.repeats):.1f}")
        lines.append(f"| `{spec}` | {proj.kind} | {proj.num_queries} | {params:.2f} | " + " | ".join(cells) + " |")
        del proj

    note = (
        f"\nvision {args.vision_hidden} -> LLM {args.llm_hidden}, patch grid {grid[0]}x{grid[1]} "
        f"({grid[0] * grid[1]} patches), float32, no_grad; median of {args.repeats} after {args.warmup} warm-up runs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}."
    )
    table = "\n".join(lines) + "\n" + note + "\n"
    print(table)
    if args.out:
        from deco_models.io import atomic_write

        def write(tmp):
            with open(tmp, "w") as handle:
                handle.write(table)

        atomic_write(args.out, write)
    return table


if __name__ == "__main__":
    main()
