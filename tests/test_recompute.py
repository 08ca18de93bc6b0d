"""The streamed engine (rgae.recompute) against full-matrix references: dense probabilities with repeat_kv, masks
written out, rgae.rules' gradient_weighted_attention / propagate_rows / the rollout product; and the recomputed
probabilities against torch's own scaled_dot_product_attention (the kernel whose output they must explain)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rgae.methods.rollout import rollout_layer
from rgae.recompute import (
    AttentionBlock,
    compute_dtype,
    layer_cam,
    layer_probabilities,
    probability_rows,
    rollout_step,
    row_trick_step,
)
from rgae.rules import gradient_weighted_attention, propagate_rows

PROPERTY = settings(max_examples=30, deadline=None)
seeds = st.integers(min_value=0, max_value=2**31 - 1)


def dense_probs(block: AttentionBlock) -> torch.Tensor:
    """[H, n_q, n_k], written out: repeat the KV heads, full logits, every mask rule as a dense boolean."""
    rep = block.heads // block.kv_heads
    q = block.query.double()
    k = block.key.double().repeat_interleave(rep, dim=0)
    logits = q @ k.transpose(-1, -2) * block.scaling
    if block.softcap is not None:
        logits = block.softcap * torch.tanh(logits / block.softcap)
    n_q, n_k = block.n_q, block.n_k
    i = torch.arange(n_q).view(-1, 1)
    j = torch.arange(n_k).view(1, -1)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool)
    if block.causal:
        allowed &= j <= i
    if block.window is not None:
        allowed &= (i - j < block.window) if block.causal else ((i - j).abs() < block.window)
    if block.mask is not None:
        if block.mask.dtype == torch.bool:
            logits = logits.masked_fill(~block.mask, -math.inf)
        else:
            logits = logits + block.mask.double()
    logits = logits.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


def dense_grad(block: AttentionBlock, grad_out: torch.Tensor) -> torch.Tensor:
    """[T, H, n_q, n_k] = (dy/dO) Vᵀ with the KV heads repeated."""
    v = block.value.double().repeat_interleave(block.heads // block.kv_heads, dim=0)
    return grad_out.double() @ v.transpose(-1, -2)


@st.composite
def blocks(draw, square=False):
    seed = draw(seeds)
    g = torch.Generator().manual_seed(seed)
    kv = draw(st.integers(1, 3))
    heads = kv * draw(st.integers(1, 3))
    n_q = draw(st.integers(1, 9))
    n_k = n_q if square else draw(st.integers(1, 9))
    d, d_v = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    q = torch.randn(heads, n_q, d, generator=g, dtype=torch.float64)
    k = torch.randn(kv, n_k, d, generator=g, dtype=torch.float64)
    v = torch.randn(kv, n_k, d_v, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["none", "causal", "bool", "additive", "per_head_bool"]))
    causal = kind == "causal" and n_q == n_k
    mask = None
    if kind in ("bool", "per_head_bool"):
        mask = torch.rand(heads if kind == "per_head_bool" else 1, n_q, n_k, generator=g) < 0.7
    elif kind == "additive":
        keep = torch.rand(1, n_q, n_k, generator=g) < 0.7
        bias = 0.1 * torch.randn(1, n_q, n_k, generator=g, dtype=torch.float64)
        mask = torch.where(keep, bias, torch.finfo(torch.float64).min)  # eager's additive mask, plus a bias
    window = draw(st.one_of(st.none(), st.integers(1, 4))) if (causal or (kind == "none" and n_q == n_k)) else None
    softcap = draw(st.one_of(st.none(), st.floats(0.5, 5.0)))
    scaling = draw(st.floats(0.1, 2.0))
    return AttentionBlock(q, k, v, scaling, mask=mask, causal=causal, window=window, softcap=softcap)


@PROPERTY
@given(block=blocks(), targets=st.integers(1, 3), chunk=st.sampled_from([1, 2, 3, 128]), seed=seeds)
def test_layer_cam_equals_gradient_weighted_attention_of_the_dense_matrices(block, targets, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(targets, block.heads, block.n_q, block.value.shape[-1], generator=g, dtype=torch.float64)
    expected = gradient_weighted_attention(dense_probs(block).expand(targets, -1, -1, -1), dense_grad(block, grad_out))
    got = layer_cam([block], [grad_out], block.n_q, block.n_k, chunk_rows=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer_probabilities([block], block.n_q, block.n_k), dense_probs(block))


@PROPERTY
@given(layers=st.lists(blocks(square=True), min_size=1, max_size=4), seed=seeds, chunk=st.sampled_from([1, 2, 5, 128]))
def test_streamed_row_trick_equals_propagate_rows_of_the_full_cams(layers, seed, chunk):
    n = layers[0].n_q
    layers = [b for b in layers if b.n_q == n]
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(2, b.heads, n, b.value.shape[-1], generator=g, dtype=torch.float64) for b in layers]
    rows = [int(torch.randint(n, (1,), generator=g)), n - 1]
    cams = [gradient_weighted_attention(dense_probs(b).expand(2, -1, -1, -1), dense_grad(b, gr))
            for b, gr in zip(layers, grads)]
    # Target t's row r_t through its own cams: e_r (I + cam_L) ... (I + cam_1).
    expected = torch.stack([propagate_rows([c[t] for c in cams], rows[t]) for t in range(2)])
    v = torch.zeros(2, n, dtype=torch.float64)
    v[0, rows[0]] = v[1, rows[1]] = 1.0
    for block, grad in zip(reversed(layers), reversed(grads)):
        v = row_trick_step(v, [block], [grad], chunk_rows=chunk)
    torch.testing.assert_close(v, expected, rtol=1e-10, atol=1e-12)


@PROPERTY
@given(layers=st.lists(blocks(square=True), min_size=1, max_size=3),
       # a subnormal residual on a fully masked row is 0/0 in float64 too: the residual is 0 or a usable weight
       residual=st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), seed=seeds, heads=st.sampled_from([None, [0]]))
def test_streamed_rollout_equals_the_product_of_rollout_layers(layers, residual, seed, heads):
    n = layers[0].n_q
    layers = [b for b in layers if b.n_q == n]
    if any(b.mask is not None and b.mask.dtype == torch.bool for b in layers) and residual == 0.0:
        return  # a fully masked row has no rollout (0/0) in either implementation
    rows = [n - 1, 0]
    expected = torch.eye(n, dtype=torch.float64)[rows]
    for b in reversed(layers):
        probs = dense_probs(b)
        expected = expected @ rollout_layer((probs if heads is None else probs[heads]).mean(0), residual)
    v = torch.eye(n, dtype=torch.float64)[rows]
    for b in reversed(layers):
        v = rollout_step(v, [b], heads=heads, residual=residual, chunk_rows=3)
    torch.testing.assert_close(v, expected, rtol=1e-10, atol=1e-12)


@PROPERTY
@given(block=blocks(), seed=seeds)
def test_probability_rows_are_rows_of_the_dense_matrix(block, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(block.n_q, (3,), generator=g)
    torch.testing.assert_close(probability_rows([block], rows, block.n_k), dense_probs(block)[:, rows])


def test_block_diagonal_layer_equals_one_block_with_a_block_diagonal_mask():
    g = torch.Generator().manual_seed(0)
    sizes = [3, 5, 2]
    n = sum(sizes)
    q, k, v = (torch.randn(2, n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64)
    diag = torch.block_diag(*[torch.ones(s, s, dtype=torch.bool) for s in sizes]).unsqueeze(0)
    whole = AttentionBlock(q, k, v, 0.5, mask=diag)
    parts, start = [], 0
    for s in sizes:
        parts.append(AttentionBlock(q[:, start : start + s], k[:, start : start + s], v[:, start : start + s], 0.5,
                                    q_offset=start, k_offset=start))
        start += s
    part_grads = [grad[:, :, b.q_offset : b.q_offset + b.n_q] for b in parts]
    torch.testing.assert_close(layer_cam(parts, part_grads, n, n), layer_cam([whole], [grad], n, n))
    torch.testing.assert_close(layer_probabilities(parts, n, n), layer_probabilities([whole], n, n))
    e = torch.eye(n, dtype=torch.float64)[[n - 1, 4]]
    torch.testing.assert_close(row_trick_step(e, parts, [pg.expand(2, -1, -1, -1) for pg in part_grads]),
                               row_trick_step(e, [whole], [grad.expand(2, -1, -1, -1)]))


@pytest.mark.parametrize("kind", ["causal", "bool", "additive", "gqa"])
def test_recomputed_probabilities_reproduce_torch_sdpa(kind):
    """O = A · V with the recomputed A equals the kernel's output: the mask semantics are the kernel's."""
    g = torch.Generator().manual_seed(1)
    heads, kv = (4, 2) if kind == "gqa" else (2, 2)
    n, d = 7, 8
    q = torch.randn(1, heads, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, kv, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(1, kv, n, d, generator=g, dtype=torch.float64)
    mask, causal, sdpa_kw = None, False, {}
    if kind in ("causal", "gqa"):
        causal, sdpa_kw = True, {"is_causal": True}
    elif kind == "bool":
        mask = torch.rand(1, 1, n, n, generator=g) < 0.6
        mask[..., 0] = True  # sdpa's fully masked rows are backend-dependent
        sdpa_kw = {"attn_mask": mask}
    else:
        mask = torch.randn(1, 1, n, n, generator=g, dtype=torch.float64)
        sdpa_kw = {"attn_mask": mask}
    out = F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=kind == "gqa", **sdpa_kw)
    block = AttentionBlock(q[0], k[0], v[0], 0.3, mask=None if mask is None else mask[0], causal=causal)
    probs = layer_probabilities([block], n, n)
    recon = probs @ v[0].repeat_interleave(heads // kv, dim=0)
    torch.testing.assert_close(recon, out[0], rtol=1e-12, atol=1e-12)


def test_gradient_of_the_output_times_values_is_the_gradient_of_the_probabilities():
    """∂y/∂A = (∂y/∂O) Vᵀ: autograd through O = A V, for an arbitrary y."""
    g = torch.Generator().manual_seed(2)
    attn = torch.softmax(torch.randn(2, 5, 6, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    v = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    out = attn @ v
    y = (torch.sin(out) * torch.randn(2, 5, 3, generator=g, dtype=torch.float64)).sum()
    d_attn, d_out = torch.autograd.grad(y, [attn, out])
    torch.testing.assert_close(d_attn, d_out @ v.transpose(-1, -2))


def test_rows_the_target_does_not_need_are_never_computed():
    """A causal row-trick step from e_r reads rows <= r only: NaN queries after r change nothing."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    e = torch.zeros(1, 6, dtype=torch.float64)
    e[0, 3] = 1.0
    clean = row_trick_step(e, [AttentionBlock(q, k, v, 0.5, causal=True)], [grad])
    q_bad = q.clone()
    q_bad[:, 4:] = float("nan")
    assert torch.equal(row_trick_step(e, [AttentionBlock(q_bad, k, v, 0.5, causal=True)], [grad]), clean)
    assert clean[0, 4:].abs().sum() == 0 and clean[0, :4].abs().sum() > 0


def test_half_precision_is_recomputed_in_float32():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 5, 4, generator=g).to(torch.bfloat16) for _ in range(3))
    block = AttentionBlock(q, k, v, 0.5, causal=True)
    assert compute_dtype(torch.bfloat16) == torch.float32 and compute_dtype(torch.float64) == torch.float64
    probs = layer_probabilities([block], 5, 5)
    assert probs.dtype == torch.float32
    ref = dense_probs(AttentionBlock(q.float(), k.float(), v.float(), 0.5, causal=True))
    torch.testing.assert_close(probs.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"query": torch.zeros(2, 3)}, "query"),
        ({"key": torch.zeros(3, 3, 4), "value": torch.zeros(3, 3, 4)}, "multiple"),
        ({"mask": torch.zeros(1, 3, 2, dtype=torch.bool)}, "mask"),
        ({"mask": torch.zeros(1, 3, 3, dtype=torch.long)}, "dtype"),
        ({"scaling": float("nan")}, "scaling"),
        ({"window": 0}, "window"),
        ({"softcap": -1.0}, "softcap"),
    ],
)
def test_bad_blocks_are_value_errors(kwargs, match):
    base = {"query": torch.zeros(2, 3, 4), "key": torch.zeros(2, 3, 4), "value": torch.zeros(2, 3, 4), "scaling": 1.0}
    with pytest.raises(ValueError, match=match):
        AttentionBlock(**{**base, **kwargs})
    block = AttentionBlock(**base)
    with pytest.raises(ValueError, match="gradient"):
        layer_cam([block], [], 3, 3)
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        row_trick_step(torch.zeros(1, 3), [block], [torch.zeros(1, 2, 3)])
