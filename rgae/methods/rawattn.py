"""Raw attention baseline (DeCo Appendix B): Text-to-Query from the head-averaged attention of one LLM layer
(default: the last; for an LLM that reads the image through cross-attention layers, Mllama, one of those), Query-to-
Patch from the last Q-Former cross-attention.

For projectors without attention, Query-to-Patch is geometric: the identity (linear / MLP) or the adaptive-pooling
operator of the query grid over the patch grid (avgpool; also maxpool and the abstractors, whose queries pool the
same windows; their attention-free mixing has no raw-attention reading).

With ``capture="interface"`` (default) the model runs its own attention kernel and only the probabilities read here
are recomputed from the recorded q and k (the predicting rows of the chosen LLM layers, the last cross-attention);
``capture="eager"`` records every probability tensor of eager attention. Same maps.

Example:
    >>> from rgae.methods import RawAttention
    >>> RawAttention(model, processor).attribute(image, target="a cat", layer="mean")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from rgae.attention_capture import InterfaceCapture
from rgae.capture import AttentionRecorder, eager_attention, explain_mode
from rgae.methods.base import Explainer, PreparedInputs
from rgae.methods.relevance import attention_groups, check_capture, coverage_options
from rgae.recompute import layer_probabilities, probability_rows


def head_indices(heads, n_heads: int) -> list[int] | None:
    """``heads`` (None: all; int or list of ints in ``[-n_heads, n_heads)``) as a list of indices, or None."""
    if heads is None:
        return None
    idx = [heads] if isinstance(heads, int) else list(heads)
    if not idx or any(not isinstance(h, int) or isinstance(h, bool) or not -n_heads <= h < n_heads for h in idx):
        raise ValueError(f"heads must be None, an int or a list of ints in [-{n_heads}, {n_heads}), got {heads!r}")
    return idx


def select_heads(attn: torch.Tensor, heads) -> torch.Tensor:
    """``[H, n, m]`` -> head mean over ``heads`` (None: all; int or list of ints)."""
    idx = head_indices(heads, attn.shape[0])
    return attn.mean(0) if idx is None else attn[idx].mean(0)


def layer_index(layer, n_layers: int) -> list[int]:
    """The layers ``layer`` selects: an int (negative from the end) or ``"mean"`` (all)."""
    if layer == "mean":
        return list(range(n_layers))
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n_layers <= layer < n_layers:
        raise ValueError(f"layer must be 'mean' or an int in [-{n_layers}, {n_layers}), got {layer!r}")
    return [layer % n_layers]


def select_layers(maps: list[torch.Tensor], layer) -> torch.Tensor:
    """One layer's map (int index, negative from the end) or ``"mean"`` over layers."""
    return torch.stack([maps[i] for i in layer_index(layer, len(maps))]).mean(0)


class AttentionForward(Explainer):
    """One forward-only teacher-forced pass recording LLM (and Q-Former) attention.

    ``capture="interface"`` (default) keeps q, k and the masks of the model's own kernel and recomputes only the
    probabilities a method reads; ``capture="eager"`` records every probability tensor of eager attention."""

    def record(self, inputs: PreparedInputs):
        """``capture="eager"``: ``(logits, [H, n, n] per LLM layer, [H, n_q, n_k] per projector layer)``."""
        ad = self.adapter
        llm = AttentionRecorder(ad.llm_attention, require_graph=False)
        proj = AttentionRecorder([m for _, m in ad.projector_attention], require_graph=False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(explain_mode(self.model, require_grad=False))
            stack.enter_context(eager_attention(self.model))
            stack.enter_context(torch.no_grad())
            stack.enter_context(llm)
            stack.enter_context(proj)
            logits, offset = self.forward(inputs)
        llm.check_complete()
        proj.check_complete()
        self._probs = self.token_probs(logits, inputs, offset)
        return logits, [a[0] for a in llm.attentions], [a[0] for a in proj.attentions]

    def capture_layers(self, inputs: PreparedInputs):
        """``capture="interface"``: ``(logits, LLM CapturedLayers, projector CapturedLayers)``, forward only."""
        groups = attention_groups(self.adapter, through_vision=False)
        capture = InterfaceCapture(self.model, groups, graph=False)
        with contextlib.ExitStack() as stack:
            stack.enter_context(explain_mode(self.model, require_grad=False))
            stack.enter_context(torch.no_grad())
            stack.enter_context(capture)
            logits, offset = self.forward(inputs)
            capture.check_complete()
        self._probs = self.token_probs(logits, inputs, offset)
        return logits, capture.layers("llm"), capture.layers("projector")

    def projector_probabilities(self, proj_layers) -> list[torch.Tensor | None]:
        """Per projector layer ``[H, n_q, n_k]`` where :meth:`geometric_q2p` reads it (the Q-Former's last
        cross-attention, recomputed), None elsewhere."""
        kinds = [k for k, _ in self.adapter.projector_attention]
        last = max((i for i, k in enumerate(kinds) if k == "cross"), default=None)
        return [layer_probabilities(layer.blocks, layer.n_q, layer.n_k) if i == last else None
                for i, layer in enumerate(proj_layers)]

    def geometric_q2p(self, inputs: PreparedInputs, proj_attn: list, heads_proj=None) -> torch.Tensor:
        """Query-to-Patch without gradients: the last Q-Former cross-attention, or the layout's structural map."""
        ad = self.adapter
        if ad.projector_kind == "qformer":
            cross = [a for (k, _), a in zip(ad.projector_attention, proj_attn) if k == "cross"]
            return select_heads(cross[-1], heads_proj)[:, ad.feature_prefix :]
        q2p = inputs.layout.query_to_patch
        if q2p is None:
            raise ValueError(f"the {inputs.layout.rule!r} connector has no structural Query-to-Patch map")
        return q2p


class RawAttention(AttentionForward):
    """``attribute(image, target=None, prompt=None, layer=-1, heads=None, capture="interface")``: ``layer`` an int or
    ``"mean"``; ``heads`` None (all) or a list of head indices (applied to the LLM layer(s)); ``capture`` as in
    :class:`AttentionForward` (the same maps)."""

    method = "rawattn"

    def _attribute(self, inputs: PreparedInputs, layer=-1, heads=None, capture: str = "interface", **unknown):
        if unknown:
            raise TypeError(
                f"unknown RawAttention options: {sorted(unknown)} (known: layer, heads, capture, max_new_tokens)"
            )
        rows = inputs.predicting_positions
        # The LLM attends to the image only in its cross-attention layers (Mllama): ``layer`` counts those.
        cross_only = self.adapter.sees_image_through_cross_attention
        kinds = self.adapter.llm_attention_kinds
        if check_capture(capture) == "eager":
            logits, llm_attn, proj_attn = self.record(inputs)
            maps = [select_heads(a, heads) for a in llm_attn]
            if cross_only:
                maps = [a for k, a in zip(kinds, maps) if k == "cross"]
            attn = select_layers(maps, layer)
            t2q = attn[rows.to(attn.device)][:, inputs.image_positions]
        else:
            logits, llm_layers, proj_layers = self.capture_layers(inputs)
            if cross_only:
                llm_layers = [c for k, c in zip(kinds, llm_layers) if k == "cross"]
            chosen = layer_index(layer, len(llm_layers))
            idx = head_indices(heads, llm_layers[0].blocks[0].heads)
            # Only the predicting rows of the chosen layers are recomputed.
            maps = [probability_rows(llm_layers[i].blocks, rows, llm_layers[i].n_k) for i in chosen]
            attn = torch.stack([m.mean(0) if idx is None else m[idx].mean(0) for m in maps]).mean(0)
            t2q = attn[:, inputs.image_positions]
            proj_attn = self.projector_probabilities(proj_layers)
        q2p = self.geometric_q2p(inputs, proj_attn).to(t2q.device, t2q.dtype)
        return self.pack(
            inputs, text_to_patch=t2q @ q2p, token_probs=self._probs, text_to_query=t2q,
            query_to_patch=q2p, options={"layer": layer, "heads": heads, "capture": capture,
                                         **coverage_options(self.adapter)},
        )
