"""``deco zoo``: the shipped models.

    deco zoo list            names, projector, image tokens, size on disk, caption-word accuracy on the test scenes
    deco zoo path NAME       the folder of one model (and its base)
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("zoo", help="list the shipped (offline) models",
                                   description="The models shipped inside the package, loadable offline with "
                                               "deco_models.load(NAME).")
    sub = parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND")
    listing = sub.add_parser("list", help="list the shipped models")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=run_list)
    path = sub.add_parser("path", help="print where a shipped model's files are")
    path.add_argument("name")
    path.set_defaults(func=run_path)
    parser.set_defaults(func=run_list, json=False)
    return parser


def _size_mb(folder) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def _image_tokens(entry) -> int | None:
    """M, the image tokens the LLM sees: from the projector spec and the base vision tower's patch grid."""
    from deco_models.configuration import vision_patch_grid
    from deco_models.projectors import parse_projector_spec

    try:
        from transformers import AutoConfig

        grid = vision_patch_grid(AutoConfig.from_pretrained(str(entry.base / "vision")))
        parsed = parse_projector_spec(entry.projector, num_patches=grid[0] * grid[1])
    except (OSError, ValueError):
        return None
    return parsed.num_queries if parsed.num_queries is not None else grid[0] * grid[1]


def run_list(args: argparse.Namespace) -> int:
    from deco_models import zoo

    rows = []
    for name in zoo.available():
        entry = zoo.resolve(name)
        # The test scenes' number, what the README reports (shipping records it: shapes_mini.record_test).
        accuracy = entry.metrics.get("test", {}).get("caption_word_accuracy", {}).get("color_shape")
        rows.append({"name": name, "projector": entry.projector,
                     "image_tokens": _image_tokens(entry), "adapter_mb": round(_size_mb(entry.path), 2),
                     "caption_color_shape_accuracy": accuracy, "path": str(entry.path)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no shipped models found (the zoo folder is missing from this installation)")
        return 0
    print(f"{'name':<30} {'projector':<16} {'tokens':>6} {'MB':>6} {'caption acc (test)':>18}")
    for row in rows:
        acc = "-" if row["caption_color_shape_accuracy"] is None else f"{row['caption_color_shape_accuracy']:.3f}"
        print(f"{row['name']:<30} {row['projector']:<16} {row['image_tokens'] or '-':>6} {row['adapter_mb']:>6.2f} "
              f"{acc:>18}")
    base = zoo.resolve(rows[0]["name"]).base
    print(f"shared base (vision tower, LLM, tokenizer): {base} ({_size_mb(base):.1f} MB)")
    return 0


def run_path(args: argparse.Namespace) -> int:
    from deco_models import zoo
    from rgae.cli_base import user_errors

    with user_errors(ValueError):
        entry = zoo.resolve(args.name)
    print(entry.path)
    print(entry.base)
    return 0
