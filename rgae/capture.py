"""Record attention probabilities (with their autograd graph) and reduce ``(G ⊙ A)+`` per layer: the eager capture
(``capture="eager"``), kept as the reference of :mod:`rgae.attention_capture` (the default).

Three pieces, used together by the explainers in :mod:`rgae.methods`:

* :func:`eager_attention` switches every config of a model (top level, text, vision, any nested sub-config) to
  ``"eager"`` attention for a block and restores the previous values: SDPA/flash kernels return no probabilities
  (transformers only logs a warning), and an empty map must never be returned.
* :func:`explain_mode` puts the model in eval mode (no dropout), turns gradient checkpointing off and makes every
  floating-point parameter require grad (so each attention probability tensor is part of a graph and
  ``d(target)/dA`` exists even for frozen models) or freezes them all, restoring all three afterwards.
* :class:`AttentionRecorder` registers forward hooks on given modules and keeps ``out[1]`` (the post-softmax
  probabilities ``[1, heads, n_q, n_k]``) in call order; :meth:`AttentionRecorder.cams` turns the gradients of one
  target into per-layer maps ``mean_h (G ⊙ A)+`` right away (only ``[n_q, n_k]`` is kept per layer).

Example:
    >>> from rgae.capture import AttentionRecorder, eager_attention, explain_mode
    >>> with explain_mode(model), eager_attention(model), AttentionRecorder(modules) as rec:  # doctest: +SKIP
    ...     logits = model(**inputs).logits
    ...     grads = rec.gradients(logits[0, -1, token])
    ...     cams = rec.cams(grads)  # one [n_q, n_k] map per recorded layer
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from rgae.rules import gradient_weighted_attention


class AttentionCaptureError(RuntimeError):
    """The model did not give attention probabilities (e.g. it cannot run eager attention)."""


class NonFiniteGradientError(ValueError):
    """A gradient of the explained logit is NaN or inf (the message names the layer)."""


def _configs(model: nn.Module) -> list:
    """Every distinct config object reachable from the model's modules and their sub-configs, parents first."""
    seen: dict[int, object] = {}
    queue = []
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
            queue.append(cfg)
    ordered = []
    while queue:
        cfg = queue.pop(0)
        ordered.append(cfg)
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "to_dict") and id(sub) not in seen:
                seen[id(sub)] = sub
                queue.append(sub)
    return ordered


@contextlib.contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run the block with eager attention in every (sub-)config of ``model``; restore the previous settings.

    transformers reads ``config._attn_implementation`` at each forward, so switching the config switches the kernel.
    The values are restored parents first, so a parent's recursive setter cannot overwrite a child's own value.
    """
    configs = _configs(model)
    before = [(cfg, getattr(cfg, "_attn_implementation", None)) for cfg in configs]
    try:
        for cfg in configs:
            if hasattr(cfg, "_attn_implementation"):
                try:
                    cfg._attn_implementation = "eager"
                except Exception as exc:  # a config that refuses eager cannot give attention probabilities
                    raise AttentionCaptureError(
                        f"{type(model).__name__}: could not switch {type(cfg).__name__} to eager attention ({exc}); "
                        "R-GAE needs attention probabilities, which SDPA/flash kernels do not return"
                    ) from exc
        yield
    finally:
        for cfg, value in before:
            if hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = value


@contextlib.contextmanager
def explain_mode(model: nn.Module, require_grad: bool | None = True) -> Iterator[None]:
    """Eval mode and gradient checkpointing off for the block; parameters made to require grad (``True``, the eager
    capture: each probability tensor must be part of a graph), frozen (``False``, the interface capture: the graph
    starts at the recorded attention outputs, and frozen parameters save less for the backward), or left as they are
    (``None``). All of it is restored afterwards, also on exceptions."""
    was_training = model.training
    # transformers keeps the switch per module (``module.gradient_checkpointing``); flipping those flags avoids the
    # enable/disable API, whose names changed across versions, and restores exactly what was on.
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    flags = []
    if require_grad is not None:
        for p in model.parameters():
            if p.is_floating_point() or p.is_complex():
                flags.append((p, p.requires_grad))
    try:
        model.eval()
        for m in checkpointed:
            m.gradient_checkpointing = False
        for p, _ in flags:
            p.requires_grad_(bool(require_grad))
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m in checkpointed:
            m.gradient_checkpointing = True
        model.train(was_training)


class AttentionRecorder:
    """Forward hooks that keep each attention module's probabilities ``out[1]`` in call order.

    Args:
        modules: the attention modules (their forward returns ``(output, probabilities, ...)``).
        names: one label per module, used in error messages (default ``"layer {i}"``).
        require_graph: the probabilities must carry a graph (raise otherwise); set False for forward-only baselines.

    After a forward, :attr:`attentions` holds one ``[batch, heads, n_q, n_k]`` tensor per call, in call order, and
    :attr:`calls` the index (into ``modules``) of the module of each call; :meth:`cams` reads a batch (a vision
    tower's views) as one block-diagonal layer.
    """

    def __init__(self, modules: Sequence[nn.Module], names: Sequence[str] | None = None, require_graph: bool = True):
        self.modules = list(modules)
        self.names = list(names) if names is not None else [f"layer {i}" for i in range(len(self.modules))]
        if len(self.names) != len(self.modules):
            raise ValueError(f"names must have one entry per module ({len(self.modules)}), got {len(self.names)}")
        self.require_graph = require_graph
        self.attentions: list[torch.Tensor] = []
        self.calls: list[int] = []
        self._handles = []

    def _hook(self, index: int):
        def hook(module, args, out):
            probs = out[1] if isinstance(out, tuple | list) and len(out) > 1 else None
            if probs is None:
                raise AttentionCaptureError(
                    f"{self.names[index]} ({type(module).__name__}) returned no attention probabilities (out[1] is "
                    "None): capture='eager' needs modules that return them under eager attention "
                    "(rgae.capture.eager_attention), which some never do (the Qwen-VL vision towers' attention); "
                    "use capture='interface', the default, which recomputes them from the module's query and key"
                )
            if probs.ndim != 4:
                raise ValueError(
                    f"{self.names[index]}: expected attention probabilities [batch, heads, n_q, n_k], "
                    f"got {tuple(probs.shape)}"
                )
            if self.require_graph and torch.is_grad_enabled() and not probs.requires_grad:
                raise AttentionCaptureError(
                    f"{self.names[index]}: attention probabilities carry no autograd graph; run inside "
                    "rgae.capture.explain_mode(model) (parameters require grad) and without torch.no_grad()"
                )
            self.attentions.append(probs)
            self.calls.append(index)

        return hook

    def __enter__(self) -> AttentionRecorder:
        self.clear()
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.attentions.clear()
        self.calls.clear()

    def check_complete(self) -> None:
        """Each module was called exactly once, in the given order (a model that skipped a layer is an error)."""
        if self.calls != list(range(len(self.modules))):
            raise AttentionCaptureError(
                f"expected one call per attention module in order 0..{len(self.modules) - 1}, got calls {self.calls}"
            )

    def gradients(self, scalar: torch.Tensor, extra: Sequence[torch.Tensor] = ()) -> list[torch.Tensor | None]:
        """``d scalar / dA`` for every recorded attention (then for each tensor of ``extra``); None where unused.

        The graph is retained so that the next target token can be differentiated too.
        """
        inputs = [*self.attentions, *extra]
        return list(torch.autograd.grad(scalar, inputs, retain_graph=True, allow_unused=True))

    def cams(self, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Per-layer ``mean_h (G ⊙ A)+`` as ``[n_q, n_k]`` (``[B·n_q, B·n_k]`` block-diagonal for a batch of B);
        None for layers the target does not depend on."""
        out = []
        for i, (attn, grad) in enumerate(zip(self.attentions, grads)):
            if grad is None:
                out.append(None)
                continue
            a, g = attn.detach(), grad
            if a.dtype in (torch.float16, torch.bfloat16):  # half-precision models: relevance math in float32
                a, g = a.float(), g.float()
            try:  # the engine checks finiteness; only the message needs the layer's name
                # A batch (a vision tower's views) is one block-diagonal layer, example after example.
                cams = [gradient_weighted_attention(a[b], g[b]) for b in range(a.shape[0])]
                out.append(cams[0] if len(cams) == 1 else torch.block_diag(*cams))
            except ValueError as exc:
                if "NaN or inf" not in str(exc):
                    raise
                name = self.names[self.calls[i]] if i < len(self.calls) else f"layer {i}"
                what = "gradient of the target" if "grad" in str(exc) else "attention probabilities"
                raise NonFiniteGradientError(
                    f"the {what} w.r.t. the attention of {name} contains NaN/inf; the model overflows in this dtype "
                    "(try float32/float64) or has non-finite weights"
                ) from exc
        return out
