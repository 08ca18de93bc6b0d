"""Adapter for ``deco_models.DecoForConditionalGeneration``: stock Llava plus a projector from the zoo, which says
its own kind, query grid and (for the Q-Former) its attention layers.

The family is found by the config's ``model_type`` (rgae does not import deco_models to know its classes):
    >>> from types import SimpleNamespace
    >>> FAMILY.rank(SimpleNamespace(config=SimpleNamespace(model_type="deco")))  # -1: before any class match
    -1
"""

from __future__ import annotations

from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter
from rgae.adapters.llava import llava_fields, vision_geometry


def deco_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a deco model (any projector of :mod:`deco_models.projectors`)."""
    fields = llava_fields(model)
    projector = fields["projector"]
    grid, vision_prefix, feature_prefix, layer = vision_geometry(model, fields["vision_tower"])
    config_grid = tuple(model.config.patch_grid)
    if config_grid != grid:
        raise ValueError(f"deco config patch_grid {config_grid} disagrees with the vision config's grid {grid}")
    kind = getattr(projector, "kind", None)
    attention = []
    if hasattr(projector, "attention_layers"):
        attention = [(str(k), m) for k, m in projector.attention_layers()]
    if kind == "qformer" and not attention:
        raise ValueError("a Q-Former projector must list its attention layers (projector.attention_layers())")
    query_grid = tuple(getattr(projector, "query_grid", None) or grid)
    return ModelAdapter(
        **fields,
        projector_attention=attention,
        projector_kind=kind,
        patch_grid=grid,
        query_grid=query_grid if feature_prefix == 0 else None,
        vision_feature_layer=layer,
        vision_prefix=vision_prefix,
        feature_prefix=feature_prefix,
        projector_type=getattr(model.config, "projector_type", None),
    )


FAMILY = Family(
    name="deco",
    model_classes=("DecoForConditionalGeneration",),
    build=deco_adapter,
    connector="any deco_models projector: linear/MLP, avgpool (DeCo), maxpool, Q-Former, C-/D-Abstractor",
    query_to_patch="identity (linear/MLP), the pooling operator (avgpool), GAE through the Q-Former, "
    "the gradient rule (maxpool, abstractors)",
    matches=lambda model: getattr(getattr(model, "config", None), "model_type", None) == "deco",
)
