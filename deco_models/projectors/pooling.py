"""DeCo's compressing projector: parameter-free 2-D adaptive pooling of the patch grid, then an MLP.

``avgpool{L}_{M}`` is the paper's AvgPoolProjector (Yao et al., DeCo, 2024): the same attribute names (``sampler``,
``mlp_projector``) and layer layout, so its released ``mm_projector`` weights load with only the prefix stripped.
Unlike the released code, the patch grid is the real (h, w) grid given at construction (rectangular grids work),
never ``int(sqrt(N))``. ``maxpool{L}_{M}`` is the paper's max-pooling ablation.
"""

from __future__ import annotations

import torch
from torch import nn

from deco_models.projectors.registry import Projector, ProjectorSpec, register_projector


class AdaptivePoolProjector(Projector):
    """``avgpool{L}_{M}`` / ``maxpool{L}_{M}``: adaptive pool (h, w) -> (√M, √M), then Linear, (GELU, Linear) × (L−1).

    Query-to-Patch for R-GAE: avgpool — the pooling operator itself (1/|window| on each query's PyTorch window, the
    Jacobian of ``adaptive_avg_pool2d``); maxpool — a gradient-based rule (the arg-max patch of each window depends
    on the input and channel).

    Example:
        >>> import torch
        >>> from deco_models import build_projector
        >>> proj = build_projector("avgpool2_36", 8, 16, (16, 24))
        >>> proj(torch.randn(2, 16 * 24, 8)).shape, sum(p.numel() for p in proj.sampler.parameters())
        (torch.Size([2, 36, 16]), 0)
    """

    def __init__(self, spec: ProjectorSpec, vision_hidden_size: int, llm_hidden_size: int, grid_hw, bias: bool = True):
        super().__init__(spec, vision_hidden_size, llm_hidden_size, grid_hw)
        self.kind = spec.kind
        self.query_to_patch = "pooling" if spec.kind == "avgpool" else "gradient"
        self.layer_num = spec.layers
        self.query_num = spec.num_queries
        pool = nn.AdaptiveAvgPool2d if spec.kind == "avgpool" else nn.AdaptiveMaxPool2d
        self.sampler = pool(self.query_grid)
        modules = [nn.Linear(vision_hidden_size, llm_hidden_size, bias=bias)]
        for _ in range(1, spec.layers):
            modules.append(nn.GELU())
            modules.append(nn.Linear(llm_hidden_size, llm_hidden_size, bias=bias))
        self.mlp_projector = nn.Sequential(*modules)

    def pool(self, image_features: torch.Tensor) -> torch.Tensor:
        """The parameter-free compression alone: [B, N, D] -> [B, M, D] (row-major over the √M×√M query grid)."""
        self._check_input(image_features)
        pooled = self.sampler(self.to_grid(image_features))
        return pooled.flatten(2).transpose(1, 2)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.mlp_projector(self.pool(image_features))


@register_projector("avgpool{L}_{M}")
def _build_avgpool(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return AdaptivePoolProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)


@register_projector("maxpool{L}_{M}")
def _build_maxpool(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs):
    return AdaptivePoolProjector(spec, vision_hidden_size, llm_hidden_size, grid_hw, **kwargs)
