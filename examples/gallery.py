"""Render every rgae.viz figure type into a folder, to look at them (and to show what they are for).

    python examples/gallery.py --out gallery/            # synthetic explanations (seconds)
    python examples/gallery.py --out gallery/ --model    # also a tiny random model, if rgae.RGAE is available

Synthetic explanations are built the way R-GAE composes its maps, ``R_t2p = R_t2q · Q2P``: Gaussian blobs of
Text-to-Query relevance per word on the query grid, times the projector's Query-to-Patch map (identity for a linear
projector, the adaptive-average-pooling operator for DeCo, soft random blobs standing in for a Q-Former's learned
patterns), over real photos from ``skimage.data``. A GradCAM-like explanation (no query stage) and a padded,
non-square image exercise the remaining paths.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import cv2
import numpy as np
import torch
from skimage import data

from rgae import Explanation, viz
from rgae.layout import ImageLayout


def pooling_q2p(patch_grid: tuple[int, int], query_grid: tuple[int, int]) -> torch.Tensor:
    """Q2P of 2-D adaptive average pooling (``rgae.rules.pooling_map`` when present, else the same formula)."""
    try:
        from rgae.rules import pooling_map

        return pooling_map(patch_grid, query_grid)
    except (ImportError, AttributeError, TypeError):
        pass

    def windows(n_in: int, n_out: int) -> list[range]:
        # PyTorch's adaptive windows: [floor(i·In/Out), ceil((i+1)·In/Out)).
        return [range((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]

    (ph, pw), (qh, qw) = patch_grid, query_grid
    q2p = torch.zeros(qh * qw, ph * pw)
    for qi, rows in enumerate(windows(ph, qh)):
        for qj, cols in enumerate(windows(pw, qw)):
            for r in rows:
                for c in cols:
                    q2p[qi * qw + qj, r * pw + c] = 1.0 / (len(rows) * len(cols))
    return q2p


def gaussian(grid: tuple[int, int], center: tuple[float, float], sigma: float) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32), torch.arange(grid[1], dtype=torch.float32),
                            indexing="ij")
    return torch.exp(-((ys - center[0]) ** 2 + (xs - center[1]) ** 2) / (2 * sigma**2))


def blob_t2q(query_grid, centers, sigma, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for center in centers:
        noise = 0.05 * torch.rand(query_grid, generator=gen)
        rows.append((gaussian(query_grid, center, sigma) + noise).flatten())
    return torch.stack(rows)


def synthetic(image, text, centers_rel, patch_grid, query_grid, projector, method="rgae", seed=0, view_box=None):
    """An explanation whose words light up blobs at relative positions ``centers_rel`` (one per word)."""
    words = text.split()
    qh, qw = query_grid
    centers = [(r * (qh - 1), c * (qw - 1)) for r, c in centers_rel]
    t2q = blob_t2q(query_grid, centers, sigma=max(qh, qw) / 8, seed=seed)
    if projector.startswith("mlp") or projector == "linear":
        q2p = torch.eye(qh * qw)
    elif projector.startswith("avgpool"):
        q2p = pooling_q2p(patch_grid, query_grid)
    else:  # a Q-Former stand-in: each query attends to a soft blob somewhere, some queries repeat
        gen = torch.Generator().manual_seed(seed + 1)
        centers_q = torch.rand(qh * qw, 2, generator=gen) * torch.tensor([patch_grid[0] - 1, patch_grid[1] - 1])
        centers_q[1::7] = centers_q[0]  # repetitive patterns, as the paper observes
        q2p = torch.stack([gaussian(patch_grid, tuple(c.tolist()), max(patch_grid) / 6).flatten() for c in centers_q])
        q2p = q2p / q2p.sum(dim=1, keepdim=True)
    layout = None
    if view_box is not None:  # the patch grid covers view_box of the image (the padding around it included)
        layout = ImageLayout.single_view(image.shape[:2], patch_grid, view_box, torch.arange(qh * qw), q2p.double(),
                                         rule="pooling", query_grid=query_grid)
    return Explanation(
        method=method, target_text=text, output_tokens=words, text_to_patch=t2q @ q2p, patch_grid=patch_grid,
        text_to_query=t2q, query_to_patch=q2p, query_grid=query_grid, image=image, projector_type=projector,
        layout=layout, model_name="synthetic",
    )


def square_view_box(image: np.ndarray) -> tuple[float, float, float, float]:
    """The view box of LLaVA-style pad-to-square: the square centred on the image, in its pixels."""
    h, w = image.shape[:2]
    side = max(h, w)
    y0, x0 = (side - h) // 2, (side - w) // 2
    return (-x0, -y0, side - x0, side - y0)


def synthetic_explanations() -> dict[str, Explanation]:
    astronaut = cv2.resize(data.astronaut(), (336, 336), interpolation=cv2.INTER_AREA)
    text = "A pot of green plants"
    # word → where it "looks" (relative row, col): the flag, the face, a spread-out word, the suit, the rocket.
    spots = [(0.2, 0.2), (0.25, 0.45), (0.5, 0.5), (0.75, 0.3), (0.35, 0.85)]
    out = {
        "qformer": synthetic(astronaut, text, spots, (24, 24), (12, 12), "qformer2_144"),
        "avgpool": synthetic(astronaut, text, spots, (24, 24), (12, 12), "avgpool2_144"),
        "linear": synthetic(astronaut, text, spots, (12, 12), (12, 12), "mlp2x_gelu"),
    }
    g = out["linear"]
    out["gradcam"] = Explanation(method="gradcam", target_text=text, output_tokens=g.output_tokens,
                                 text_to_patch=g.text_to_patch.clone(), patch_grid=g.patch_grid, image=astronaut,
                                 projector_type="mlp2x_gelu")
    cat = data.chelsea()
    out["padded"] = synthetic(cat, "a ginger cat's left eye", [(0.45, 0.3), (0.5, 0.4), (0.4, 0.35), (0.42, 0.38),
                                                             (0.42, 0.55)], (14, 14), (7, 7), "avgpool2_49",
                              view_box=square_view_box(cat))
    return out


def render(expl: Explanation, out: Path, tag: str) -> list[Path]:
    written = []
    kinds = ["text_to_image", "words", "decomposition"]
    if expl.text_to_query is not None:
        kinds += ["text_to_query", "query_grid"]
    if expl.query_to_patch is not None:
        kinds += ["query_to_image"]
    for kind in kinds:
        fig = viz.plot(expl, kind=kind)
        written.append(viz.save_figure(fig, out / f"{tag}-{kind}.png"))
    if expl.layout is not None:  # a padded view: the maps are drawn over the original image, the padding gone
        fig = viz.plot_decomposition(expl, style="grid")
        written.append(viz.save_figure(fig, out / f"{tag}-decomposition-grid.png"))
    fig = viz.plot_text_to_image(expl, interpolation="nearest")
    written.append(viz.save_figure(fig, out / f"{tag}-text_to_image-nearest.png"))
    return written


def model_explanations() -> dict[str, Explanation]:
    """R-GAE explanations of tiny random models (tests/tiny.py), one per projector kind, on a non-square photo
    (padded to square by the processor, so the content box is exercised). Random weights: the maps show the
    machinery, not meaning."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from rgae import RGAE
        from tests.tiny import tiny_deco_model, tiny_processor
    except (ImportError, AttributeError) as exc:
        print(f"skipping the tiny-model gallery: {exc}")
        return {}
    out = {}
    image = cv2.resize(data.chelsea(), (120, 80), interpolation=cv2.INTER_AREA)
    for projector in ("mlp2x_gelu", "avgpool2_9", "qformer2_9"):
        try:
            model = tiny_deco_model(projector, image_size=48)
            out[f"tiny-{projector}"] = RGAE(model, tiny_processor(model)).attribute(image, target="a red circle")
        except Exception as exc:  # noqa: BLE001 - a gallery renders what it can and says what it could not
            print(f"tiny model {projector}: {type(exc).__name__}: {exc}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gallery"), help="output folder")
    parser.add_argument("--model", action="store_true", help="also explain a tiny random model (rgae.RGAE)")
    parser.add_argument("--formats", nargs="+", default=["png"], help="formats of the save_figures set")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    expls = synthetic_explanations()
    if args.model:
        expls.update(model_explanations())
    written: list[Path] = []
    for tag, expl in expls.items():
        written += render(expl, args.out, tag)
    # The original tool's file set, for the README's example.
    written += viz.save_figures(expls["qformer"], args.out / "save_figures", formats=args.formats)
    written += viz.save_figures(expls["gradcam"], args.out / "save_figures", formats=args.formats, words=False)
    tiny = [e for tag, e in expls.items() if tag.startswith("tiny-")]
    if tiny:
        fig = viz.plot_comparison(tiny, rows="projector", crop_to_content=True)
        written.append(viz.save_figure(fig, args.out / "tiny-comparison-projector.png"))
    for rows, group in (("projector", ["linear", "avgpool", "qformer"]), ("method", ["qformer", "gradcam"])):
        for normalize in ("per_map", "global"):
            fig = viz.plot_comparison([expls[k] for k in group], rows=rows, normalize=normalize)
            written.append(viz.save_figure(fig, args.out / f"comparison-{rows}-{normalize}.png"))
    print(f"wrote {len(written)} files to {args.out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
