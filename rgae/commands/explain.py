"""``rgae explain``: explain one image + text with one method and write the Explanation (and optionally figures).

Example:

    rgae explain --model shapes-mini-avgpool2_36 --image cat.jpg --text "A pot of green plants" \\
        --method rgae --out out/rgae --visualize --vis-save-path out/figs --html out/rgae.html
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rgae.cli_base import (
    HelpFormatter,
    UsageError,
    check_device,
    check_image,
    check_output_file,
    check_output_folder,
    help_text,
    user_errors,
)

METHODS = {
    "rgae": "RGAE",
    "rawattn": "RawAttention",
    "rollout": "AttentionRollout",
    "gradcam": "GradCAM",
    "occlusion": "Occlusion",
}
DTYPES = {"float32": "float32", "float64": "float64", "bfloat16": "bfloat16", "float16": "float16"}
MODEL_TYPES = ("deco", "llava")  # config.json model_type of the folders load_model reads


def _zoo_names() -> list[str]:
    try:
        from deco_models import zoo
    except ImportError:  # zoo not shipped in this install
        return []
    return zoo.available()


def model_source(path: str) -> str:
    """What ``--model`` names: ``"zoo"`` or the ``model_type`` of its folder (``deco``/``llava``); checked without
    loading anything. :class:`~rgae.cli_base.UsageError` listing the zoo and what a folder must contain otherwise."""
    zoo_names = _zoo_names()
    if path in zoo_names:
        return "zoo"
    folder = Path(path).expanduser()
    listing = f"zoo models: {', '.join(zoo_names)}" if zoo_names else "no zoo models are installed"
    needs = "a model folder must contain config.json (model_type 'deco' or 'llava'), the weights and processor files"
    if not folder.exists():
        raise UsageError(f"--model {path}: neither a zoo model name nor an existing folder ({listing}; {needs})")
    config_file = folder / "config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise UsageError(f"--model {path}: no config.json there ({listing}; {needs})")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise UsageError(f"--model {path}: config.json is not a JSON object ({exc})") from None
    if model_type not in MODEL_TYPES:
        raise UsageError(f"--model {path}: unsupported model_type {model_type!r} in config.json (expected 'deco' or "
                         f"'llava'; for other LLaVA layouts convert them first with deco convert)")
    return model_type


def load_model(path: str, dtype: str = "float32", device: str | None = None):
    """``(model, processor)`` from a zoo name, a saved deco model folder or a saved llava-hf folder."""
    import torch

    from rgae.verbosity import quiet_loading

    source = model_source(path)
    with quiet_loading():
        if source == "zoo":
            from deco_models import zoo

            model, processor = zoo.load(path)
        elif source == "deco":
            from deco_models.modeling import DecoForConditionalGeneration
            from deco_models.processing import DecoProcessor

            model = DecoForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
            processor = DecoProcessor.from_pretrained(str(path))
        else:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=getattr(torch, dtype))
            processor = AutoProcessor.from_pretrained(str(path))
    return _place(model, dtype, device), processor


def _place(model, dtype, device):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device=device, dtype=getattr(torch, dtype)).eval()


def parse_layer(text: str | None) -> int | str | None:
    """``--layer``: an LLM layer index (negative counts from the end) or ``"mean"``."""
    if text is None or text == "mean":
        return text
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--layer must be an integer or 'mean', got {text!r}") from None


def check_arguments(args: argparse.Namespace) -> dict:
    """Every cheap check, before the model is loaded; returns the method's options."""
    model_source(args.model)
    check_image(args.image)
    check_output_folder(args.out, "--out")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text is empty: give the text to explain, or leave --text out to explain the model's "
                         "own answer")
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("--prompt is empty: give an instruction, or leave --prompt out for the default one")
    options = method_options(args)
    if args.vis_save_path is not None:
        check_output_folder(args.vis_save_path, "--vis-save-path")
    if args.html is not None:
        check_output_file(args.html, "--html")
    args.device = check_device(args.device)
    if args.method in ("rgae", "occlusion"):
        options["progress"] = True
    return options


def method_options(args: argparse.Namespace) -> dict:
    """The ``attribute(**options)`` that ``--max-new-tokens``, ``--through-vision`` and ``--layer`` give
    ``--method`` (no progress bars); :class:`~rgae.cli_base.UsageError` for an option of another method."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    layer = parse_layer(args.layer)
    if layer is not None and args.method != "rawattn":
        raise UsageError(f"--layer is an option of --method rawattn, not of {args.method}")
    if args.through_vision and args.method != "rgae":
        raise UsageError(f"--through-vision is an option of --method rgae, not of {args.method}")
    options: dict = {"max_new_tokens": args.max_new_tokens}
    if args.method == "rgae":
        options["through_vision"] = args.through_vision
    if layer is not None:
        options["layer"] = layer
    return options


def check_layer(model, layer) -> None:
    """An integer ``--layer`` is one of the model's LLM layers (checked once the model is loaded)."""
    if isinstance(layer, int):
        n_layers = model.config.get_text_config().num_hidden_layers
        if not -n_layers <= layer < n_layers:
            raise UsageError(f"--layer {layer}: the model's LLM has {n_layers} layers "
                             f"(use -{n_layers}..{n_layers - 1} or 'mean')")


def run(args: argparse.Namespace) -> int:
    import rgae.methods as methods
    from rgae.methods.base import InputError

    options = check_arguments(args)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device)
    check_layer(model, options.get("layer"))
    cls = getattr(methods, METHODS[args.method])
    explainer = cls(model, processor, model_name=args.model)
    with user_errors(InputError):  # e.g. a text longer than the model's context: only the tokenizer can tell
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
        "answer (when --text is omitted), and save the Explanation (safetensors + JSON).\n\n"
        + help_text(__doc__).split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True, help="zoo name (deco zoo list) or a saved deco / llava-hf model folder")
    p.add_argument("--image", required=True, help="image file (any format Pillow reads)")
    p.add_argument("--text", default=None,
                   help="target text to explain, teacher-forced (default: the model's own greedy answer)")
    p.add_argument("--method", choices=sorted(METHODS), default="rgae",
                   help="rgae (R-GAE) or a baseline: raw attention, attention rollout, GradCAM, occlusion")
    p.add_argument("--out", required=True, help="output folder of the Explanation (created if missing)")
    p.add_argument("--prompt", default=None,
                   help="instruction (wrapped in the chat template) or a full prompt holding <image> "
                        "(default: 'Describe the image in one sentence.')")
    p.add_argument("--through-vision", action="store_true",
                   help="rgae: also propagate through the vision encoder (Query-to-Patch through the ViT)")
    p.add_argument("--layer", default=None,
                   help="rawattn: LLM layer index (negative from the end) or 'mean' over layers (default: last)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit when --text is omitted")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype of the model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--visualize", action="store_true", help="also write the figure set (rgae.viz.save_figures)")
    p.add_argument("--vis-save-path", default=None, help="figure folder (default: OUT/figures)")
    p.add_argument("--html", default=None, metavar="PATH", help="also write the interactive explorer page (one file)")
    p.set_defaults(func=run)
    return p
