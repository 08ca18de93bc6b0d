"""Adapter for ``InternVLForConditionalGeneration`` (InternVL 2.5/3 ``-hf`` checkpoints).

Connector: the vision tower's CLS token is dropped, every 2×2 block of patch features is concatenated by the model's
``pixel_shuffle`` (``downsample_ratio = 0.5``), then LayerNorm + a 2-layer MLP per token. Query-to-Patch: each token
is uniform over its block (rule ``"block"``, :mod:`rgae.adapters.blocks`).

Layout: the processor (``crop_to_patches``) resizes the whole image, stretched, to a canvas of ``cols × rows`` tiles
chosen by ``get_optimal_tiled_canvas`` (the image processor's own function, with its ``min_patches``/``max_patches``)
and cuts it into tiles; with more than one tile it appends a thumbnail (the whole image resized to one tile). The
views are the tiles, row-major, then the thumbnail; a single-tile image is one view over the whole image. Each view's
``image_seq_length`` ``<IMG_CONTEXT>`` tokens follow the view order, so token k belongs to view ``k // per_view``.

Example (a tiny random model: 32-px tiles of 8-px patches; the model's own ``pixel_shuffle`` gives the blocks, and
the projector input's rows — C-channel slices of each token — map to them view after view):
    >>> import torch
    >>> from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config
    >>> from rgae.adapters import get_adapter
    >>> from rgae.layout import ImageLayout, View
    >>> vision = InternVLVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                               num_attention_heads=2, image_size=32, patch_size=8)
    >>> text = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                    num_key_value_heads=2, vocab_size=64)
    >>> adapter = get_adapter(InternVLForConditionalGeneration(InternVLConfig(vision_config=vision,
    ...                                                                       text_config=text, image_token_id=5)))
    >>> adapter.query_grid, adapter.token_blocks()[:2].tolist()
    ((2, 2), [[0, 1, 4, 5], [2, 3, 6, 7]])
    >>> layout = ImageLayout((24, 40), (View("tile 0,0", (4, 4), (0, 0, 20, 24)),
    ...                                 View("thumbnail", (4, 4), (0, 0, 40, 24))), torch.arange(8))
    >>> adapter.connector_patch_rows(layout)[12:20].tolist()  # the first view's last token, the thumbnail's first
    [10, 11, 14, 15, 16, 17, 20, 21]
"""

from __future__ import annotations

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules
from rgae.adapters.blocks import blocks_from_packed, example_ids, image_layout, patch_indices, views_query_to_patch
from rgae.adapters.tiling import crop_to_patches_views


class CropToPatchesAdapter(ModelAdapter):
    """A :class:`ModelAdapter` for GotOcr2's crop-to-patches views (tiles, then the whole image) whose every view is
    packed alike by :meth:`token_blocks` (InternVL, Aya Vision); the image tokens are ``image_token_id``'s, view
    after view."""

    #: The name of the view of the whole image that follows the tiles.
    whole_view = "thumbnail"

    def token_blocks(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def layout(self, processor, batch, image_size):
        ids = example_ids(batch)
        n_views = int(batch["pixel_values"].shape[0])
        blocks = self.token_blocks()
        per_view = blocks.shape[0]
        positions = (ids == self.image_token_id).nonzero().flatten()
        if positions.numel() != n_views * per_view:
            raise ValueError(
                f"expected {n_views} views × {per_view} image tokens (id {self.image_token_id}), found "
                f"{positions.numel()}; was the prompt built by the model's processor?"
            )
        views = crop_to_patches_views(processor, n_views, image_size, self.patch_grid, self.whole_view)
        return image_layout(image_size, views, positions, views_query_to_patch(blocks, self.n_patches, n_views))


class InternVLAdapter(CropToPatchesAdapter):
    """InternVL's tiles + thumbnail with 2×2 pixel-shuffle blocks."""

    def token_blocks(self) -> torch.Tensor:
        """``[tokens per view, 4]`` patch indices of each token's block: the model's ``pixel_shuffle`` run on patch
        indices, reshaped as ``get_image_features`` does."""
        rows, cols = self.patch_grid
        inner = getattr(self.model, "model", self.model)
        grid = patch_indices(self.patch_grid).reshape(1, rows, cols, 1)
        packed = inner.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return blocks_from_packed(packed.reshape(1, -1, packed.shape[-1]), rows * cols)

    def connector_patch_rows(self, layout, inputs=None):
        """The projector's input is ``[views, tokens, s²·C]`` (after the model's ``pixel_shuffle``): row
        ``(view, token, j)``, the ``j``-th ``C``-channel slice of a token, is the ``j``-th patch of its block."""
        blocks = self.token_blocks().flatten()
        return torch.cat([layout.view_slice(v).start + blocks for v in range(len(layout.views))])

    def layout(self, processor, batch, image_size):
        tiles = tuple(batch["pixel_values"].shape[-2:])
        expected = tuple(_as_hw(self.model.config.vision_config.image_size))
        if tiles != expected:
            raise ValueError(f"the processor's tiles are {tiles} pixels, the vision tower expects {expected}")
        return super().layout(processor, batch, image_size)


def internvl_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of an ``InternVLForConditionalGeneration``."""
    cfg = model.config
    inner = getattr(model, "model", model)
    if cfg.vision_feature_select_strategy != "default":
        raise ValueError(
            "InternVL's pixel shuffle needs a square patch grid: vision_feature_select_strategy must be 'default' "
            f"(the CLS token dropped), got {cfg.vision_feature_select_strategy!r}"
        )
    vcfg = cfg.vision_config
    image_hw, patch_hw = _as_hw(vcfg.image_size), _as_hw(vcfg.patch_size)
    grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    scale = round(1 / cfg.downsample_ratio)
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"InternVL takes one vision_feature_layer, got {layer!r}")
    return InternVLAdapter(
        model=model,
        language_model=inner.language_model,
        vision_tower=inner.vision_tower,
        projector=inner.multi_modal_projector,
        llm_attention=leaf_attention_modules(inner.language_model),
        vision_attention=leaf_attention_modules(inner.vision_tower),
        projector_kind="mlp",
        patch_grid=grid,
        query_grid=(grid[0] // scale, grid[1] // scale),
        image_token_id=int(cfg.image_token_id),
        vision_feature_layer=int(layer),
        vision_prefix=1,
        feature_prefix=0,
        projector_type=f"pixel_shuffle{scale}x{scale}_mlp2x_gelu",
    )


FAMILY = Family(
    name="internvl",
    model_classes=("InternVLForConditionalGeneration",),
    build=internvl_adapter,
    connector="CLS dropped, pixel shuffle 2×2, LayerNorm + 2-layer MLP per token; tiles + thumbnail",
    query_to_patch="block: each token uniform over the 2×2 patches it concatenates, per view",
)
