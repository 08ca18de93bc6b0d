"""Non-compressing projectors: ``linear`` and LLaVA's ``mlp{N}x_gelu`` (one output token per patch).

Parameter names follow transformers' ``LlavaMultiModalProjector`` (``linear_1``, ``act``, ``linear_2``), so a stock
llava-hf checkpoint's ``multi_modal_projector.*`` tensors load into ``mlp2x_gelu`` unchanged. Original LLaVA
checkpoints store the same MLP as an ``nn.Sequential`` (``model.mm_projector.0.weight``, ``...2.weight``);
:func:`llava_sequential_to_named` renames those keys.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from deco_models.projectors.registry import Projector, ProjectorSpec, register_projector


class MLPProjector(Projector):
    """``linear`` / ``mlp{N}x_gelu``: Linear(vision, llm), then (GELU, Linear(llm, llm)) × (N−1), applied per patch.

    Query-to-Patch for R-GAE: identity (query i is patch i).

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> proj = build_projector("mlp2x_gelu", 16, 32, (4, 6))
        >>> proj(torch.randn(1, 24, 16)).shape, [n for n, _ in proj.named_children()]
        (torch.Size([1, 24, 32]), ['linear_1', 'act', 'linear_2'])
    """

    query_to_patch = "identity"

    def __init__(self, spec: ProjectorSpec, vision_hidden_size: int, llm_hidden_size: int, grid_hw, bias: bool = True):
        super().__init__(spec, vision_hidden_size, llm_hidden_size, grid_hw)
        self.kind = spec.kind
        self.depth = spec.mlp_depth
        self.linear_1 = nn.Linear(vision_hidden_size, llm_hidden_size, bias=bias)
        if self.depth > 1:
            # One stateless activation shared between layers, as in LlavaMultiModalProjector (no parameters to map).
            self.act = nn.GELU()
        for i in range(2, self.depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(llm_hidden_size, llm_hidden_size, bias=bias))

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        self._check_input(image_features)
        hidden = self.linear_1(image_features)
        for i in range(2, self.depth + 1):
            hidden = getattr(self, f"linear_{i}")(self.act(hidden))
        return hidden


def llava_sequential_to_named(state_dict: dict, prefix: str = "") -> dict:
    """Rename original-LLaVA ``nn.Sequential`` MLP keys to :class:`MLPProjector` names.

    ``{prefix}0.weight`` -> ``linear_1.weight``, ``{prefix}2.bias`` -> ``linear_2.bias``, ... (Sequential index 2k
    holds the (k+1)-th Linear; odd indices are the parameter-free GELUs). Keys without ``prefix`` are dropped.

    Example:
        >>> import torch
        >>> sd = {"model.mm_projector.0.weight": torch.zeros(4, 2), "model.mm_projector.2.bias": torch.zeros(4)}
        >>> sorted(llava_sequential_to_named(sd, prefix="model.mm_projector."))
        ['linear_1.weight', 'linear_2.bias']
    """
    out = {}
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(weight|bias)$")
    for key, value in state_dict.items():
        found = pattern.match(key)
        if not found:
            continue
        index = int(found.group(1))
        if index % 2:
            raise ValueError(f"{key!r}: odd Sequential indices are GELUs and hold no tensors; not an mlp{{N}}x_gelu")
        out[f"linear_{index // 2 + 1}.{found.group(2)}"] = value
    return out


@register_projector("linear")
def _build_linear(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return MLPProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)


@register_projector("mlp{N}x_gelu")
def _build_mlp(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return MLPProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)
