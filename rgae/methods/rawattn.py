"""Raw attention baseline (DeCo Appendix B): Text-to-Query from the head-averaged attention of one LLM layer
(default: the last; for an LLM that reads the image through cross-attention layers, Mllama, one of those), Query-to-
Patch from the last Q-Former cross-attention.

For projectors without attention, Query-to-Patch is geometric: the identity (linear / MLP) or the adaptive-pooling
operator of the query grid over the patch grid (avgpool; also maxpool and the abstractors, whose queries pool the
same windows; their attention-free mixing has no raw-attention reading).

Example:
    >>> from rgae.methods import RawAttention
    >>> RawAttention(model, processor).attribute(image, target="a cat", layer="mean")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib

import torch

from rgae.capture import AttentionRecorder, eager_attention, explain_mode
from rgae.methods.base import Explainer, PreparedInputs


def select_heads(attn: torch.Tensor, heads) -> torch.Tensor:
    """``[H, n, m]`` -> head mean over ``heads`` (None: all; int or list of ints)."""
    n_heads = attn.shape[0]
    if heads is None:
        return attn.mean(0)
    idx = [heads] if isinstance(heads, int) else list(heads)
    if not idx or any(not isinstance(h, int) or not -n_heads <= h < n_heads for h in idx):
        raise ValueError(f"heads must be None, an int or a list of ints in [-{n_heads}, {n_heads}), got {heads!r}")
    return attn[idx].mean(0)


def select_layers(maps: list[torch.Tensor], layer) -> torch.Tensor:
    """One layer's map (int index, negative from the end) or ``"mean"`` over layers."""
    if layer == "mean":
        return torch.stack(maps).mean(0)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(maps) <= layer < len(maps):
        raise ValueError(f"layer must be 'mean' or an int in [-{len(maps)}, {len(maps)}), got {layer!r}")
    return maps[layer]


class AttentionForward(Explainer):
    """One forward-only teacher-forced pass recording LLM (and Q-Former) attention probabilities."""

    def record(self, inputs: PreparedInputs):
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

    def geometric_q2p(self, inputs: PreparedInputs, proj_attn: list[torch.Tensor], heads_proj=None) -> torch.Tensor:
        """Query-to-Patch without gradients: the last Q-Former cross-attention, or the layout's structural map."""
        ad = self.adapter
        if ad.projector_kind == "qformer":
            cross = [a for (k, _), a in zip(ad.projector_attention, proj_attn) if k == "cross"]
            return select_heads(cross[-1], heads_proj)[:, ad.feature_prefix :]
        q2p = inputs.layout.query_to_patch
        if q2p is None:
            raise ValueError(f"the {inputs.layout.rule!r} connector has no structural Query-to-Patch map")
        dtype = proj_attn[-1].dtype if proj_attn else torch.float32
        return q2p.to(dtype)


class RawAttention(AttentionForward):
    """``attribute(image, target=None, prompt=None, layer=-1, heads=None)``: ``layer`` an int or ``"mean"``;
    ``heads`` None (all) or a list of head indices (applied to the LLM layer(s))."""

    method = "rawattn"

    def _attribute(self, inputs: PreparedInputs, layer=-1, heads=None, **unknown):
        if unknown:
            raise TypeError(f"unknown RawAttention options: {sorted(unknown)} (known: layer, heads, max_new_tokens)")
        logits, llm_attn, proj_attn = self.record(inputs)
        maps = [select_heads(a, heads) for a in llm_attn]
        kinds = self.adapter.llm_attention_kinds
        if self.adapter.sees_image_through_cross_attention:
            # The LLM attends to the image only in its cross-attention layers (Mllama): ``layer`` counts those.
            maps = [a for k, a in zip(kinds, maps) if k == "cross"]
        attn = select_layers(maps, layer)
        rows = inputs.predicting_positions.to(attn.device)
        t2q = attn[rows][:, inputs.image_positions]
        q2p = self.geometric_q2p(inputs, proj_attn).to(t2q.device, t2q.dtype)
        return self.pack(
            inputs, text_to_patch=t2q @ q2p, token_probs=self._probs, text_to_query=t2q,
            query_to_patch=q2p, options={"layer": layer, "heads": heads},
        )
