"""The projector zoo: spec strings -> nn.Modules mapping ViT patches [B, N, Dv] to LLM tokens [B, M, Dl].

Families (one module each): :mod:`.mlp` (``linear``, ``mlp{N}x_gelu``), :mod:`.pooling` (``avgpool{L}_{M}`` = DeCo,
``maxpool{L}_{M}``), :mod:`.qformer` (``qformer{L}_{M}``), :mod:`.abstractor` (``cabstractor_{M}``,
``dabstractor_{M}``). New families register with :func:`register_projector`.

Example:
    >>> import torch
    >>> from deco_models.projectors import build_projector, available_projectors
    >>> proj = build_projector("mlp2x_gelu", vision_hidden_size=16, llm_hidden_size=32, grid_hw=(3, 4))
    >>> proj(torch.randn(1, 12, 16)).shape, proj.num_queries, proj.kind
    (torch.Size([1, 12, 32]), 12, 'mlp')
"""

from __future__ import annotations

from deco_models.projectors.registry import (
    PROJECTOR_KINDS,
    Projector,
    ProjectorSpec,
    available_projectors,
    build_projector,
    normalize_grid,
    parse_projector_spec,
    register_projector,
    unregister_projector,
)

__all__ = [
    "PROJECTOR_KINDS",
    "Projector",
    "ProjectorSpec",
    "available_projectors",
    "build_projector",
    "normalize_grid",
    "parse_projector_spec",
    "register_projector",
    "unregister_projector",
    "MLPProjector",
    "AdaptivePoolProjector",
    "llava_sequential_to_named",
    "QFormerProjector",
    "load_blip2_qformer_state_dict",
    "CAbstractorProjector",
    "DAbstractorProjector",
]

_LAZY = {
    "MLPProjector": "deco_models.projectors.mlp",
    "llava_sequential_to_named": "deco_models.projectors.mlp",
    "AdaptivePoolProjector": "deco_models.projectors.pooling",
    "QFormerProjector": "deco_models.projectors.qformer",
    "load_blip2_qformer_state_dict": "deco_models.projectors.qformer",
    "CAbstractorProjector": "deco_models.projectors.abstractor",
    "DAbstractorProjector": "deco_models.projectors.abstractor",
}


def __getattr__(name):
    # Family modules are imported on first use (the registry imports them too), keeping this package's import cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deco_models.projectors' has no attribute {name!r}")
