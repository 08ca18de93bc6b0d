"""``deco train``: train one stage from a YAML config, or run a named recipe.

    deco train --config deco_models/configs/llava15_7b/avgpool2_144_align.yaml --train.output_dir runs/a
    deco train --config run.yaml train.lr=2e-4 lora.r=64 --resume
    torchrun --nproc-per-node 8 -m deco_models.cli train --config run.yaml
    deco train --recipe shapes-mini --out runs/shapes
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a deco model (align / LoRA finetune) from a YAML config",
        description=(
            "Train one stage of a deco model with transformers' Trainer. Any config value can be overridden with "
            "SECTION.KEY=VALUE or --SECTION.KEY VALUE after the options (e.g. --train.lr 1e-4 lora.r=64). "
            "Launch with torchrun / accelerate launch for several processes."
        ),
    )
    parser.add_argument("--config", help="YAML config (sections model, data, train, lora)")
    parser.add_argument("--recipe", help="run a named recipe from deco_models.train.recipes.RECIPES instead")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in train.output_dir (from scratch if there is none)",
    )
    parser.add_argument("--resume-from", metavar="CHECKPOINT", help="continue from this checkpoint folder")
    parser.add_argument("--deepspeed", help="DeepSpeed JSON config (same as train.deepspeed=...)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(func=run, overrides=[])
    _accept_overrides(parser)
    return parser


def _accept_overrides(parser: argparse.ArgumentParser) -> None:
    """Let ``parser`` take free-form ``--section.key value`` / ``section.key=value`` tokens: argparse cannot declare
    them, so whatever it does not recognise is kept in ``namespace.overrides`` instead of being an error."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        namespace, extras = parse_known(args, namespace)
        namespace.overrides = [*getattr(namespace, "overrides", []), *(t for t in extras if t != "--")]
        return namespace, []

    parser.parse_known_args = parse_known_args


def run(args: argparse.Namespace) -> int:
    from deco_models.train.config import TrainConfig, parse_overrides

    try:
        overrides = parse_overrides(list(args.overrides or []))
    except ValueError as exc:
        raise SystemExit(f"deco train: {exc}") from None
    if args.deepspeed:
        overrides["train.deepspeed"] = args.deepspeed
    if args.recipe:
        if args.config:
            raise SystemExit("deco train: give --config or --recipe, not both")
        from deco_models.train.recipes import get_recipe

        try:
            recipe = get_recipe(args.recipe)
        except ValueError as exc:
            raise SystemExit(f"deco train: {exc}") from None
        result = recipe(overrides, args.resume_from or args.resume)
        if result is not None:
            print(result)
        return 0
    if not args.config:
        raise SystemExit("deco train: --config CONFIG.yaml (or --recipe NAME) is required")
    try:
        config = TrainConfig.from_yaml(args.config).with_overrides(overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"deco train: {exc}") from None
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    from deco_models.train.trainer import summarize, train

    result = train(config, resume=args.resume_from or args.resume)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(summarize(result))
    return 0
