"""``deco convert``: turn a published checkpoint (original LLaVA-1.5 / DeCo, stage-1 ``mm_projector.bin``, LLaVA LoRA,
llava-hf) into a deco folder (``model.safetensors`` + ``config.json`` with model_type ``deco`` + processor files).

Examples::

    deco convert llava-v1.5-7b out/llava-v1.5-7b-deco --vision-tower clip-vit-large-patch14-336
    deco convert llava-v1.5-7b-avgpool2_144-lora out/deco-avgpool --base vicuna-7b-v1.5 --dtype float16
    deco convert pretrain/mm_projector.bin out/stage1 --base vicuna-7b-v1.5 --projector avgpool2_144 \
        --vision-tower clip-vit-large-patch14-336
    deco convert llava-1.5-7b-hf out/llava-hf-deco --detect-only
"""

from __future__ import annotations

import json
from pathlib import Path

from rgae.cli_base import HelpFormatter, UsageError, check_input_folder, check_output_folder, help_text, user_errors

DTYPES = ("float32", "float16", "bfloat16")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert LLaVA / DeCo / llava-hf checkpoints into a deco folder",
        description=help_text(__doc__),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", help="checkpoint folder or file (layout detected from its files)")
    parser.add_argument("dst", nargs="?", help="new output folder (must not exist or be empty)")
    parser.add_argument("--base", default=None, help="base LLM folder (LoRA and stage-1 mm_projector checkpoints)")
    parser.add_argument("--vision-tower", default=None, help="local vision model folder overriding mm_vision_tower")
    parser.add_argument("--projector", default=None, help="spec of a bare mm_projector.bin, e.g. avgpool2_144")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--image-aspect", default=None, choices=("pad", "square"),
                        help="processor image handling: pad to square (LLaVA-1.5) or stretch (default: as saved)")
    parser.add_argument("--template", default=None, choices=("plain", "vicuna_v1"),
                        help="processor chat template (default: as saved, else vicuna_v1)")
    parser.add_argument("--detect-only", action="store_true", help="print the detected layout and exit")
    parser.set_defaults(func=run)


def _check_arguments(args) -> None:
    """The cheap checks, before the source checkpoint is read."""
    from deco_models.cli_base import check_model

    check_model(args.src, "src")
    for option, value in (("--base", args.base), ("--vision-tower", args.vision_tower)):
        if value is not None:
            check_input_folder(value, option, what="a model folder")
    if args.detect_only:
        return
    if not args.dst:
        raise UsageError("dst is required unless --detect-only is given")
    dst = check_output_folder(args.dst, "dst")
    if dst.is_dir() and any(dst.iterdir()):
        raise UsageError(f"dst {args.dst} exists and is not empty; choose a new folder")


def run(args) -> int:
    _check_arguments(args)
    import torch

    from deco_models.convert import convert_llava_checkpoint
    from deco_models.loading import CheckpointError, detect_layout

    layout = detect_layout(args.src)
    if args.detect_only:
        print(json.dumps({"src": args.src, "layout": layout}))
        return 0
    with user_errors(CheckpointError):
        dst = convert_llava_checkpoint(
            args.src,
            Path(args.dst),
            base=args.base,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            vision_tower=args.vision_tower,
            projector_type=args.projector,
            image_aspect=args.image_aspect,
            chat_template=args.template,
        )
    print(json.dumps({"src": args.src, "layout": layout, "dst": str(dst)}))
    return 0
