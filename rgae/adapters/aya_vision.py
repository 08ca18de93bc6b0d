"""Adapter for ``AyaVisionForConditionalGeneration`` (Aya Vision 8B/32B: SigLIP2 + Cohere2).

Connector: the projector's own ``pixel_shuffle`` concatenates every 2×2 block of patch features
(``downsample_factor``), then LayerNorm + a SwiGLU MLP per token. Query-to-Patch: each token is uniform over its
block (rule ``"block"``, :mod:`rgae.adapters.blocks`).

Layout: GotOcr2's crop-to-patches (as InternVL, :func:`rgae.adapters.tiling.crop_to_patches_views`): the tiles
row-major, then the global image; one view for an image that fits one tile. In the prompt each tile's
``<|IMG_PATCH|>`` tokens follow a ``TILE_k`` text tag and the global image's a ``TILE_GLOBAL`` tag; the tags are plain
text (several tokens with some tokenizers), so they are not part of the layout — only the image-patch tokens are.

Example (the projector's own ``pixel_shuffle`` on patch indices: the 2×2 blocks of a 4×4 grid):
    >>> from types import SimpleNamespace
    >>> from transformers.models.aya_vision.modeling_aya_vision import AyaVisionMultiModalProjector
    >>> from rgae.adapters.blocks import blocks_from_packed, patch_indices
    >>> projector = SimpleNamespace(downsample_factor=2)  # what pixel_shuffle reads of the projector
    >>> blocks_from_packed(AyaVisionMultiModalProjector.pixel_shuffle(projector, patch_indices((4, 4))), 16).tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
"""

from __future__ import annotations

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules
from rgae.adapters.blocks import blocks_from_packed, patch_indices
from rgae.adapters.internvl import CropToPatchesAdapter
from rgae.adapters.llava import vision_geometry


class AyaVisionAdapter(CropToPatchesAdapter):
    """Aya Vision's tiles + global image with 2×2 pixel-shuffle blocks."""

    whole_view = "global"

    def token_blocks(self) -> torch.Tensor:
        """``[tokens per view, s²]``: the projector's ``pixel_shuffle`` run on patch indices."""
        packed = self.projector.pixel_shuffle(patch_indices(self.patch_grid))
        return blocks_from_packed(packed, self.n_patches)

    def model_inputs(self, batch):
        # num_patches is the processor's bookkeeping (older processors return it), not a model input.
        return {k: v for k, v in super().model_inputs(batch).items() if k != "num_patches"}


def aya_vision_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of an ``AyaVisionForConditionalGeneration``."""
    cfg = model.config
    inner = getattr(model, "model", model)
    grid, vision_prefix, feature_prefix, layer = vision_geometry(model, inner.vision_tower)
    if feature_prefix:
        raise ValueError("Aya Vision's pixel shuffle needs the patch grid alone: a kept CLS token cannot be shuffled")
    if not isinstance(cfg.vision_feature_layer, int):
        raise ValueError(f"one vision_feature_layer is supported, got {cfg.vision_feature_layer!r}")
    scale = int(cfg.downsample_factor)
    return AyaVisionAdapter(
        model=model,
        language_model=inner.language_model,
        vision_tower=inner.vision_tower,
        projector=inner.multi_modal_projector,
        llm_attention=leaf_attention_modules(inner.language_model),
        vision_attention=leaf_attention_modules(inner.vision_tower),
        projector_kind="mlp",
        patch_grid=_as_hw(grid),
        query_grid=(grid[0] // scale, grid[1] // scale),
        image_token_id=int(cfg.image_token_id),
        vision_feature_layer=layer,
        vision_prefix=vision_prefix,
        feature_prefix=0,
        projector_type=f"pixel_shuffle{scale}x{scale}_swiglu",
    )


FAMILY = Family(
    name="aya-vision",
    model_classes=("AyaVisionForConditionalGeneration",),
    build=aya_vision_adapter,
    connector="pixel shuffle 2×2, LayerNorm + SwiGLU MLP per token; tiles + global image",
    query_to_patch="block: each token uniform over the 2×2 patches it concatenates, per view",
)
