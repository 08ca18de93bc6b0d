"""``rgae demo``: the main job. Explains a bundled shapes scene with every shipped model and the four fast methods
(R-GAE, raw attention, attention rollout, GradCAM; occlusion on request), writes figures and a summary, and prints
where. With ``--photo`` it also explains a real photo (``skimage.data.chelsea``): the shipped models were trained on
the shapes world only and know nothing about photos, so their answers and maps there are not meaningful; the summary
and every photo figure say so.

Output (``--out``, default ``./rgae-demo``)::

    index.html                        the whole comparison in one interactive page (rgae.viz.explore_sections)
    summary.md, summary.json          per model / image / method: target, top words, pointing-game hit rate,
                                      timing, and the projector diagnostics of R-GAE's Query-to-Patch map
    comparison-<image>-<model>.png    methods × words grid, one per image and model
    projectors-<image>.png            models × words grid of R-GAE, one per image (with two or more models)
    <model>/<image>/                  R-GAE's sentence map and decomposition (rgae.viz.save_figures names);
                                      with --full-figures, every method's full figure set with per-word files

Example:

    rgae demo                         # every model of deco_models.zoo.available()
    rgae demo --photo                 # and the out-of-domain photo
    rgae demo --tiny --out /tmp/demo  # tiny random models: checks the pipeline, the maps mean nothing
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rgae.cli_base import HelpFormatter, UsageError, check_output_folder, help_text

METHODS = {"rgae": "RGAE", "rawattn": "RawAttention", "rollout": "AttentionRollout", "gradcam": "GradCAM",
           "occlusion": "Occlusion"}
DEFAULT_METHODS = ("rgae", "rawattn", "rollout", "gradcam")  # occlusion: one forward per patch, over the budget
SCENE_SEED = 2  # three objects, every color, shape and size word unique: each has one ground-truth box
PROMPT = "Describe the image."
TINY_PROJECTORS = ("mlp2x_gelu", "avgpool2_36")
NO_MODELS_MESSAGE = (
    "no shapes-mini models are installed (deco_models.zoo.available() is empty): train and install them with "
    "'deco train --recipe shapes-mini' (about 30 minutes on 2 CPU cores), or check the pipeline on tiny random "
    "models (their maps mean nothing) with 'rgae demo --tiny'"
)
# Said in summary.md and in the title of every photo figure.
PHOTO_NOTE = ("out of domain: the shapes-world models know nothing about photos; "
              "this answer and its maps are not meaningful")


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
    """``(model, processor)`` of a zoo model (``deco_models.load``) or of ``tiny-<projector>``."""
    if name.startswith("tiny-"):
        return tiny_random_model(name.removeprefix("tiny-"))
    import deco_models

    return deco_models.load(name)


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


def known_model_names() -> list[str]:
    """The model names :func:`run_demo` accepts: the zoo's, and ``tiny-<projector>`` for the tiny random ones."""
    from deco_models import zoo

    return [*zoo.available(), *(f"tiny-{p}" for p in TINY_PROJECTORS)]


def _is_tiny_name(name: str) -> bool:
    from deco_models.data import shapes
    from deco_models.projectors import parse_projector_spec

    if not name.startswith("tiny-"):
        return False
    grid = shapes.IMAGE_SIZE // shapes.PATCH_SIZE
    try:
        parse_projector_spec(name.removeprefix("tiny-"), num_patches=grid * grid)
    except ValueError:
        return False
    return True


def check_models(models: list[str] | None, tiny: bool = False) -> list[str]:
    """The models to run (default: the whole zoo, or the tiny ones with ``tiny``); ``ValueError`` naming the unknown
    ones and the known ones, ``LookupError`` (with training instructions) when there is nothing to run."""
    if models is None:
        if tiny:
            return [f"tiny-{p}" for p in TINY_PROJECTORS]
        from deco_models import zoo

        models = zoo.available()
        if not models:
            raise LookupError(NO_MODELS_MESSAGE)
        return models
    unknown = [m for m in models if m not in known_model_names() and not _is_tiny_name(m)]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known_model_names())} "
                         "(tiny-<projector spec> for a tiny random model)")
    if not models:
        raise LookupError(NO_MODELS_MESSAGE)
    return list(models)


def run_demo(out: str | Path, models: list[str] | None = None, methods=DEFAULT_METHODS, tiny: bool = False,
             full_figures: bool = False, formats=("png",), progress: bool = True, dpi: int = 100,
             photo: bool = False) -> dict:
    """Run the demo and return the summary (also written to ``out/summary.json`` and ``out/summary.md``).

    ``photo=True`` adds ``skimage.data.chelsea()``, explained with each model's own answer; its records, the summary
    and its figures carry :data:`PHOTO_NOTE`. One progress bar runs over the whole job (none when ``progress`` is
    False or stderr is not a terminal, so logs get no escape codes).

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
    models = check_models(models, tiny)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scene = demo_scene()
    # The scene's caption is teacher-forced (its words have ground-truth boxes); the photo gets the model's answer.
    images = {"shapes": (scene.image, caption(scene))}
    if photo:
        images["photo"] = (demo_photo(), None)
    notes = {"photo": PHOTO_NOTE}
    summary: dict = {"out": str(out.resolve()), "prompt": PROMPT, "scene_seed": SCENE_SEED,
                     "scene_caption": caption(scene), "methods": list(methods), "images": list(images),
                     "models": {}, "figures": 0}
    if photo:
        summary["photo_note"] = PHOTO_NOTE
    rgae_by_image: dict[str, dict[str, object]] = {name: {} for name in images}
    explained: dict[str, dict] = {}  # model -> image -> method -> Explanation, for index.html
    n_figures = 0
    jobs = [(img, m) for img in images for m in methods]
    # One bar for the whole job: per model, its load, every explanation and the figures of each image.
    bar = tqdm(total=len(models) * (1 + len(jobs) + len(images)), desc="rgae demo", unit="step",
               disable=None if progress else True, dynamic_ncols=True)
    for model_name in models:
        bar.set_postfix_str(f"{model_name}: loading")
        t0 = time.perf_counter()
        model, processor = load_model(model_name)
        bar.update()
        entry: dict = {"load_s": round(time.perf_counter() - t0, 3), "images": {}}
        summary["models"][model_name] = entry
        expls: dict[str, dict[str, object]] = {img: {} for img in images}
        photo_target = None
        for image_name, method in jobs:
            bar.set_postfix_str(f"{model_name}: {method} on {image_name}")
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
            if image_name in notes:
                record["note"] = notes[image_name]
            if method == "rgae" and expl.query_to_patch is not None:
                diag = projector_diagnostics(expl)
                record["projector"] = {k: round(diag[k], 4) for k in ("entropy", "locality", "redundancy")}
            if image_name == "shapes":
                pairs = unique_word_boxes(expl, scene)
                hits = [word_pointing_game(expl, i, box, original_hw=scene.image.shape[:2]) for i, _, box in pairs]
                record["pointing"] = {w: bool(h) for (_, w, _), h in zip(pairs, hits)}
                record["pointing_hits"] = int(sum(hits))
                record["pointing_total"] = len(hits)
                record["pointing_rate"] = round(sum(hits) / len(hits), 4) if hits else None
                if pairs:
                    entry.setdefault("random_pointing", round(float(np.mean([
                        word_random_baseline(expl, b) for _, _, b in pairs])), 4))
            entry["images"].setdefault(image_name, {})[method] = record
            bar.update()

        # Figures: R-GAE's (or, with full_figures, every method's) figure set and a comparison grid per image.
        for image_name, by_method in expls.items():
            bar.set_postfix_str(f"{model_name}: figures of {image_name}")
            note = notes.get(image_name)
            folder = out / _slug(model_name) / image_name
            for method, expl in by_method.items():
                if full_figures:
                    n_figures += len(viz.save_figures(expl, folder, formats=formats, dpi=dpi, words=True,
                                                      note=note))
                elif method == "rgae":
                    n_figures += _save_quick_figures(expl, folder, formats, dpi, note=note)
            first = next(iter(by_method.values()))
            columns = _comparison_words(first, scene if image_name == "shapes" else None)
            fig = viz.plot_comparison(list(by_method.values()), rows="method", words=columns, note=note)
            for fmt in formats:
                viz.save_figure(fig, out / f"comparison-{image_name}-{_slug(model_name)}.{fmt}", fmt=fmt, dpi=dpi)
                n_figures += 1
            if "rgae" in by_method:
                rgae_by_image[image_name][model_name] = by_method["rgae"]
            bar.update()
        explained[model_name] = expls
        entry["total_s"] = round(time.perf_counter() - t0, 3)
        del model
    bar.close()

    if len(models) > 1:
        for image_name, by_model in rgae_by_image.items():
            if len(by_model) < 2:
                continue
            first = next(iter(by_model.values()))
            columns = _comparison_words(first, scene if image_name == "shapes" else None)
            # Row labels: the projector spec (what differs between the models), short enough for the margin.
            fig = viz.plot_comparison({name.removeprefix("shapes-mini-"): e for name, e in by_model.items()},
                                      words=columns, note=notes.get(image_name))
            for fmt in formats:
                viz.save_figure(fig, out / f"projectors-{image_name}.{fmt}", fmt=fmt, dpi=dpi)
                n_figures += 1
    _write_explorer(out, explained)
    summary["figures"] = n_figures
    summary["total_s"] = round(time.perf_counter() - start, 2)
    _write_summary(out, summary)
    return summary


def _write_explorer(out: Path, explained: dict) -> None:
    """``index.html``: the shapes scene with every model and method side by side (one caption, so one shared word
    selection), then, with ``--photo``, the photo per model (each model explains its own answer)."""
    from rgae import viz

    sections = {"Shapes scene, teacher-forced caption: every model and method": {
        f"{model.removeprefix('shapes-mini-')} · {method}": e
        for model, by_image in explained.items() for method, e in by_image["shapes"].items()}}
    for model, by_image in explained.items():
        if "photo" in by_image:
            sections[f"Photo (skimage chelsea), {model}'s own answer ({PHOTO_NOTE})"] = \
                by_image["photo"]
    viz.explore_sections(sections, title="rgae demo").save(out / "index.html")


QUICK_FIGURES = (("R_t_i", ""), ("decomposition", ""))


def _save_quick_figures(expl, folder: Path, formats, dpi: int, note: str | None = None) -> int:
    """The default figure subset (the budget allows it): the sentence map and the three-panel decomposition."""
    from rgae import viz

    written = 0
    for prefix, suffix, make in viz.figure_specs(expl, words=False, note=note):
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
    """The comparison grid's columns: the sentence map, then every word the summary scores (shapes scene: the
    color/shape words with a ground-truth box) or the three words that drew most on the image (photo)."""
    if scene is not None:
        words: list = [i for i, _, _ in unique_word_boxes(expl, scene)]
    else:
        top = top_words(expl, 3)
        words = [expl.words.index(w) for w in top]
    return [None, *words]


def _rate(record: dict) -> str:
    """A word-level pointing result as a rate with its count: ``0.67 (4/6)``."""
    total = record.get("pointing_total", 0)
    return f"{record.get('pointing_hits', 0) / total:.2f} ({record.get('pointing_hits', 0)}/{total})" if total else "-"


def _write_summary(out: Path, summary: dict) -> None:
    from rgae.io import atomic_write

    with_photo = "photo" in summary.get("images", ())
    head = (f"Prompt: `{summary['prompt']}`. Shapes scene (seed {summary['scene_seed']}), teacher-forced caption: "
            f"*{summary['scene_caption']}*.")
    if with_photo:
        head += " Photo: `skimage.data.chelsea()`, the model's own answer."
    lines = [
        "# rgae demo", "", head, "",
        "Pointing game: the top patch of a color/shape word's map falls in that object's box (words whose object is "
        "unique in the scene). Reported as a hit rate over those words (hits/words in brackets); the *random* row is "
        "the rate a uniformly random top patch would reach on the same words (the fraction of patches inside each "
        "box, averaged). Top words: the words whose maps hold the most positive relevance.", "",
    ]
    if with_photo:
        lines += [f"**The photo is {summary.get('photo_note', PHOTO_NOTE)}.** The shipped models were trained on "
                  "scenes of colored shapes only; the photo shows what the tool does on a real image, not what the "
                  "models see in it.", ""]
    columns = ["model", "method", "shapes: pointing rate", "shapes: top words"]
    if with_photo:
        columns += ["photo: answer (out of domain)", "photo: top words"]
    columns.append("time (s)")
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for model_name, entry in summary["models"].items():
        imgs = entry["images"]
        for method in summary["methods"]:
            s = imgs.get("shapes", {}).get(method, {})
            p = imgs.get("photo", {}).get(method, {})
            cells = [model_name, method, _rate(s), ", ".join(s.get("top_words", []))]
            if with_photo:
                cells += [p.get("target", ""), ", ".join(p.get("top_words", []))]
            cells.append(f"{s.get('seconds', 0) + p.get('seconds', 0):.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        if "random_pointing" in entry:
            cells = [model_name, "random", f"{entry['random_pointing']:.2f} (expected)", ""]
            lines.append("| " + " | ".join(cells + [""] * (len(columns) - len(cells))) + " |")
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
        "demo", help="explain a shapes scene with every shipped model and method",
        description=help_text(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("--out", default="./rgae-demo", help="output folder (created if missing)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="zoo model names (default: every installed model; tiny-<projector> for a random one)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS),
                        help="methods to run (occlusion is slow: one forward pass per patch)")
    parser.add_argument("--photo", action="store_true",
                        help="also explain a real photo (skimage.data.chelsea); out of domain for the shipped "
                             "shapes-world models, and labelled so")
    parser.add_argument("--tiny", action="store_true",
                        help="use tiny random models when no --models are given (checks the pipeline only)")
    parser.add_argument("--full-figures", action="store_true",
                        help="write every method's full figure set, per-word files included (slow; default: R-GAE's "
                             "sentence map and decomposition, and the comparison grids)")
    parser.add_argument("--formats", nargs="+", default=["png"], choices=["png", "pdf", "svg"],
                        help="figure file formats")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    check_output_folder(args.out, "--out")
    try:
        models = check_models(args.models, args.tiny)
    except (LookupError, ValueError) as exc:
        raise UsageError(f"--models: {exc}" if args.models else str(exc.args[0])) from None
    summary = run_demo(args.out, models=models, methods=args.methods, tiny=args.tiny, photo=args.photo,
                       full_figures=args.full_figures, formats=tuple(args.formats), progress=not args.no_progress)
    out = Path(summary["out"])
    print(f"rgae demo: {len(summary['models'])} model(s) x {len(summary['methods'])} method(s), "
          f"{summary['figures']} figure files in {summary['total_s']:.1f} s")
    print(f"Wrote {out}/index.html (interactive), {out}/summary.md, {out}/summary.json and the figures under {out}/")
    return 0
