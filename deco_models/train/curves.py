"""Training curves of several runs on one figure: the paper's convergence comparison (Figure 5).

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> for name, scale in (("mlp", 1.0), ("deco", 0.8)):
...     with open(os.path.join(d, name + ".csv"), "w") as f:
...         _ = f.write("step,loss\\n" + "".join(f"{s},{scale * 3 / s}\\n" for s in range(1, 21)))
>>> fig = plot_curves([os.path.join(d, "mlp.csv"), os.path.join(d, "deco.csv")], ["MLP", "DeCo"],
...                   os.path.join(d, "curves.png"))
>>> os.path.isfile(os.path.join(d, "curves.png"))
True
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from deco_models.train.callbacks import read_log


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points, ignoring NaNs (window 1 returns the values).

    >>> smooth([1.0, 3.0, float("nan"), 5.0], 2)
    [1.0, 2.0, 3.0, 5.0]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out = []
    for i in range(len(values)):
        recent = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(recent) / len(recent) if recent else float("nan"))
    return out


def plot_curves(
    csv_paths: Sequence[str | os.PathLike],
    labels: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    metric: str = "loss",
    x: str = "step",
    smoothing: int = 1,
    title: str | None = None,
    log_y: bool = False,
):
    """Plot ``metric`` against ``x`` for each training log (``train_log.csv`` of :func:`deco_models.train.train`, or a
    run folder containing one) and save to ``out`` (PNG/PDF/SVG by extension) when given. Returns the figure."""
    # A bare Figure (no pyplot): no GUI backend, no global state, works headless.
    from matplotlib.figure import Figure

    if not csv_paths:
        raise ValueError("csv_paths is empty: give at least one training log")
    labels = list(labels) if labels is not None else [Path(p).parent.name or Path(p).stem for p in csv_paths]
    if len(labels) != len(csv_paths):
        raise ValueError(f"{len(csv_paths)} logs but {len(labels)} labels")
    figure = Figure(figsize=(6.0, 4.0), dpi=150)
    axes = figure.add_subplot(1, 1, 1)
    for path, label in zip(csv_paths, labels):
        path = Path(path)
        if path.is_dir():
            path = path / "train_log.csv"
        columns = read_log(path)
        if metric not in columns or x not in columns:
            raise ValueError(f"{path} has no {metric!r}/{x!r} column; columns: {sorted(columns)}")
        pairs = [(a, b) for a, b in zip(columns[x], smooth(columns[metric], smoothing)) if not math.isnan(b)]
        if not pairs:
            raise ValueError(f"{path}: no {metric!r} values to plot")
        axes.plot([a for a, _ in pairs], [b for _, b in pairs], label=label, linewidth=1.5)
    axes.set_xlabel("training step" if x == "step" else x)
    axes.set_ylabel(metric.replace("_", " "))
    if log_y:
        axes.set_yscale("log")
    axes.grid(True, alpha=0.3)
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out)
    return figure


def main(argv: list[str] | None = None) -> int:
    """``python -m deco_models.train.curves RUN_DIR_OR_CSV ... --labels A B --out fig.png [--metric loss]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Plot the training curves of several runs (the paper's Figure 5).")
    parser.add_argument("logs", nargs="+", help="run folders (with train_log.csv) or CSV files")
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", required=True, help="output image (.png/.pdf/.svg)")
    parser.add_argument("--metric", default="loss")
    parser.add_argument("--smoothing", type=int, default=1, help="moving-average window (points)")
    parser.add_argument("--log-y", action="store_true")
    args = parser.parse_args(argv)
    plot_curves(args.logs, args.labels, args.out, metric=args.metric, smoothing=args.smoothing, log_y=args.log_y)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
