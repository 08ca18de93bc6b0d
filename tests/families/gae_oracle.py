"""Plain-torch pieces for the float64 oracles of families with cross-attention (Q-Formers, Mllama's LLM), written
without rgae's engine so that they can catch it: the guarded row normalization, a forward that records given
attention modules' probabilities with their graph, and the per-layer map.

Example:
    >>> import torch
    >>> normalize(torch.tensor([[1.0, 0.0], [2.0, 1.5]], dtype=torch.float64))
    tensor([[1.0000, 0.0000],
            [0.8000, 1.2000]], dtype=torch.float64)
"""

from __future__ import annotations

import torch


def normalize(R: torch.Tensor) -> torch.Tensor:
    """GAE eqs. 8-9 written out: (R - I) / rowsum(R - I) + I, zero row sums left as they are."""
    eye = torch.eye(R.shape[0], dtype=R.dtype)
    residual = R - eye
    sums = residual.sum(-1, keepdim=True)
    return residual / torch.where(sums == 0, torch.ones_like(sums), sums) + eye


def recorded_forward(model, inputs, modules, grad: bool = True):
    """``(logits, [probabilities])`` of one teacher-forced forward (``inputs``: an explainer's PreparedInputs), in
    the order of ``modules`` (each module's calls in call order); with ``grad`` they carry their graph."""
    calls = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda mod, args, out, i=i: calls[i].append(out[1]))
               for i, m in enumerate(modules)]
    if grad:
        for p in model.parameters():
            p.requires_grad_(True)
    try:
        with torch.set_grad_enabled(grad):
            logits = model(**inputs.model_kwargs(), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    return logits, [a for module_calls in calls for a in module_calls]


def cam(attn: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    """``mean_h (G ⊙ A)+`` in float64 of one recorded ``[1, heads, n_q, n_k]`` map (zero when unused)."""
    a = attn[0].detach().double()
    if grad is None:
        return torch.zeros(a.shape[-2:], dtype=torch.float64)
    return (grad[0].double() * a).clamp(min=0).mean(0)
