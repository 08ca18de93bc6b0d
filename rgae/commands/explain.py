"""``rgae explain``: explain one image + text with one method and write the Explanation (and optionally figures).

Example:
    rgae explain --model shapes-mini-avgpool2_36 --image cat.jpg --text "A pot of green plants" \\
        --method rgae --out out/rgae --visualize --vis-save-path out/figs --html out/rgae.html
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METHODS = {
    "rgae": "RGAE",
    "rawattn": "RawAttention",
    "rollout": "AttentionRollout",
    "gradcam": "GradCAM",
    "occlusion": "Occlusion",
}
DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16"}


def load_model(path: str, dtype: str = "float32", device: str | None = None):
    """``(model, processor)`` from a zoo name, a saved deco model folder or a saved llava-hf folder."""
    import torch

    try:
        from deco_models import zoo

        if zoo.is_zoo_name(path):
            model, processor = zoo.load(path)
            return _place(model, dtype, device), processor
    except ImportError:  # zoo not shipped in this install
        pass
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {path!r} is neither a zoo model name nor a folder with a config.json")
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type == "deco":
        from deco_models.modeling import DecoForConditionalGeneration
        from deco_models.processing import DecoProcessor

        model = DecoForConditionalGeneration.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        processor = DecoProcessor.from_pretrained(str(folder))
    elif model_type == "llava":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        processor = AutoProcessor.from_pretrained(str(folder))
    else:
        raise ValueError(f"--model {path!r}: unsupported model_type {model_type!r} (expected 'deco' or 'llava')")
    return _place(model, dtype, device), processor


def _place(model, dtype, device):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def run(args: argparse.Namespace) -> int:
    import rgae.methods as methods

    if args.html and Path(args.html).is_dir():  # before the model runs, not after
        raise ValueError(f"--html {args.html} is a folder; give the path of the .html file to write")
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
    cls = getattr(methods, METHODS[args.method])
    options: dict = {"max_new_tokens": args.max_new_tokens}
    if args.method == "rgae":
        options["through_vision"] = args.through_vision
        options["progress"] = True
    if args.method == "rawattn" and args.layer is not None:
        options["layer"] = args.layer if args.layer == "mean" else int(args.layer)
    if args.method == "occlusion":
        options["progress"] = True
    explainer = cls(model, processor, model_name=args.model)
    explanation = explainer.attribute(args.image, target=args.text, prompt=args.prompt, **options)
    out = explanation.save(args.out)
    print(f"{explanation!r}\nwritten to {out}")
    if args.visualize:
        from rgae.viz import save_figures

        vis_dir = Path(args.vis_save_path or Path(args.out) / "figures")
        written = save_figures(explanation, vis_dir)
        print(f"{len(written)} figures written to {vis_dir}")
    if args.html:
        from rgae.viz import explore

        print(f"interactive page written to {explore(explanation).save(args.html)}")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain",
        help="explain one image + text (R-GAE or a baseline) and save the relevance maps",
        description="Explain which image patches a LLaVA-style model uses for a text (teacher-forced) or for its own "
        "answer (when --text is omitted), and save the Explanation (safetensors + JSON).",
    )
    p.add_argument("--model", required=True, help="zoo name (deco zoo) or a saved deco / llava-hf model folder")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--text", default=None, help="target text to explain; omitted: the model's greedy answer")
    p.add_argument("--method", choices=sorted(METHODS), default="rgae")
    p.add_argument("--out", required=True, help="output folder of the Explanation")
    p.add_argument("--prompt", default=None, help="instruction (wrapped in the chat template) or a full prompt")
    p.add_argument("--through-vision", action="store_true", help="R-GAE: also propagate through the vision encoder")
    p.add_argument("--layer", default=None, help="rawattn: LLM layer index or 'mean' (default: last)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="when --text is omitted")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--visualize", action="store_true", help="also write the figure set (rgae.viz.save_figures)")
    p.add_argument("--vis-save-path", default=None, help="figure folder (default: OUT/figures)")
    p.add_argument("--html", default=None, metavar="PATH", help="also write the interactive explorer page (one file)")
    p.set_defaults(func=_main)
    return p


def _main(args) -> int:
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"rgae explain: error: {exc}", file=sys.stderr)
        return 2
