"""rgae.metrics: hand-computed localization and diagnostics cases, brute-force references, and the model-based
metrics (perturbation curves, randomization check) on tiny real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rgae.metrics import (
    box_to_model_frame,
    energy_in_box,
    insertion_deletion,
    patch_boxes,
    perturbation_curve,
    pointing_game,
    projector_diagnostics,
    query_entropy,
    query_locality,
    query_redundancy,
    random_pointing_baseline,
    randomization_check,
    spearman,
    ssim,
    word_pointing_game,
)

# ------------------------------------------------------------------------------------------------- pointing game


def one_hot(grid, i, j, value=1.0):
    m = torch.zeros(grid)
    m[i, j] = value
    return m


def test_pointing_game_hit_and_miss_on_rectangular_grid():
    # 2x3 grid over a 60x90 image: patch (1, 2) covers x [60, 90), y [30, 60), center (75, 45).
    m = one_hot((2, 3), 1, 2)
    assert pointing_game(m, (70, 40, 80, 50), image_hw=(60, 90))
    assert not pointing_game(m, (0, 0, 74, 60), image_hw=(60, 90))  # stops just left of the center
    assert pointing_game(m, (0, 0, 76, 60), image_hw=(60, 90))
    # 3x2 grid over a 90x40 image (tall): patch (2, 0) covers x [0, 20), y [60, 90), center (10, 75).
    tall = one_hot((3, 2), 2, 0)
    assert pointing_game(tall, (5, 70, 15, 80), image_hw=(90, 40))
    assert not pointing_game(tall, (20, 60, 40, 90), image_hw=(90, 40))
    assert pointing_game(tall, (20, 60, 40, 90), image_hw=(90, 40), criterion="overlap") is False
    assert pointing_game(tall, (19, 60, 40, 90), image_hw=(90, 40), criterion="overlap") is True


def test_pointing_game_flat_map_with_grid_and_half_open_box():
    flat = torch.zeros(6)
    flat[4] = 2.0  # (1, 1) in a 2x3 grid of a 60x90 image: center (45, 45)
    assert pointing_game(flat, (45, 45, 46, 46), grid_hw=(2, 3), image_hw=(60, 90))
    assert not pointing_game(flat, (30, 30, 45, 45), grid_hw=(2, 3), image_hw=(60, 90))  # end-exclusive


def test_pointing_game_ties_go_to_first_patch_in_row_major_order():
    m = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    assert pointing_game(m, (4, 0, 8, 4), image_hw=(8, 8))  # patch 1 (top right) wins over patch 2
    assert not pointing_game(m, (0, 4, 4, 8), image_hw=(8, 8))


def test_pointing_game_empty_map_is_a_miss_or_seeded_random():
    zero = torch.zeros(2, 2)
    whole = (0, 0, 8, 8)
    assert not pointing_game(zero, whole, image_hw=(8, 8))
    assert not pointing_game(torch.full((2, 2), 3.0), whole, image_hw=(8, 8))
    assert pointing_game(zero, whole, image_hw=(8, 8), empty="random")
    draws = [pointing_game(zero, (0, 0, 4, 4), image_hw=(8, 8), empty="random", seed=s) for s in range(200)]
    assert draws == [pointing_game(zero, (0, 0, 4, 4), image_hw=(8, 8), empty="random", seed=s) for s in range(200)]
    assert 0.15 < np.mean(draws) < 0.35  # one patch of four


def test_pointing_game_rejects_bad_input():
    with pytest.raises(ValueError, match="grid_hw"):
        pointing_game(torch.zeros(4), (0, 0, 1, 1), image_hw=(8, 8))
    with pytest.raises(ValueError, match="x1 > x0"):
        pointing_game(torch.zeros(2, 2), (4, 0, 2, 4), image_hw=(8, 8))
    with pytest.raises(ValueError, match="NaN"):
        pointing_game(torch.tensor([[float("nan"), 0.0]]), (0, 0, 1, 1), image_hw=(8, 8))
    with pytest.raises(ValueError, match="criterion"):
        pointing_game(torch.eye(2), (0, 0, 1, 1), image_hw=(8, 8), criterion="iou")
    with pytest.raises(ValueError, match="patches"):
        pointing_game(torch.zeros(5), (0, 0, 1, 1), grid_hw=(2, 2), image_hw=(8, 8))


def test_random_pointing_baseline_counts_patch_centers():
    # 4x4 grid on 40x40: centers at 5, 15, 25, 35. A box [0, 20) x [0, 30) holds 2 x 3 centers.
    assert random_pointing_baseline((0, 0, 20, 30), (4, 4), (40, 40)) == pytest.approx(6 / 16)
    assert random_pointing_baseline((0, 0, 20, 30), (4, 4), (40, 40), criterion="overlap") == pytest.approx(6 / 16)
    assert random_pointing_baseline((0, 0, 21, 30), (4, 4), (40, 40), criterion="overlap") == pytest.approx(9 / 16)


# ------------------------------------------------------------------------------------------------ energy in box


def test_energy_in_box_partial_overlap_by_hand():
    # 2x2 grid on 20x20: patches are 10x10. Box [5, 15) x [0, 10) covers half of patch 0 and half of patch 1.
    m = torch.tensor([[2.0, 4.0], [1.0, -3.0]])  # the negative patch is ignored; positive mass = 7
    assert energy_in_box(m, (5, 0, 15, 10), image_hw=(20, 20)) == pytest.approx((1.0 + 2.0) / 7)
    assert energy_in_box(m, (0, 0, 20, 20), image_hw=(20, 20)) == pytest.approx(1.0)
    assert energy_in_box(m, (10, 10, 20, 20), image_hw=(20, 20)) == pytest.approx(0.0)
    assert energy_in_box(-m.abs(), (0, 0, 20, 20), image_hw=(20, 20)) == 0.0


def _energy_reference(flat, grid, image_hw, box):
    """Pixel-level reference on an integer image: spread each patch's mass over its pixels, sum those in the box."""
    h, w = image_hw
    gh, gw = grid
    pos = np.clip(flat, 0, None)
    if pos.sum() <= 0:
        return 0.0
    dens = np.zeros((h, w))
    for i in range(gh):
        for j in range(gw):
            y0, y1, x0, x1 = i * h // gh, (i + 1) * h // gh, j * w // gw, (j + 1) * w // gw
            dens[y0:y1, x0:x1] = pos[i * gw + j] / ((y1 - y0) * (x1 - x0))
    x0, y0, x1, y1 = box
    return dens[y0:y1, x0:x1].sum() / pos.sum()


@settings(max_examples=60, deadline=None)
@given(
    gh=st.integers(1, 4), gw=st.integers(1, 4), ph=st.integers(1, 5), pw=st.integers(1, 5),
    data=st.data(),
)
def test_energy_in_box_matches_pixel_reference(gh, gw, ph, pw, data):
    h, w = gh * ph, gw * pw  # patches of whole pixels, so the reference is exact
    flat = np.array(data.draw(st.lists(st.floats(-2, 2, allow_nan=False), min_size=gh * gw, max_size=gh * gw)))
    x0 = data.draw(st.integers(0, w - 1))
    y0 = data.draw(st.integers(0, h - 1))
    box = (x0, y0, data.draw(st.integers(x0 + 1, w)), data.draw(st.integers(y0 + 1, h)))
    got = energy_in_box(flat, box, grid_hw=(gh, gw), image_hw=(h, w))
    assert got == pytest.approx(_energy_reference(flat, (gh, gw), (h, w), box), abs=1e-9)


def test_patch_boxes_and_box_to_model_frame():
    assert patch_boxes((2, 1), (10, 4)).tolist() == [[0, 0, 4, 5], [0, 5, 4, 10]]
    # A 20x10 (w x h) original padded into a 20x20 square sits at y in [5, 15).
    assert box_to_model_frame((2, 0, 6, 10), (10, 20), (0, 5, 20, 15)) == (2.0, 5.0, 6.0, 15.0)
    # Resized 2x as well.
    assert box_to_model_frame((2, 0, 6, 10), (10, 20), (0, 10, 40, 30)) == (4.0, 10.0, 12.0, 30.0)


# ------------------------------------------------------------------------------------------ projector diagnostics


def pooling_q2p(grid, qgrid):
    """The Jacobian of adaptive_avg_pool2d: the pooling projector's Query-to-Patch map."""
    gh, gw = grid
    x = torch.eye(gh * gw).reshape(gh * gw, 1, gh, gw)
    return torch.nn.functional.adaptive_avg_pool2d(x, qgrid).reshape(gh * gw, -1).T  # [M, N]


def test_diagnostics_identity_map():
    d = projector_diagnostics(torch.eye(16), patch_grid=(4, 4), query_grid=(4, 4))
    assert d["entropy"] == 0.0 and d["locality"] == 1.0 and d["redundancy"] == 0.0


@pytest.mark.parametrize("grid,qgrid", [((4, 4), (2, 2)), ((12, 12), (6, 6)), ((6, 4), (3, 2))])
def test_diagnostics_pooling_map_is_local(grid, qgrid):
    q2p = pooling_q2p(grid, qgrid)
    d = projector_diagnostics(q2p, patch_grid=grid, query_grid=qgrid)
    assert d["locality"] == pytest.approx(1.0)
    assert d["redundancy"] == pytest.approx(0.0)  # windows tile the grid: disjoint rows
    window = (grid[0] // qgrid[0]) * (grid[1] // qgrid[1])
    n = grid[0] * grid[1]
    assert d["entropy"] == pytest.approx(math.log(window) / math.log(n))


def test_diagnostics_uniform_rows():
    d = projector_diagnostics(torch.ones(4, 16), patch_grid=(4, 4), query_grid=(2, 2))
    assert d["entropy"] == pytest.approx(1.0)
    assert d["redundancy"] == pytest.approx(1.0)
    assert d["locality"] == pytest.approx(4 / 16)  # best 2x2 window holds 4 of 16 equal patches


def test_diagnostics_hand_cases_and_zero_rows():
    q2p = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    ent = query_entropy(q2p)
    assert ent[0] == pytest.approx(0.5) and math.isnan(ent[1]) and ent[2] == pytest.approx(0.5)
    loc = query_locality(q2p, (2, 2), window=(1, 2))
    assert loc[0] == pytest.approx(1.0) and math.isnan(loc[1]) and loc[2] == pytest.approx(0.5)
    # cos(r0, r2) = 1/2, zero row similar to nothing: mean of (0, 0.5, 0).
    assert query_redundancy(q2p) == pytest.approx(0.5 / 3)
    with pytest.raises(ValueError, match="window"):
        query_locality(q2p, (2, 2))
    with pytest.raises(ValueError, match="patch columns"):
        query_locality(q2p, (3, 3), window=1)


@settings(max_examples=30, deadline=None)
@given(gh=st.integers(1, 5), gw=st.integers(1, 5), kh=st.integers(1, 5), kw=st.integers(1, 5), data=st.data())
def test_locality_matches_brute_force(gh, gw, kh, kw, data):
    kh, kw = min(kh, gh), min(kw, gw)
    vals = data.draw(st.lists(st.floats(0.01, 1.0), min_size=gh * gw, max_size=gh * gw))
    m = np.array(vals).reshape(gh, gw)
    best = max(m[i : i + kh, j : j + kw].sum() for i in range(gh - kh + 1) for j in range(gw - kw + 1))
    got = query_locality(m.reshape(1, -1), (gh, gw), window=(kh, kw))[0]
    assert got == pytest.approx(best / m.sum())


# ------------------------------------------------------------------------------------------ similarity measures


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 5, 30).astype(float)
        b = rng.integers(0, 5, 30).astype(float)
        assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert spearman(np.ones(4), np.arange(4)) == 0.0


def test_ssim_identity_and_difference():
    m = np.random.default_rng(1).random((6, 6))
    assert ssim(m, m) == pytest.approx(1.0)
    assert ssim(m, 3 * m + 2) == pytest.approx(1.0)  # min-max normalized first
    assert ssim(m, np.random.default_rng(2).random((6, 6))) < 0.5


# ------------------------------------------------------------------------------------------ model-based metrics


@pytest.fixture(scope="module")
def tiny():
    from tests.tiny import tiny_deco_model, tiny_image, tiny_processor

    model = tiny_deco_model("mlp2x_gelu")
    return model, tiny_processor(model), tiny_image()


@pytest.fixture(scope="module")
def occlusion_expl(tiny):
    from rgae.methods import Occlusion

    model, processor, image = tiny
    return Occlusion(model, processor).attribute(image, target="a red circle", prompt="describe the image",
                                                 backend="torch")


def test_perturbation_curves_on_tiny_model(tiny, occlusion_expl):
    model, processor, _ = tiny
    e = occlusion_expl
    pos = perturbation_curve(model, processor, e, order="positive", steps=16)
    neg = perturbation_curve(model, processor, e, order="negative", steps=16)
    unperturbed = float(e.token_probs.double().log().mean())
    for curve in (pos, neg):
        assert curve.fractions[0] == 0 and curve.fractions[-1] == 1 and len(curve.scores) == 17
        assert np.isfinite(curve.scores).all() and math.isfinite(curve.auc)
        assert curve.scores[0] == pytest.approx(unperturbed, abs=1e-4)  # nothing removed: the explained forward
    assert pos.scores[-1] == pytest.approx(neg.scores[-1], abs=1e-5)  # everything removed: the same image
    # The occlusion map measures each patch's own effect on this target: removing its top patches first must hurt
    # more than removing its bottom patches first.
    assert pos.auc <= neg.auc
    # Batching does not change the numbers.
    pos1 = perturbation_curve(model, processor, e, order="positive", steps=16, batch_size=1)
    np.testing.assert_allclose(pos1.scores, pos.scores, atol=1e-5)


@pytest.mark.parametrize("baseline", ["mean", "zero", "blur"])
def test_insertion_deletion_endpoints(tiny, occlusion_expl, baseline):
    model, processor, _ = tiny
    curves = insertion_deletion(model, processor, occlusion_expl, steps=4, baseline=baseline)
    ins, dele = curves["insertion"], curves["deletion"]
    # Insertion starts where deletion ends (the baseline image) and ends where deletion starts (the image).
    assert ins.scores[0] == pytest.approx(dele.scores[-1], abs=1e-5)
    assert ins.scores[-1] == pytest.approx(dele.scores[0], abs=1e-5)
    word = perturbation_curve(model, processor, occlusion_expl, steps=2, baseline=baseline, word="red")
    assert word.scores[0] == pytest.approx(float(occlusion_expl.token_probs[1].log()), abs=1e-4)


def test_perturbation_rejects_bad_options(tiny, occlusion_expl):
    model, processor, _ = tiny
    with pytest.raises(ValueError, match="order"):
        perturbation_curve(model, processor, occlusion_expl, order="middle")
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curve(model, processor, occlusion_expl, baseline="noise")
    bare = type(occlusion_expl)(method="x", target_text="a", output_tokens=["a"], text_to_patch=torch.zeros(1, 16),
                                patch_grid=(4, 4))
    with pytest.raises(ValueError, match="input_ids"):
        perturbation_curve(model, processor, bare)


def test_randomization_check_changes_rgae_maps(tiny):
    from rgae.methods import RGAE

    model, processor, image = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = randomization_check(RGAE, model, processor, image, "a red circle", prompt="describe the image",
                              layers="all")
    assert res.stages == ["all"] and res.changed()
    cascade = randomization_check(RGAE, model, processor, image, "a red circle", prompt="describe the image")
    assert cascade.stages[0] == "lm_head" and "multi_modal_projector" in cascade.stages
    assert any(not torch.allclose(m, cascade.original) for m in cascade.maps)
    assert all(-1.0 <= s <= 1.0 for s in cascade.spearman)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the caller's model is untouched


def test_word_pointing_game_on_explanation(occlusion_expl):
    e = occlusion_expl
    word_map = e.word_text_to_patch("red").reshape(e.patch_grid)
    i, j = divmod(int(word_map.argmax()), e.patch_grid[1])
    h, w = e.image.shape[:2]
    ph, pw = h / e.patch_grid[0], w / e.patch_grid[1]
    box = (j * pw, i * ph, (j + 1) * pw, (i + 1) * ph)
    assert word_pointing_game(e, "red", box)
    other = (((j + 2) % 4) * pw, i * ph, ((j + 2) % 4 + 1) * pw, (i + 1) * ph)
    assert not word_pointing_game(e, "red", other)


# ------------------------------------------------ shipped models (quality targets: tests/test_zoo.py)


def _zoo_names() -> list[str]:
    from deco_models import zoo

    return zoo.available()


@pytest.mark.slow
def test_shipped_model_maps_change_under_randomization():
    names = _zoo_names()
    if not names:
        pytest.skip("no shapes-mini model is installed")
    from deco_models import zoo
    from deco_models.data import shapes
    from rgae.methods import RGAE

    model, processor = zoo.load(names[0])
    scene = shapes.generate_scene(2, n_objects=3)
    res = randomization_check(RGAE, model, processor, scene.image, shapes.caption(scene),
                              prompt="Describe the image.", layers="all")
    assert res.changed(), res.to_dict()
