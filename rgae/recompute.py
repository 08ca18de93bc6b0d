"""Attention probabilities recomputed from queries and keys, in row chunks, and the R-GAE reductions streamed over
them: pure tensor math, no model knowledge (the engine's second half, beside :mod:`rgae.rules`).

An attention call with output ``O_h = A_h V_h`` (per head h) never has to store ``A_h``: it is recomputed as
``A_h = softmax(softcap(Q_h K_hᵀ · scale) + mask)`` and, since the target y depends on ``A_h`` only through ``O_h``,
its gradient is exactly ``G_h = ∂y/∂A_h = (∂y/∂O_h) V_hᵀ``. So one backward pass per target token gives ``∂y/∂O``
at every layer (``n · H · d`` numbers each) and the per-layer map ``cam = mean_h (G_h ⊙ A_h)+`` (clamp per head,
then the mean, as :func:`rgae.rules.gradient_weighted_attention`) is formed a few rows at a time:

* :func:`row_trick_step` — ``v ← v + v · cam`` for the rows v needs (the row trick of
  :func:`rgae.rules.propagate_rows`, one layer), skipping rows where v is zero (after the predicting position in a
  causal model) and keys the mask forbids, so the extra memory is ``O(T · H · chunk · n)`` for T targets at once and
  ``chunk`` query rows per step, never ``O(H · n²)``;
* :func:`layer_cam` — the full ``[n_q, n_k]`` cam (small layers: a Q-Former, a ViT propagated in full);
* :func:`probability_rows`, :func:`layer_probabilities`, :func:`rollout_step` — the probabilities themselves, for
  raw attention and attention rollout.

One call is an :class:`AttentionBlock` (its heads, mask, scaling, softcap); a layer is a list of blocks on
disjoint row/column ranges (``q_offset``/``k_offset``), which is how a module called once per packed sequence or per
image makes one block-diagonal layer. Grouped-query attention keeps ``H_kv`` key/value heads and never materializes
the repeat: query head h uses key/value head ``h // (H / H_kv)``, as transformers' ``repeat_kv`` does. Half-precision
tensors are recomputed in float32; float32 and float64 stay as they are.

Example (one head, two tokens, causal: token 1 attends to both with equal scores):
    >>> import torch
    >>> q = k = torch.zeros(1, 2, 4)
    >>> block = AttentionBlock(q, k, torch.ones(1, 2, 4), scaling=0.5, causal=True)
    >>> layer_probabilities([block], 2, 2)[0]
    tensor([[1.0000, 0.0000],
            [0.5000, 0.5000]])
    >>> grad_out = torch.ones(1, 1, 2, 4)  # d y / d O for one target: G = 1 · Vᵀ = 4 everywhere
    >>> layer_cam([block], [grad_out], 2, 2)[0]
    tensor([[4., 0.],
            [2., 2.]])
    >>> row_trick_step(torch.tensor([[0.0, 1.0]]), [block], [grad_out])  # e_1ᵀ (I + cam)
    tensor([[2., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_CHUNK_ROWS",
    "AttentionBlock",
    "Workspace",
    "chunk_rows_for",
    "compute_dtype",
    "layer_cam",
    "layer_probabilities",
    "probability_rows",
    "rollout_step",
    "row_trick_step",
]

#: Query rows per chunk. A chunk's temporaries are ``[T, H, rows, keys]``, so the extra memory grows like the
#: sequence (as a forward's activations do), never like its square: 4 targets × 8 heads × 256 rows × 2,048 keys
#: in float32 is 64 MiB. Fewer, larger chunks keep the per-operation cost down where it dominates: on a busy CPU
#: every multi-threaded operation waits for its threads to be scheduled, whatever its size.
DEFAULT_CHUNK_ROWS = 256

#: The largest ``[T, H, rows, keys]`` temporary a chunk may hold before its rows shrink below the default (not
#: below :data:`MIN_CHUNK_ROWS`, where the per-operation cost would dominate): with 4 targets, 8 heads and 1,026
#: keys, 256 rows made a 32 MiB temporary beside the targets' gradients, half again the extra memory of the whole
#: explanation of a 1,024 × 768 image on a Qwen2-VL-shaped model (bench/bench_qwen_memory.py).
CHUNK_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 64


def chunk_rows_for(chunk_rows: int, targets: int, heads: int, keys: int, dtype: torch.dtype) -> int:
    """Rows per chunk: ``chunk_rows``, fewer when a ``[targets, heads, rows, keys]`` temporary would pass
    :data:`CHUNK_BYTES` (never fewer than :data:`MIN_CHUNK_ROWS` for that reason).

    Example:
        >>> chunk_rows_for(256, 4, 8, 512, torch.float32), chunk_rows_for(256, 4, 8, 1026, torch.float32)
        (256, 127)
    """
    row_bytes = max(1, targets * heads * keys * torch.finfo(dtype).bits // 8)
    return max(1, min(int(chunk_rows), max(MIN_CHUNK_ROWS, CHUNK_BYTES // row_bytes)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the recompute: float32 for half-precision inputs, else the input's (float32/float64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _masked_value(mask: torch.Tensor) -> torch.Tensor:
    """Where an additive mask forbids a key: -inf or the dtype's most negative value (transformers' eager masks)."""
    return mask <= torch.finfo(mask.dtype).min


@dataclass(frozen=True)
class AttentionBlock:
    """The inputs of one attention call, batch axis removed: ``A = softmax(softcap(q kᵀ · scaling) + mask)``.

    Attributes:
        query: ``[H, n_q, d]`` (post-RoPE) queries.
        key: ``[H_kv, n_k, d]`` keys, ``H_kv`` dividing ``H``.
        value: ``[H_kv, n_k, d_v]`` values.
        scaling: the factor on ``q kᵀ``.
        mask: None, or ``[1 or H, n_q, n_k]``: boolean (True = attend) or additive float (``-inf`` / the dtype's
            minimum forbid a key).
        causal: query i attends to keys ``j <= i`` only (needs ``n_q == n_k``).
        window: with causal, keys ``i - window < j <= i``; without, ``|i - j| < window`` (flash attention's window).
        softcap: ``softcap · tanh(logits / softcap)`` before the mask, as Gemma's eager attention does.
        q_offset, k_offset: where the block's rows and columns sit in its layer (block-diagonal layers).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    mask: torch.Tensor | None = None
    causal: bool = False
    window: int | None = None
    softcap: float | None = None
    q_offset: int = 0
    k_offset: int = 0

    def __post_init__(self):
        q, k, v = self.query, self.key, self.value
        for name, x in (("query", q), ("key", k), ("value", v)):
            if not isinstance(x, torch.Tensor) or x.ndim != 3 or not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point [heads, tokens, dim] tensor, got {_shape(x)}")
        if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1] or q.shape[2] != k.shape[2]:
            raise ValueError(
                f"query {tuple(q.shape)}, key {tuple(k.shape)} and value {tuple(v.shape)} do not fit: expected "
                "query [H, n_q, d], key [H_kv, n_k, d], value [H_kv, n_k, d_v]"
            )
        if q.shape[0] % k.shape[0]:
            raise ValueError(f"{q.shape[0]} query heads are not a multiple of {k.shape[0]} key/value heads")
        if not isinstance(self.scaling, int | float) or isinstance(self.scaling, bool) or not math.isfinite(
            self.scaling
        ):
            raise ValueError(f"scaling must be a finite number, got {self.scaling!r}")
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, torch.Tensor) or m.ndim != 3 or m.shape[0] not in (1, q.shape[0]):
                raise ValueError(
                    f"mask must be None or a [1 or {q.shape[0]}, {q.shape[1]}, {k.shape[1]}] tensor, got {_shape(m)}"
                )
            if tuple(m.shape[1:]) != (q.shape[1], k.shape[1]):
                raise ValueError(f"mask {tuple(m.shape)} does not match {q.shape[1]} queries and {k.shape[1]} keys")
            if m.dtype != torch.bool and not m.is_floating_point():
                raise ValueError(f"mask must be boolean or additive float, got dtype {m.dtype}")
        if self.causal and q.shape[1] != k.shape[1]:
            raise ValueError(f"a causal block needs as many queries as keys, got {q.shape[1]} and {k.shape[1]}")
        if self.window is not None and (isinstance(self.window, bool) or not isinstance(self.window, int)
                                        or self.window < 1):
            raise ValueError(f"window must be None or a positive int, got {self.window!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be None or positive, got {self.softcap!r}")

    @property
    def heads(self) -> int:
        return self.query.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[0]

    @property
    def n_q(self) -> int:
        return self.query.shape[1]

    @property
    def n_k(self) -> int:
        return self.key.shape[1]

    # ---- pieces of A ----------------------------------------------------------------------------------------------
    def key_span(self, r0: int, r1: int) -> tuple[int, int]:
        """``[c0, c1)``: every key that rows ``r0 .. r1-1`` may attend lies in it (the rest get probability 0).

        Narrowed by causality, the window and, when every row keeps at least one key, the explicit mask; a row that
        the mask forbids everything keeps the full range, so that its softmax is the kernel's (uniform for an
        additive mask, zero for a boolean one).
        """
        c0, c1 = 0, self.n_k
        if self.causal:
            c1 = min(c1, r1)
        if self.window is not None:
            c0 = max(c0, r0 - self.window + 1)
            if not self.causal:
                c1 = min(c1, r1 - 1 + self.window)
        if self.mask is not None and c1 > c0:
            m = self.mask[:, r0:r1, c0:c1]
            allowed = m if m.dtype == torch.bool else ~_masked_value(m)
            allowed = allowed.any(0)
            if bool(allowed.any(-1).all()):
                cols = allowed.any(0).nonzero()
                c0, c1 = c0 + int(cols[0]), c0 + int(cols[-1]) + 1
        return c0, max(c0, c1)

    def probabilities(self, rows: slice | torch.Tensor, c0: int, c1: int, dtype: torch.dtype,
                      workspace: Workspace | None = None) -> torch.Tensor:
        """``[H_kv, groups, r, c1 - c0]`` probabilities of query rows ``rows`` (a slice, or an index tensor) over
        keys ``c0 .. c1-1``, which must contain every key those rows may attend (:meth:`key_span`). With a
        ``workspace`` the result lives in its buffer ``"probs"`` (valid until the next call)."""
        ws = workspace or Workspace()
        h_kv, groups = self.kv_heads, self.heads // self.kv_heads
        index = _row_index(rows, self.query.device)
        r, c = index.numel(), c1 - c0
        device = self.query.device
        q = self.query[:, rows].to(dtype).reshape(h_kv, groups * r, -1)  # a view without GQA
        logits = ws.take("logits", (h_kv, groups * r, c), dtype, device)
        # The scaling rides in the matrix product (alpha): no extra pass over the [H, r, c] logits.
        logits.baddbmm_(q, self.key[:, c0:c1].to(dtype).transpose(-1, -2), beta=0.0, alpha=self.scaling)
        logits = logits.view(h_kv, groups, r, c)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.mask is not None:
            m = self.mask[:, rows, c0:c1]
            m = m.unsqueeze(0) if m.shape[0] == 1 else m.unflatten(0, (h_kv, groups))  # views, no copy
            if m.dtype == torch.bool:
                logits.masked_fill_(~m, -math.inf)
            else:
                logits.add_(m.to(dtype))
        for a, b, forbidden in self._position_masks(rows, index, c0, c1, ws):
            logits[..., a - c0 : b - c0].masked_fill_(forbidden, -math.inf)
        probs = ws.take("probs", (h_kv, groups, r, c), dtype, device)
        torch.softmax(logits, dim=-1, out=probs)
        if self.mask is not None and self.mask.dtype == torch.bool:
            # A row a boolean mask forbids entirely is all -inf: the kernels give it zero output, softmax NaN.
            # (Causal rows always keep their own key; additive masks stay finite.)
            dead = logits.amax(-1, keepdim=True) == -math.inf
            if bool(dead.any()):
                probs.masked_fill_(dead, 0.0)
        return probs if workspace is not None else probs.clone()

    def _position_masks(self, rows, index: torch.Tensor, c0: int, c1: int, ws: Workspace):
        """``(a, b, forbidden [r, b - a])``: the causal / window rules on the only key slabs they can forbid (a
        causal row chunk ``[r0, r1)`` can only forbid keys in ``(r0, r1)``), so a chunk never pays a full pass.
        For a slice of rows a slab's pattern depends only on its offsets from ``r0``: made once per workspace."""
        if not (self.causal or self.window is not None):
            return
        r0, r1 = int(index.min()), int(index.max()) + 1
        slabs = []
        if self.causal:
            slabs.append(("causal", max(c0, r0 + 1), c1))
        if self.window is not None:
            slabs.append(("left", c0, min(c1, r1 - self.window)))
            if not self.causal:
                slabs.append(("right", max(c0, r0 + self.window), c1))
        for rule, a, b in slabs:
            if b <= a:
                continue

            def make(rule=rule, a=a, b=b):
                i = index.view(-1, 1)
                j = torch.arange(a, b, device=index.device).view(1, -1)
                w = self.window
                return j > i if rule == "causal" else (j <= i - w if rule == "left" else j >= i + w)

            if isinstance(rows, slice):
                yield a, b, ws.cached((rule, a - r0, b - r0, r1 - r0, self.window), make)
            else:
                yield a, b, make()

    def arrange(self, grad_output: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[T, H, n_q, d_v]`` gradients (w.r.t. this block's per-head output) in the layout :meth:`cam`
        multiplies without copying a chunk: ``[H_kv, n_q, T · groups, d_v]``, contiguous, in ``dtype``."""
        t, _, n, d_v = grad_output.shape
        groups = self.heads // self.kv_heads
        g = grad_output.to(dtype).reshape(t, self.kv_heads, groups, n, d_v).permute(1, 3, 0, 2, 4)
        return g.reshape(self.kv_heads, n, t * groups, d_v)

    def cam(self, grads: torch.Tensor, rows: slice, c0: int, c1: int, dtype: torch.dtype,
            scale: float | None = None, workspace: Workspace | None = None) -> torch.Tensor:
        """``[T, r, c1 - c0]``: ``mean_h (G_h ⊙ A_h)+`` on rows ``rows`` / keys ``c0 .. c1-1``, with
        ``G_h = (∂y/∂O_h) V_hᵀ``; times ``scale`` instead of the head mean's ``1 / H`` when given (callers fold the
        mean into a later product). The probabilities are computed once for all T targets.

        ``grads``: the T targets' gradients as :meth:`arrange` lays them out.
        """
        ws = workspace or Workspace()
        probs = self.probabilities(rows, c0, c1, dtype, ws)
        h_kv, groups, r = self.kv_heads, self.heads // self.kv_heads, probs.shape[2]
        tg, c = grads.shape[2], c1 - c0
        # Every target and head group shares the values: one [H_kv, r·T·groups, d_v] @ [H_kv, d_v, c] product.
        grad = ws.take("grad", (h_kv, r * tg, c), dtype, probs.device)
        torch.bmm(grads[:, rows].reshape(h_kv, r * tg, -1), self.value[:, c0:c1].to(dtype).transpose(-1, -2),
                  out=grad)
        # (G ⊙ A)+ = G+ ⊙ A since A >= 0: the clamp is per head, before the head sum.
        grad = grad.view(h_kv, r, tg // groups, groups, c).clamp_(min=0)
        grad.mul_(probs.permute(0, 2, 1, 3).unsqueeze(2))
        total = grad.sum(dim=(0, 3))  # [r, T, c]
        total = total.div_(self.heads) if scale is None else (total.mul_(scale) if scale != 1 else total)
        return total.transpose(0, 1)


class Workspace:
    """Scratch buffers reused across the chunks of a loop: fresh memory costs a page fault per page, on every chunk
    (a large share of the recompute's time on the CPU); a buffer is allocated once, at its largest size so far.

    ``capacity``: the smallest size (elements) a new buffer gets, e.g. a chunk's largest ``[T, H, rows, keys]``;
    or per buffer name (``{"grad": T·H·rows·keys, "probs": H·rows·keys}``; other names: 0), so that a buffer whose
    chunks never hold T targets is not sized for them.
    """

    def __init__(self, capacity: int | dict[str, int] = 0):
        self.capacity = capacity
        self._buffers: dict[str, torch.Tensor] = {}
        self._cache: dict = {}

    def cached(self, key, make):
        """``make()``, once per ``key`` (e.g. a chunk's causal pattern, the same for every chunk of one size)."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def take(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != torch.device(device):
            least = self.capacity.get(name, 0) if isinstance(self.capacity, dict) else self.capacity
            buf = torch.empty(max(numel, least), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


def _cam_workspace(targets: int, chunk: int) -> Workspace:
    """The buffers of :meth:`AttentionBlock.cam` over chunks of at most ``chunk`` = ``H · rows · keys`` elements:
    the probabilities are shared by the targets, their gradients are not."""
    return Workspace({"logits": chunk, "probs": chunk, "grad": targets * chunk})


def _row_index(rows: slice | torch.Tensor, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_layer(blocks: Sequence[AttentionBlock], grads=None) -> None:
    if not blocks or not all(isinstance(b, AttentionBlock) for b in blocks):
        raise ValueError("a layer is a non-empty sequence of AttentionBlock")
    if grads is None:
        return
    if len(grads) != len(blocks):
        raise ValueError(f"need one gradient per block ({len(blocks)}), got {len(grads)}")
    t = None
    for i, (b, g) in enumerate(zip(blocks, grads)):
        expected = (b.heads, b.n_q, b.value.shape[-1])
        if not isinstance(g, torch.Tensor) or g.ndim != 4 or tuple(g.shape[1:]) != expected:
            raise ValueError(f"grads[{i}] must be [T, {expected[0]}, {expected[1]}, {expected[2]}], got {_shape(g)}")
        if t is not None and g.shape[0] != t:
            raise ValueError("every block's gradient must hold the same number of targets T")
        t = g.shape[0]


def _chunks(block: AttentionBlock, lo: int, hi: int, step: int):
    """Row chunks ``slice(r0, r1)`` of ``[lo, hi)`` with the key span each may attend (empty spans skipped)."""
    for r0 in range(lo, hi, step):
        r1 = min(hi, r0 + step)
        c0, c1 = block.key_span(r0, r1)
        if c1 > c0:
            yield slice(r0, r1), c0, c1


def _support(v: torch.Tensor, offset: int, n: int) -> tuple[int, int] | None:
    """``[lo, hi)`` of the block rows where any of the T rows of v is non-zero; None if none is."""
    nz = (v[:, offset : offset + n] != 0).any(0).nonzero()
    if nz.numel() == 0:
        return None
    return int(nz[0]), int(nz[-1]) + 1


def row_trick_step(
    v: torch.Tensor,
    blocks: Sequence[AttentionBlock],
    grads: Sequence[torch.Tensor],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """One layer of the row trick, ``v + v · cam``, with cam streamed from the recomputed attention.

    Equal to ``v + v @ gradient_weighted_attention(A, G)`` for the layer's full ``A`` and ``G``
    (:func:`rgae.rules.propagate_rows` applies the same step from the last layer down). Rows where all of v is zero
    and keys the mask forbids are never computed.

    Args:
        v: ``[T, n]`` one row per target (e.g. starting from ``e_r``), in the dtype of the result
            (:func:`compute_dtype` of the model's).
        blocks: the layer's attention blocks (self-attention: the layer maps n tokens to n tokens).
        grads: per block ``[T, H, n_q, d_v]``, target t's gradient w.r.t. the block's per-head output.
        chunk_rows: query rows per chunk (the temporaries are ``[T, H, chunk_rows, keys]``).

    Returns:
        ``[T, n]``, a new tensor.
    """
    _check_layer(blocks, grads)
    if v.ndim != 2 or v.shape[0] != grads[0].shape[0]:
        raise ValueError(f"v must be [T={grads[0].shape[0]}, n], got {_shape(v)}")
    out = v.clone()
    for block, grad in zip(blocks, grads):
        span = _support(v, block.q_offset, block.n_q)
        if span is None:
            continue
        step = chunk_rows_for(chunk_rows, v.shape[0], block.heads, block.n_k, v.dtype)
        ws = _cam_workspace(v.shape[0], block.heads * min(step, span[1] - span[0]) * block.n_k)
        arranged = block.arrange(grad, v.dtype)
        for rows, c0, c1 in _chunks(block, *span, step):
            cam = block.cam(arranged, rows, c0, c1, v.dtype, scale=1.0, workspace=ws)  # 1/H goes on the weights
            weights = v[:, block.q_offset + rows.start : block.q_offset + rows.stop].unsqueeze(1) / block.heads
            out[:, block.k_offset + c0 : block.k_offset + c1] += torch.bmm(weights, cam).squeeze(1)
    return out


def layer_cam(
    blocks: Sequence[AttentionBlock],
    grads: Sequence[torch.Tensor],
    n_q: int,
    n_k: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """The full per-layer map ``[T, n_q, n_k]`` = ``mean_h (G ⊙ A)+`` of every target (zero between blocks)."""
    _check_layer(blocks, grads)
    ref = blocks[0].query
    dtype = compute_dtype(ref.dtype)
    out = torch.zeros(grads[0].shape[0], n_q, n_k, dtype=dtype, device=ref.device)
    for block, grad in zip(blocks, grads):
        step = chunk_rows_for(chunk_rows, grad.shape[0], block.heads, block.n_k, dtype)
        ws = _cam_workspace(grad.shape[0], block.heads * min(step, block.n_q) * block.n_k)
        arranged = block.arrange(grad, dtype)
        for rows, c0, c1 in _chunks(block, 0, block.n_q, step):
            out[:, block.q_offset + rows.start : block.q_offset + rows.stop,
                block.k_offset + c0 : block.k_offset + c1] = block.cam(arranged, rows, c0, c1, dtype, workspace=ws)
    return out


def probability_rows(blocks: Sequence[AttentionBlock], rows, n_k: int) -> torch.Tensor:
    """``[H, len(rows), n_k]``: the probabilities of the given layer rows (ints into the layer's queries)."""
    _check_layer(blocks)
    ref = blocks[0].query
    rows = torch.as_tensor(rows, dtype=torch.long, device=ref.device).view(-1)
    heads = blocks[0].heads
    if any(b.heads != heads for b in blocks):
        raise ValueError("every block of a layer must have the same number of heads")
    out = torch.zeros(heads, rows.numel(), n_k, dtype=compute_dtype(ref.dtype), device=ref.device)
    for block in blocks:
        inside = (rows >= block.q_offset) & (rows < block.q_offset + block.n_q)
        if not bool(inside.any()):
            continue
        local = rows[inside] - block.q_offset
        c0, c1 = block.key_span(int(local.min()), int(local.max()) + 1)
        if c1 > c0:
            probs = block.probabilities(local, c0, c1, out.dtype).reshape(heads, local.numel(), c1 - c0)
            out[:, inside, block.k_offset + c0 : block.k_offset + c1] = probs
    return out


def layer_probabilities(blocks: Sequence[AttentionBlock], n_q: int, n_k: int) -> torch.Tensor:
    """``[H, n_q, n_k]``: the layer's full probabilities (small layers; zero between blocks)."""
    return probability_rows(blocks, range(n_q), n_k)


def rollout_step(
    v: torch.Tensor,
    blocks: Sequence[AttentionBlock],
    heads: Sequence[int] | None = None,
    residual: float = 0.5,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """One layer of attention rollout by the row trick: ``v · Â`` with ``Â = (1 - r)·mean_h A + r·I``, rows
    renormalized to 1 (``rgae.methods.rollout.rollout_layer``), streamed in row chunks.

    Args:
        v: ``[T, n]``; blocks: the (self-attention) layer; heads: head indices to average (None: all);
        residual: r.
    """
    _check_layer(blocks)
    if v.ndim != 2:
        raise ValueError(f"v must be [T, n], got {_shape(v)}")
    out = torch.zeros_like(v)
    for block in blocks:
        if block.q_offset != block.k_offset or block.n_q != block.n_k:
            raise ValueError("rollout needs self-attention blocks (n_q == n_k on the diagonal)")
        span = _support(v, block.q_offset, block.n_q)
        if span is None:
            continue
        step = max(1, int(chunk_rows))
        ws = Workspace(block.heads * min(step, span[1] - span[0]) * block.n_k)
        for rows, c0, c1 in _chunks(block, *span, step):
            r = rows.stop - rows.start
            probs = block.probabilities(rows, c0, c1, v.dtype, ws).reshape(block.heads, r, c1 - c0)
            mean = (probs if heads is None else probs[list(heads)]).mean(0).mul_(1.0 - residual)
            # Â's row i: (1 - r)·mean A[i] + r·e_i, divided by its sum.
            scale = v[:, block.q_offset + rows.start : block.q_offset + rows.stop] / (mean.sum(-1) + residual)
            out[:, block.k_offset + c0 : block.k_offset + c1] += scale @ mean
            out[:, block.k_offset + rows.start : block.k_offset + rows.stop] += residual * scale
    return out
