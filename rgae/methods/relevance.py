"""How the attention-based explainers obtain their per-layer quantities, for either capture.

* ``capture="interface"`` (default, :mod:`rgae.attention_capture`): the model's own kernel (sdpa, eager or flash)
  runs; each attention call's q, k, v, mask and output O are kept; per target, the gradients w.r.t. the O tensors give
  ``G_h = (∂y/∂O_h) V_hᵀ`` and the probabilities are recomputed in row chunks (:mod:`rgae.recompute`), so nothing of
  size ``layers × heads × n²`` is ever held. Parameters are frozen for the call (the graph starts at the recorded
  outputs), which also keeps the backward's saved activations at those of a frozen model.
* ``capture="eager"`` (the reference, :mod:`rgae.capture`): the model is switched to eager attention and forward
  hooks keep every probability tensor ``[1, H, n, n]`` with its graph (parameters require grad).

:class:`InterfaceRelevance` and :class:`EagerRelevance` give R-GAE the same three things per target token: the LLM
row ``e_rᵀ (I + cam_L) ⋯ (I + cam_1)`` (``[n]``), the Q-Former's per-layer cams and, with ``through_vision``, the
ViT's full ``R_vit``. :func:`llm_layers_without_attention` says which LLM layers mix tokens without an attention
matrix (linear attention, short convolutions): both captures explain through the attention layers only.

Example:
    >>> from rgae.methods.relevance import check_capture
    >>> check_capture("interface")
    'interface'
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence

import torch
from torch import nn

from rgae.attention_capture import InterfaceCapture
from rgae.capture import AttentionRecorder, eager_attention, explain_mode
from rgae.recompute import DEFAULT_CHUNK_ROWS, compute_dtype, layer_cam, row_trick_step
from rgae.rules import propagate, propagate_rows

CAPTURES = ("interface", "eager")

#: Targets whose gradients (w.r.t. the recorded attention outputs: one set is the size of those outputs, about a
#: tenth of a forward's saved activations) the interface capture gathers before recomputing the probabilities once
#: for all of them: each chunk of probabilities serves two targets, for one extra set held (four would hold three
#: extra sets, which with q, k, v kept takes the peak past 1.5× the gradient floor's; bench/bench_memory.py).
GROUP_TARGETS = 2


def check_capture(capture) -> str:
    """``capture`` if it is one of :data:`CAPTURES`, else a ValueError."""
    if capture not in CAPTURES:
        raise ValueError(f"capture must be one of {CAPTURES}, got {capture!r}")
    return capture


def attention_groups(adapter, through_vision: bool, projector: bool = True) -> dict[str, list[tuple[str, nn.Module]]]:
    """The named attention modules an explainer needs: the LLM's, the Q-Former's (``projector``) and, with
    ``through_vision``, the vision tower's, in forward order."""
    groups = {"llm": [(f"LLM layer {i}", m) for i, m in enumerate(adapter.llm_attention)]}
    groups["projector"] = (
        [(f"projector {k}-attention {i}", m) for i, (k, m) in enumerate(adapter.projector_attention)]
        if projector and adapter.projector_kind == "qformer" else []
    )
    vision = adapter.vision_attention if through_vision else []
    groups["vision"] = [(f"vision layer {i}", m) for i, m in enumerate(vision)]
    if through_vision and not groups["vision"]:
        raise ValueError("through_vision=True but no vision attention modules were found in the vision tower")
    return groups


_NOT_MIXING = re.compile(r"norm|mlp|feed_?forward|moe|expert|dropout|router|gate$", re.IGNORECASE)


def llm_layers_without_attention(language_model: nn.Module, attention_modules: Sequence[nn.Module]) -> list[str]:
    """Decoder layers of ``language_model`` that hold none of ``attention_modules``, as ``"layer i (Class)"`` with
    the class of their token mixer (e.g. ``Lfm2ShortConv``, ``Qwen3NextGatedDeltaNet``); ``[]`` when every layer
    attends. Their token mixing has no attention matrix, so R-GAE, raw attention and rollout pass through them along
    the residual path only."""
    n = getattr(getattr(language_model, "config", None), "num_hidden_layers", None)
    stacks = [m for m in language_model.modules() if isinstance(m, nn.ModuleList) and n and len(m) == n]
    if not stacks:
        return []
    attention = {id(m) for m in attention_modules}
    out = []
    for i, layer in enumerate(stacks[0]):
        if any(id(m) in attention for m in layer.modules()):
            continue
        mixers = [type(c).__name__ for name, c in layer.named_children() if not _NOT_MIXING.search(name)]
        out.append(f"layer {i} ({', '.join(mixers) or type(layer).__name__})")
    return out


def coverage_options(adapter) -> dict:
    """``options`` entries saying what an attention-based explanation does not explain (empty when complete)."""
    missing = llm_layers_without_attention(adapter.language_model, adapter.llm_attention)
    if not missing:
        return {}
    return {
        "llm_layers_without_attention": missing,
        "explained_through": (
            f"the LLM's {len(adapter.llm_attention)} attention layers only; the token mixing of "
            f"{len(missing)} layer(s) without an attention matrix (linear attention / convolution) is not explained: "
            "relevance passes them along the residual path"
        ),
    }


def _zeros_like_cam(n_q: int, n_k: int, ref: torch.Tensor) -> torch.Tensor:
    return torch.zeros(n_q, n_k, dtype=compute_dtype(ref.dtype), device=ref.device)


class EagerRelevance:
    """``capture="eager"``: hooks on eager attention keep each probability tensor with its graph (the reference)."""

    capture = "eager"

    def __init__(self, model: nn.Module, adapter, through_vision: bool, full_llm_cams: bool = False):
        self.model = model
        self.full_llm_cams = full_llm_cams
        groups = attention_groups(adapter, through_vision)
        self.recorders = {g: AttentionRecorder([m for _, m in items], [n for n, _ in items])
                          for g, items in groups.items()}
        self.through_vision = through_vision

    def enter(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(explain_mode(self.model))
        stack.enter_context(eager_attention(self.model))
        for rec in self.recorders.values():
            stack.enter_context(rec)

    def group_size(self, recorded: Sequence[torch.Tensor], n_targets: int) -> int:
        """Targets per :meth:`maps` call: 1 (each target's cams come from its own probability gradients)."""
        return 1

    def after_forward(self) -> list[torch.Tensor]:
        """Checks the recording; returns the tensors whose gradients :meth:`maps` needs."""
        for rec in self.recorders.values():
            rec.check_complete()
        self._all = AttentionRecorder([], require_graph=False)
        recs = list(self.recorders.values())
        self._all.attentions = [a for rec in recs for a in rec.attentions]
        self._all.names = [name for rec in recs for name in rec.names]
        self._all.calls = list(range(len(self._all.attentions)))
        return self._all.attentions

    def maps(self, rows: Sequence[int], grads: Sequence[torch.Tensor | None]):
        """Per target k (row ``rows[k]``, gradients ``g[k]``): ``(llm_row [n], projector cams, R_vit or None)``;
        with ``full_llm_cams``, every LLM layer's cam ``[n_q, n_k]`` instead of the row."""
        llm, proj, vis = (self.recorders[g].attentions for g in ("llm", "projector", "vision"))
        n_llm, n_proj = len(llm), len(proj)
        out = []
        for k, row in enumerate(rows):
            cams = self._all.cams([None if g is None else g[k] for g in grads])
            if self.full_llm_cams:
                llm_row = [c if c is not None else _zeros_like_cam(*a.shape[-2:], a) for c, a in zip(cams, llm)]
            else:
                llm_cams = [c for c in cams[:n_llm] if c is not None]
                n = llm[0].shape[-1]
                llm_row = propagate_rows(llm_cams, row) if llm_cams else torch.zeros(n, dtype=compute_dtype(
                    llm[0].dtype), device=llm[0].device)
            proj_cams = [c if c is not None else _zeros_like_cam(*a.shape[-2:], a)
                         for c, a in zip(cams[n_llm : n_llm + n_proj], proj)]
            r_vit = None
            if self.through_vision:
                vis_cams = [c for c in cams[n_llm + n_proj :] if c is not None]
                n_tok = vis[0].shape[0] * vis[0].shape[-1]  # a batch of views: block-diagonal
                r_vit = propagate(vis_cams) if vis_cams else torch.eye(n_tok, dtype=compute_dtype(vis[0].dtype),
                                                                       device=vis[0].device)
            out.append((llm_row, proj_cams, r_vit))
        return out


class InterfaceRelevance:
    """``capture="interface"``: the model's own kernel runs; cams are recomputed from q, k and ``∂y/∂O`` in chunks."""

    capture = "interface"

    def __init__(self, model: nn.Module, adapter, through_vision: bool, full_llm_cams: bool = False,
                 chunk_rows: int = DEFAULT_CHUNK_ROWS):
        self.model = model
        self.through_vision = through_vision
        self.full_llm_cams = full_llm_cams
        self.chunk_rows = chunk_rows
        self.capture_ = InterfaceCapture(model, attention_groups(adapter, through_vision))

    def enter(self, stack: contextlib.ExitStack) -> None:
        stack.enter_context(explain_mode(self.model, require_grad=False))
        stack.enter_context(self.capture_)

    def group_size(self, recorded: Sequence[torch.Tensor], n_targets: int) -> int:
        """Targets per :meth:`maps` call (:data:`GROUP_TARGETS`): each chunk of probabilities is recomputed once
        for the group instead of once per target."""
        return max(1, min(n_targets, GROUP_TARGETS))

    def after_forward(self) -> list[torch.Tensor]:
        self.capture_.check_complete()
        self.layers = {g: self.capture_.layers(g) for g in ("llm", "projector", "vision")}
        return [o for g in ("llm", "projector", "vision") for layer in self.layers[g] for o in layer.outputs]

    def _split(self, grads):
        """The flat gradient list back into per-group, per-layer per-block ``[k, H, n, d]`` lists (None: unused)."""
        out, i = {}, 0
        for g in ("llm", "projector", "vision"):
            out[g] = []
            for layer in self.layers[g]:
                out[g].append(layer.block_grads(grads[i : i + len(layer.outputs)], batched=True))
                i += len(layer.outputs)
        return out

    def maps(self, rows: Sequence[int], grads: Sequence[torch.Tensor | None]):
        per_layer = self._split(grads)
        llm = self.layers["llm"]
        ref = llm[0].blocks[0].query
        dtype = compute_dtype(ref.dtype)
        k = len(rows)
        if self.full_llm_cams:  # every layer's whole cam: the bi-modal rules need R_tt, not one row of it
            v = [self._cam_or_zeros(layer, g, k, dtype, ref.device) for layer, g in zip(llm, per_layer["llm"])]
        else:
            v = torch.zeros(k, llm[0].n_q, dtype=dtype, device=ref.device)
            v[torch.arange(k), torch.as_tensor(list(rows))] = 1.0
            for layer, g in zip(reversed(llm), reversed(per_layer["llm"])):  # e_rᵀ (I + cam_L) ⋯ (I + cam_1)
                if g is not None:
                    v = row_trick_step(v, layer.blocks, g, self.chunk_rows)
            if not bool(torch.isfinite(v).all()):
                raise ValueError("propagate_rows overflowed: the layer maps are too large for the product to stay "
                                 "finite")
        proj_cams = [self._cam_or_zeros(layer, g, k, dtype, ref.device)
                     for layer, g in zip(self.layers["projector"], per_layer["projector"])]
        r_vit = None
        if self.through_vision:
            vis = self.layers["vision"]
            n_v = vis[0].n_q
            r_vit = torch.eye(n_v, dtype=dtype, device=ref.device).expand(k, n_v, n_v).clone()
            for layer, g in zip(vis, per_layer["vision"]):  # R = (I + cam_k) ⋯ (I + cam_1), first layer first
                if g is not None:
                    r_vit = r_vit + layer_cam(layer.blocks, g, n_v, n_v, self.chunk_rows) @ r_vit
        llm_out = (lambda i: [c[i] for c in v]) if self.full_llm_cams else (lambda i: v[i])
        return [(llm_out(i), [c[i] for c in proj_cams], None if r_vit is None else r_vit[i]) for i in range(k)]

    def _cam_or_zeros(self, layer, g, k: int, dtype, device) -> torch.Tensor:
        """``[k, n_q, n_k]``: the layer's cam per target, zeros where no target depends on it."""
        if g is None:
            return torch.zeros(k, layer.n_q, layer.n_k, dtype=dtype, device=device)
        return layer_cam(layer.blocks, g, layer.n_q, layer.n_k, self.chunk_rows)


def relevance_source(capture: str, model: nn.Module, adapter, through_vision: bool, full_llm_cams: bool = False):
    """The :class:`InterfaceRelevance` or :class:`EagerRelevance` of ``capture``; ``full_llm_cams``: :meth:`maps`
    gives every LLM layer's cam instead of the row-trick row (an LLM with cross-attention layers, Mllama)."""
    cls = InterfaceRelevance if check_capture(capture) == "interface" else EagerRelevance
    return cls(model, adapter, through_vision, full_llm_cams=full_llm_cams)
