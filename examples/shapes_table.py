"""The paper's Table 1 in miniature: task quality and explanation quality of each shipped shapes-mini model on the
**test** scenes (``SCENE_SETS["test"]`` of :mod:`deco_models.recipes.shapes_mini`: never seen in training and never used
to choose anything; ``--set validation`` gives the scenes every choice was made on), each number with its 95%
bootstrap interval over scenes (:mod:`deco_models.eval.intervals`: 2000 resamples, seed 0).

Columns, per projector model:

- **caption**: teacher-forced accuracy of the caption's color and shape words (argmax given the image and the
  caption so far) — the sanity gate of the quality targets;
- **VQA**: exact-match accuracy (``deco_models.eval.gqa_accuracy``) of greedy answers to attribute questions;
- **POPE F1**: yes/no probes with random, popular and adversarial negatives (``pope_metrics``);
- **Acc@0.5**: grounding, "Where is the COLOR SHAPE?" for every object its color and shape name alone, the answered
  box's IoU with the object's box ≥ 0.5 (``shapes_mini.grounding_accuracy``);
- **PG <method>**: pointing game (center of the top patch inside the object's box) of the color and shape words of
  the teacher-forced caption whose object is unique in the scene; **PG random** is the expected hit rate of a
  uniformly random patch on the same words;
- **Q2P locality / redundancy**: :func:`rgae.metrics.projector_diagnostics` of R-GAE's Query-to-Patch map, averaged
  over the scenes — the mass of each query in its best stride-sized window, and the mean cosine similarity between
  queries (the paper's "double abstraction": a Q-Former's queries are non-local and redundant).

Usage::

    python examples/shapes_table.py                      # every model in deco_models.zoo.available(), 200 test scenes
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


def _with_interval(numerators, denominators=None) -> dict:
    from deco_models.eval.intervals import bootstrap_ratio

    found = bootstrap_ratio(numerators, denominators)
    return {"value": found["value"], "low": found["low"], "high": found["high"]}


def task_quality(model, processor, scenes, batch_size: int = 16, progress: bool = True) -> dict:
    """VQA exact match and POPE (F1 and the rest) from greedy answers, with scene-bootstrap intervals."""
    from PIL import Image
    from tqdm.auto import tqdm

    from deco_models.data import shapes
    from deco_models.eval import gqa_accuracy, parse_pope_answer, pope_metrics
    from deco_models.eval.generation import generate_batch

    items = []  # (task, prompt, image index, answer)
    for k, scene in enumerate(scenes):
        # rng=None: the questions are drawn from the scene's own seed, as deco_models.data.shapes.write_dataset does.
        for sample in shapes.scene_tasks(scene, str(k), f"{k}.png", tasks=("vqa", "pope")):
            question, answer = _question(sample["conversations"])
            items.append((sample["task"], processor.render_prompt(question), k, answer))
    images = [Image.fromarray(s.image) for s in scenes]
    answers: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc="answers", disable=not progress, leave=False):
        chunk = items[start : start + batch_size]
        answers += generate_batch(model, processor, [p for _, p, _, _ in chunk], [images[k] for _, _, k, _ in chunk],
                                  max_new_tokens=24)
    n = len(scenes)
    vqa_right, vqa_asked = np.zeros(n), np.zeros(n)
    pope_num, pope_den = np.zeros(n), np.zeros(n)  # F1 = 2 TP / (2 TP + FP + FN), summed per scene
    pope_pred, pope_gold = [], []
    for (task, _, k, gold), pred in zip(items, answers):
        if task == "vqa":
            vqa_right[k] += gqa_accuracy(pred, gold)
            vqa_asked[k] += 1
        else:
            said_yes, is_yes = parse_pope_answer(pred) == "yes", gold == "yes"
            pope_num[k] += 2 * (said_yes and is_yes)
            pope_den[k] += 2 * (said_yes and is_yes) + (said_yes != is_yes)
            pope_pred.append(pred)
            pope_gold.append(gold)
    return {"vqa": _with_interval(vqa_right, vqa_asked), "vqa_n": int(vqa_asked.sum()),
            "pope": pope_metrics(pope_pred, pope_gold), "pope_f1": _with_interval(pope_num, pope_den),
            "examples": [{"task": t, "pred": a, "gold": g} for (t, _, _, g), a in list(zip(items, answers))[:6]]}


def explanation_quality(model, processor, scenes, methods=tuple(METHODS), progress: bool = True) -> dict:
    """Pointing-game hit rate per method (and random) on the unique-object color/shape words of the captions, and
    R-GAE's Query-to-Patch diagnostics, each with its scene-bootstrap interval."""
    from tqdm.auto import tqdm

    import rgae.methods as rgae_methods
    from deco_models.data import shapes
    from rgae.commands.demo import unique_word_boxes
    from rgae.metrics import projector_diagnostics, word_pointing_game, word_random_baseline

    explainers = {m: getattr(rgae_methods, METHODS[m])(model, processor) for m in methods}
    n = len(scenes)
    hits = {m: np.zeros(n) for m in methods}
    by_kind: dict[str, dict[str, list[bool]]] = {m: {"color": [], "shape": []} for m in methods}
    words, chance = np.zeros(n), np.zeros(n)
    diagnostics: dict[str, list[float]] = {"locality": [], "redundancy": [], "entropy": []}
    for k, scene in enumerate(tqdm(scenes, desc="pointing game", disable=not progress, leave=False)):
        target = shapes.caption(scene)
        for m, explainer in explainers.items():
            expl = explainer.attribute(scene.image, target=target, prompt=PROMPT)
            pairs = unique_word_boxes(expl, scene)
            if m == "rgae" and expl.query_to_patch is not None:
                found = projector_diagnostics(expl)
                for key in diagnostics:
                    diagnostics[key].append(found[key])
            for i, word, box in pairs:
                hit = word_pointing_game(expl, i, box, original_hw=scene.image.shape[:2])
                hits[m][k] += hit
                by_kind[m]["color" if word in shapes.COLORS else "shape"].append(hit)
            if m == methods[0]:
                words[k] = len(pairs)
                chance[k] = sum(word_random_baseline(expl, b) for _, _, b in pairs)
    out = {m: _with_interval(h, words) for m, h in hits.items()}
    out["random"] = _with_interval(chance, words)
    out["n_words"] = int(words.sum())
    for key, values in diagnostics.items():
        out[f"q2p_{key}"] = _with_interval(values) if values else None
    out["by_kind"] = {m: {kind: float(np.mean(v)) if v else float("nan") for kind, v in d.items()}
                      for m, d in by_kind.items()}
    return out


def evaluate(name: str, scene_set: str = "test", n_scenes: int | None = None, methods=tuple(METHODS),
             batch_size: int = 16, progress: bool = True) -> dict:
    """Every column of the table for one model, on the first ``n_scenes`` scenes of ``scene_set``."""
    from deco_models.recipes.shapes_mini import SCENE_SETS, caption_word_accuracy, grounding_accuracy
    from rgae.commands.demo import load_model

    t0 = time.perf_counter()
    chosen = SCENE_SETS[scene_set]
    scenes = chosen.scenes(n_scenes)
    model, processor = load_model(name)
    row = {"model": name, "projector": model.config.projector_type,
           "image_tokens": int(model.config.num_image_tokens), "scenes": chosen.describe(len(scenes))}
    caption = caption_word_accuracy(model, processor, len(scenes), seed=chosen.seed)
    row["caption"] = {"value": caption["color_shape"], "low": caption["color_shape_interval"][0],
                      "high": caption["color_shape_interval"][1]}
    row.update(task_quality(model, processor, scenes, batch_size=batch_size, progress=progress))
    grounding = grounding_accuracy(model, processor, len(scenes), seed=chosen.seed, batch_size=batch_size)
    row["grounding_acc50"] = {"value": grounding["acc50"], "low": grounding["acc50_interval"][0],
                              "high": grounding["acc50_interval"][1]}
    row["grounding"] = grounding
    row["pointing"] = explanation_quality(model, processor, scenes, methods=methods, progress=progress)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def markdown_table(rows: list[dict], methods=tuple(METHODS)) -> str:
    from deco_models.eval.intervals import describe

    head = ["model", "tokens", "caption", "VQA", "POPE F1", "Acc@0.5", *[f"PG {m}" for m in methods], "PG random",
            "words", "Q2P locality", "Q2P redundancy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pg = r["pointing"]
        cells = [r["model"], str(r["image_tokens"]), describe(r["caption"]), describe(r["vqa"]), describe(r["pope_f1"]),
                 describe(r["grounding_acc50"]), *[describe(pg.get(m)) for m in methods], describe(pg["random"]),
                 str(pg["n_words"]), describe(pg.get("q2p_locality")), describe(pg.get("q2p_redundancy"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from deco_models.recipes.shapes_mini import EVAL_SETS, SCENE_SETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help="zoo names (default: deco_models.zoo.available())")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test; numbers mean nothing)")
    parser.add_argument("--set", default="test", choices=EVAL_SETS, dest="scene_set",
                        help="scene set (default test; validation is the one every choice was made on)")
    parser.add_argument("--scenes", type=int, default=None, help="scenes of the set (default: all of it, 200)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    parser.add_argument("--out", default="shapes_table.md", help="markdown output (a .json is written beside it)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    available = SCENE_SETS[args.scene_set].size
    if args.scenes is not None and not 1 <= args.scenes <= available:
        parser.error(f"--scenes must be in 1..{available} (the {args.scene_set} set's size)")

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
    rows = [evaluate(name, args.scene_set, args.scenes, methods=tuple(args.methods), batch_size=args.batch_size,
                     progress=not args.no_progress) for name in models]
    table = markdown_table(rows, tuple(args.methods))
    from deco_models.eval import intervals

    chosen = rows[0]["scenes"]
    note = (f"Shapes {chosen['set']} scenes: {chosen['n_scenes']} (seed {chosen['seed']}); each cell is the value "
            f"and its {intervals.LEVEL:.0%} bootstrap interval over scenes ({intervals.RESAMPLES} resamples, seed "
            f"{intervals.SEED}); PG = pointing game (center of the "
            f"top patch) on caption color/shape words whose object is unique in the scene; Q2P = projector "
            f"diagnostics of R-GAE's Query-to-Patch map (best-window mass, mean cosine similarity between queries).")
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
