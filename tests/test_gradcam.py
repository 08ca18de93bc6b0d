"""GradCAM on ViT patch features: centered over the patches (the location-independent term of the features' shared
component no longer decides the map's sign), checked against the formula and on the shipped shapes-mini model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgae.methods import GradCAM


def test_centered_map_matches_the_formula_in_float64():
    """map_t = ReLU((A − mean_p A) · mean_p ∂logit_t/∂A), A = the projector's input, by an independent autograd."""
    from rgae.commands.demo import demo_scene, tiny_random_model

    model, processor = tiny_random_model("mlp2x_gelu")
    model = model.double()
    explainer = GradCAM(model, processor)
    target = "a large yellow square"
    e = explainer.attribute(demo_scene().image, target=target)
    assert e.options["center"] is True

    inputs = explainer.prepare(demo_scene().image, target, None)
    captured = {}

    def keep_input(module, args, out):  # returns None: a forward hook's return value would replace the output
        captured["features"] = args[0]

    handle = model.model.multi_modal_projector.register_forward_hook(keep_input)
    try:
        with torch.enable_grad():
            logits = model(**inputs.model_kwargs(), use_cache=False).logits
    finally:
        handle.remove()
    features = captured["features"]
    rows = logits[0, inputs.predicting_positions, inputs.target_ids]
    expected = []
    for t in range(rows.numel()):
        (grad,) = torch.autograd.grad(rows[t], features, retain_graph=True)
        centered = features[0] - features[0].mean(0, keepdim=True)
        expected.append(torch.relu(centered.detach() @ grad[0].mean(0)))
    torch.testing.assert_close(e.text_to_patch, torch.stack(expected), rtol=1e-9, atol=1e-12)


def _object_mask(scene, grid: int = 12, patch: int = 8) -> np.ndarray:
    """Patches whose center lies in one of the scene's object boxes."""
    mask = np.zeros((grid, grid), bool)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        for r in range(grid):
            for c in range(grid):
                mask[r, c] |= x0 <= c * patch + patch / 2 < x1 and y0 <= r * patch + patch / 2 < y1
    return mask


def test_shipped_model_maps_are_no_longer_inverted():
    """The demo scene on shapes-mini-mlp2x_gelu. Uncentered, the features' shared component (~92% of their norm)
    decides each map's sign: the sentence map is hotter on the background than on the objects (on the earlier seed-2
    model "yellow" came out all zero). Centered, the objects are hotter and no word's map is empty."""
    import deco_models
    from deco_models.data.shapes import caption
    from rgae.commands.demo import PROMPT, demo_scene

    try:
        model, processor = deco_models.load("shapes-mini-mlp2x_gelu")
    except ValueError:
        pytest.skip("the shapes-mini zoo is not installed")
    scene = demo_scene()
    explainer = GradCAM(model, processor)
    objects = _object_mask(scene)

    def contrast(e, word=None) -> float:
        m = e.patch_map(word=word).numpy()
        return float(m[objects].mean() - m[~objects].mean())

    raw = explainer.attribute(scene.image, target=caption(scene), prompt=PROMPT, center=False)
    assert contrast(raw) < 0
    centered = explainer.attribute(scene.image, target=caption(scene), prompt=PROMPT)
    assert contrast(centered) > 0
    assert all(float(centered.patch_map(word=i).max()) > 0 for i in range(len(centered.words)))
