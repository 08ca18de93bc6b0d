"""Is a projector's Query-to-Patch rule at fault, or the model? The pointing game of R-GAE as it is (its Text-to-Query
rows times its own Query-to-Patch map) against the same Text-to-Query rows times an **occlusion** Query-to-Patch map,
on the same model and scenes.

Occlusion Query-to-Patch: replace patch p's feature (the projector's input) by the mean feature of the image and
measure how far each query's output moves, ``Q2P_occ[q, p] = ||y_q(x) - y_q(x with x_p := mean(x))||``, each row
normalized to sum 1. It assumes nothing about the projector (one batched projector call per image) and recovers the
structural maps' supports exactly: the pooling windows of ``avgpool``, the diagonal of ``mlp``. For the projectors
R-GAE explains with its gradient rule (``cabstractor``, ``dabstractor``, ``maxpool``), comparing the two pointing
games separates the two causes of a poor map: if the occlusion map localizes and the rule's does not, the rule is at
fault; if neither does, the model's queries do not keep their patches apart.

Usage::

    python examples/q2p_occlusion.py --model shapes-mini-avgpool2_36 --scenes 100   # validation scenes
    python examples/q2p_occlusion.py --tiny --scenes 2                               # smoke test, tiny random models

Prints both pointing games with 95% scene-bootstrap intervals and both maps' locality / redundancy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import torch


def occlusion_query_to_patch(projector, features: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """``[M, N]`` occlusion Query-to-Patch map of ``projector`` (``[1, N, C] -> [1, M, D]``) at ``features``
    ``[1, N, C]``: row q is how far query q's output moves when each patch's feature is replaced by the mean feature,
    normalized to sum 1 (a row that never moves stays zero).

    Example:
        >>> from deco_models import build_projector
        >>> proj = build_projector("avgpool2_4", 8, 8, (4, 4))
        >>> q2p = occlusion_query_to_patch(proj, torch.randn(1, 16, 8))
        >>> sorted(int(p) for p in torch.nonzero(q2p[0] > 0)[:, 0])  # query 0 reads its 2x2 window
        [0, 1, 4, 5]
    """
    if features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(f"features must be [1, N, C] (one image), got {tuple(features.shape)}")
    x = features.detach()
    n = x.shape[1]
    with torch.no_grad():
        moved = []
        for start in range(0, n, chunk):
            patches = torch.arange(start, min(start + chunk, n), device=x.device)
            occluded = x.repeat(len(patches) + 1, 1, 1)  # row 0 stays intact: the reference, from the same call
            occluded[1 + torch.arange(len(patches)), patches] = x[0].mean(0)
            out = projector(occluded)
            moved.append((out[1:] - out[:1]).norm(dim=-1))  # [k, M]
    change = torch.cat(moved).T.float()  # [M, N]
    total = change.sum(-1, keepdim=True)
    return change / torch.where(total > 0, total, torch.ones_like(total))


def projector_input(model, processor, image) -> torch.Tensor:
    """The features the model's projector receives for ``image`` (``[1, N, C]``), recorded by a forward hook."""
    seen = {}

    def keep(module, args):
        seen["x"] = args[0].detach()

    inputs = processor(text=processor.render_prompt("Describe the image."), images=image)
    handle = model.model.multi_modal_projector.register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["x"]


def compare(model, processor, scenes, progress: bool = True) -> dict:
    """Both pointing games (unique-object color/shape words of the teacher-forced caption) and both maps'
    diagnostics over ``scenes``."""
    from tqdm.auto import tqdm

    import rgae
    from deco_models.data import shapes
    from deco_models.eval.intervals import bootstrap_ratio
    from rgae.commands.demo import unique_word_boxes
    from rgae.metrics import projector_diagnostics, word_pointing_game, word_random_baseline

    explainer = rgae.RGAE(model, processor)
    projector = model.model.multi_modal_projector
    hits = {"rule": np.zeros(len(scenes)), "occlusion": np.zeros(len(scenes))}
    words, chance = np.zeros(len(scenes)), np.zeros(len(scenes))
    diagnostics = {"rule": [], "occlusion": []}
    for k, scene in enumerate(tqdm(scenes, desc="scenes", disable=not progress)):
        rule = explainer.attribute(scene.image, target=shapes.caption(scene), prompt="Describe the image.")
        q2p = occlusion_query_to_patch(projector, projector_input(model, processor, scene.image))
        occlusion = dataclasses.replace(rule, query_to_patch=q2p.to(rule.text_to_query.dtype),
                                        text_to_patch=rule.text_to_query @ q2p.to(rule.text_to_query.dtype))
        for name, expl in (("rule", rule), ("occlusion", occlusion)):
            diagnostics[name].append(projector_diagnostics(expl))
            for i, _, box in unique_word_boxes(expl, scene):
                hits[name][k] += word_pointing_game(expl, i, box, original_hw=scene.image.shape[:2])
        pairs = unique_word_boxes(rule, scene)
        words[k] = len(pairs)
        chance[k] = sum(word_random_baseline(rule, box) for _, _, box in pairs)
    out = {"projector": model.config.projector_type, "scenes": len(scenes), "words": int(words.sum()),
           "rule": rule.options.get("query_to_patch_rule")}
    for name in hits:
        found = bootstrap_ratio(hits[name], words)
        out[f"pointing_{name}"] = [found["value"], found["low"], found["high"]]
        for key in ("locality", "redundancy"):
            out[f"{key}_{name}"] = float(np.nanmean([d[key] for d in diagnostics[name]]))
    out["pointing_random"] = float(chance.sum() / max(words.sum(), 1))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=None, help="zoo names (default: every shipped model)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (a smoke test; numbers mean nothing)")
    parser.add_argument("--scenes", type=int, default=100, help="validation scenes (default 100)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from deco_models.recipes.shapes_mini import SCENE_SETS
    from rgae.commands.demo import load_model

    if not 1 <= args.scenes <= SCENE_SETS["validation"].size:
        parser.error(f"--scenes must be in 1..{SCENE_SETS['validation'].size}")
    if args.model:
        names = args.model
    elif args.tiny:
        names = ["tiny-avgpool2_36", "tiny-cabstractor_36"]
    else:
        from deco_models import zoo

        names = zoo.available()
    # Diagnosis, not a reported number: on the validation scenes (the test scenes stay for the shipped numbers).
    scenes = SCENE_SETS["validation"].scenes(args.scenes)
    for name in names:
        model, processor = load_model(name)
        print(json.dumps({"model": name, **compare(model, processor, scenes, progress=not args.no_progress)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
