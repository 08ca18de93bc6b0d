"""The R-GAE engine: pure tensor math, no model knowledge.

Notation (DeCo, Appendix A; GAE = Chefer et al., ICCV 2021, equation numbers of that paper):

* ``A``: post-softmax attention of one layer, ``[..., heads, n_q, n_k]``; ``G = d(target)/dA``, same shape.
* ``cam`` (``Abar``): the per-layer map ``mean_h (G ⊙ A)+`` (GAE eq. 5), ``[..., n_q, n_k]``.
* ``R_xy``: relevance of stream ``x``'s tokens to stream ``y``'s tokens, ``[..., n_x, n_y]``.

Self-attention layers (GAE rules 6, 7) unroll to ``R = (I + cam_L) ... (I + cam_1)``, newest layer on the left.
A pure self-attention stack (the LLM) needs only a few rows of that product: :func:`propagate_rows` gets them with
vector-matrix products from the last layer down, ``O(L n^2)`` instead of the ``O(L n^3)`` of :func:`propagate`.
Cross-attention layers (GAE rules 10, 11) mix two streams and need the row-normalized residuals of eqs. 8, 9
(:func:`normalize_residual`); :func:`propagate_cross_stack` runs a Q-Former-like stack with them.
The projector's Query-to-Patch map is :func:`identity_map` (linear / MLP), :func:`pooling_map` (adaptive average
pooling, DeCo) or the ``R_qk`` of :func:`propagate_cross_stack` (Q-Former); :func:`compose` turns a Text-to-Query
map into Text-to-Patch and :func:`average_steps` averages the per-step maps into a sentence map.

Every function is batched over leading dimensions (``...``), keeps its inputs' dtype and device, and raises
:class:`ValueError` for inputs it cannot use (wrong shapes, non-finite values) instead of returning NaN.

Example (a two-layer LLM where token 1 attends to token 0, then to both):
    >>> import torch
    >>> cams = [torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.5, 0.5]])]
    >>> propagate(cams)
    tensor([[1.0000, 0.0000],
            [2.0000, 1.5000]])
    >>> propagate_rows(cams, [1])
    tensor([[2.0000, 1.5000]])
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

__all__ = [
    "average_steps",
    "compose",
    "cross_attention_update",
    "gradient_weighted_attention",
    "identity_map",
    "normalize_residual",
    "pooling_map",
    "propagate",
    "propagate_cross_stack",
    "propagate_rows",
    "self_attention_update",
]


# ---- validation helpers (cheap: one reduction per tensor) ---------------------------------------------------------


def _all_finite(x: torch.Tensor) -> bool:
    # One reduction instead of isfinite's several elementwise passes (this runs per layer per token): any NaN or inf
    # makes the sum non-finite, and a sum that merely overflowed is re-checked exactly.
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def _check_tensor(x, name: str, min_ndim: int = 0, finite: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    if finite and not _all_finite(x):
        raise ValueError(f"{name} contains NaN or inf; expected finite values")


def _check_square(x: torch.Tensor, name: str) -> int:
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"{name} must be square [..., n, n], got shape {tuple(x.shape)}")
    return x.shape[-1]


def _is_int(value) -> bool:
    # numpy integers count; bool (an int subclass, e.g. a mask by mistake) does not.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_size(value, name: str) -> int:
    if not _is_int(value):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _grid(hw, name: str) -> tuple[int, int]:
    if _is_int(hw):
        return _check_size(hw, name), _check_size(hw, name)
    if not isinstance(hw, Sequence) or len(hw) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {hw!r}")
    return _check_size(hw[0], f"{name}[0]"), _check_size(hw[1], f"{name}[1]")


def _eye_like(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.eye(n, dtype=x.dtype, device=x.device)


# ---- per-layer rules ----------------------------------------------------------------------------------------------


def gradient_weighted_attention(attn: torch.Tensor, grad: torch.Tensor, head_dim: int = -3) -> torch.Tensor:
    """The per-layer map ``Abar = E_h[(G ⊙ A)+]`` (GAE eq. 5; DeCo Appendix A).

    The clamp is applied **per head before** the mean: heads with opposite signs must not cancel. The batch axis is
    never merged into the head axis, so every leading dimension other than ``head_dim`` is kept.

    Args:
        attn: post-softmax attention ``A``, e.g. ``[batch, heads, n_q, n_k]``.
        grad: ``d(target)/dA``, the same shape as ``attn``.
        head_dim: the head axis (default ``-3``); it must not be one of the last two (query/key) axes.

    Returns:
        ``attn`` without the head axis, e.g. ``[batch, n_q, n_k]``; dtype and device of ``grad * attn``.

    Example:
        >>> import torch
        >>> attn = torch.ones(2, 1, 2)  # two heads, one query, two keys
        >>> grad = torch.tensor([[[1.0, -1.0]], [[-1.0, 1.0]]])
        >>> gradient_weighted_attention(attn, grad)  # mean-then-clamp would give zeros
        tensor([[0.5000, 0.5000]])
    """
    _check_tensor(attn, "attn", min_ndim=3)
    _check_tensor(grad, "grad", min_ndim=3)
    if attn.shape != grad.shape:
        raise ValueError(f"attn and grad must have the same shape, got {tuple(attn.shape)} and {tuple(grad.shape)}")
    ndim = attn.ndim
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not -ndim <= head_dim < ndim:
        raise ValueError(f"head_dim must be an int in [-{ndim}, {ndim}) for shape {tuple(attn.shape)}, got {head_dim}")
    if head_dim % ndim >= ndim - 2:
        raise ValueError(
            f"head_dim={head_dim} points at a query/key axis of shape {tuple(attn.shape)}; "
            "expected the head axis, before the last two dims"
        )
    # In-place clamp on the fresh product: one [..., H, n, n] temporary instead of two.
    return (grad * attn).clamp_(min=0).mean(dim=head_dim)


def self_attention_update(
    R_ss: torch.Tensor, R_sq: torch.Tensor, cam: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One self-attention layer of stream ``s`` (GAE rules 6, 7).

    ``R_ss' = R_ss + cam · R_ss`` and ``R_sq' = R_sq + cam · R_sq``, both from the **old** values.
    No row normalization: starting from ``R_ss = I`` the layers unroll to ``(I + cam_L) ... (I + cam_1)``.

    Args:
        R_ss: ``[..., n_s, n_s]`` relevance of stream s to itself.
        R_sq: ``[..., n_s, n_q]`` relevance of stream s to another stream q (use a ``[n_s, 0]`` tensor if none).
        cam: ``[..., n_s, n_s]`` this layer's :func:`gradient_weighted_attention` map.

    Returns:
        ``(R_ss_new, R_sq_new)``.

    Example:
        >>> import torch
        >>> R_ss, R_sq = torch.eye(2), torch.zeros(2, 3)
        >>> R_ss, R_sq = self_attention_update(R_ss, R_sq, torch.full((2, 2), 0.5))
        >>> R_ss
        tensor([[1.5000, 0.5000],
                [0.5000, 1.5000]])
    """
    _check_tensor(R_ss, "R_ss", min_ndim=2)
    _check_tensor(R_sq, "R_sq", min_ndim=2)
    _check_tensor(cam, "cam", min_ndim=2)
    n = _check_square(cam, "cam")
    if R_ss.shape[-2:] != (n, n):
        raise ValueError(f"R_ss must be [..., {n}, {n}] to match cam {tuple(cam.shape)}, got {tuple(R_ss.shape)}")
    if R_sq.shape[-2] != n:
        raise ValueError(f"R_sq must be [..., {n}, n_q] to match cam {tuple(cam.shape)}, got {tuple(R_sq.shape)}")
    return R_ss + cam @ R_ss, R_sq + cam @ R_sq


def normalize_residual(R: torch.Tensor) -> torch.Tensor:
    """The guarded row normalization of GAE eqs. 8, 9: ``R̄ = (R - I) / rowsum(R - I) + I``.

    Rows of ``R - I`` that sum to zero (a token that gathered no relevance yet, e.g. everywhere when ``R = I``)
    are divided by 1 instead of 0, so ``R = I`` maps to ``I`` instead of NaN. For maps built by the rules
    (``R - I >= 0``) every other row of ``R̄ - I`` sums to 1.

    Args:
        R: ``[..., n, n]`` a self-relevance matrix.

    Returns:
        ``[..., n, n]`` the normalized matrix, same dtype and device.

    Raises:
        ValueError: non-square or non-finite input, or a row of ``R - I`` whose entries cancel to a sum so close to
            zero that the division overflows (impossible for ``R - I >= 0``, which is what the rules produce).

    Example:
        >>> import torch
        >>> normalize_residual(torch.tensor([[1.0, 0.0], [2.0, 1.5]]))
        tensor([[1.0000, 0.0000],
                [0.8000, 1.2000]])
        >>> torch.equal(normalize_residual(torch.eye(3)), torch.eye(3))
        True
    """
    _check_tensor(R, "R", min_ndim=2)
    n = _check_square(R, "R")
    eye = _eye_like(R, n)
    residual = R - eye
    row_sum = residual.sum(dim=-1, keepdim=True)
    row_sum = torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    out = residual / row_sum + eye
    if not _all_finite(out):
        raise ValueError(
            "normalize_residual overflowed: a row of R - I has entries that cancel to a near-zero sum; "
            "expected R - I >= 0 as produced by the propagation rules"
        )
    return out


def cross_attention_update(
    R_ss: torch.Tensor,
    R_qq: torch.Tensor,
    R_sq: torch.Tensor,
    R_qs: torch.Tensor,
    cam_sq: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One cross-attention layer where stream ``s`` (queries of the attention) attends to stream ``q`` (keys).

    GAE rules 10, 11, both from the old values::

        R_sq' = R_sq + normalize_residual(R_ss)ᵀ · cam_sq · normalize_residual(R_qq)     (rule 10, eqs. 8-9)
        R_ss' = R_ss + cam_sq · R_qs                                                      (rule 11, R_qs raw)

    Note the transpose on ``R̄_ss`` and that only the two self-relevance matrices are normalized.

    Args:
        R_ss: ``[..., n_s, n_s]``; R_qq: ``[..., n_q, n_q]``; R_sq: ``[..., n_s, n_q]``; R_qs: ``[..., n_q, n_s]``.
        cam_sq: ``[..., n_s, n_q]`` this layer's :func:`gradient_weighted_attention` map (s rows attend to q columns).

    Returns:
        ``(R_sq_new, R_ss_new)``.

    Example:
        >>> import torch
        >>> R_ss = torch.eye(2) + 0.5  # I + U
        >>> R_sq, R_ss_new = cross_attention_update(R_ss, torch.eye(2), torch.zeros(2, 2), torch.zeros(2, 2),
        ...                                         torch.eye(2))
        >>> R_sq
        tensor([[1.5000, 0.5000],
                [0.5000, 1.5000]])
    """
    _check_tensor(R_ss, "R_ss", min_ndim=2)
    _check_tensor(R_qq, "R_qq", min_ndim=2)
    _check_tensor(R_sq, "R_sq", min_ndim=2)
    _check_tensor(R_qs, "R_qs", min_ndim=2)
    _check_tensor(cam_sq, "cam_sq", min_ndim=2)
    n_s, n_q = cam_sq.shape[-2:]
    expected = {"R_ss": (n_s, n_s), "R_qq": (n_q, n_q), "R_sq": (n_s, n_q), "R_qs": (n_q, n_s)}
    for name, value in zip(expected, (R_ss, R_qq, R_sq, R_qs)):
        if tuple(value.shape[-2:]) != expected[name]:
            raise ValueError(
                f"{name} must be [..., {expected[name][0]}, {expected[name][1]}] for cam_sq of shape "
                f"{tuple(cam_sq.shape)} (n_s={n_s}, n_q={n_q}), got {tuple(value.shape)}"
            )
    R_ss_bar = normalize_residual(R_ss)
    R_qq_bar = normalize_residual(R_qq)
    R_sq_new = R_sq + R_ss_bar.transpose(-1, -2) @ cam_sq @ R_qq_bar
    R_ss_new = R_ss + cam_sq @ R_qs
    return R_sq_new, R_ss_new


# ---- Query-to-Patch maps of parameter-free projectors -------------------------------------------------------------


def _pooling_map_1d(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    out = torch.zeros(n_out, n_in, dtype=dtype, device=device)
    for i in range(n_out):
        # PyTorch's adaptive pooling windows: [floor(i*In/Out), ceil((i+1)*In/Out)), in exact integer arithmetic.
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        out[i, start:end] = 1.0 / (end - start)
    return out


def pooling_map(
    in_hw: int | tuple[int, int],
    out_hw: int | tuple[int, int],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``[M, N]`` Query-to-Patch map of 2-D adaptive average pooling (the DeCo projector).

    ``Q2P[q, p] = 1 / |window(q)|`` for patch ``p`` in the window of query ``q``, else 0, with PyTorch's windows
    ``[floor(i·In/Out), ceil((i+1)·In/Out))`` on each axis (they overlap when In is not a multiple of Out).
    Rows and columns are flattened row-major, like ``rearrange("b d h w -> b (h w) d")``; every row sums to 1.
    It equals the Jacobian of ``torch.nn.functional.adaptive_avg_pool2d`` (DeCo Appendix A: "the merged token is
    assigned 1/k² of the relevance of each raw token within the window").

    Args:
        in_hw: the patch grid ``(h, w)`` (or ``n`` for ``n × n``); N = h·w.
        out_hw: the query grid ``(h', w')`` (or ``m`` for ``m × m``), each side at most the input's; M = h'·w'.
        dtype, device: of the returned tensor.

    Example:
        >>> pooling_map((1, 3), (1, 2))
        tensor([[0.5000, 0.5000, 0.0000],
                [0.0000, 0.5000, 0.5000]])
        >>> pooling_map(4, 2)[0].nonzero().flatten().tolist()
        [0, 1, 4, 5]
    """
    in_h, in_w = _grid(in_hw, "in_hw")
    out_h, out_w = _grid(out_hw, "out_hw")
    if out_h > in_h or out_w > in_w:
        raise ValueError(
            f"pooling_map compresses: out_hw {(out_h, out_w)} must be at most in_hw {(in_h, in_w)} on each axis"
        )
    rows = _pooling_map_1d(in_h, out_h, dtype, device)
    cols = _pooling_map_1d(in_w, out_w, dtype, device)
    # Row-major flattening of both grids makes the 2-D operator the Kronecker product of the per-axis ones.
    return torch.kron(rows, cols)


def identity_map(
    n: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The ``[n, n]`` Query-to-Patch map of a token-wise projector (linear / MLP): query i is patch i.

    Example:
        >>> identity_map(2)
        tensor([[1., 0.],
                [0., 1.]])
    """
    return torch.eye(_check_size(n, "n"), dtype=dtype, device=device)


# ---- multi-layer propagation --------------------------------------------------------------------------------------


def _layer_maps(cams, name: str = "cams", finite: bool = True) -> tuple[list[torch.Tensor], int, torch.Size]:
    """Validate a first-layer-first list (or ``[L, ..., n, n]`` tensor) of square layer maps of one shape.

    ``finite=False`` skips the value scan for callers that fuse it into their own pass over the maps.
    """
    if isinstance(cams, torch.Tensor):
        if cams.ndim < 3:
            raise ValueError(f"{name} as a tensor must be [L, ..., n, n], got shape {tuple(cams.shape)}")
        _check_tensor(cams, name, finite=finite)
        n = _check_square(cams, name)
        return list(cams.unbind(0)), n, cams.shape[1:]
    if not isinstance(cams, Sequence) or isinstance(cams, str | bytes):
        raise ValueError(f"{name} must be a sequence of [..., n, n] tensors or an [L, ..., n, n] tensor")
    if len(cams) == 0:
        raise ValueError(f"{name} is empty: need at least one layer map (or an [0, n, n] tensor) to know n")
    out = list(cams)
    for i, cam in enumerate(out):
        _check_tensor(cam, f"{name}[{i}]", min_ndim=2, finite=finite)
        if cam.shape != out[0].shape:
            raise ValueError(
                f"all layer maps must have one shape: {name}[0] is {tuple(out[0].shape)}, "
                f"{name}[{i}] is {tuple(cam.shape)}"
            )
    n = _check_square(out[0], f"{name}[0]")
    return out, n, out[0].shape


def _row_index(rows, n: int) -> tuple[list[int], bool]:
    """Row indices as a list of ints in [0, n) (negative ones count from the end); whether a single row was given."""
    if isinstance(rows, torch.Tensor):
        if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
            raise ValueError(f"rows must hold integer indices, got dtype {rows.dtype}")
        if rows.ndim > 1:
            raise ValueError(f"rows must be an int or a 1-D list/tensor of ints, got shape {tuple(rows.shape)}")
        single = rows.ndim == 0
        values = [int(v) for v in rows.reshape(-1).tolist()]
    elif _is_int(rows):
        single, values = True, [int(rows)]
    elif isinstance(rows, Sequence) and all(_is_int(v) for v in rows):
        single, values = False, [int(v) for v in rows]
    else:
        raise ValueError(f"rows must be an int or a 1-D list/tensor of ints, got {rows!r}")
    out = []
    for v in values:
        if not -n <= v < n:
            raise ValueError(f"row index {v} is out of range for n={n} (expected -{n} <= row < {n})")
        out.append(v % n)
    return out, single


def propagate_rows(cams, rows) -> torch.Tensor:
    """Selected rows of ``R = (I + cam_L) ... (I + cam_1)`` by the row trick (DESIGN "row trick"; GAE rule 6).

    ``e_rᵀ R`` is computed as vector-matrix products from the last layer down,
    ``v ← v + v · cam_l`` for ``l = L ... 1`` starting from ``v = e_rᵀ``: ``O(L·k·n²)`` for ``k`` rows instead of
    the ``O(L·n³)`` of :func:`propagate`, with the same result.

    Args:
        cams: the layer maps, **first layer first**: a sequence of ``[..., n, n]`` tensors of one shape, or one
            ``[L, ..., n, n]`` tensor.
        rows: row indices (ints, negative ones count from the end): a list / 1-D integer tensor gives
            ``[..., len(rows), n]``; a single int (or 0-d tensor) gives ``[..., n]``.

    Example:
        >>> import torch
        >>> cams = [torch.full((3, 3), 1 / 3)] * 2  # two uniform layers: R = I + 3U
        >>> propagate_rows(cams, [0])
        tensor([[2., 1., 1.]])
    """
    layers, n, shape = _layer_maps(cams, finite=False)
    index, single = _row_index(rows, n)
    ref = layers[0] if layers else cams
    k = len(index)
    kw = {"dtype": ref.dtype, "device": ref.device}
    # The products are memory-bound: a separate finiteness scan would read every map a second time and double the
    # cost. Instead an extra all-ones row rides along in one buffer: its product is the map's column sums,
    # non-finite whenever the map holds a NaN or inf (every entry is multiplied by 1, none skipped as a zero).
    # The buffer is updated in place so each layer costs one (k+1)-row product and no concatenation.
    buffer = torch.zeros(*shape[:-2], k + 1, n, **kw)
    buffer[..., torch.arange(k, device=buffer.device), torch.tensor(index, device=buffer.device)] = 1.0
    buffer[..., k, :] = 1.0
    column_sums = torch.zeros(*shape[:-2], 1, n, **kw)
    for cam in reversed(layers):
        out = buffer @ cam
        buffer[..., :k, :] += out[..., :k, :]
        column_sums = column_sums + out[..., k:, :]
    v = buffer[..., :k, :]
    if not bool(torch.isfinite(column_sums).all()):
        # NaN/inf in a map, or merely huge finite values whose sums overflowed: the exact scan tells which.
        for i, cam in enumerate(layers):
            _check_tensor(cam, f"cams[{i}]")
    if not _all_finite(v):
        raise ValueError("propagate_rows overflowed: the layer maps are too large for the product to stay finite")
    return v.squeeze(-2) if single else v


def propagate(cams) -> torch.Tensor:
    """The full ``R = (I + cam_L) ... (I + cam_1)`` (GAE rule 6 from ``R = I``), newest layer on the left.

    The slow, obviously correct reference for :func:`propagate_rows` (``O(L·n³)``); use it when all rows are needed.

    Args:
        cams: the layer maps, first layer first (see :func:`propagate_rows`).

    Returns:
        ``[..., n, n]``.

    Example:
        >>> import torch
        >>> propagate([torch.full((2, 2), 0.5)] * 3)  # I + (2^3 - 1) U
        tensor([[4.5000, 3.5000],
                [3.5000, 4.5000]])
    """
    layers, n, shape = _layer_maps(cams)
    ref = layers[0] if layers else cams
    R = torch.eye(n, dtype=ref.dtype, device=ref.device).expand(shape).clone()
    for cam in layers:
        R = R + cam @ R
    if not _all_finite(R):
        raise ValueError("propagate overflowed: the layer maps are too large for the product to stay finite")
    return R


def propagate_cross_stack(
    layers: Sequence[tuple[str, torch.Tensor]],
    n_queries: int,
    n_keys: int,
    R_kk: torch.Tensor | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Propagate a Q-Former-like stack of query self-attention and query→key cross-attention layers.

    Streams: the ``n_queries`` learned queries (q) and the ``n_keys`` image tokens (k). Start from ``R_qq = I``,
    ``R_qk = 0``, ``R_kq = 0`` and ``R_kk = I`` (or the given ``R_kk``, e.g. the ViT's propagated map). Then, in
    forward order:

    * ``("self", cam [.., n_q, n_q])``: rules 6, 7 on the query stream, ``R_qq += cam·R_qq``, ``R_qk += cam·R_qk``;
    * ``("cross", cam [.., n_q, n_k])``: rules 10, 11 with s = queries, q = keys,
      ``R_qk += R̄_qqᵀ·cam·R̄_kk`` and ``R_qq += cam·R_kq`` (zero: the image tokens never attend to the queries,
      so ``R_kq`` and ``R_kk`` stay as they are).

    Returns ``(R_qq, R_qk)``; ``R_qk`` (``[..., n_q, n_k]``) is the Q-Former's Query-to-Patch map. Their dtype and
    device are those of the first layer's map (or ``R_kk``); ``dtype``/``device`` only matter for an empty stack.

    Example:
        >>> import torch
        >>> R_qq, R_qk = propagate_cross_stack([("cross", torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))], 2, 3)
        >>> R_qk
        tensor([[1.0000, 0.0000, 0.0000],
                [0.0000, 0.5000, 0.5000]])
    """
    n_q = _check_size(n_queries, "n_queries")
    n_k = _check_size(n_keys, "n_keys")
    if isinstance(layers, str | bytes) or not isinstance(layers, Sequence):
        raise ValueError('layers must be a sequence of ("self", cam) / ("cross", cam) pairs')
    parsed = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, Sequence) or isinstance(layer, str | bytes) or len(layer) != 2:
            raise ValueError(f'layers[{i}] must be a ("self" | "cross", cam) pair, got {layer!r}')
        kind, cam = layer
        if kind not in ("self", "cross"):
            raise ValueError(f'layers[{i}] kind must be "self" or "cross", got {kind!r}')
        _check_tensor(cam, f"layers[{i}] cam", min_ndim=2)
        expected = (n_q, n_q) if kind == "self" else (n_q, n_k)
        if tuple(cam.shape[-2:]) != expected:
            raise ValueError(
                f'layers[{i}] is "{kind}": its cam must be [..., {expected[0]}, {expected[1]}] '
                f"(n_queries={n_q}, n_keys={n_k}), got {tuple(cam.shape)}"
            )
        parsed.append((kind, cam))
    if R_kk is not None:
        _check_tensor(R_kk, "R_kk", min_ndim=2)
        if tuple(R_kk.shape[-2:]) != (n_k, n_k):
            raise ValueError(f"R_kk must be [..., {n_k}, {n_k}] (n_keys={n_k}), got {tuple(R_kk.shape)}")
    ref = parsed[0][1] if parsed else R_kk
    kw = {"dtype": ref.dtype, "device": ref.device} if ref is not None else {"dtype": dtype, "device": device}
    R_qq = torch.eye(n_q, **kw)
    R_qk = torch.zeros(n_q, n_k, **kw)
    R_kq = torch.zeros(n_k, n_q, **kw)
    if R_kk is None:
        R_kk = torch.eye(n_k, **kw)
    for kind, cam in parsed:
        if kind == "self":
            R_qq, R_qk = self_attention_update(R_qq, R_qk, cam)
        else:
            R_qk, R_qq = cross_attention_update(R_qq, R_kk, R_qk, R_kq, cam)
    return R_qq, R_qk


# ---- Text-to-Patch and sentence maps ------------------------------------------------------------------------------


def compose(t2q: torch.Tensor, q2p: torch.Tensor) -> torch.Tensor:
    """Text-to-Patch ``T2P = T2Q · Q2P`` (DeCo eq. in Appendix A).

    Args:
        t2q: ``[..., M]`` Text-to-Query relevance (one row per target token, or a single ``[M]`` vector).
        q2p: ``[M, N]`` (or batched ``[..., M, N]``) Query-to-Patch map.

    Returns:
        ``[..., N]``.

    Example:
        >>> import torch
        >>> compose(torch.tensor([1.0, 1.0]), pooling_map((1, 3), (1, 2)))
        tensor([0.5000, 1.0000, 0.5000])
    """
    _check_tensor(t2q, "t2q", min_ndim=1)
    _check_tensor(q2p, "q2p", min_ndim=2)
    if t2q.shape[-1] != q2p.shape[-2]:
        raise ValueError(
            f"t2q's last dim (M={t2q.shape[-1]}) must equal q2p's rows (M={q2p.shape[-2]}); "
            f"got t2q {tuple(t2q.shape)}, q2p {tuple(q2p.shape)}"
        )
    return t2q @ q2p


def average_steps(maps, weights=None) -> torch.Tensor:
    """The sentence map: the (weighted) mean of per-step maps over the step axis, **axis 0** (DeCo §3.1).

    Args:
        maps: ``[T, ...]`` tensor (e.g. ``[T, N]`` Text-to-Patch, or ``[T, h, w]`` grids), or a sequence of ``T``
            same-shape tensors (stacked along a new axis 0).
        weights: optional ``[T]`` non-negative weights with a positive sum; default: the plain mean.

    Returns:
        ``maps.shape[1:]``: ``Σ_t w_t maps[t] / Σ_t w_t``. No display normalization (R-GAE is not scale invariant).

    Example:
        >>> import torch
        >>> average_steps(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), weights=[3.0, 1.0])
        tensor([0.7500, 0.2500])
    """
    if not isinstance(maps, torch.Tensor):
        if isinstance(maps, str | bytes) or not isinstance(maps, Sequence) or len(maps) == 0:
            raise ValueError("maps must be a [T, ...] tensor or a non-empty sequence of same-shape tensors")
        for i, m in enumerate(maps):
            if not isinstance(m, torch.Tensor) or m.shape != maps[0].shape:
                raise ValueError(f"maps[{i}] must be a tensor of the shape of maps[0] ({tuple(maps[0].shape)})")
        maps = torch.stack(list(maps))
    _check_tensor(maps, "maps", min_ndim=1)
    t = maps.shape[0]
    if t == 0:
        raise ValueError("maps has no steps (T = 0); expected at least one per-step map")
    if weights is None:
        return maps.mean(dim=0)
    if not isinstance(weights, torch.Tensor):
        weights = torch.as_tensor(weights, dtype=maps.dtype)
    weights = weights.to(dtype=maps.dtype, device=maps.device)
    _check_tensor(weights, "weights", min_ndim=1)
    if weights.shape != (t,):
        raise ValueError(f"weights must be [T={t}], got shape {tuple(weights.shape)}")
    if bool((weights < 0).any()) or not bool(weights.sum() > 0):
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights.tolist()}")
    w = weights.reshape(t, *([1] * (maps.ndim - 1)))
    return (w * maps).sum(dim=0) / weights.sum()
