"""Grad-CAM and occlusion for models that see the image as several views (rgae/methods/gradcam.py, occlusion.py):
Grad-CAM per view on the connector's input against an independent float64 formula, occlusion of original-image
regions re-processed by the model's processor (captum and the plain loop agree), and both on "planted" tiny
LLaVA-NeXT (anyres base + tiles) and InternVL (tiles + thumbnail) models whose answer depends on one region only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rgae import RGAE
from rgae.methods import GradCAM, Occlusion
from rgae.methods.occlusion import occlusion_grid
from tests.families import layout_probes as probes
from tests.families.tiny_internvl import tiny_image, tiny_internvl
from tests.families.tiny_llava_next import tiny_llava_next, tiny_llava_next_processor
from tests.families.zoo import planted_family, planted_image


@pytest.fixture(scope="module")
def internvl():
    return tiny_internvl()


def reference_gradcam(model, inputs) -> torch.Tensor:
    """``[T, N]``: per view v (the vision tower's output, CLS dropped), ``ReLU((A_v − mean_p A_v) · mean_p ∂y/∂A_v)``,
    views concatenated in the layout's order."""
    seen = {}

    def leaf(module, args, out):
        out.last_hidden_state = out.last_hidden_state.detach().requires_grad_(True)
        seen["a"] = out.last_hidden_state
        return out

    handle = model.model.vision_tower.register_forward_hook(leaf)
    try:
        with torch.enable_grad():
            logits = model(**inputs.model_kwargs(), use_cache=False).logits
    finally:
        handle.remove()
    a = seen["a"]
    maps = []
    for pos, tok in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
        (g,) = torch.autograd.grad(logits[0, pos, tok], a, retain_graph=True)
        feats, grads = a.detach()[:, 1:], g[:, 1:]  # [views, patches, C]
        centered = feats - feats.mean(1, keepdim=True)
        maps.append(torch.relu((centered * grads.mean(1, keepdim=True)).sum(-1)).flatten())
    return torch.stack(maps)


def test_gradcam_per_view_equals_the_formula(internvl):
    model, processor = internvl
    explainer = GradCAM(model, processor)
    inputs = explainer.prepare(tiny_image(24, 40), "a red circle", None)  # 1×2 tiles + thumbnail
    e = explainer._attribute(inputs)
    expected = reference_gradcam(model, inputs)
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(e.text_to_patch, expected, rtol=1e-9, atol=1e-14)
    assert e.image_map(word="red").shape == (24, 40) and e.patch_grid is None


def test_occlusion_captum_equals_the_plain_loop_over_image_regions(internvl):
    pytest.importorskip("captum")
    model, processor = internvl
    image = tiny_image(24, 40)
    a = Occlusion(model, processor).attribute(image, target="a red", backend="captum", grid=(2, 3))
    b = Occlusion(model, processor).attribute(image, target="a red", backend="torch", grid=(2, 3))
    assert b.text_to_patch.shape == (2, 6) and float(b.text_to_patch.abs().max()) > 0
    torch.testing.assert_close(a.text_to_patch, b.text_to_patch, rtol=0, atol=1e-8)  # captum: via exp and log
    assert [v.name for v in b.layout.views] == ["occlusion grid"] and b.layout.views[0].box == (0, 0, 40, 24)
    assert b.patch_grid == (2, 3) and b.image_map().shape == (24, 40)
    # One cell by hand: the image with its top-middle cell in the processor's mean colour, processed again.
    occluded = image.copy()
    occluded[0:12, 14:27] = b.options["fill_rgb"]  # pixel (y, x) is in cell (floor(2y/24), floor(3x/40))
    explainer = RGAE(model, processor)
    before, after = (explainer.prepare(img, "a red", None) for img in (image, occluded))

    def logprobs(inputs):
        with torch.no_grad():
            logits = model(**inputs.model_kwargs(), use_cache=False).logits[0, inputs.predicting_positions]
        return logits.log_softmax(-1).gather(-1, inputs.target_ids.view(-1, 1)).squeeze(-1)

    torch.testing.assert_close(b.text_to_patch[:, 1], logprobs(before) - logprobs(after), rtol=1e-9, atol=1e-12)


def test_the_default_occlusion_grid_is_the_finest_views_patches(internvl):
    model, processor = internvl
    explainer = Occlusion(model, processor)
    layout = explainer.prepare(tiny_image(24, 40), "a", None).layout
    assert occlusion_grid(layout) == (4, 8)  # a tile's 4×4 patches cover 5×6 original pixels
    with pytest.raises(ValueError, match="grid must be"):
        explainer.attribute(tiny_image(24, 40), target="a", grid=(0, 3))


def _check_planted(e, region, off_exactly_zero: bool):
    heat = e.image_map()
    assert probes.pointing_in(heat, region), e.method
    if off_exactly_zero:  # the cells away from the region change nothing the model sees
        boxes = e.layout.patch_boxes()
        x0, y0, x1, y1 = region
        off = (boxes[:, 2] <= x0) | (boxes[:, 0] >= x1) | (boxes[:, 3] <= y0) | (boxes[:, 1] >= y1)
        assert float(e.text_to_patch[:, off].abs().max()) == 0.0
        assert float(e.text_to_patch[:, ~off].max()) > 0


def test_planted_internvl_lights_up_the_region_in_gradcam_and_occlusion():
    model, processor = planted_family("internvl")
    region = (0, 0, 16, 16)  # tile 0's first 2×2 block; the thumbnail's first block
    image = planted_image(32, 64, region)
    # The word the region raises most: occluding the region lowers it.
    target = probes.planted_target(RGAE(model, processor), planted_image(32, 64, (0, 0, 0, 0)), image)
    _check_planted(GradCAM(model, processor).attribute(image, target=target), region, False)
    # Black cells (the fill) are as dark as the blue background: only the region's cells matter.
    occlusion = Occlusion(model, processor).attribute(image, target=target, backend="torch", grid=(2, 4))
    _check_planted(occlusion, region, True)


def test_planted_llava_next_lights_up_the_region_in_gradcam_and_occlusion():
    model = tiny_llava_next(dtype=torch.float64, text_layers=1, seed=1)
    processor = tiny_llava_next_processor(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    explainer = RGAE(model, processor)
    probes.plant(model, explainer.adapter)
    region = (16, 8, 32, 16)  # base patch (1, 1); tile 0,0's patches (1, 2), (1, 3)
    dark, bright = probes.bright_square(32, 64, region)
    target = probes.planted_target(explainer, dark, bright)
    _check_planted(GradCAM(model, processor).attribute(bright, target=target), region, False)
    occlusion = Occlusion(model, processor).attribute(bright, target=target, backend="torch", grid=(4, 4))
    _check_planted(occlusion, region, True)
    assert np.isclose(occlusion.image_map().sum().item(), occlusion.text_to_patch.mean(0).sum().item())
