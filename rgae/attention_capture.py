"""Capture attention through transformers' ``AttentionInterface``: the model's own kernel runs, and each call's
inputs are kept so that the probabilities can be recomputed exactly (:mod:`rgae.recompute`).

:class:`InterfaceCapture` registers one attention function per kernel the model uses, under its own name
(``rgae+sdpa``, ``rgae+eager``, ``rgae+flash_attention_2``, ...), with the matching mask function in
``AttentionMaskInterface`` (so the mask the kernel gets is the one it would get anyway), switches every (sub-)config's
``_attn_implementation`` to it for the block and restores everything afterwards, also on exceptions. The registered
function calls the original kernel (``ALL_ATTENTION_FUNCTIONS[name]``; for ``eager``, the ``eager_attention_forward``
of the module's own modeling file) for the output, unchanged, and for each watched module keeps per call:

* the post-RoPE query, key and value (grouped-query attention: the ``H_kv`` key/value heads, not repeated),
* the mask exactly as the kernel received it (boolean or additive 4-D for eager/sdpa, ``None`` with the kernel's causal
  rule, flash attention's 2-D padding mask, ``cu_seq_lens`` or packed ``position_ids`` as a block-diagonal layer),
  the scaling, the softcap and flash attention's sliding window,
* the attention output ``O`` (per head, before the output projection) with its graph: target gradients w.r.t. ``O``
  give ``∂y/∂A_h = (∂y/∂O_h) V_hᵀ`` exactly. When ``O`` has no graph (frozen parameters, nothing upstream requires
  grad) it is replaced by an equal leaf that requires grad, so gradients w.r.t. it exist without making any parameter
  require grad.

Several calls of one module in a forward (a vision tower that attends per image) form one block-diagonal layer, in
call order, which is how the modules concatenate their outputs; so does a batched call (a vision tower encoding an
image's tiles as a batch): example b's tokens follow example b − 1's. Anything the recompute cannot reproduce exactly
(attention sinks, position biases, active dropout, flex attention's block masks) is an :class:`AttentionCaptureError`
naming the module; so is a watched module that never called the interface (it computes attention itself).

Example:
    >>> from rgae.attention_capture import InterfaceCapture
    >>> with InterfaceCapture(model, {"llm": adapter.llm_attention}) as cap:  # doctest: +SKIP
    ...     logits = model(**inputs).logits  # the model's own kernel: the same logits as without the capture
    ...     cap.check_complete()
    ...     layers = cap.layers("llm")  # one CapturedLayer (blocks + outputs O) per module, in the given order
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rgae.capture import AttentionCaptureError, NonFiniteGradientError, _configs
from rgae.recompute import AttentionBlock

__all__ = ["CAPTURE_PREFIX", "CapturedLayer", "InterfaceCapture", "is_capture_implementation"]

#: Prefix of the attention implementation names this module registers (``rgae+sdpa`` wraps ``sdpa``).
CAPTURE_PREFIX = "rgae+"

def is_capture_implementation(name) -> bool:
    """Whether ``name`` is one of the attention implementations an :class:`InterfaceCapture` registers."""
    return isinstance(name, str) and name.startswith(CAPTURE_PREFIX)


def _is_flash(name: str) -> bool:
    return "flash" in name


def _check_supported(name: str, where: str) -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager" or name == "sdpa" or (_is_flash(name) and name in ALL_ATTENTION_FUNCTIONS):
        return
    raise AttentionCaptureError(
        f"{where} uses attention implementation {name!r}; capture='interface' reproduces eager, sdpa and flash "
        "attention kernels exactly (not flex attention's block masks or paged/custom kernels): use capture='eager'"
    )


# ---- the registered functions -------------------------------------------------------------------------------------
_lock = threading.Lock()
_registered: dict[str, int] = {}  # registered name -> number of captures using it
_owners: dict[nn.Module, InterfaceCapture] = {}  # watched module -> its capture
_wrappers: dict[str, object] = {}


def _eager_kernel(module: nn.Module):
    """The ``eager_attention_forward`` of the module's modeling file (the default each module passes to
    ``get_interface``; ``eager`` is not in ``ALL_ATTENTION_FUNCTIONS``)."""
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if callable(fn):
            return fn
    raise AttentionCaptureError(
        f"{type(module).__name__}: found no eager_attention_forward in its modeling file to run its eager attention"
    )


def _kernel(original: str, module: nn.Module):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return _eager_kernel(module) if original == "eager" else ALL_ATTENTION_FUNCTIONS[original]


@contextlib.contextmanager
def _kernel_sees_its_name(module: nn.Module, original: str) -> Iterator[None]:
    """Flash attention reads ``module.config._attn_implementation`` to pick its library: show it its own name."""
    config = getattr(module, "config", None)
    if not _is_flash(original) or config is None:
        yield
        return
    current = config._attn_implementation
    config._attn_implementation = original
    try:
        yield
    finally:
        config._attn_implementation = current


def _wrapper(original: str):
    if original not in _wrappers:

        def attention(module, query, key, value, attention_mask, **kwargs):
            kernel = _kernel(original, module)
            capture = _owners.get(module)
            if capture is None:
                with _kernel_sees_its_name(module, original):
                    return kernel(module, query, key, value, attention_mask, **kwargs)
            return capture._call(kernel, original, module, query, key, value, attention_mask, kwargs)

        attention.__name__ = attention.__qualname__ = f"rgae_capture_{original}"
        _wrappers[original] = attention
    return _wrappers[original]


def _register(original: str) -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = CAPTURE_PREFIX + original
    with _lock:
        if _registered.get(name, 0) == 0:
            AttentionInterface.register(name, _wrapper(original))
            # No mask function for the original means transformers builds no mask for it: mirror that.
            if original in ALL_MASK_ATTENTION_FUNCTIONS:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        _registered[name] = _registered.get(name, 0) + 1


def _unregister(original: str) -> None:
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = CAPTURE_PREFIX + original
    with _lock:
        _registered[name] -= 1
        if _registered[name] == 0:
            del _registered[name]
            # The registries have register() but no unregister(): their class-wide mapping is the registry.
            for registry in (AttentionInterface, AttentionMaskInterface):
                getattr(registry, "_global_mapping", {}).pop(name, None)


# ---- what one call keeps ------------------------------------------------------------------------------------------
@dataclass
class _Call:
    blocks: list[AttentionBlock]  # offsets local to the call
    output: torch.Tensor  # [1, n_q, H, d_v], the kernel's output as returned to the module


def _dense_padding(mask: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
    """Flash attention's 2-D padding mask ``[1, n_k]`` as a boolean ``[1, n_q, n_k]``: padded keys are never
    attended and padded queries (same positions, right-aligned) get zero output."""
    keys = mask[0, -n_k:].to(torch.bool)
    queries = keys[-n_q:]
    return (queries.view(n_q, 1) & keys.view(1, n_k)).unsqueeze(0)


def _segments(kwargs: dict, n: int) -> list[tuple[int, int]] | None:
    """Packed sequences of a flash call as ``[(start, stop)]`` (``cu_seq_lens`` or restarting ``position_ids``)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None or not torch.equal(cu_q.cpu(), cu_k.cpu()):
            raise AttentionCaptureError("flash attention with different query and key cu_seq_lens is not supported")
        bounds = [int(b) for b in cu_q.tolist()]
    else:
        from transformers.modeling_flash_attention_utils import (
            _is_packed_sequence,
            prepare_fa_kwargs_from_position_ids,
        )

        position_ids = kwargs.get("position_ids")
        if position_ids is None or not bool(_is_packed_sequence(position_ids, 1)):
            return None
        (cu, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
        bounds = [int(b) for b in cu.tolist()]
    if bounds[0] != 0 or bounds[-1] != n:
        raise AttentionCaptureError(f"packed sequence bounds {bounds} do not cover the {n} tokens of the call")
    return list(zip(bounds[:-1], bounds[1:]))


def _call_blocks(original: str, module: nn.Module, query, key, value, mask, kwargs: dict) -> list[AttentionBlock]:
    """The attention blocks one kernel call computes, reproducing that kernel's masking rules."""
    q, k, v = query[0].detach(), key[0].detach(), value[0].detach()
    n_q, n_k = q.shape[1], k.shape[1]
    scaling = kwargs.get("scaling")
    scaling = float(q.shape[-1] ** -0.5 if scaling is None else scaling)
    softcap = kwargs.get("softcap")
    softcap = None if softcap is None else float(softcap)
    is_causal = kwargs.get("is_causal")
    is_causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
    window, segments, dense = None, None, None
    if _is_flash(original):
        causal = is_causal
        sliding = kwargs.get("sliding_window")
        if sliding is not None and n_k > sliding:  # flash only uses the window when there are more keys than it
            window = int(sliding)
        if mask is not None:
            if mask.ndim != 2:
                raise AttentionCaptureError(f"flash attention got a {mask.ndim}-D mask; expected its 2-D padding mask")
            dense = _dense_padding(mask, n_q, n_k)
        else:
            segments = _segments(kwargs, n_q)
    else:
        # sdpa: no mask means its is_causal rule (several queries, module/kwarg causal); eager: no mask is no mask.
        causal = original == "sdpa" and mask is None and n_q > 1 and is_causal
        if mask is not None:
            if mask.ndim != 4 or mask.shape[0] != 1:
                raise AttentionCaptureError(
                    f"{type(module).__name__} got an attention mask of shape {tuple(mask.shape)}; expected "
                    "[1, 1 or heads, queries, keys]"
                )
            dense = mask[0].detach()
            if tuple(dense.shape[1:]) != (n_q, n_k):
                try:
                    dense = dense.expand(dense.shape[0], n_q, n_k)
                except RuntimeError:
                    raise AttentionCaptureError(
                        f"{type(module).__name__}: mask {tuple(mask.shape)} does not fit {n_q} queries, {n_k} keys"
                    ) from None
    if causal and n_q != n_k:
        raise AttentionCaptureError(
            f"{type(module).__name__}: causal attention with {n_q} queries over {n_k} keys (a cache); explain "
            "without a cache (use_cache=False)"
        )
    common = {"scaling": scaling, "softcap": softcap, "causal": causal, "window": window}
    if segments is None:
        return [AttentionBlock(q, k, v, mask=dense, **common)]
    return [
        AttentionBlock(q[:, a:b], k[:, a:b], v[:, a:b], q_offset=a, k_offset=a, **common) for a, b in segments
    ]


def _batch_blocks(original: str, module: nn.Module, query, key, value, mask, kwargs: dict) -> list[AttentionBlock]:
    """The blocks of one call over a batch: example b's tokens follow example a's (a vision tower that encodes an
    image's views as a batch is one block-diagonal layer over all views, in batch order)."""
    batch, n_q, n_k = query.shape[0], query.shape[2], key.shape[2]
    if batch == 1:
        return _call_blocks(original, module, query, key, value, mask, kwargs)
    blocks = []
    for b in range(batch):
        mask_b = mask if mask is None or mask.shape[0] == 1 else mask[b : b + 1]
        for block in _call_blocks(original, module, query[b : b + 1], key[b : b + 1], value[b : b + 1], mask_b,
                                  kwargs):
            blocks.append(dataclasses.replace(block, q_offset=block.q_offset + b * n_q,
                                              k_offset=block.k_offset + b * n_k))
    return blocks


# ---- a captured layer ---------------------------------------------------------------------------------------------
@dataclass
class CapturedLayer:
    """One watched module's attention in one forward: its blocks (offsets into the layer) and outputs O.

    Attributes:
        name: label used in messages (``"LLM layer 3"``).
        module: the attention module.
        blocks: the layer's :class:`~rgae.recompute.AttentionBlock` list (block-diagonal over calls / segments).
        outputs: the kernel outputs ``[B, n_q_call, H, d_v]``, one per call, in call order (differentiate w.r.t.
            these; :meth:`block_grads` turns their gradients into per-block ``[T, H, n_q, d_v]``; a batch of B is
            B consecutive blocks).
        n_q, n_k: the layer's query and key counts.
    """

    name: str
    module: nn.Module
    blocks: list[AttentionBlock]
    outputs: list[torch.Tensor]
    n_q: int
    n_k: int
    _call_blocks: list[list[int]] = field(default_factory=list, repr=False)  # block indices of each call

    def block_grads(self, grads: Sequence[torch.Tensor | None], batched: bool = False):
        """Per-block ``[T, H, n_q_block, d_v]`` from the gradients w.r.t. :attr:`outputs` (``[B, n, H, d]`` each,
        or ``[T, B, n, H, d]`` with ``batched``); None when the target does not depend on this layer."""
        if len(grads) != len(self.outputs):
            raise ValueError(f"{self.name}: expected {len(self.outputs)} gradients (one per call), got {len(grads)}")
        if all(g is None for g in grads):
            return None
        out: list[torch.Tensor] = [None] * len(self.blocks)  # type: ignore[list-item]
        for call, (g, indices) in enumerate(zip(grads, self._call_blocks)):
            if g is None:
                g = torch.zeros_like(self.outputs[call])
                g = g.unsqueeze(0) if batched else g
            g = g if batched else g.unsqueeze(0)
            if not bool(torch.isfinite(g.sum())) and not bool(torch.isfinite(g).all()):
                raise NonFiniteGradientError(
                    f"the gradient of the target w.r.t. the attention output of {self.name} contains NaN/inf; the "
                    "model overflows in this dtype (try float32/float64) or has non-finite weights"
                )
            per_head = g.flatten(1, 2).transpose(1, 2)  # [T, B, n, H, d_v] -> [T, H, B·n, d_v]
            call_start = self.blocks[indices[0]].q_offset  # a call's first block starts at its first token
            for i in indices:
                local = self.blocks[i].q_offset - call_start
                out[i] = per_head[:, :, local : local + self.blocks[i].n_q]
        return out


# ---- the capture --------------------------------------------------------------------------------------------------
class InterfaceCapture:
    """Context manager: the model's attention runs through registered wrappers of its own kernels (module docs).

    Args:
        model: the model; every (sub-)config reachable from its modules is switched for the block.
        groups: ``{group: modules}`` or ``{group: [(name, module), ...]}``: the attention modules to record, in
            forward order per group (e.g. ``{"llm": ..., "projector": ..., "vision": ...}``).
        graph: keep outputs in the autograd graph (leaves that require grad where they have none); False for
            forward-only use under ``torch.no_grad()``.
    """

    def __init__(self, model: nn.Module, groups: Mapping[str, Sequence], graph: bool = True):
        self.model = model
        self.graph = graph
        self.groups: dict[str, list[tuple[str, nn.Module]]] = {}
        for group, items in groups.items():
            named = []
            for i, item in enumerate(items):
                name, module = item if isinstance(item, tuple) else (f"{group} layer {i}", item)
                named.append((str(name), module))
            self.groups[group] = named
        self._calls: dict[nn.Module, list[_Call]] = {}
        self._config_state: list = []
        self._originals: list[str] = []
        self._watched: list[nn.Module] = []

    # ---- entering / leaving ---------------------------------------------------------------------------------------
    def __enter__(self) -> InterfaceCapture:
        configs = [cfg for cfg in _configs(self.model) if hasattr(cfg, "_attn_implementation")]
        before = [(cfg, cfg._attn_implementation) for cfg in configs]
        originals = []
        for cfg, impl in before:
            impl = impl or "eager"  # transformers' get_interface falls back to the module's eager function on None
            if is_capture_implementation(impl):
                raise AttentionCaptureError(
                    f"{type(cfg).__name__} already runs {impl!r}: this model is inside another rgae capture"
                )
            _check_supported(impl, f"{type(self.model).__name__} ({type(cfg).__name__})")
            originals.append(impl)
        modules = [m for items in self.groups.values() for _, m in items]
        with _lock:
            busy = [m for m in modules if m in _owners]
            if busy:
                raise AttentionCaptureError(f"{type(busy[0]).__name__} is already being captured (nested capture)")
            for m in modules:
                _owners[m] = self
        self._watched = modules
        try:
            for impl in dict.fromkeys(originals):
                _register(impl)
                self._originals.append(impl)
            self._config_state = before
            # Parents first: a parent's setter also writes its sub-configs, which then get their own value back.
            for (cfg, _), impl in zip(before, originals):
                cfg._attn_implementation = CAPTURE_PREFIX + impl
        except BaseException:
            self._restore()
            raise
        self._calls = {}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for cfg, value in self._config_state:
            cfg._attn_implementation = value
        self._config_state = []
        for impl in self._originals:
            _unregister(impl)
        self._originals = []
        with _lock:
            for m in self._watched:
                if _owners.get(m) is self:
                    del _owners[m]
        self._watched = []

    # ---- one call -------------------------------------------------------------------------------------------------
    def _call(self, kernel, original: str, module, query, key, value, attention_mask, kwargs: dict):
        where = type(module).__name__
        batch = query.shape[0]
        if key.shape[0] != batch or value.shape[0] != batch:
            raise AttentionCaptureError(f"{where}: query batch {batch}, key batch {key.shape[0]}")
        if float(kwargs.get("dropout") or 0.0) > 0.0:
            raise AttentionCaptureError(
                f"{where} runs attention dropout (training mode): the probabilities would be random; explain in eval "
                "mode (rgae.capture.explain_mode)"
            )
        for name, what in (("s_aux", "attention sinks"), ("position_bias", "a position bias")):
            if kwargs.get(name) is not None:
                raise AttentionCaptureError(
                    f"{where} adds {what} ({name}) to its attention, which capture='interface' cannot recompute yet: "
                    "use capture='eager'"
                )
        with _kernel_sees_its_name(module, original):
            out, weights = kernel(module, query, key, value, attention_mask, **kwargs)
        if self.graph and torch.is_grad_enabled() and not out.requires_grad:
            out = out.detach().requires_grad_(True)  # the same numbers; d y / d O exists without grad parameters
        blocks = _batch_blocks(original, module, query, key, value, attention_mask, kwargs)
        n_q, heads, d_v = query.shape[2], query.shape[1], value.shape[-1]
        if tuple(out.shape) != (batch, n_q, heads, d_v):
            raise AttentionCaptureError(
                f"{where}: the {original} kernel returned {tuple(out.shape)}; expected [{batch}, {n_q}, {heads}, {d_v}]"
            )
        self._calls.setdefault(module, []).append(_Call(blocks, out))
        return out, weights

    # ---- after the forward ----------------------------------------------------------------------------------------
    def clear(self) -> None:
        self._calls = {}

    def check_complete(self, groups: Sequence[str] | None = None) -> None:
        """Every watched module (of ``groups``, default all) called the interface at least once."""
        missing = [
            (name, m) for g in (groups or self.groups) for name, m in self.groups[g] if not self._calls.get(m)
        ]
        if missing:
            classes = sorted({type(m).__name__ for _, m in missing})
            names = ", ".join(name for name, _ in missing[:4]) + (" ..." if len(missing) > 4 else "")
            raise AttentionCaptureError(
                f"{', '.join(classes)} ({names}) never called transformers' attention interface: these modules "
                "compute attention themselves, so capture='interface' cannot see it; use capture='eager'"
            )

    def layers(self, group: str) -> list[CapturedLayer]:
        """One :class:`CapturedLayer` per module of ``group`` (in the given order) that was called."""
        out = []
        for name, module in self.groups[group]:
            calls = self._calls.get(module)
            if not calls:
                continue
            blocks, call_blocks, q_off, k_off = [], [], 0, 0
            for call in calls:
                indices = []
                n_q = n_k = 0
                for b in call.blocks:
                    indices.append(len(blocks))
                    blocks.append(
                        AttentionBlock(
                            b.query, b.key, b.value, b.scaling, mask=b.mask, causal=b.causal, window=b.window,
                            softcap=b.softcap, q_offset=q_off + b.q_offset, k_offset=k_off + b.k_offset,
                        )
                    )
                    n_q = max(n_q, b.q_offset + b.n_q)
                    n_k = max(n_k, b.k_offset + b.n_k)
                call_blocks.append(indices)
                q_off, k_off = q_off + n_q, k_off + n_k
            layer = CapturedLayer(name, module, blocks, [c.output for c in calls], q_off, k_off)
            layer._call_blocks = call_blocks
            out.append(layer)
        return out
