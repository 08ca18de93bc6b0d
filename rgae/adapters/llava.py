"""Adapter for stock transformers ``LlavaForConditionalGeneration`` (llava-hf checkpoints): an MLP projector, so
query i is patch i (Query-to-Patch is the identity).

Example (a tiny random llava-hf model: CLIP has a CLS token, which the default feature strategy drops):
    >>> from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    >>> from rgae.adapters import get_adapter
    >>> vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                           image_size=32, patch_size=8)
    >>> text = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                    num_key_value_heads=2, vocab_size=64)
    >>> adapter = get_adapter(LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
    ...                                                                  image_token_id=5)))
    >>> adapter.patch_grid, adapter.vision_prefix, adapter.feature_prefix, adapter.static_query_to_patch()[1]
    ((4, 4), 1, 0, 'identity')
"""

from __future__ import annotations

from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules


def llava_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(language_model, vision_tower, multi_modal_projector) of a Llava model, wherever this transformers version
    keeps them (``model.model.X`` in transformers 5, ``model.X`` in older layouts)."""
    inner = getattr(model, "model", model)
    parts = []
    for name in ("language_model", "vision_tower", "multi_modal_projector"):
        part = getattr(inner, name, None) or getattr(model, name, None)
        if part is None:
            raise ValueError(f"{type(model).__name__} has no {name}; is it a LLaVA-style model?")
        parts.append(part)
    return tuple(parts)


def llava_fields(model: nn.Module) -> dict:
    """The :class:`~rgae.adapters.base.ModelAdapter` fields every LLaVA-pattern family reads the same way: the three
    parts, their attention modules (by class), the image token id."""
    language_model, vision_tower, projector = llava_parts(model)
    return dict(
        model=model,
        language_model=language_model,
        vision_tower=vision_tower,
        projector=projector,
        llm_attention=leaf_attention_modules(language_model),
        vision_attention=leaf_attention_modules(vision_tower),
        image_token_id=int(model.config.image_token_id),
    )


def vision_geometry(model: nn.Module, vision_tower: nn.Module) -> tuple[tuple[int, int], int, int, int]:
    """(patch_grid, vision_prefix, feature_prefix, vision_feature_layer) from the config and the vision tower."""
    cfg = model.config
    vcfg = cfg.vision_config
    image_hw = _as_hw(vcfg.image_size)
    patch_hw = _as_hw(vcfg.patch_size)
    grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    # CLIP (class_embedding) and ViT (cls_token) put a CLS token in front of the patches; SigLIP has none.
    cls_names = ("class_embedding", "cls_token")
    vision_prefix = int(any(getattr(m, n, None) is not None for m in vision_tower.modules() for n in cls_names))
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy == "default":
        if vision_prefix == 0:
            raise ValueError(
                "vision_feature_select_strategy='default' drops the first vision token, but this vision encoder has no "
                "CLS token (it would drop a patch); use 'full' for CLS-free encoders such as SigLIP"
            )
        feature_prefix = 0
    elif strategy == "full":
        feature_prefix = vision_prefix
    else:
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r} (expected 'default' or 'full')")
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        # Several layers concatenated: propagate through the ViT up to the deepest one.
        n = getattr(vcfg, "num_hidden_layers", None)
        layer = max((k if k >= 0 else n + 1 + k) for k in layer)
    return grid, vision_prefix, feature_prefix, int(layer)


def llava_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a stock ``LlavaForConditionalGeneration``."""
    fields = llava_fields(model)
    grid, vision_prefix, feature_prefix, layer = vision_geometry(model, fields["vision_tower"])
    return ModelAdapter(
        **fields,
        projector_kind="mlp",
        patch_grid=grid,
        query_grid=grid if feature_prefix == 0 else None,
        vision_feature_layer=layer,
        vision_prefix=vision_prefix,
        feature_prefix=feature_prefix,
        projector_type="mlp2x_gelu",
    )


FAMILY = Family(
    name="llava",
    model_classes=("LlavaForConditionalGeneration",),
    build=llava_adapter,
    connector="2-layer MLP per patch token (llava-hf checkpoints)",
    query_to_patch="identity: token i is patch i",
)
