"""Adapter for transformers ``MllamaForConditionalGeneration`` (Llama 3.2 Vision): the image enters the LLM only
through gated cross-attention layers; there are no image tokens in its sequence.

The vision model sees the image as tiles: the processor resizes it to fit the best canvas of at most
``max_image_tiles`` tiles (keeping its aspect ratio), pads right and bottom, and cuts the canvas into tiles
(``aspect_ratio_ids`` says which arrangement, ``aspect_ratio_mask`` which tiles are real). Each tile is a grid of
patches with a CLS token in front; after the local and global vision transformers a linear projector
(``multi_modal_projector``) maps each token to the LLM width, and every cross-attention layer attends from the text
to all of them (``max_num_tiles × (1 + patches)`` keys; padding tiles masked).

R-GAE uses the bi-modal GAE rules (``RGAE._cross_llm_t2q``): the text is one stream, the cross-attention keys the
other; self-attention layers update ``R_tt`` and ``R_tk``, cross-attention layers add ``R̄_ttᵀ · cam · R̄_kk``
(``R_kk = I``). Text-to-Query is the predicting row of ``R_tk`` over all keys; the layout's ``positions`` are those
key indices (``0 .. K-1``), one view per real tile, and Query-to-Patch is the identity of the per-token linear
projector on each real tile's patch tokens (CLS tokens and padding tiles are placeholders: no pixel box).
``through_vision=True`` is not supported yet (several views).

Example (a tiny random Mllama whose text layer 1 is a cross-attention layer):
    >>> from transformers import MllamaConfig, MllamaForConditionalGeneration
    >>> from rgae.adapters import get_adapter
    >>> config = MllamaConfig(
    ...     vision_config=dict(hidden_size=16, num_hidden_layers=1, num_global_layers=1, attention_heads=2,
    ...                        intermediate_size=32, image_size=16, patch_size=8, max_num_tiles=4,
    ...                        intermediate_layers_indices=[0], vision_output_dim=32),
    ...     text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
    ...                      num_key_value_heads=2, intermediate_size=32, cross_attention_layers=[1],
    ...                      bos_token_id=1, eos_token_id=2, pad_token_id=3),
    ...     image_token_index=5)
    >>> get_adapter(MllamaForConditionalGeneration(config)).llm_attention_kinds
    ('self', 'cross', 'self')
"""

from __future__ import annotations

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules
from rgae.adapters.geometry import _get
from rgae.layout import ImageLayout, View


class MllamaAdapter(ModelAdapter):
    """A :class:`ModelAdapter` whose layout is Mllama's tiles and whose image tokens are cross-attention keys."""

    def tiling(self, processor, batch, image_size: tuple[int, int]):
        """``((rows, cols), (new_h, new_w), tile)``: the tile arrangement, the resized image size on the canvas and
        the tile side, computed with the image processor's own functions and checked against its outputs."""
        from transformers.models.mllama.image_processing_pil_mllama import (
            get_all_supported_aspect_ratios,
            get_image_size_fit_to_canvas,
            get_optimal_tiled_canvas,
        )

        ip = getattr(processor, "image_processor", None)
        if ip is None:
            raise ValueError(f"{type(processor).__name__} has no image_processor: cannot place the tiles")
        tile = int(_get(ip.size, "height"))
        max_tiles = int(ip.max_image_tiles)
        h, w = image_size
        canvas_h, canvas_w = get_optimal_tiled_canvas(h, w, max_tiles, tile)
        new_h, new_w = get_image_size_fit_to_canvas(h, w, canvas_h, canvas_w, tile)
        rows, cols = int(canvas_h) // tile, int(canvas_w) // tile
        if batch["pixel_values"].shape[1] != 1:
            raise ValueError(f"explain one image at a time: the processor gave {batch['pixel_values'].shape[1]}")
        ratio = get_all_supported_aspect_ratios(max_tiles)[int(batch["aspect_ratio_ids"][0, 0]) - 1]
        real = int(batch["aspect_ratio_mask"][0, 0].sum())
        if tuple(ratio) != (rows, cols) or real != rows * cols:
            raise ValueError(
                f"the processor tiled the {h}×{w} image as {tuple(ratio)} with {real} real tiles, but its settings "
                f"give {(rows, cols)}: cannot place the tiles"
            )
        return (rows, cols), (int(new_h), int(new_w)), tile

    def connector_patch_rows(self, layout, inputs=None):
        """The projector's input rows are the cross-attention keys (tiles × (CLS + patches)): key k is the patch
        its identity Query-to-Patch row names, ``-1`` for CLS tokens and padding tiles."""
        q2p = layout.query_to_patch
        return torch.where(q2p.any(1), q2p.argmax(1), torch.full((q2p.shape[0],), -1))

    def layout(self, processor, batch, image_size: tuple[int, int]) -> ImageLayout:
        (rows, cols), (new_h, new_w), tile = self.tiling(processor, batch, image_size)
        h, w = image_size
        sx, sy = new_w / w, new_h / h
        views = tuple(
            View(f"tile {i},{j}", self.patch_grid, (j * tile / sx, i * tile / sy, (j + 1) * tile / sx,
                                                    (i + 1) * tile / sy))
            for i in range(rows) for j in range(cols)
        )
        # Keys: tiles in order (padding tiles included), each CLS then its patches row-major (the vision model's
        # concatenation); the linear projector keeps token k's features in key k.
        per_tile = self.n_patches + self.vision_prefix
        n_keys = batch["pixel_values"].shape[2] * per_tile
        q2p = torch.zeros(n_keys, len(views) * self.n_patches, dtype=torch.float64)
        for t in range(len(views)):
            keys = t * per_tile + self.vision_prefix + torch.arange(self.n_patches)
            q2p[keys, t * self.n_patches + torch.arange(self.n_patches)] = 1.0
        placeholder = q2p.sum(1) == 0
        return ImageLayout(image_size, views, torch.arange(n_keys), q2p, placeholder, "identity", None)


def mllama_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of an ``MllamaForConditionalGeneration`` (module docs)."""
    inner = getattr(model, "model", model)
    vision, language_model = inner.vision_model, inner.language_model
    vcfg = model.config.vision_config
    image_hw, patch_hw = _as_hw(vcfg.image_size), _as_hw(vcfg.patch_size)
    grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    llm_attention = leaf_attention_modules(language_model)
    kinds = tuple("cross" if type(m).__name__.endswith("CrossAttention") else "self" for m in llm_attention)
    if "cross" not in kinds:
        raise ValueError(f"{type(model).__name__} has no cross-attention layer: its LLM never reads the image")
    return MllamaAdapter(
        model=model,
        language_model=language_model,
        vision_tower=vision,
        projector=inner.multi_modal_projector,
        llm_attention=llm_attention,
        llm_attention_kinds=kinds,
        vision_attention=leaf_attention_modules(vision),
        projector_kind="linear",
        patch_grid=grid,
        query_grid=None,
        image_token_id=int(model.config.image_token_id),
        # The projector reads the global transformer's output concatenated with intermediate local layers.
        vision_feature_layer=-1,
        vision_prefix=1,
        feature_prefix=1,
        projector_type="linear",
    )


FAMILY = Family(
    name="mllama",
    model_classes=("MllamaForConditionalGeneration",),
    build=mllama_adapter,
    connector="linear projection of every tile's vision tokens, read by gated cross-attention layers of the LLM "
    "(no image tokens in the sequence)",
    query_to_patch="bi-modal GAE through the LLM's self- and cross-attention for Text-to-Query (over the keys); "
    "identity per tile from keys to patches (CLS and padding tiles carry no patch)",
)
