"""Attention rollout (Abnar & Zuidema, 2020): per layer ``Â = 0.5·mean_h(A) + 0.5·I``, rows renormalized to 1,
multiplied over layers, ``R = Â_L ⋯ Â_1``; Text-to-Query is row ``p_t - 1`` of R (computed by the row trick) on the
image-token columns. Query-to-Patch as in :mod:`rgae.methods.rawattn` (last Q-Former cross-attention, or geometric).

Example:
    >>> from rgae.methods import AttentionRollout
    >>> AttentionRollout(model, processor).attribute(image, target="a cat")  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from rgae.methods.base import PreparedInputs
from rgae.methods.rawattn import AttentionForward, select_heads


def rollout_layer(attn_mean: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """``(1 - residual)·A + residual·I`` with rows renormalized to sum 1."""
    eye = torch.eye(attn_mean.shape[-1], dtype=attn_mean.dtype, device=attn_mean.device)
    a = (1.0 - residual) * attn_mean + residual * eye
    return a / a.sum(-1, keepdim=True)


class AttentionRollout(AttentionForward):
    """``attribute(image, target=None, prompt=None, heads=None, residual=0.5)``."""

    method = "rollout"

    def _attribute(self, inputs: PreparedInputs, heads=None, residual: float = 0.5, **unknown):
        if unknown:
            raise TypeError(f"unknown AttentionRollout options: {sorted(unknown)} (known: heads, residual)")
        if not 0.0 <= float(residual) <= 1.0:
            raise ValueError(f"residual must be in [0, 1], got {residual}")
        if self.adapter.sees_image_through_cross_attention:
            raise ValueError(
                f"attention rollout is not defined for {type(self.model).__name__}: its LLM reads the image through "
                "cross-attention layers (no image tokens in its sequence), and rollout multiplies self-attention "
                "maps only; use RGAE (bi-modal rules) or RawAttention (a cross-attention layer)"
            )
        logits, llm_attn, proj_attn = self.record(inputs)
        layers = [rollout_layer(select_heads(a, heads), residual) for a in llm_attn]
        n = layers[0].shape[-1]
        rows = inputs.predicting_positions.to(layers[0].device)
        v = torch.zeros(rows.numel(), n, dtype=layers[0].dtype, device=layers[0].device)
        v[torch.arange(rows.numel()), rows] = 1.0
        for a in reversed(layers):  # e_rᵀ Â_L ⋯ Â_1, last layer first
            v = v @ a
        t2q = v[:, inputs.image_positions]
        q2p = self.geometric_q2p(inputs, proj_attn).to(t2q.device, t2q.dtype)
        return self.pack(
            inputs, text_to_patch=t2q @ q2p, token_probs=self._probs, text_to_query=t2q,
            query_to_patch=q2p, options={"heads": heads, "residual": float(residual)},
        )
