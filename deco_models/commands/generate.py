"""``deco generate``: answer a question about an image with any checkpoint ``deco_models.load`` understands.

Examples::

    deco generate --model out/deco-avgpool --image cat.jpg --prompt "What is in the picture?"
    deco generate --model shapes-mini-avgpool2_36 --image shapes.png --prompt "" --template plain
    deco generate --model llava-lora --base vicuna-7b-v1.5 --image cat.jpg --prompt "Describe it." --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate an answer for an image and a prompt",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="checkpoint folder/file or zoo name")
    parser.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True, help="the question; wrapped in the chat template")
    parser.add_argument("--base", default=None, help="base LLM folder for LoRA / stage-1 checkpoints")
    parser.add_argument("--template", default=None, choices=("plain", "vicuna_v1"), help="override the chat template")
    parser.add_argument("--raw", action="store_true", help="use --prompt verbatim (it must hold <image> if --image)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda if available)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the bare answer")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from deco_models.loading import load

    if args.max_new_tokens < 1:
        raise SystemExit("deco generate: --max-new-tokens must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load(
        args.model,
        base=args.base,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        device=device,
        chat_template=args.template,
    )
    if processor is None:
        raise SystemExit(f"deco generate: {args.model} has no tokenizer/processor files")
    if args.raw:
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
