"""``deco train``: train one stage from a YAML config, or run a named recipe.

    deco train --config deco_models/configs/llava15_7b/avgpool2_144_align.yaml --train.output_dir runs/a
    deco train --config run.yaml train.lr=2e-4 lora.r=64 --resume
    torchrun --nproc-per-node 8 -m deco_models.cli train --config run.yaml
    deco train --recipe shapes-mini --recipe.out runs/shapes
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from pathlib import Path

from rgae.cli_base import (
    HelpFormatter,
    UsageError,
    check_input_file,
    check_input_folder,
    check_output_folder,
    help_text,
    user_errors,
)

# A hub repository id ("org/name"): accepted for the LLM and vision parts of a config (a networked machine downloads
# them); anything else that does not exist locally is a mistake.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


DESCRIPTION = (
    "Train one stage of a deco model with transformers' Trainer. Any config value can be overridden with "
    "SECTION.KEY=VALUE or --SECTION.KEY VALUE after the options (e.g. --train.lr 1e-4 lora.r=64). "
    "Launch with torchrun / accelerate launch for several processes."
)


class _HelpWithRecipes(argparse.Action):
    """``-h/--help`` that lists the registered recipes and their options. Recipes are found by importing
    :mod:`deco_models.recipes` (torch and all), so that happens only when the help is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = recipes_help()
        parser.print_help()
        parser.exit()


def recipes_help() -> str:
    """The ``Recipes:`` section of ``deco train --help``: each recipe's first docstring line and its options."""
    from deco_models.train.recipes import RECIPES, discover

    discover()
    lines = ["Recipes (deco train --recipe NAME [--recipe.OPTION VALUE ...]):"]
    for name in sorted(RECIPES):
        function = RECIPES[name]
        summary = help_text((function.__doc__ or "").strip().split("\n\n")[0])
        lines += textwrap.wrap(f"{name}: " + " ".join(summary.split()), width=100, initial_indent="  ",
                               subsequent_indent="    ")
        options = getattr(function, "options", None) or {}
        if options:
            shown = ", ".join(f"{key}={_show(value)}" for key, value in options.items())
            lines += textwrap.wrap(f"options (default): {shown}", width=100, initial_indent="    ",
                                   subsequent_indent="      ")
    if len(lines) == 1:
        lines.append("  none registered")
    return "\n".join(lines)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="train a deco model (align / LoRA finetune) from a YAML config, or run a recipe",
        description=DESCRIPTION + "\n\n" + help_text(__doc__).split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
        add_help=False,
    )
    parser.add_argument("-h", "--help", action=_HelpWithRecipes, help="show this help (with the recipes) and exit")
    parser.add_argument("--config", help="YAML config (sections model, data, train, lora)")
    parser.add_argument("--recipe", help="run a named recipe instead (listed below)")
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


def _check_recipe_options(recipe, overrides: dict) -> None:
    options = getattr(recipe, "options", None)
    if options is None:
        return  # the recipe checks its own overrides
    unknown = [key for key in overrides if not key.startswith("recipe.") or key.partition(".")[2] not in options]
    if unknown:
        raise UsageError(f"unknown recipe option(s) {', '.join(unknown)}; this recipe takes "
                         f"{', '.join('recipe.' + k for k in options)} (see deco train --help)")


def _check_model_source(option: str, value: str | None, hub_ok: bool) -> None:
    if value is None or Path(value).expanduser().exists():
        return
    if hub_ok and _HUB_ID.match(value):
        return  # a hub id: downloaded by transformers (a failure to reach the hub is reported when loading)
    if option == "model.name_or_path":
        from deco_models.cli_base import check_model

        check_model(value, option)
        return
    raise UsageError(f"{option} {value}: no such folder (and not a hub id like org/name)")


def _check_config(config) -> None:
    """The cheap checks of a resolved config, before any model is built."""
    if not config.train.output_dir:
        raise UsageError("train.output_dir is required (set it in the config or pass train.output_dir=DIR)")
    check_output_folder(config.train.output_dir, "train.output_dir")
    if not config.data.data_path:
        raise UsageError("data.data_path is required (the LLaVA-format JSON/JSONL training data)")
    check_input_file(config.data.data_path, "data.data_path", what="a data file (LLaVA JSON or JSONL)")
    if config.data.image_folder:
        check_input_folder(config.data.image_folder, "data.image_folder", what="an image folder")
    model = config.model
    _check_model_source("model.name_or_path", model.name_or_path, hub_ok=False)
    _check_model_source("model.vision_name_or_path", model.vision_name_or_path, hub_ok=True)
    _check_model_source("model.llm_name_or_path", model.llm_name_or_path, hub_ok=True)
    if model.pretrained_projector and not Path(model.pretrained_projector).expanduser().exists():
        raise UsageError(f"model.pretrained_projector {model.pretrained_projector}: no such file or folder")
    if config.train.deepspeed:
        check_input_file(config.train.deepspeed, "train.deepspeed", what="a DeepSpeed JSON config")


def run(args: argparse.Namespace) -> int:
    from deco_models.train.config import TrainConfig, parse_overrides

    with user_errors(ValueError):
        overrides = parse_overrides(list(args.overrides or []))
    if args.deepspeed:
        overrides["train.deepspeed"] = args.deepspeed
    if args.recipe:
        if args.config:
            raise UsageError("give --config or --recipe, not both")
        from deco_models.train.recipes import get_recipe

        with user_errors(ValueError):
            recipe = get_recipe(args.recipe)
        _check_recipe_options(recipe, overrides)
        result = recipe(overrides, args.resume_from or args.resume)
        if result is not None:
            print(result)
        return 0
    if not args.config:
        raise UsageError("--config CONFIG.yaml (or --recipe NAME) is required")
    check_input_file(args.config, "--config", what="a YAML config file")
    with user_errors(ValueError, FileNotFoundError):
        config = TrainConfig.from_yaml(args.config).with_overrides(overrides)
    if args.print_config:
        import yaml

        sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    _check_config(config)
    if args.resume_from:
        check_input_folder(args.resume_from, "--resume-from", what="a checkpoint folder")
    from deco_models.loading import CheckpointError
    from deco_models.train.trainer import build_model, summarize, train

    # Building the model reads the user's checkpoints (or reaches the hub): what fails there is theirs to fix.
    with user_errors(OSError, CheckpointError):
        model, processor = build_model(config)
    result = train(config, model=model, processor=processor, resume=args.resume_from or args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summarize(result))
    return 0
