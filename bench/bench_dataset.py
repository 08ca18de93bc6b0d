"""Benchmark ``rgae explain-dataset``: records per second for the shapes-mini models, against the single-image API
in a Python loop, with one and two processes.

Parts:
  loop        ``RGAE(model, processor).attribute(image, target, prompt)`` for every record, results discarded
  store       ``rgae.datasets.explain_dataset`` on the same explainer into a fresh store (one process): the loop plus
              reading each record, packing and writing shards (safetensors + JSON), progress bookkeeping
  cli-1       ``rgae explain-dataset`` in a fresh process (torch's default threads)
  cli-2       ``torchrun --nproc_per_node 2 -m rgae.cli explain-dataset`` (two processes, one thread each, gloo);
              on CUDA with two or more GPUs, one GPU each
``loop`` and ``store`` run in this process on one loaded model, warm-up rounds first, then timed rounds alternating
between the two (so a change of machine load hits both alike); medians; ``overhead`` = store / loop - 1. The CLI parts
run in fresh processes; their rate is over the explain phase the command reports (after imports and model loading),
and ``wall`` is the whole command. Records: ``shapes:12345:N`` (held-out scenes, 1-3 objects, captions of 4-16
tokens).

Usage: python bench/bench_dataset.py [--records 24] [--warmup 3] [--repeat 5] [--cli-repeat 3] [--device cpu|cuda]
       [--models shapes-mini-mlp2x_gelu ...] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("shapes-mini-mlp2x_gelu", "shapes-mini-avgpool2_36", "shapes-mini-qformer2_36")
SUMMARY = re.compile(r"with (\d+) process\(es\) in ([\d.]+) s")


def in_process(name: str, n: int, warmup: int, repeat: int, device: str) -> dict:
    """Median seconds of the loop and of explain_dataset over ``n`` records, interleaved."""
    from rgae.commands.explain import load_model
    from rgae.datasets import read_dataset
    from rgae.datasets.processes import partial_state
    from rgae.datasets.runner import explain_dataset
    from rgae.methods import RGAE

    model, processor = load_model(name, device=device)
    explainer = RGAE(model, processor, model_name=name)
    records = read_dataset(f"shapes:12345:{n}")
    state = partial_state(cpu=device == "cpu")
    work = Path(tempfile.mkdtemp(prefix="bench-dataset-"))

    def loop():
        for r in records:
            explainer.attribute(r.image, target=r.text, prompt=r.prompt)

    def store(k=[0]):  # noqa: B006 - a counter: every round writes a fresh store
        k[0] += 1
        explain_dataset(explainer, records, work / f"s{k[0]}", manifest={"model": name, "method": "rgae",
                        "options": {}}, progress=False, state=state)

    parts = {"loop": loop, "store": store}
    times: dict[str, list[float]] = {p: [] for p in parts}
    try:
        for _ in range(warmup):
            for fn in parts.values():
                fn()
        for _ in range(repeat):
            for p, fn in parts.items():
                t0 = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {p: statistics.median(v) for p, v in times.items()}
    return {"loop_rps": n / med["loop"], "store_rps": n / med["store"], "overhead": med["store"] / med["loop"] - 1,
            "loop_s": times["loop"], "store_s": times["store"]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cli(name: str, n: int, processes: int, repeat: int, device: str, threads: int | None = None) -> dict:
    """Fresh-process runs of the command; the explain-phase rate and the wall time, medians over ``repeat``."""
    rates, walls = [], []
    for _ in range(repeat):
        out = Path(tempfile.mkdtemp(prefix="bench-cli-")) / "store"
        args = ["-m", "rgae.cli", "explain-dataset", "--model", name, "--data", f"shapes:12345:{n}", "--out",
                str(out), "--no-progress"]
        if device == "cpu" and processes == 1:
            args += ["--device", "cpu"]
        env = dict(os.environ)
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        if threads is not None and processes == 1:  # torchrun gives each of several workers one thread itself
            env["OMP_NUM_THREADS"] = str(threads)
        if processes == 1:
            cmd = [sys.executable, *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(_free_port()), *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        walls.append(time.perf_counter() - t0)
        shutil.rmtree(out.parent, ignore_errors=True)
        match = SUMMARY.search(proc.stdout)
        if proc.returncode != 0 or match is None or int(match.group(1)) != processes:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        rates.append(n / float(match.group(2)))
    return {"rps": statistics.median(rates), "wall_s": statistics.median(walls), "rps_all": rates}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cli-repeat", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the single-process parts (default: torch's); 1 on a busy machine, "
                             "where two spinning OpenMP threads waste most of their time waiting for each other")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    two = 2 if device == "cpu" or torch.cuda.device_count() >= 2 else None
    rows = []
    for name in args.models:
        row = {"model": name, "device": device, "records": args.records, "threads": torch.get_num_threads()}
        row.update(in_process(name, args.records, args.warmup, args.repeat, device))
        row["cli1"] = cli(name, args.records, 1, args.cli_repeat, device, args.threads)
        if two:
            row["cli2"] = cli(name, args.records, two, args.cli_repeat, device)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{device}, {args.records} records, medians (in-process: {args.warmup} warm-up + {args.repeat} timed "
          f"rounds; CLI: {args.cli_repeat} fresh runs)\n")
    print("| model | loop rec/s | store rec/s | store overhead | CLI 1 proc rec/s (wall s) "
          "| CLI 2 proc rec/s (wall s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c2 = f"{r['cli2']['rps']:.1f} ({r['cli2']['wall_s']:.1f})" if "cli2" in r else "—"
        print(f"| {r['model']} | {r['loop_rps']:.1f} | {r['store_rps']:.1f} | {100 * r['overhead']:+.1f}% | "
              f"{r['cli1']['rps']:.1f} ({r['cli1']['wall_s']:.1f}) | {c2} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
