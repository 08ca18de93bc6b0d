"""Attention rollout (Abnar & Zuidema, 2020): per layer ``Â = 0.5·mean_h(A) + 0.5·I``, rows renormalized to 1,
multiplied over layers, ``R = Â_L ⋯ Â_1``; Text-to-Query is row ``p_t - 1`` of R (computed by the row trick) on the
image-token columns. Query-to-Patch as in :mod:`rgae.methods.rawattn` (last Q-Former cross-attention, or geometric).
With ``capture="interface"`` (default) each ``Â`` is recomputed from q, k in row chunks
(:func:`rgae.recompute.rollout_step`) and only the rows the product reaches are formed.

Example:
    >>> from rgae.methods import AttentionRollout
    >>> AttentionRollout(model, processor).attribute(image, target="a cat")  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from rgae.methods.base import PreparedInputs
from rgae.methods.rawattn import AttentionForward, head_indices, select_heads
from rgae.methods.relevance import check_capture, coverage_options
from rgae.recompute import compute_dtype, rollout_step


def rollout_layer(attn_mean: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """``(1 - residual)·A + residual·I`` with rows renormalized to sum 1."""
    eye = torch.eye(attn_mean.shape[-1], dtype=attn_mean.dtype, device=attn_mean.device)
    a = (1.0 - residual) * attn_mean + residual * eye
    return a / a.sum(-1, keepdim=True)


class AttentionRollout(AttentionForward):
    """``attribute(image, target=None, prompt=None, heads=None, residual=0.5, capture="interface")``."""

    method = "rollout"

    def _attribute(self, inputs: PreparedInputs, heads=None, residual: float = 0.5, capture: str = "interface",
                   **unknown):
        if unknown:
            raise TypeError(f"unknown AttentionRollout options: {sorted(unknown)} (known: heads, residual, capture)")
        if not 0.0 <= float(residual) <= 1.0:
            raise ValueError(f"residual must be in [0, 1], got {residual}")
        if self.adapter.sees_image_through_cross_attention:
            raise ValueError(
                f"attention rollout is not defined for {type(self.model).__name__}: its LLM reads the image through "
                "cross-attention layers (no image tokens in its sequence), and rollout multiplies self-attention "
                "maps only; use RGAE (bi-modal rules) or RawAttention (a cross-attention layer)"
            )
        rows = inputs.predicting_positions
        if check_capture(capture) == "eager":
            logits, llm_attn, proj_attn = self.record(inputs)
            layers = [rollout_layer(select_heads(a, heads), residual) for a in llm_attn]
            v = self._start(rows, layers[0].shape[-1], layers[0])
            for a in reversed(layers):  # e_rᵀ Â_L ⋯ Â_1, last layer first
                v = v @ a
        else:
            logits, llm_layers, proj_layers = self.capture_layers(inputs)
            idx = head_indices(heads, llm_layers[0].blocks[0].heads)
            ref = llm_layers[0].blocks[0].query
            v = self._start(rows, llm_layers[0].n_q, torch.empty(0, dtype=compute_dtype(ref.dtype),
                                                                  device=ref.device))
            for layer in reversed(llm_layers):  # the same product, Â streamed in row chunks
                v = rollout_step(v, layer.blocks, heads=idx, residual=float(residual))
            proj_attn = self.projector_probabilities(proj_layers)
        t2q = v[:, inputs.image_positions]
        q2p = self.geometric_q2p(inputs, proj_attn).to(t2q.device, t2q.dtype)
        return self.pack(
            inputs, text_to_patch=t2q @ q2p, token_probs=self._probs, text_to_query=t2q,
            query_to_patch=q2p, options={"heads": heads, "residual": float(residual), "capture": capture,
                                         **coverage_options(self.adapter)},
        )

    @staticmethod
    def _start(rows: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
        """``[T, n]`` one-hot rows ``e_r``."""
        v = torch.zeros(rows.numel(), n, dtype=like.dtype, device=like.device)
        v[torch.arange(rows.numel()), rows.to(like.device)] = 1.0
        return v
