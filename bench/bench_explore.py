"""Size and speed of explorer pages (rgae.viz.explore): the issue's budget is <= 2 MB for one explanation of a 336 px
image with 20 words.

Cases (all 20 words, 24 x 24 patches, 336 px photo = skimage.data.chelsea() resized, 576 queries):
  smooth-mlp      maps built like R-GAE's (one Gaussian blob of query relevance per word), identity Query-to-Patch
  random-mlp      every Text-to-Query entry random (rough maps: the hardest Text-to-Image PNGs), identity
  random-dense    the same with a dense random 576 x 576 Query-to-Patch map (a Q-Former's, incompressible): worst case
  shapes-2        the shipped shapes-mini-mlp2x_gelu model, R-GAE + raw attention side by side on a scene (96 -> 288 px)

Reported: the page's bytes and their parts (base image, Text-to-Image maps, Text-to-Query, Query-to-Patch, the rest:
script, style, markup), the median build time in Python (warm-up >= 3), and, with --browser, the median time headless
Chromium takes from navigation to the first rendered state and to re-render after a word is clicked.

Usage: python bench/bench_explore.py [--warmup 3] [--repeat 5] [--browser] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def photo_explanation(kind: str):
    from skimage import data

    from rgae import Explanation

    photo = np.asarray(Image.fromarray(data.chelsea()).resize((336, 336), Image.Resampling.BICUBIC))
    words = [f"word{i}" for i in range(20)]
    gen = torch.Generator().manual_seed(0)
    if kind == "smooth-mlp":
        ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
        centers = torch.rand(20, 2, generator=gen) * 23
        t2q = torch.stack([torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 72).flatten() for cy, cx in centers.tolist()])
    else:
        t2q = torch.rand(20, 576, generator=gen) ** 4
    q2p = torch.rand(576, 576, generator=gen) if kind == "random-dense" else torch.eye(576)
    return [Explanation(method="rgae", target_text=" ".join(words), output_tokens=words, text_to_patch=t2q @ q2p,
                        patch_grid=(24, 24), text_to_query=t2q, query_to_patch=q2p, query_grid=(24, 24), image=photo,
                        token_probs=torch.rand(20, generator=gen), projector_type=kind, model_name="bench")]


def shapes_explanations():
    import deco_models
    import rgae
    from deco_models.data.shapes import caption, generate_scene

    model, processor = deco_models.load("shapes-mini-mlp2x_gelu")
    scene = generate_scene(2, n_objects=3)
    kw = dict(target=caption(scene), prompt="Describe the image.")
    return [cls(model, processor, model_name="shapes-mini-mlp2x_gelu").attribute(scene.image, **kw)
            for cls in (rgae.RGAE, rgae.RawAttention)]


def breakdown(page_html: str) -> dict[str, int]:
    """Bytes of the page by part (the JSON data's base64 strings, by field)."""
    data = json.loads(re.search(r'class="rx-data">(.*?)</script>', page_html, flags=re.S).group(1))
    parts = {"image": sum(len(v) for v in data["images"].values()),
             "text_to_image": sum(len(u) for p in data["panels"] for u in p["t2i"]["png"]),
             "text_to_query": sum(len(p["t2q"]["png"]) for p in data["panels"] if "t2q" in p),
             "query_to_patch": sum(len(p["q2p"]["png"]) for p in data["panels"] if "q2p" in p)}
    parts["rest"] = len(page_html.encode()) - sum(parts.values())
    return parts


def browser_times(path: Path, repeat: int, warmup: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_explore import Chromium, _chromium

    exe = _chromium()
    if exe is None:
        return {}
    b = Chromium(exe)
    try:
        loads, clicks = [], []
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            b.open(path.as_uri())
            t1 = time.perf_counter()
            b.js("document.querySelector('.rx-word[data-word=\"3\"]').click()")  # renders synchronously
            t2 = time.perf_counter()
            if i >= warmup:
                loads.append(t1 - t0)
                clicks.append(t2 - t1)
        assert not b.problems(), b.problems()
        return {"load_to_ready_ms": 1000 * statistics.median(loads),
                "click_render_ms": 1000 * statistics.median(clicks)}
    finally:
        b.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="also time loading and clicking in headless Chromium")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from rgae.viz import explore

    cases = {k: photo_explanation(k) for k in ("smooth-mlp", "random-mlp", "random-dense")}
    cases["shapes-2"] = shapes_explanations()
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="rgae-bench-explore-"))
    for name, expls in cases.items():
        times = []
        for i in range(args.warmup + args.repeat):
            t0 = time.perf_counter()
            page = explore(expls)
            document = page.html
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        row = {"bytes": len(document.encode()), **breakdown(document), "build_s": statistics.median(times)}
        if args.browser:
            row.update(browser_times(page.save(tmp / f"{name}.html"), args.repeat, args.warmup))
        results[name] = row
    cols = ["bytes", "image", "text_to_image", "text_to_query", "query_to_patch", "rest"]
    print("| case | MiB | " + " | ".join(c + " KiB" for c in cols[1:]) + " | build (s) |"
          + (" load (ms) | click (ms) |" if args.browser else ""))
    print("|---" * (len(cols) + 2 + (2 if args.browser else 0)) + "|")
    for name, r in results.items():
        cells = [f"{r['bytes'] / 2**20:.2f}", *(f"{r[c] / 1024:.0f}" for c in cols[1:]), f"{r['build_s']:.2f}"]
        if args.browser and "load_to_ready_ms" in r:
            cells += [f"{r['load_to_ready_ms']:.0f}", f"{r['click_render_ms']:.1f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
