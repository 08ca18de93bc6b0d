"""LLaVA-OneVision: anyres layout with the model's bilinear downsampling of large tile grids; Query-to-Patch = the exact
interpolation weights, checked against a hand-written bilinear reference and autograd; R-GAE against the full-matrix
oracle, end to end, planted region. Tiny real models (tests/families/tiny_llava_onevision.py)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.image_processing_utils import select_best_resolution

from rgae import RGAE
from rgae.viz import save_figures
from tests.families import layout_probes as probes
from tests.families.layout_probes import noise_image as noise
from tests.families.tiny_llava_onevision import (
    ASPECT,
    PATCH,
    PINPOINTS,
    TILE,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
)
from tests.family_checks import assert_close_relative, full_matrix_text_to_query

# 72×100: best pinpoint 96×96 (3×3 tiles), resized to 70×96 and padded 13 | 13 px vertically; the 12×12 tile grid
# unpads to 8×12 patches, more than anyres_max_2 allows: the model interpolates it down to 4×6.
LARGE = (72, 100)
SMALL = (32, 64)  # exactly the 32×64 pinpoint: two tiles, no padding, no interpolation
SIDE = TILE // PATCH



@pytest.fixture(scope="module")
def model64():
    return tiny_llava_onevision(dtype=torch.float64)


@pytest.fixture(scope="module")
def explainer(model64):
    return RGAE(model64, tiny_llava_onevision_processor())


def _bilinear_1d(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]`` weights of ``F.interpolate(mode="bilinear", align_corners=False, size=...)`` on one axis:
    source coordinate ``(i + 0.5) · n_in / n_out - 0.5``, clamped at 0, between its floor and the next cell."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(math.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        w[i, lo] += 1 - frac
        w[i, hi] += frac
    return w


def reference_tile_rows(image_hw) -> torch.Tensor:
    """The tile tokens' Query-to-Patch rows (newlines left out), from the LLaVA-OneVision packing written out:
    stitch the tiles' patch grids, crop the padded rows/columns as ``unpad_image``, interpolate bilinearly."""
    h, w = image_hw
    best_h, best_w = select_best_resolution((h, w), PINPOINTS)
    nph, npw = best_h // TILE, best_w // TILE
    rows, cols = nph * SIDE, npw * SIDE
    grid = torch.zeros(rows, cols, dtype=torch.long)  # patch index (base view first) of every stitched cell
    for r in range(rows):
        for c in range(cols):
            tile = (r // SIDE) * npw + c // SIDE
            grid[r, c] = SIDE * SIDE * (1 + tile) + (r % SIDE) * SIDE + c % SIDE
    if w / h > cols / rows:
        pad = (rows - int(round(h * cols / w, 7))) // 2
        grid = grid[pad: rows - pad]
    else:
        pad = (cols - int(round(w * rows / h, 7))) // 2
        grid = grid[:, pad: cols - pad]
    cur_h, cur_w = grid.shape
    ratio = math.sqrt(cur_h * cur_w / (int(ASPECT.removeprefix("anyres_max_")) * SIDE**2))
    out_h, out_w = (int(cur_h // ratio), int(cur_w // ratio)) if ratio > 1.1 else (cur_h, cur_w)
    wy, wx = _bilinear_1d(cur_h, out_h), _bilinear_1d(cur_w, out_w)
    n = SIDE * SIDE * (1 + nph * npw)
    q2p = torch.zeros(out_h * out_w, n, dtype=torch.float64)
    for i in range(out_h):
        for j in range(out_w):
            q2p[i * out_w + j].index_add_(0, grid.flatten(), torch.outer(wy[i], wx[j]).flatten())
    return q2p


@pytest.mark.parametrize("image_hw, rule", [(LARGE, "bilinear"), (SMALL, "identity")])
def test_query_to_patch_is_the_hand_written_interpolation(explainer, image_hw, rule):
    layout = explainer.prepare(noise(image_hw), "a", None).layout
    assert layout.rule == rule
    q2p, placeholder = layout.query_to_patch, layout.placeholder
    base = SIDE * SIDE
    torch.testing.assert_close(q2p[:base], torch.eye(base, q2p.shape[1], dtype=torch.float64))
    expected = reference_tile_rows(image_hw)
    torch.testing.assert_close(q2p[base:][~placeholder[base:]], expected, rtol=0, atol=1e-12)
    # One newline after every row of the (interpolated) grid, and nowhere else.
    out_w = expected.shape[0] // int(placeholder.sum())
    assert torch.nonzero(placeholder).flatten().tolist() == [base + (out_w + 1) * r + out_w
                                                            for r in range(int(placeholder.sum()))]


def test_query_to_patch_is_the_packings_autograd_jacobian(explainer, model64):
    layout = explainer.prepare(noise(LARGE), "a", None).layout
    n_views = len(layout.views)

    def pack(x):  # random features in, every packed token's first channel out
        packed, _ = model64.model.pack_image_features([x.view(n_views, SIDE * SIDE, 1)], torch.tensor([LARGE]),
                                                      image_newline=torch.zeros(1, dtype=torch.float64),
                                                      vision_aspect_ratio=ASPECT)
        return packed[0][:, 0]

    jac = torch.autograd.functional.jacobian(pack, torch.randn(layout.n_patches, dtype=torch.float64))
    torch.testing.assert_close(jac, layout.query_to_patch, rtol=0, atol=1e-12)


def test_layout_of_a_large_image(explainer):
    layout = explainer.prepare(noise(LARGE), "a", None).layout
    assert len(layout.views) == 10 and layout.views[0].box == (0.0, 0.0, 100.0, 72.0)
    # 70 of the 96 canvas rows are image, pasted at y = 13: tile row 0 starts 13 · 72/70 px above the image.
    assert layout.views[1].box[1] == pytest.approx(-13 * 72 / 70)
    assert layout.n_tokens == 16 + 4 * 6 + 4
    assert bool((layout.query_to_patch[~layout.placeholder].sum(1) - 1).abs().max() < 1e-12)


def test_a_pixel_reaches_exactly_its_patch_in_the_base_and_in_its_tile(explainer):
    patches = probes.check_pixel_reaches_its_patches(explainer, noise(LARGE), (TILE, TILE))
    assert len(patches) == 2 and patches[0] < 16 <= patches[1]


@pytest.mark.parametrize("patch", [3, 16 + 5, 16 * 5 + 10, 16 * 9 + 15])
def test_a_connector_patch_reaches_the_tokens_that_interpolate_it(explainer, patch):
    tokens = probes.check_patch_reaches_its_tokens(explainer, noise(LARGE), patch, linear=True)
    assert len(tokens) <= 4


def test_text_to_query_equals_the_full_matrix_oracle_and_text_to_patch_composes(explainer, model64):
    inputs = explainer.prepare(noise(LARGE), "a red circle", None)
    out = explainer.compute(inputs)
    assert_close_relative(out["text_to_query"], full_matrix_text_to_query(model64, inputs), 1e-6)
    torch.testing.assert_close(out["text_to_patch"], out["text_to_query"] @ inputs.layout.query_to_patch,
                               rtol=1e-12, atol=1e-15)


def test_end_to_end_teacher_forced_and_generated(explainer):
    e = explainer.attribute(noise(LARGE), target="a red circle")
    assert e.options["query_to_patch_rule"] == "bilinear"
    assert e.image_map().shape == LARGE and e.image_map(word="circle").shape == LARGE
    g = explainer.attribute(noise(SMALL), target=None, max_new_tokens=3)
    assert g.image_map().shape == SMALL and g.options["query_to_patch_rule"] == "identity"


@pytest.mark.slow
def test_figures_are_written(explainer, tmp_path):
    e = explainer.attribute(noise(LARGE), target="a red circle")
    paths = save_figures(e, tmp_path, dpi=30, words=False)
    assert paths and all(p.stat().st_size > 0 for p in paths)


def test_planted_region_lights_up_in_the_image_map():
    model = tiny_llava_onevision(dtype=torch.float64, text_layers=1, seed=1)
    processor = tiny_llava_onevision_processor(image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    explainer = RGAE(model, processor)
    probes.plant(model, explainer.adapter)
    # 64×96 fits the 64×96 pinpoint (2×3 tiles, no padding) and is large enough to be interpolated (8×12 → 4×6):
    # the region is tile 1,1's top-left 2×2 patches; the base view (24×16-px patches) and the interpolation spread
    # its relevance a little beyond it.
    region = (32, 32, 48, 48)
    dark, bright = probes.bright_square(64, 96, region)
    target = probes.planted_target(explainer, dark, bright)
    e = explainer.attribute(bright, target=target)
    assert e.options["query_to_patch_rule"] == "bilinear"
    assert probes.pointing_in(e.image_map(), region)


def test_docstring_examples():
    import rgae.adapters.llava_onevision as module
    import tests.families.tiny_llava_onevision as tiny

    probes.run_doctests(module, tiny)
