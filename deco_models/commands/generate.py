"""``deco generate``: answer a question about an image with any checkpoint ``deco_models.load`` understands.

Examples::

    deco generate --model out/deco-avgpool --image cat.jpg --prompt "What is in the picture?"
    deco generate --model shapes-mini-avgpool2_36 --image shapes.png --prompt "" --template plain
    deco generate --model llava-lora --base vicuna-7b-v1.5 --image cat.jpg --prompt "Describe it." --max-new-tokens 64
"""

from __future__ import annotations

import json

from rgae.cli_base import (
    HelpFormatter,
    UsageError,
    check_device,
    check_image,
    check_input_folder,
    help_text,
    user_errors,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an answer for an image and a prompt",
        description=help_text(__doc__),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint folder/file or zoo name (deco zoo list)")
    parser.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question; wrapped in the chat template")
    parser.add_argument("--base", default=None, help="base LLM folder for LoRA / stage-1 checkpoints")
    parser.add_argument("--template", default=None, choices=("plain", "vicuna_v1"),
                        help="override the chat template (default: the processor's own)")
    parser.add_argument("--raw", action="store_true", help="use --prompt verbatim (it must hold <image> if --image)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="length limit of the answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="weight dtype (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the bare answer")
    parser.set_defaults(func=run)


def run(args) -> int:
    from deco_models.cli_base import check_model

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    check_model(args.model)
    if args.image is not None:
        check_image(args.image)
    if args.base is not None:
        check_input_folder(args.base, "--base", what="a model folder")
    device = check_device(args.device)

    import torch

    from deco_models.loading import CheckpointError, load

    with user_errors(CheckpointError):
        model, processor = load(
            args.model,
            base=args.base,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            device=device,
            chat_template=args.template,
        )
    if processor is None:
        raise UsageError(f"--model {args.model} has no tokenizer/processor files")
    if args.raw:
        image_token = getattr(processor, "image_token", "<image>")
        if args.image is not None and image_token not in args.prompt:
            raise UsageError(f"--raw --prompt must hold {image_token} when --image is given")
        text = args.prompt
    else:
        text = processor.render_prompt(args.prompt, image=args.image is not None)
    inputs = processor(text=text, images=args.image).to(device) if args.image else processor(text=text).to(device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, pad_token_id=processor.tokenizer.pad_token_id, **sampling
        )
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    answer = processor.decode(new_tokens, skip_special_tokens=True).strip()
    if args.json:
        print(json.dumps({"model": args.model, "prompt": text, "answer": answer}))
    else:
        print(answer)
    return 0
