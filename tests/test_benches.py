"""The memory/time benchmarks still run end to end (a smoke test at the smallest sizes, not a timing): their numbers
are in the README, and the CUDA run has to work unchanged when a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _run(script: str, *args: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_memory_measures_every_part_in_fresh_processes(tmp_path):
    result = _run("bench_memory.py", "--lengths", "256", "--warmup", "0", "--repeat", "1", out=tmp_path / "m.json")
    row = result["lengths"]["256"]
    assert sorted(row) == ["eager", "floor", "interface"]
    for part, r in row.items():
        assert "error" not in r and "time_error" not in r, (part, r)
        assert r["peak_mib"] > 0 and r["median_s"] > 0 and len(r["times_s"]) == 1, (part, r)
    # The eager capture keeps every layer's probabilities with their graph: more than the floor even at n = 256.
    assert row["eager"]["peak_mib"] > row["floor"]["peak_mib"]


@pytest.mark.slow
def test_bench_explain_times_the_fast_path_against_the_floor(tmp_path):
    result = _run("bench_explain.py", "--parts", "fast,floor", "--warmup", "0", "--repeat", "1", "--no-memory",
                  out=tmp_path / "e.json")
    assert result["fast"]["median_s"] > 0 and result["floor"]["median_s"] > 0
