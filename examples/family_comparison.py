"""One image and one caption explained by tiny models of several families, in one comparison figure.

    python examples/family_comparison.py                          # docs/families.png (about half a minute)
    python examples/family_comparison.py --out cmp.png --families internvl gemma3 blip2

Each row is a tiny random model of a real transformers class (LLaVA-NeXT, LLaVA-OneVision, Gemma3, InternVL, Idefics3,
Mistral3, BLIP-2) with its real processor, "planted" so that its answer can only depend on the white square
(``tests/families/zoo.py``: the vision tower passes a blue patch on as exactly zero). R-GAE explains the caption with
each; every row is drawn over the same original image through its own layout (one patch grid, anyres base + tiles,
tiles + thumbnail, tiles + global image), so the rows differ in what their connectors do to the maps: identity per
patch, a pooling window, 2×2 blocks, the Q-Former's spread over its patches. The models are random: the figure shows
the layouts and Query-to-Patch rules at work, not what trained models see.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the tiny builders live with the tests
    sys.path.insert(0, str(ROOT))

from rgae import RGAE  # noqa: E402
from rgae.viz import plot_comparison  # noqa: E402
from rgae.viz.export import save_figure  # noqa: E402
from tests.families.zoo import PLANTED, planted_family, planted_image  # noqa: E402

CAPTION = "a red square"
REGION = (0, 0, 16, 16)  # x0, y0, x1, y1 of the white square in the 32×64 image


def explain_families(names=PLANTED, caption: str = CAPTION, region=REGION, size=(32, 64)) -> dict:
    """``{row label: Explanation}`` of ``caption`` for the planted image, one row per family in ``names``."""
    image = planted_image(*size, region)
    rows = {}
    for name in names:
        model, processor = planted_family(name)
        e = RGAE(model, processor).attribute(image, target=caption)
        rule = e.options["query_to_patch_rule"].replace(" (mean over target tokens)", "")
        rows[f"{name}\n{len(e.layout.views)} view(s), {rule}"] = e
    return rows


def family_figure(names=PLANTED, caption: str = CAPTION):
    """The comparison figure (rows = models). The maps are drawn nearly opaque: blended with the saturated blue
    background at the usual alpha, the colormap's red would turn purple."""
    return plot_comparison(explain_families(names, caption), rows="model", alpha=0.9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "families.png", help="the PNG to write")
    parser.add_argument("--families", nargs="+", default=list(PLANTED), choices=PLANTED, help="rows, in order")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tiny tokenizers' "unknown word" notices
        fig = family_figure(args.families)
    save_figure(fig, args.out, dpi=args.dpi)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
