"""``rgae demo``: the main job. Explains a bundled shapes scene and a real photo (``skimage.data``) with every shipped
model and every method, writes figures and a summary, and prints where.

Output (``--out``, default ``./rgae-demo``)::

    summary.md, summary.json          per model / image / method: target, top words, pointing game, timing,
                                      and the projector diagnostics of R-GAE's Query-to-Patch map
    comparison-<image>-<model>.png    methods × words grid, one per image and model
    projectors-<image>.png            models × words grid of R-GAE, one per image (with two or more models)
    <model>/<image>/                  R-GAE's sentence map and decomposition (rgae.viz.save_figures names);
                                      with --full-figures, every method's full figure set with per-word files

Example:
    rgae demo                         # every model of deco_models.zoo.available()
    rgae demo --tiny --out /tmp/demo  # tiny random models: checks the pipeline, the maps mean nothing
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

METHODS = {"rgae": "RGAE", "rawattn": "RawAttention", "rollout": "AttentionRollout", "gradcam": "GradCAM",
           "occlusion": "Occlusion"}
DEFAULT_METHODS = ("rgae", "rawattn", "rollout", "gradcam")  # occlusion: one forward per patch, over the budget
SCENE_SEED = 2  # three objects, every color, shape and size word unique: each has one ground-truth box
PROMPT = "Describe the image."
TINY_PROJECTORS = ("mlp2x_gelu", "avgpool2_36")
NO_MODELS_MESSAGE = (
    "rgae demo: no shapes-mini models are installed (deco_models.zoo.available() is empty).\n"
    "Train and install them with:\n"
    "    deco train --recipe shapes-mini        # about 30 minutes on 2 CPU cores\n"
    "or check the pipeline on tiny random models (their maps mean nothing):\n"
    "    rgae demo --tiny"
)


# ----------------------------------------------------------------------------------------------- models, images


def tiny_random_model(projector: str = "mlp2x_gelu", seed: int = 0):
    """A randomly initialised shapes-world model ``(model, processor)``: the real classes and the shapes tokenizer at
    96 px / 8-px patches, with a 2-layer, 32-wide vision tower and LLM. For smoke tests and demos without a zoo;
    its maps are meaningless.

    Example:
        >>> model, processor = tiny_random_model("avgpool2_36")
        >>> model.config.num_image_tokens
        36
    """
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig

    from deco_models.configuration import DecoConfig
    from deco_models.data import shapes
    from deco_models.modeling import DecoForConditionalGeneration
    from deco_models.processing import DecoProcessor
    from deco_models.recipes.shapes_mini import build_tokenizer, image_processor

    tokenizer = build_tokenizer()
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision = CLIPVisionConfig(**small, image_size=shapes.IMAGE_SIZE, patch_size=shapes.PATCH_SIZE, projection_dim=32)
    text = LlamaConfig(**small, num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = DecoConfig(vision_config=vision, text_config=text, projector_type=projector,
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        pad_token_id=tokenizer.pad_token_id)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"  # the explainers need attention probabilities
    torch.manual_seed(seed)
    model = DecoForConditionalGeneration(config).eval()
    processor = DecoProcessor(image_processor(), tokenizer, num_image_tokens=config.num_image_tokens,
                              image_aspect="pad", chat_template="vicuna_v1")
    return model, processor


def load_model(name: str):
    """``(model, processor)`` of a zoo model (``deco_models.load``, or the zoo's own loader) or ``tiny-<projector>``."""
    if name.startswith("tiny-"):
        return tiny_random_model(name.removeprefix("tiny-"))
    try:
        import deco_models

        return deco_models.load(name)
    except (ModuleNotFoundError, AttributeError):  # deco_models.load not available in this install
        from deco_models import zoo

        return zoo.load(name)


def demo_scene():
    """The bundled shapes scene: ``deco_models.data.shapes.generate_scene(SCENE_SEED, n_objects=3)``."""
    from deco_models.data.shapes import generate_scene

    return generate_scene(SCENE_SEED, n_objects=3)


def demo_photo(side: int = 192) -> np.ndarray:
    """``skimage.data.chelsea()`` (a real photo that ships with scikit-image) shrunk to ``side`` px wide."""
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.chelsea())
    h = round(photo.height * side / photo.width)
    return np.asarray(photo.resize((side, h), Image.Resampling.BICUBIC))


def unique_word_boxes(explanation, scene) -> list[tuple[int, str, list[int]]]:
    """``(word index, word, box)`` for the color/shape words of a caption whose object is the only one with that
    attribute in ``scene``. A word belongs to the object whose shape word comes next ("a small red circle")."""
    from deco_models.data.shapes import COLORS, SHAPES

    out = []
    words = explanation.words
    shape_seen = 0
    for i, w in enumerate(words):
        if w in COLORS or w in SHAPES:
            k = shape_seen
            if k < len(scene.objects):
                attr = "color" if w in COLORS else "shape"
                obj = scene.objects[k]
                if getattr(obj, attr) == w and sum(getattr(o, attr) == w for o in scene.objects) == 1:
                    out.append((i, w, list(obj.box)))
        if w in SHAPES:
            shape_seen += 1
    return out


def top_words(explanation, k: int = 3) -> list[str]:
    """The ``k`` words whose maps hold the most positive relevance (how much each word drew on the image)."""
    mass = [float(explanation.word_text_to_patch(i).clamp(min=0).sum()) for i in range(len(explanation.words))]
    order = sorted(range(len(mass)), key=lambda i: -mass[i])
    return [explanation.words[i] for i in order[:k]]


# ---------------------------------------------------------------------------------------------------------- run


def _slug(text: str) -> str:
    from rgae.viz import slugify

    return slugify(text, max_bytes=48)


def run_demo(out: str | Path, models: list[str] | None = None, methods=DEFAULT_METHODS, tiny: bool = False,
             full_figures: bool = False, formats=("png",), progress: bool = True, dpi: int = 100) -> dict:
    """Run the demo and return the summary (also written to ``out/summary.json`` and ``out/summary.md``).

    Example:
        >>> summary = run_demo("/tmp/rgae-demo", tiny=True, progress=False)  # doctest: +SKIP
        >>> sorted(summary["models"])  # doctest: +SKIP
        ['tiny-avgpool2_36', 'tiny-mlp2x_gelu']
    """
    from tqdm.auto import tqdm

    import rgae.methods as rgae_methods
    from deco_models.data.shapes import caption
    from rgae import viz
    from rgae.metrics import projector_diagnostics, word_pointing_game, word_random_baseline

    start = time.perf_counter()
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected any of {sorted(METHODS)}")
    if models is None:
        if tiny:
            models = [f"tiny-{p}" for p in TINY_PROJECTORS]
        else:
            from deco_models import zoo

            models = zoo.available()
    if not models:
        raise LookupError(NO_MODELS_MESSAGE)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene = demo_scene()
    # The scene's caption is teacher-forced (its words have ground-truth boxes); the photo gets the model's answer.
    images = {"shapes": (scene.image, caption(scene)), "photo": (demo_photo(), None)}
    summary: dict = {"out": str(out.resolve()), "prompt": PROMPT, "scene_seed": SCENE_SEED,
                     "scene_caption": caption(scene), "methods": list(methods), "models": {}, "figures": 0}
    rgae_by_image: dict[str, dict[str, object]] = {name: {} for name in images}
    n_figures = 0
    for model_name in tqdm(models, desc="models", disable=not progress):
        t0 = time.perf_counter()
        model, processor = load_model(model_name)
        entry: dict = {"load_s": round(time.perf_counter() - t0, 3), "images": {}}
        summary["models"][model_name] = entry
        jobs = [(img, m) for img in images for m in methods]
        expls: dict[str, dict[str, object]] = {img: {} for img in images}
        photo_target = None
        for image_name, method in tqdm(jobs, desc=f"explain {model_name}", disable=not progress, leave=False):
            image, target = images[image_name]
            if image_name == "photo":
                target = photo_target
            explainer = getattr(rgae_methods, METHODS[method])(model, processor, model_name=model_name)
            t1 = time.perf_counter()
            try:
                expl = explainer.attribute(image, target=target, prompt=PROMPT, max_new_tokens=12)
            except ValueError:
                if target is not None:
                    raise
                # A model that answers nothing (a tiny random one ends at once): explain the scene's caption words.
                expl = explainer.attribute(image, target="a yellow circle", prompt=PROMPT)
            seconds = time.perf_counter() - t1
            if image_name == "photo" and photo_target is None:
                photo_target = expl.target_text  # every method explains the same answer
            expls[image_name][method] = expl
            record = {"target": expl.target_text, "top_words": top_words(expl), "seconds": round(seconds, 4),
                      "mean_token_prob": round(float(expl.token_probs.mean()), 4)
                      if expl.token_probs is not None else None}
            if method == "rgae" and expl.query_to_patch is not None:
                diag = projector_diagnostics(expl)
                record["projector"] = {k: round(diag[k], 4) for k in ("entropy", "locality", "redundancy")}
            if image_name == "shapes":
                pairs = unique_word_boxes(expl, scene)
                hits = [word_pointing_game(expl, i, box, original_hw=scene.image.shape[:2]) for i, _, box in pairs]
                record["pointing"] = {w: bool(h) for (_, w, _), h in zip(pairs, hits)}
                record["pointing_hits"] = int(sum(hits))
                record["pointing_total"] = len(hits)
                if pairs:
                    entry.setdefault("random_pointing", round(float(np.mean([
                        word_random_baseline(expl, b) for _, _, b in pairs])), 4))
            entry["images"].setdefault(image_name, {})[method] = record

        # Figures: R-GAE's (or, with full_figures, every method's) figure set and a comparison grid per image.
        for image_name, by_method in tqdm(expls.items(), desc=f"figures {model_name}", disable=not progress,
                                          leave=False):
            folder = out / _slug(model_name) / image_name
            for method, expl in by_method.items():
                if full_figures:
                    n_figures += len(viz.save_figures(expl, folder, formats=formats, dpi=dpi, words=True))
                elif method == "rgae":
                    n_figures += _save_quick_figures(expl, folder, formats, dpi)
            first = next(iter(by_method.values()))
            columns = _comparison_words(first, scene if image_name == "shapes" else None)
            fig = viz.plot_comparison(list(by_method.values()), rows="method", words=columns)
            for fmt in formats:
                viz.save_figure(fig, out / f"comparison-{image_name}-{_slug(model_name)}.{fmt}", fmt=fmt, dpi=dpi)
                n_figures += 1
            if "rgae" in by_method:
                rgae_by_image[image_name][model_name] = by_method["rgae"]
        entry["total_s"] = round(time.perf_counter() - t0, 3)
        del model

    if len(models) > 1:
        for image_name, by_model in rgae_by_image.items():
            if len(by_model) < 2:
                continue
            first = next(iter(by_model.values()))
            columns = _comparison_words(first, scene if image_name == "shapes" else None)
            # Row labels: the projector spec (what differs between the models), short enough for the margin.
            fig = viz.plot_comparison({name.removeprefix("shapes-mini-"): e for name, e in by_model.items()},
                                      words=columns)
            for fmt in formats:
                viz.save_figure(fig, out / f"projectors-{image_name}.{fmt}", fmt=fmt, dpi=dpi)
                n_figures += 1
    summary["figures"] = n_figures
    summary["total_s"] = round(time.perf_counter() - start, 2)
    _write_summary(out, summary)
    return summary


QUICK_FIGURES = (("R_t_i", ""), ("decomposition", ""))


def _save_quick_figures(expl, folder: Path, formats, dpi: int) -> int:
    """The default figure subset (the budget allows it): the sentence map and the three-panel decomposition."""
    from rgae import viz

    written = 0
    for prefix, suffix, make in viz.figure_specs(expl, words=False):
        if (prefix, suffix) not in QUICK_FIGURES:
            continue
        fig = make()
        for fmt in formats:
            name = viz.figure_filename(prefix, expl.method, expl.target_text, expl.projector_type, suffix=suffix,
                                       ext=fmt)
            viz.save_figure(fig, folder / name, fmt=fmt, dpi=dpi)
            written += 1
    return written


def _comparison_words(expl, scene) -> list:
    """The comparison grid's columns: the sentence map, then the ground-truth words (shapes scene) or the words
    that drew most on the image (photo); at most five words."""
    if scene is not None:
        words: list = [i for i, _, _ in unique_word_boxes(expl, scene)][:5]
    else:
        top = top_words(expl, 3)
        words = [expl.words.index(w) for w in top]
    return [None, *words]


def _write_summary(out: Path, summary: dict) -> None:
    from deco_models.io import atomic_write

    lines = [
        "# rgae demo", "",
        f"Prompt: `{summary['prompt']}`. Shapes scene (seed {summary['scene_seed']}), teacher-forced caption: "
        f"*{summary['scene_caption']}*. Photo: `skimage.data.chelsea()`, the model's own answer.", "",
        "Pointing game: the top patch of a color/shape word's map falls in that object's box (words whose object is "
        "unique in the scene). Top words: the words whose maps hold the most positive relevance.", "",
        "| model | method | shapes: pointing | shapes: top words | photo: answer | photo: top words | time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model_name, entry in summary["models"].items():
        imgs = entry["images"]
        for method in summary["methods"]:
            s = imgs.get("shapes", {}).get(method, {})
            p = imgs.get("photo", {}).get(method, {})
            seconds = s.get("seconds", 0) + p.get("seconds", 0)
            lines.append(f"| {model_name} | {method} | {s.get('pointing_hits', 0)}/{s.get('pointing_total', 0)} | "
                         f"{', '.join(s.get('top_words', []))} | {p.get('target', '')} | "
                         f"{', '.join(p.get('top_words', []))} | {seconds:.3f} |")
        if "random_pointing" in entry:
            lines.append(f"| {model_name} | random | {entry['random_pointing']:.2f} expected | | | | |")
    diag_lines = []
    for model_name, entry in summary["models"].items():
        proj = entry["images"].get("shapes", {}).get("rgae", {}).get("projector")
        if proj:
            diag_lines.append(f"| {model_name} | {proj['entropy']:.3f} | {proj['locality']:.3f} | "
                              f"{proj['redundancy']:.3f} |")
    if diag_lines:
        lines += ["", "Projector diagnostics of R-GAE's Query-to-Patch map (shapes scene): normalized spatial entropy "
                  "(0 = one patch per query), mass in the best stride-sized window, mean cosine similarity between "
                  "queries.", "", "| model | entropy | locality | redundancy |", "|---|---|---|---|", *diag_lines]
    lines += ["", f"{summary['figures']} figure files; total {summary['total_s']:.1f} s.", ""]
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    atomic_write(out / "summary.md", lambda p: Path(p).write_text("\n".join(lines)))


# ---------------------------------------------------------------------------------------------------------- CLI


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo", help="explain a shapes scene and a photo with every shipped model and method",
        description="Explain a bundled shapes scene and a real photo with every shipped model "
                    "(deco_models.zoo.available()) and every method; write figures and summary.md/summary.json.")
    parser.add_argument("--out", default="./rgae-demo", help="output folder (default: ./rgae-demo)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="zoo model names (default: every installed model; tiny-<projector> for a random one)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS),
                        help=f"methods (default: {' '.join(DEFAULT_METHODS)}; occlusion is slow)")
    parser.add_argument("--tiny", action="store_true",
                        help="use tiny random models when no --models are given (checks the pipeline only)")
    parser.add_argument("--full-figures", action="store_true",
                        help="write every method's full figure set, per-word files included (slow; default: R-GAE's "
                             "sentence map and decomposition, and the comparison grids)")
    parser.add_argument("--formats", nargs="+", default=["png"], choices=["png", "pdf", "svg"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        summary = run_demo(args.out, models=args.models, methods=args.methods, tiny=args.tiny,
                           full_figures=args.full_figures, formats=tuple(args.formats), progress=not args.no_progress)
    except LookupError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    out = Path(summary["out"])
    print(f"rgae demo: {len(summary['models'])} model(s) x {len(summary['methods'])} method(s), "
          f"{summary['figures']} figure files in {summary['total_s']:.1f} s")
    print(f"Wrote {out}/summary.md, {out}/summary.json and the figures under {out}/")
    return 0
