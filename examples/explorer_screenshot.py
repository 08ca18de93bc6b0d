"""Write ``docs/explorer.png``, the README's screenshot of the interactive explorer (``rgae.viz.explore``).

R-GAE and raw attention of the shipped ``shapes-mini-mlp2x_gelu`` model on the demo's shapes scene, opened in headless
Chromium at ``#word=2`` ("yellow"), as a PNG.

Usage: python examples/explorer_screenshot.py [--out docs/explorer.png] [--chromium chromium]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from PIL import Image

import deco_models
import rgae
from deco_models.data.shapes import caption, generate_scene
from rgae import viz

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "explorer.png"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--fragment", default="word=2")
    args = parser.parse_args()

    model, processor = deco_models.load("shapes-mini-mlp2x_gelu")
    scene = generate_scene(2, n_objects=3)
    kw = dict(target=caption(scene), prompt="Describe the image.")
    expls = {name: cls(model, processor, model_name="shapes-mini-mlp2x_gelu").attribute(scene.image, **kw)
             for name, cls in (("R-GAE", rgae.RGAE), ("raw attention", rgae.RawAttention))}
    with tempfile.TemporaryDirectory() as tmp:
        page = viz.explore(expls).save(Path(tmp) / "explorer.html")
        shot = Path(tmp) / "shot.png"
        subprocess.run([args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", "--virtual-time-budget=5000", "--window-size=840,1180",
                        f"--screenshot={shot}", f"{page.as_uri()}#{args.fragment}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        image = Image.open(shot).convert("RGB")
        image.save(args.out, optimize=True)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
