"""Adapter for ``Qwen2_5_VLForConditionalGeneration`` (Qwen2.5-VL).

Connector and layout as Qwen2-VL's (:mod:`rgae.adapters.qwen2_vl`; the merger's norm is an RMSNorm): 14-px patches,
images resized to multiples of 28 px, each token uniform over its 2×2 merge block (rule ``"block"``).

Windowed vision attention: the tower reorders its sequence once, by merge block, into windows of
``window_size / patch_size`` patches a side (``window_index``: 8×8 patches for the released models); most layers
attend within each window (one attention call per window), the ``fullatt_block_indexes`` layers within each image;
the merger's output is put back in raster block order before the LLM. So the layout (tokens, blocks, Query-to-Patch)
is Qwen2-VL's, and only the vision attention sequence differs: :meth:`Qwen2_5_VLAdapter.attention_order` reads the
window order from the model's own ``get_vision_window_index``, so that ``through_vision`` maps the captured
(window-ordered) vision attention back to raster patches.

Example:
    >>> from rgae.adapters import families
    >>> family = next(f for f in families() if f.name == "qwen2.5-vl")
    >>> "Qwen2_5_VLForConditionalGeneration" in family.model_classes, family.query_to_patch is not None
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.qwen_vl_base import QwenVLAdapter, _modeling_module, qwen_vl_fields


@dataclass
class Qwen2_5_VLAdapter(QwenVLAdapter):
    """:class:`QwenVLAdapter` whose vision attention runs in window order."""

    def attention_order(self, grids: torch.Tensor) -> torch.Tensor:
        """``[Σ t·h·w]``: the attention-sequence position of each token of the merge-block sequence: the tower's
        ``permute_input_for_window_attn`` moves merge block ``window_index[j]`` to block position ``j``."""
        visual = self.vision_tower
        window_index, _ = _modeling_module(visual).get_vision_window_index(
            grids, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
            patch_size=visual.patch_size)
        unit = self.merge_size**2
        block_position = torch.argsort(window_index.cpu())  # merge block -> its position in window order
        n = int(grids.prod(-1).sum())
        token = torch.arange(n)
        return block_position[token // unit] * unit + token % unit


def qwen2_5_vl_adapter(model: nn.Module) -> QwenVLAdapter:
    """The adapter of a ``Qwen2_5_VLForConditionalGeneration``."""
    merge = int(model.config.vision_config.spatial_merge_size)
    return Qwen2_5_VLAdapter(**qwen_vl_fields(model, f"rmsnorm_patch_merger{merge}x{merge}_mlp2x_gelu"))


FAMILY = Family(
    name="qwen2.5-vl",
    model_classes=("Qwen2_5_VLForConditionalGeneration",),
    build=qwen2_5_vl_adapter,
    connector="patch merger inside the vision tower: RMSNorm, 2×2 merge block concatenated, 2-layer MLP; windowed "
    "vision attention (window_index order, full attention in fullatt_block_indexes); dynamic resolution",
    query_to_patch="block: each token uniform over the 2×2 patches it merges; the vision attention's window order is "
    "undone for through_vision",
)
