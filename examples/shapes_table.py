"""The paper's Table 1 in miniature: task quality and explanation quality of each shipped shapes-mini model on a
held-out shapes set (scenes ``generate_scene((HELDOUT_SEED, i))``, never seen in training).

Columns, per projector model:

- **caption**: teacher-forced accuracy of the caption's color and shape words (argmax given the image and the
  caption so far) — the sanity gate of the quality targets;
- **VQA**: exact-match accuracy (``deco_models.eval.gqa_accuracy``) of greedy answers to attribute questions;
- **POPE F1**: yes/no probes with random, popular and adversarial negatives (``pope_metrics``);
- **Acc@0.5**: grounding, the answered box's IoU with the object's box ≥ 0.5 (``rec_accuracy``);
- **PG <method>**: pointing game (center of the top patch inside the object's box) of the color and shape words of
  the teacher-forced caption whose object is unique in the scene; **PG random** is the expected hit rate of a
  uniformly random patch on the same words;
- **Q2P locality / redundancy**: :func:`rgae.metrics.projector_diagnostics` of R-GAE's Query-to-Patch map, averaged
  over the scenes — the mass of each query in its best stride-sized window, and the mean cosine similarity between
  queries (the paper's "double abstraction": a Q-Former's queries are non-local and redundant).

Usage::

    python examples/shapes_table.py                      # every model in deco_models.zoo.available(), 100 scenes
    python examples/shapes_table.py --tiny --scenes 3    # smoke test on tiny random models

Prints a markdown table and writes it to ``--out`` (default ``shapes_table.md``) with the raw numbers beside it
(``.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

METHODS = {"rgae": "RGAE", "rawattn": "RawAttention", "rollout": "AttentionRollout", "gradcam": "GradCAM"}
PROMPT = "Describe the image."


def _question(turns: list[dict]) -> tuple[str, str]:
    return turns[0]["value"].replace("<image>\n", "").replace("<image>", "").strip(), turns[1]["value"]


def task_quality(model, processor, scenes, batch_size: int = 16, progress: bool = True) -> dict:
    """VQA exact match, POPE (F1 and the rest) and grounding Acc@0.5 from greedy answers."""
    from PIL import Image
    from tqdm.auto import tqdm

    from deco_models.data import shapes
    from deco_models.eval import gqa_accuracy, pope_metrics, rec_accuracy
    from deco_models.eval.generation import generate_batch

    items = []  # (task, prompt, image index, answer, extra)
    for k, scene in enumerate(scenes):
        # rng=None: the questions are drawn from the scene's own seed, as deco_models.data.shapes.write_dataset does.
        for sample in shapes.scene_tasks(scene, str(k), f"{k}.png", tasks=("vqa", "pope", "grounding")):
            question, answer = _question(sample["conversations"])
            items.append((sample["task"], processor.render_prompt(question), k, answer, sample))
    images = [Image.fromarray(s.image) for s in scenes]
    answers: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc="answers", disable=not progress, leave=False):
        chunk = items[start : start + batch_size]
        prompts, chunk_images = [p for _, p, _, _, _ in chunk], [images[k] for _, _, k, _, _ in chunk]
        answers += generate_batch(model, processor, prompts, chunk_images, max_new_tokens=24)
    by_task: dict[str, list[tuple[str, str, dict]]] = {"vqa": [], "pope": [], "grounding": []}
    for (task, _, k, gold, sample), pred in zip(items, answers):
        by_task[task].append((pred, gold, {"scene": k, **sample}))
    out: dict = {}
    vqa = by_task["vqa"]
    out["vqa"] = float(np.mean([gqa_accuracy(p, g) for p, g, _ in vqa])) if vqa else float("nan")
    out["vqa_n"] = len(vqa)
    pope = by_task["pope"]
    out["pope"] = pope_metrics([p for p, _, _ in pope], [g for _, g, _ in pope]) if pope else {}
    grounding = by_task["grounding"]
    if grounding:
        gt = [scenes[s["scene"]].objects[s["object"]].box_norm for _, _, s in grounding]
        out["grounding_acc50"] = rec_accuracy([p for p, _, _ in grounding], gt, iou=0.5)
    else:
        out["grounding_acc50"] = float("nan")
    out["grounding_n"] = len(grounding)
    out["examples"] = [{"task": t, "pred": a, "gold": g} for (t, _, _, g, _), a in list(zip(items, answers))[:6]]
    return out


def caption_accuracy(model, processor, scenes) -> float:
    """Teacher-forced argmax accuracy of the caption's color and shape words."""
    import torch

    from deco_models.data import shapes

    tok = processor.tokenizer
    content = {tok.convert_tokens_to_ids(w) for w in (*shapes.COLORS, *shapes.SHAPES)}
    prompt = processor.render_prompt(PROMPT)
    hits = total = 0
    for scene in scenes:
        n_prompt = processor(text=prompt, images=scene.image)["input_ids"].shape[1]
        inputs = processor(text=prompt + " " + shapes.caption(scene), images=scene.image)
        with torch.no_grad():
            predicted = model(**inputs).logits[0, :-1].argmax(-1)
        ids = inputs["input_ids"][0]
        for pos in range(n_prompt, ids.shape[0]):
            if int(ids[pos]) in content:
                hits += int(predicted[pos - 1] == ids[pos])
                total += 1
    return hits / max(total, 1)


def explanation_quality(model, processor, scenes, methods=tuple(METHODS), progress: bool = True) -> dict:
    """Pointing-game hit rate per method (and random) on the unique-object color/shape words of the captions."""
    from tqdm.auto import tqdm

    import rgae.methods as rgae_methods
    from deco_models.data import shapes
    from rgae.commands.demo import unique_word_boxes
    from rgae.metrics import projector_diagnostics, word_pointing_game, word_random_baseline

    explainers = {m: getattr(rgae_methods, METHODS[m])(model, processor) for m in methods}
    hits: dict[str, list[bool]] = {m: [] for m in methods}
    chance: list[float] = []
    diagnostics: list[dict] = []
    by_kind: dict[str, dict[str, list[bool]]] = {m: {"color": [], "shape": []} for m in methods}
    for scene in tqdm(scenes, desc="pointing game", disable=not progress, leave=False):
        target = shapes.caption(scene)
        for m, explainer in explainers.items():
            expl = explainer.attribute(scene.image, target=target, prompt=PROMPT)
            pairs = unique_word_boxes(expl, scene)
            if m == "rgae" and expl.query_to_patch is not None:
                diagnostics.append(projector_diagnostics(expl))
            for i, word, box in pairs:
                hit = word_pointing_game(expl, i, box, original_hw=scene.image.shape[:2])
                hits[m].append(hit)
                by_kind[m]["color" if word in shapes.COLORS else "shape"].append(hit)
            if m == methods[0]:
                chance += [word_random_baseline(expl, b) for _, _, b in pairs]
    out = {m: float(np.mean(h)) if h else float("nan") for m, h in hits.items()}
    out["random"] = float(np.mean(chance)) if chance else float("nan")
    out["n_words"] = len(chance)
    for key in ("locality", "redundancy", "entropy"):
        out[f"q2p_{key}"] = float(np.mean([d[key] for d in diagnostics])) if diagnostics else float("nan")
    out["by_kind"] = {m: {k: float(np.mean(v)) if v else float("nan") for k, v in d.items()}
                      for m, d in by_kind.items()}
    return out


def evaluate(name: str, scenes, methods=tuple(METHODS), batch_size: int = 16, progress: bool = True) -> dict:
    """Every column of the table for one model."""
    from rgae.commands.demo import load_model

    t0 = time.perf_counter()
    model, processor = load_model(name)
    row = {"model": name, "projector": model.config.projector_type,
           "image_tokens": int(model.config.num_image_tokens), "scenes": len(scenes)}
    row["caption"] = caption_accuracy(model, processor, scenes)
    row.update(task_quality(model, processor, scenes, batch_size=batch_size, progress=progress))
    row["pointing"] = explanation_quality(model, processor, scenes, methods=methods, progress=progress)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown_table(rows: list[dict], methods=tuple(METHODS)) -> str:
    def f(v):
        return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"

    head = ["model", "tokens", "caption", "VQA", "POPE F1", "Acc@0.5", *[f"PG {m}" for m in methods], "PG random",
            "words", "Q2P locality", "Q2P redundancy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pg = r["pointing"]
        cells = [r["model"], str(r["image_tokens"]), f(r["caption"]), f(r["vqa"]), f(r["pope"].get("f1")),
                 f(r["grounding_acc50"]), *[f(pg.get(m)) for m in methods], f(pg["random"]), str(pg["n_words"]),
                 f(pg.get("q2p_locality")), f(pg.get("q2p_redundancy"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="zoo names (default: deco_models.zoo.available())")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test; numbers mean nothing)")
    parser.add_argument("--scenes", type=int, default=100, help="held-out scenes (default 100)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    parser.add_argument("--out", default="shapes_table.md", help="markdown output (a .json is written beside it)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        parser.error("--scenes must be >= 1")

    from deco_models.data import shapes
    from deco_models.recipes.shapes_mini import HELDOUT_SEED
    from rgae.commands.demo import TINY_PROJECTORS

    models = args.models
    if models is None:
        if args.tiny:
            models = [f"tiny-{p}" for p in TINY_PROJECTORS]
        else:
            from deco_models import zoo

            models = zoo.available()
    if not models:
        print("shapes_table: no shapes-mini models are installed; train them with `deco train --recipe shapes-mini` "
              "or run with --tiny for a smoke test.", file=sys.stderr)
        return 2
    scenes = [shapes.generate_scene((HELDOUT_SEED, i), max_objects=3) for i in range(args.scenes)]
    rows = [evaluate(name, scenes, methods=tuple(args.methods), batch_size=args.batch_size,
                     progress=not args.no_progress) for name in models]
    table = markdown_table(rows, tuple(args.methods))
    note = (f"Held-out shapes scenes: {args.scenes} (seed {HELDOUT_SEED}); PG = pointing game (center of the top "
            f"patch) on caption color/shape words whose object is unique in the scene; Q2P = projector diagnostics "
            f"of R-GAE's Query-to-Patch map (best-window mass, mean cosine similarity between queries).")
    print(table)
    print()
    print(note)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n\n" + note + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
