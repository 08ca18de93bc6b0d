"""Adapter for ``Qwen2VLForConditionalGeneration`` (Qwen2-VL).

Connector: inside the vision tower (``model.model.visual.merger``): LayerNorm, then every 2×2 merge block of patch
features concatenated (consecutive in the vision sequence) and a 2-layer MLP per block. Query-to-Patch: each token is
uniform over its block (rule ``"block"``). Layout: one view per image at its own resolution (14-px patches, resized to
multiples of 28 px); the vision sequence is in merge-block order, split per image by ``cu_seqlens``
(:mod:`rgae.adapters.qwen_vl_base`).

Example:
    >>> from rgae.adapters import families
    >>> family = next(f for f in families() if f.name == "qwen2-vl")
    >>> "Qwen2VLForConditionalGeneration" in family.model_classes, family.query_to_patch is not None
    (True, True)
"""

from __future__ import annotations

from torch import nn

from rgae.adapters import Family
from rgae.adapters.qwen_vl_base import QwenVLAdapter, qwen_vl_fields


def qwen2_vl_adapter(model: nn.Module) -> QwenVLAdapter:
    """The adapter of a ``Qwen2VLForConditionalGeneration``."""
    merge = int(model.config.vision_config.spatial_merge_size)
    return QwenVLAdapter(**qwen_vl_fields(model, f"layernorm_patch_merger{merge}x{merge}_mlp2x_gelu"))


FAMILY = Family(
    name="qwen2-vl",
    model_classes=("Qwen2VLForConditionalGeneration",),
    build=qwen2_vl_adapter,
    connector="patch merger inside the vision tower: LayerNorm, 2×2 merge block concatenated, 2-layer MLP; dynamic "
    "resolution (image_grid_thw), tokens between <|vision_start|> and <|vision_end|>",
    query_to_patch="block: each token uniform over the 2×2 patches it merges (merge-block order read from the "
    "model's vision position ids)",
)
