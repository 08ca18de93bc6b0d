"""Tests of the R-GAE engine (rgae.rules): DESIGN.md's hand-checkable cases, then properties against slow references."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rgae import propagation
from rgae.rules import (
    average_steps,
    compose,
    cross_attention_update,
    gradient_weighted_attention,
    identity_map,
    normalize_residual,
    pooling_map,
    propagate,
    propagate_cross_stack,
    propagate_rows,
    self_attention_update,
)

PROPERTY = settings(max_examples=25, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_cams(seed, n_layers, n, batch=(), dtype=torch.float64):
    """Row-stochastic-scale non-negative layer maps, like (G⊙A)+ averaged over heads."""
    g = _gen(seed)
    cams = [torch.rand(*batch, n, n, generator=g, dtype=dtype) / n for _ in range(n_layers)]
    for cam in cams:  # sparsify: many exact zeros, as clamping produces
        cam[torch.rand(cam.shape, generator=g) < 0.3] = 0.0
    return cams


# ---- hand-checkable cases (DESIGN.md) -----------------------------------------------------------------------------


def test_nonpositive_gradients_give_identity_and_zero_map():
    g = _gen(0)
    attn = torch.softmax(torch.randn(3, 4, 5, 5, generator=g), dim=-1)  # 4 heads, batch 3
    grad = -torch.rand(3, 4, 5, 5, generator=g)
    grad[0, 0, 0, 0] = 0.0
    cam = gradient_weighted_attention(attn, grad)
    assert torch.equal(cam, torch.zeros(3, 5, 5))
    R = propagate([cam] * 4)
    assert torch.equal(R, torch.eye(5).expand(3, 5, 5))
    row = propagate_rows([cam] * 4, [4])[:, 0]
    minus_self = row.clone()
    minus_self[:, 4] = 0
    assert torch.equal(minus_self, torch.zeros(3, 5))
    # R = I must stay I through the normalization instead of dividing 0 by 0.
    assert torch.equal(normalize_residual(R), R)


def test_uniform_attention_one_layer_gives_identity_plus_uniform():
    n = 4
    U = torch.full((n, n), 1 / n, dtype=torch.float64)
    cam = gradient_weighted_attention(U.expand(2, n, n), torch.ones(2, n, n, dtype=torch.float64))
    torch.testing.assert_close(cam, U)
    torch.testing.assert_close(propagate([cam]), torch.eye(n, dtype=torch.float64) + U)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_k_uniform_layers_give_identity_plus_2k_minus_1_uniform(k):
    n = 3
    U = torch.full((n, n), 1 / n, dtype=torch.float64)
    expected = torch.eye(n, dtype=torch.float64) + (2**k - 1) * U
    torch.testing.assert_close(propagate([U] * k), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(propagate_rows([U] * k, [0, 2]), expected[[0, 2]], rtol=0, atol=1e-12)


def test_clamp_per_head_before_mean():
    attn = torch.ones(2, 1, 2)
    grad = torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]]])
    cam = gradient_weighted_attention(attn, grad)
    torch.testing.assert_close(cam, torch.tensor([[0.5, 0.5]]))
    # The wrong order (mean, then clamp) cancels the heads.
    assert torch.equal((grad * attn).mean(0).clamp(min=0), torch.zeros(1, 2))


def test_two_layer_example_and_its_guarded_normalization():
    cams = [torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.5, 0.5]])]
    R = propagate(cams)
    torch.testing.assert_close(R, torch.tensor([[1.0, 0.0], [2.0, 1.5]]))
    torch.testing.assert_close(propagate_rows(cams, [1]), torch.tensor([[2.0, 1.5]]))
    torch.testing.assert_close(normalize_residual(R), torch.tensor([[1.0, 0.0], [0.8, 1.2]]))


def test_scaling_the_target_changes_the_ratio():
    # Build the two layers from (attention, gradient) pairs; a target 5x larger scales every gradient by 5.
    attn1, grad1 = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]]), torch.ones(1, 2, 2)
    attn2, grad2 = torch.tensor([[[0.0, 0.0], [0.5, 0.5]]]), torch.ones(1, 2, 2)

    def row1_minus_self(scale):
        cams = [gradient_weighted_attention(attn1, scale * grad1), gradient_weighted_attention(attn2, scale * grad2)]
        row = propagate_rows(cams, 1)
        return row - torch.tensor([0.0, 1.0])

    torch.testing.assert_close(row1_minus_self(1.0), torch.tensor([2.0, 0.5]))
    torch.testing.assert_close(row1_minus_self(5.0), torch.tensor([20.0, 2.5]))


def test_rule_10_with_nonidentity_self_relevance():
    R_ss = torch.eye(2) + torch.full((2, 2), 0.5)
    R_sq, R_ss_new = cross_attention_update(R_ss, torch.eye(2), torch.zeros(2, 2), torch.zeros(2, 2), torch.eye(2))
    torch.testing.assert_close(R_sq, torch.tensor([[1.5, 0.5], [0.5, 1.5]]))
    torch.testing.assert_close(R_ss_new, R_ss)  # R_qs = 0: rule 11 adds nothing


def test_rule_10_with_identity_self_relevance_adds_the_map():
    cam = torch.tensor([[0.2, 0.7, 0.0], [0.1, 0.0, 0.4]])
    R_sq, _ = cross_attention_update(torch.eye(2), torch.eye(3), torch.zeros(2, 3), torch.zeros(3, 2), cam)
    torch.testing.assert_close(R_sq, cam)


def test_1d_pool_3_to_2_and_text_to_patch():
    q2p = pooling_map((1, 3), (1, 2))
    torch.testing.assert_close(q2p, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]))
    torch.testing.assert_close(compose(torch.tensor([1.0, 1.0]), q2p), torch.tensor([0.5, 1.0, 0.5]))


def test_4x4_to_2x2_pool_row_0():
    q2p = pooling_map(4, 2)
    expected = torch.zeros(16)
    expected[[0, 1, 4, 5]] = 0.25
    assert q2p.shape == (4, 16)
    torch.testing.assert_close(q2p[0], expected)


# ---- properties against slow references ---------------------------------------------------------------------------


@PROPERTY
@given(seed=seeds, n_layers=st.integers(1, 8), n=st.integers(1, 12), n_rows=st.integers(1, 4))
def test_row_trick_equals_full_product(seed, n_layers, n, n_rows):
    cams = _random_cams(seed, n_layers, n)
    rows = torch.randint(0, n, (n_rows,), generator=_gen(seed + 1))
    full = propagate(cams)
    # The full product written out from its definition, newest layer on the left.
    eye = torch.eye(n, dtype=torch.float64)
    naive = eye
    for cam in reversed(cams):
        naive = naive @ (eye + cam)
    torch.testing.assert_close(full, naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(propagate_rows(cams, rows), full[rows], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(propagate_rows(torch.stack(cams), rows.tolist()), full[rows], rtol=1e-10, atol=1e-10)


def test_row_trick_single_row_and_negative_index():
    cams = _random_cams(3, 4, 6)
    full = propagate(cams)
    torch.testing.assert_close(propagate_rows(cams, -1), full[-1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(propagate_rows(cams, torch.tensor(2)), full[2], rtol=1e-10, atol=1e-10)
    assert propagate_rows(cams, [5, -1]).shape == (2, 6)


def test_row_trick_rejects_nan_the_row_never_reads():
    # Row 0 of a causal stack only ever touches column 0; the NaN sits where a zero weight multiplies it.
    cams = [torch.eye(3) * 0.5 for _ in range(3)]
    cams[1][2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"cams\[1\] contains NaN or inf"):
        propagate_rows(cams, [0])
    with pytest.raises(ValueError, match=r"cams\[1\] contains NaN or inf"):
        propagate(cams)


def test_row_trick_huge_but_finite_maps():
    # Column sums overflow float32 (a false alarm of the fused check) while the requested row stays finite.
    cam = torch.zeros(2, 2)
    cam[:, 0] = 2e38
    torch.testing.assert_close(propagate_rows([cam], [0]), torch.tensor([[2e38, 0.0]]))
    with pytest.raises(ValueError, match="overflowed"):
        propagate_rows([cam, cam], [0])
    with pytest.raises(ValueError, match="overflowed"):
        propagate([cam, cam])


def test_rules_unrolled_equal_propagate():
    n, m = 5, 3
    cams = _random_cams(7, 4, n)
    R_ss = torch.eye(n, dtype=torch.float64)
    R_sq = torch.rand(n, m, generator=_gen(8), dtype=torch.float64)
    R_sq0 = R_sq.clone()
    for cam in cams:
        R_ss, R_sq = self_attention_update(R_ss, R_sq, cam)
    full = propagate(cams)
    torch.testing.assert_close(R_ss, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R_sq, full @ R_sq0, rtol=1e-12, atol=1e-12)


def _adaptive_pool_jacobian(in_hw, out_hw):
    h, w = in_hw

    def pool(x):
        return F.adaptive_avg_pool2d(x.reshape(1, 1, h, w), out_hw).reshape(-1)

    return torch.autograd.functional.jacobian(pool, torch.zeros(h * w, dtype=torch.float64), vectorize=True)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@example(data=((27, 27), (12, 12)))
@example(data=((16, 24), (4, 6)))
@example(data=((5, 7), (3, 2)))
@example(data=((24, 24), (5, 5)))
@example(data=((1, 9), (1, 4)))
def test_pooling_map_equals_adaptive_avg_pool_jacobian(data):
    if isinstance(data, tuple):  # an explicit example
        in_hw, out_hw = data
    else:
        in_hw = (data.draw(st.integers(1, 20)), data.draw(st.integers(1, 20)))
        out_hw = (data.draw(st.integers(1, in_hw[0])), data.draw(st.integers(1, in_hw[1])))
    q2p = pooling_map(in_hw, out_hw, dtype=torch.float64)
    assert q2p.shape == (out_hw[0] * out_hw[1], in_hw[0] * in_hw[1])
    torch.testing.assert_close(q2p, _adaptive_pool_jacobian(in_hw, out_hw), rtol=0, atol=1e-12)
    torch.testing.assert_close(q2p.sum(-1), torch.ones(q2p.shape[0], dtype=torch.float64))


def test_pooling_map_int_means_square_and_matches_rearrange_flattening():
    assert torch.equal(pooling_map(6, 4), pooling_map((6, 6), (4, 4)))
    # Pooling features [d, h, w] then flattening row-major == Q2P @ features flattened row-major.
    feats = torch.randn(3, 6, 10, generator=_gen(1), dtype=torch.float64)
    pooled = F.adaptive_avg_pool2d(feats, (4, 3)).reshape(3, -1).T  # [(h w), d]
    torch.testing.assert_close(pooling_map((6, 10), (4, 3), dtype=torch.float64) @ feats.reshape(3, -1).T, pooled)


def test_identity_map():
    assert torch.equal(identity_map(4), torch.eye(4))
    assert identity_map(3, dtype=torch.float64).dtype == torch.float64


@PROPERTY
@given(seed=seeds, batch=st.integers(1, 3), heads=st.integers(1, 5), n_q=st.integers(1, 6), n_k=st.integers(1, 6))
def test_clamp_before_mean_matches_naive_loop(seed, batch, heads, n_q, n_k):
    g = _gen(seed)
    attn = torch.softmax(torch.randn(batch, heads, n_q, n_k, generator=g, dtype=torch.float64), dim=-1)
    grad = torch.randn(batch, heads, n_q, n_k, generator=g, dtype=torch.float64)
    expected = torch.zeros(batch, n_q, n_k, dtype=torch.float64)
    for b, h, i, j in itertools.product(range(batch), range(heads), range(n_q), range(n_k)):
        expected[b, i, j] += max(float(grad[b, h, i, j] * attn[b, h, i, j]), 0.0) / heads
    torch.testing.assert_close(gradient_weighted_attention(attn, grad), expected, rtol=1e-12, atol=1e-12)
    # Head axis elsewhere: [heads, batch, n_q, n_k] with head_dim=0 is the same computation.
    moved = gradient_weighted_attention(attn.transpose(0, 1), grad.transpose(0, 1), head_dim=0)
    torch.testing.assert_close(moved, expected, rtol=1e-12, atol=1e-12)


@PROPERTY
@given(
    seed=seeds,
    n=st.integers(1, 8),
    zero_row_fraction=st.floats(0, 1),
    scale=st.sampled_from(["subnormal", "tiny", "small", "one", "huge"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_normalize_residual_is_always_finite(seed, n, zero_row_fraction, scale, dtype):
    g = _gen(seed)
    info = torch.finfo(dtype)
    factor = {"subnormal": info.tiny / 2**10, "tiny": info.tiny, "small": 1e-3, "one": 1.0, "huge": info.max / 16}
    residual = (torch.rand(n, n, generator=g, dtype=torch.float64) * factor[scale]).to(dtype)
    residual[torch.rand(n, n, generator=g) < 0.3] = 0.0
    residual[torch.rand(n, generator=g) < zero_row_fraction] = 0.0
    eye = torch.eye(n, dtype=dtype)
    R = eye + residual
    out = normalize_residual(R)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    nonzero = (R - eye).sum(-1) != 0
    assert torch.equal(out[~nonzero], eye[~nonzero])  # untouched rows stay rows of I
    if scale != "subnormal":  # subnormals carry too few bits for the sum to be 1 to rounding
        sums = (out - eye).sum(-1)
        torch.testing.assert_close(sums[nonzero], torch.ones(int(nonzero.sum()), dtype=dtype))
    assert torch.equal(normalize_residual(eye), eye)


def _normalize_residual_loops(R):
    n = R.shape[0]
    out = torch.zeros_like(R)
    for i in range(n):
        row = [float(R[i, j]) - (1.0 if i == j else 0.0) for j in range(n)]
        total = sum(row) or 1.0
        for j in range(n):
            out[i, j] = row[j] / total + (1.0 if i == j else 0.0)
    return out


def _cross_rules_loops(R_ss, R_qq, R_sq, R_qs, cam):
    """GAE rules 10 and 11 written out entry by entry."""
    n_s, n_q = cam.shape
    bar_ss, bar_qq = _normalize_residual_loops(R_ss), _normalize_residual_loops(R_qq)
    R_sq_new, R_ss_new = R_sq.clone(), R_ss.clone()
    for i, j in itertools.product(range(n_s), range(n_q)):
        # (R̄_ssᵀ · cam · R̄_qq)[i, j] = Σ_a Σ_b R̄_ss[a, i] cam[a, b] R̄_qq[b, j]
        R_sq_new[i, j] += sum(float(bar_ss[a, i] * cam[a, b] * bar_qq[b, j]) for a in range(n_s) for b in range(n_q))
    for i, j in itertools.product(range(n_s), range(n_s)):
        R_ss_new[i, j] += sum(float(cam[i, b] * R_qs[b, j]) for b in range(n_q))
    return R_sq_new, R_ss_new


def _random_state(g, n_s, n_q, batch=()):
    """Relevance matrices as the rules produce them: self maps I + non-negative, with some untouched (zero) rows."""
    kw = {"generator": g, "dtype": torch.float64}
    R_ss = torch.eye(n_s, dtype=torch.float64) + torch.rand(*batch, n_s, n_s, **kw)
    R_ss[..., 0, :] = torch.eye(n_s, dtype=torch.float64)[0]
    R_qq = torch.eye(n_q, dtype=torch.float64) + torch.rand(*batch, n_q, n_q, **kw) * (torch.rand(1, **kw) > 0.3)
    return R_ss, R_qq, torch.rand(*batch, n_s, n_q, **kw), torch.rand(*batch, n_q, n_s, **kw)


@PROPERTY
@given(seed=seeds, n_s=st.integers(1, 5), n_q=st.integers(1, 5))
def test_cross_rule_matches_loop_transcription(seed, n_s, n_q):
    g = _gen(seed)
    R_ss, R_qq, R_sq, R_qs = _random_state(g, n_s, n_q)
    cam = torch.rand(n_s, n_q, generator=g, dtype=torch.float64)
    got = cross_attention_update(R_ss, R_qq, R_sq, R_qs, cam)
    expected = _cross_rules_loops(R_ss, R_qq, R_sq, R_qs, cam)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _cross_stack_reference(layers, n_q, n_k, R_kk=None):
    """All four relevance matrices kept explicitly, every rule applied in its generic form."""
    R_qq, R_qk = torch.eye(n_q, dtype=torch.float64), torch.zeros(n_q, n_k, dtype=torch.float64)
    R_kq = torch.zeros(n_k, n_q, dtype=torch.float64)
    R_kk = torch.eye(n_k, dtype=torch.float64) if R_kk is None else R_kk
    for kind, cam in layers:
        if kind == "self":
            R_qq, R_qk = R_qq + cam @ R_qq, R_qk + cam @ R_qk  # rules 6, 7 on the query stream
        else:
            R_qk, R_qq = _cross_rules_loops(R_qq, R_kk, R_qk, R_kq, cam)  # rules 10, 11, queries attend to keys
        # The key stream has no layers here: R_kk and R_kq never change.
    return R_qq, R_qk


@PROPERTY
@given(seed=seeds, n_q=st.integers(1, 4), n_k=st.integers(1, 6), kinds=st.lists(st.booleans(), max_size=5))
def test_cross_stack_matches_reference(seed, n_q, n_k, kinds):
    g = _gen(seed)
    layers = [
        ("self", torch.rand(n_q, n_q, generator=g, dtype=torch.float64) / n_q)
        if is_self
        else ("cross", torch.rand(n_q, n_k, generator=g, dtype=torch.float64) / n_k)
        for is_self in kinds
    ]
    R_kk = torch.eye(n_k, dtype=torch.float64) + torch.rand(n_k, n_k, generator=g, dtype=torch.float64)
    for kk in (None, R_kk):
        got = propagate_cross_stack(layers, n_q, n_k, R_kk=kk, dtype=torch.float64)
        expected = _cross_stack_reference(layers, n_q, n_k, R_kk=kk)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cross_stack_hand_case_self_then_cross():
    U = torch.full((2, 2), 0.5)
    cam = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    R_qq, R_qk = propagate_cross_stack([("self", U), ("cross", cam)], n_queries=2, n_keys=3)
    torch.testing.assert_close(R_qq, torch.eye(2) + U)  # R_kq = 0: the cross layer adds nothing to R_qq
    torch.testing.assert_close(R_qk, torch.tensor([[1.5, 0.5], [0.5, 1.5]]) @ cam)


def test_cross_stack_of_self_layers_is_propagate():
    cams = _random_cams(5, 3, 4)
    R_qq, R_qk = propagate_cross_stack([("self", c) for c in cams], 4, 7)
    torch.testing.assert_close(R_qq, propagate(cams), rtol=1e-12, atol=1e-12)
    assert torch.equal(R_qk, torch.zeros(4, 7, dtype=torch.float64))


def test_compose_and_average_steps():
    t2q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    q2p = pooling_map((1, 3), (1, 2))
    t2p = compose(t2q, q2p)
    torch.testing.assert_close(t2p, torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 1.0], [0.5, 1.0, 0.5]]))
    torch.testing.assert_close(average_steps(t2p), t2p.mean(0))
    torch.testing.assert_close(average_steps(list(t2p)), t2p.mean(0))
    torch.testing.assert_close(average_steps(t2p, weights=[1.0, 0.0, 1.0]), (t2p[0] + t2p[2]) / 2)
    grids = t2p.reshape(3, 1, 3)  # the step axis is 0 whatever the map's shape
    torch.testing.assert_close(average_steps(grids), t2p.mean(0).reshape(1, 3))


def test_propagation_module_reexports_the_engine():
    assert propagation.propagate_rows is propagate_rows
    assert propagation.propagate_cross_stack is propagate_cross_stack


# ---- dtype, device, batching ---------------------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_device_are_preserved(dtype, device):
    kw = {"dtype": dtype, "device": device}
    attn = torch.rand(2, 3, 4, 4, **kw)
    cam = gradient_weighted_attention(attn, torch.randn(2, 3, 4, 4, **kw))
    cams = [cam, cam]
    outs = [
        cam,
        propagate(cams),
        propagate_rows(cams, [1, 3]),
        *self_attention_update(propagate(cams), torch.rand(2, 4, 3, **kw), cam),
        normalize_residual(propagate(cams)),
        *cross_attention_update(
            torch.eye(3, **kw), torch.eye(4, **kw), torch.zeros(3, 4, **kw), torch.zeros(4, 3, **kw), cam[0, :3]
        ),
        *propagate_cross_stack([("self", cam[0, :2, :2]), ("cross", cam[0, :2])], 2, 4),
        pooling_map((4, 4), (2, 3), **kw),
        identity_map(3, **kw),
        compose(cam[0, :2], pooling_map((4, 4), (2, 2), **kw)),
        average_steps(cam[0], weights=torch.ones(4)),
    ]
    for out in outs:
        assert out.dtype == dtype and out.device.type == device


@PROPERTY
@given(seed=seeds, batch=st.integers(1, 3), n=st.integers(1, 6), n_layers=st.integers(1, 4))
def test_batched_equals_per_item_loop(seed, batch, n, n_layers):
    g = _gen(seed)
    attn = torch.rand(batch, 3, n, n, generator=g, dtype=torch.float64)
    grad = torch.randn(batch, 3, n, n, generator=g, dtype=torch.float64)
    cam = gradient_weighted_attention(attn, grad)
    for b in range(batch):
        torch.testing.assert_close(cam[b], gradient_weighted_attention(attn[b], grad[b]))

    cams = _random_cams(seed, n_layers, n, batch=(batch,))
    full, rows = propagate(cams), propagate_rows(cams, [0, n - 1])
    normed = normalize_residual(full)
    R_ss, R_qq, R_sq, R_qs = _random_state(g, n, 2, batch=(batch,))
    cam_sq = torch.rand(batch, n, 2, generator=g, dtype=torch.float64)
    cross = cross_attention_update(R_ss, R_qq, R_sq, R_qs, cam_sq)
    selfu = self_attention_update(R_ss, R_sq, cams[0])
    stack = propagate_cross_stack(
        [("self", R_qq - torch.eye(2, dtype=torch.float64)), ("cross", cam_sq.transpose(1, 2))], 2, n
    )
    for b in range(batch):
        item_cams = [c[b] for c in cams]
        torch.testing.assert_close(full[b], propagate(item_cams))
        torch.testing.assert_close(rows[b], propagate_rows(item_cams, [0, n - 1]))
        torch.testing.assert_close(normed[b], normalize_residual(full[b]))
        for got, want in zip(cross, cross_attention_update(R_ss[b], R_qq[b], R_sq[b], R_qs[b], cam_sq[b])):
            torch.testing.assert_close(got[b], want)
        for got, want in zip(selfu, self_attention_update(R_ss[b], R_sq[b], cams[0][b])):
            torch.testing.assert_close(got[b], want)
        item_stack = propagate_cross_stack(
            [("self", R_qq[b] - torch.eye(2, dtype=torch.float64)), ("cross", cam_sq[b].T)], 2, n
        )
        for got, want in zip(stack, item_stack):
            torch.testing.assert_close(got[b], want)


# ---- errors ---------------------------------------------------------------------------------------------------------

nan_map = torch.tensor([[0.0, float("nan")], [0.0, 0.0]])
inf_map = torch.tensor([[0.0, float("inf")], [0.0, 0.0]])
sq2 = torch.zeros(2, 2)

ERROR_CASES = {
    "gwa shape mismatch": (lambda: gradient_weighted_attention(torch.rand(2, 3, 3), torch.rand(2, 3, 4)), "same shape"),
    "gwa no head axis": (lambda: gradient_weighted_attention(torch.rand(3, 3), torch.rand(3, 3)), "at least 3"),
    "gwa head_dim on keys": (lambda: gradient_weighted_attention(sq2[None], sq2[None], head_dim=-1), "head axis"),
    "gwa nan": (lambda: gradient_weighted_attention(nan_map[None], sq2[None]), "NaN or inf"),
    "gwa integer": (lambda: gradient_weighted_attention(torch.ones(1, 2, 2, dtype=torch.long), sq2[None]), "floating"),
    "self non-square cam": (lambda: self_attention_update(sq2, sq2, torch.zeros(2, 3)), "square"),
    "self R_sq rows": (lambda: self_attention_update(sq2, torch.zeros(3, 2), sq2), "R_sq must be"),
    "self inf": (lambda: self_attention_update(sq2, sq2, inf_map), "NaN or inf"),
    "normalize non-square": (lambda: normalize_residual(torch.zeros(2, 3)), "square"),
    "normalize nan": (lambda: normalize_residual(nan_map), "NaN or inf"),
    "normalize cancelling row": (
        # R - I row 0 sums (left to right) to the smallest subnormal: the division overflows.
        lambda: normalize_residual(
            torch.tensor([[1.0, 2.0**1000, -(2.0**1000), 2.0**-1074], *torch.eye(4)[1:].tolist()], dtype=torch.float64)
        ),
        "overflowed",
    ),
    "cross R_qs shape": (
        lambda: cross_attention_update(sq2, torch.eye(3), torch.zeros(2, 3), sq2, torch.zeros(2, 3)),
        "R_qs must be",
    ),
    "cross nan": (lambda: cross_attention_update(sq2, sq2, sq2, sq2, nan_map), "NaN or inf"),
    "pool out larger": (lambda: pooling_map((4, 4), (5, 2)), "at most"),
    "pool negative": (lambda: pooling_map(-3, 2), "positive"),
    "pool zero": (lambda: pooling_map((4, 4), (0, 2)), "positive"),
    "pool bad grid": (lambda: pooling_map((4, 4, 4), 2), "pair"),
    "pool float size": (lambda: pooling_map(4.0, 2), "an int or"),
    "identity negative": (lambda: identity_map(-1), "positive"),
    "rows out of range": (lambda: propagate_rows([sq2], [2]), "out of range"),
    "rows too negative": (lambda: propagate_rows([sq2], [-3]), "out of range"),
    "rows float": (lambda: propagate_rows([sq2], torch.tensor([0.0])), "integer"),
    "rows bool": (lambda: propagate_rows([sq2], [True]), "ints"),
    "rows 2-D": (lambda: propagate_rows([sq2], torch.zeros(1, 1, dtype=torch.long)), "1-D"),
    "no layers": (lambda: propagate([]), "empty"),
    "mixed layer shapes": (lambda: propagate([sq2, torch.zeros(3, 3)]), "one shape"),
    "non-square layers": (lambda: propagate([torch.zeros(2, 3)]), "square"),
    "nan layer": (lambda: propagate_rows([sq2, nan_map], [0]), "NaN or inf"),
    "stack bad kind": (lambda: propagate_cross_stack([("mlp", sq2)], 2, 2), "kind"),
    "stack cross shape": (lambda: propagate_cross_stack([("cross", torch.zeros(2, 3))], 2, 4), "cross"),
    "stack R_kk shape": (lambda: propagate_cross_stack([], 2, 4, R_kk=sq2), "R_kk must be"),
    "stack negative size": (lambda: propagate_cross_stack([], -2, 4), "positive"),
    "compose mismatch": (lambda: compose(torch.zeros(3), torch.zeros(2, 5)), "must equal"),
    "compose nan": (lambda: compose(torch.tensor([float("nan")]), torch.zeros(1, 2)), "NaN or inf"),
    "average empty": (lambda: average_steps([]), "non-empty"),
    "average weights shape": (lambda: average_steps(sq2, weights=[1.0]), "weights must be"),
    "average zero weights": (lambda: average_steps(sq2, weights=[0.0, 0.0]), "positive sum"),
    "average negative weights": (lambda: average_steps(sq2, weights=[2.0, -1.0]), "non-negative"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_invalid_input_raises_value_error(case):
    call, message = ERROR_CASES[case]
    with pytest.raises(ValueError, match=message):
        call()
