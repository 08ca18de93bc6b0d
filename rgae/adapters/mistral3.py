"""Adapter for ``Mistral3ForConditionalGeneration`` (Mistral Small 3.1/3.2: Pixtral vision + Mistral text).

Connector: RMSNorm, then the patch merger concatenates every ``spatial_merge_size × spatial_merge_size`` block of
patch features (``unfold``) and mixes it with one linear layer, then a 2-layer MLP per token. Query-to-Patch: each
token is uniform over its block (rule ``"block"``, :mod:`rgae.adapters.blocks`), found by running the merger's own
``forward`` on patch indices with its linear layer left out.

Layout: Pixtral sees each image at its own size: the processor resizes it (stretched to whole merge blocks, within
``longest_edge``) to ``image_sizes``, so one view of ``h/patch × w/patch`` patches covers the whole image. The
prompt holds the image's tokens row by row, each row of ``w/(patch·merge)`` ``[IMG]`` tokens ended by
``[IMG_BREAK]``, the last one by ``[IMG_END]``: those row ends are placeholders, and the Text-to-Query grid is
``rows × (cols + 1)`` with them as its last column.

Several images in one prompt are packed into one vision sequence, each image attending only to itself (a
block-diagonal mask), and their tokens follow each other in the prompt; an explanation is of one image, so the
layout refuses ``image_sizes`` with more than one row.

Example (a tiny random model; a 16×32 model image is 2×4 patches of 8 px, merged 2×2 into two tokens):
    >>> from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig
    >>> from rgae.adapters import get_adapter
    >>> vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              image_size=32, patch_size=8, head_dim=8)
    >>> text = MistralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                      num_key_value_heads=2, vocab_size=64, head_dim=8)
    >>> adapter = get_adapter(Mistral3ForConditionalGeneration(Mistral3Config(vision_config=vision, text_config=text,
    ...                                                                       image_token_id=5)))
    >>> adapter.token_blocks((16, 32)).tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7]]
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules
from rgae.adapters.blocks import (
    block_query_to_patch,
    blocks_from_packed,
    example_ids,
    image_layout,
    patch_indices,
    token_runs,
)
from rgae.adapters.tiling import whole_image_box
from rgae.layout import View


class Mistral3Adapter(ModelAdapter):
    """:class:`ModelAdapter` whose layout is one Pixtral view of the image's own size, rows ended by placeholders."""

    def token_blocks(self, image_hw: tuple[int, int]) -> torch.Tensor:
        """``[tokens, s²]`` patch indices of each token's block for a model image of ``image_hw`` pixels: the patch
        merger's ``forward`` on patch indices, with an identity in place of its linear ``merging_layer``."""
        merger = self.projector.patch_merger
        patch = merger.patch_size
        grid = (image_hw[0] // patch, image_hw[1] // patch)
        stand_in = SimpleNamespace(patch_size=patch, spatial_merge_size=merger.spatial_merge_size,
                                   merging_layer=nn.Identity())
        packed = type(merger).forward(stand_in, patch_indices(grid)[0], torch.tensor([list(image_hw)]))
        return blocks_from_packed(packed, grid[0] * grid[1])

    def layout(self, processor, batch, image_size):
        ids = example_ids(batch)
        sizes = batch.get("image_sizes")
        if sizes is None:
            raise ValueError("Mistral3 needs the processor's image_sizes (the size each image was resized to)")
        sizes = torch.as_tensor(sizes).reshape(-1, 2)
        if sizes.shape[0] != 1:
            raise ValueError(f"one image per prompt is explained; the processor gave {sizes.shape[0]} image sizes")
        if getattr(getattr(processor, "image_processor", None), "do_center_crop", False):
            raise ValueError("a center-cropping Pixtral image processor is not supported (the view would not be the "
                             "whole image)")
        model_hw = (int(sizes[0, 0]), int(sizes[0, 1]))
        merge = self.projector.patch_merger.spatial_merge_size
        patch = self.projector.patch_merger.patch_size
        grid = (model_hw[0] // patch, model_hw[1] // patch)
        rows, cols = grid[0] // merge, grid[1] // merge
        runs = token_runs(ids == self.image_token_id)
        ends = [stop for _, stop in runs]
        contiguous = all(start == end + 1 for (start, _), end in zip(runs[1:], ends))
        if len(runs) != rows or any(stop - start != cols for start, stop in runs) or not contiguous \
                or ends[-1] >= ids.numel():
            raise ValueError(
                f"expected {rows} rows of {cols} image tokens (id {self.image_token_id}), each ended by one token, for "
                f"a {model_hw} image; found runs of {[stop - start for start, stop in runs]}; was the prompt built by "
                "the model's processor?"
            )
        blocks = self.token_blocks(model_hw)
        q2p = block_query_to_patch(blocks, grid[0] * grid[1])
        positions = torch.cat([torch.arange(start, stop) for start, stop in runs])
        view = View("image", grid, whole_image_box(image_size))
        return image_layout(image_size, [view], positions, q2p, torch.tensor(ends), query_grid=(rows, cols + 1))


def mistral3_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a ``Mistral3ForConditionalGeneration``."""
    cfg = model.config
    inner = getattr(model, "model", model)
    vcfg = cfg.vision_config
    image_hw, patch_hw = _as_hw(vcfg.image_size), _as_hw(vcfg.patch_size)
    grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    merge = int(cfg.spatial_merge_size)
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"one vision_feature_layer is supported, got {layer!r}")
    n_layers = len(leaf_attention_modules(inner.vision_tower))
    return Mistral3Adapter(
        model=model,
        language_model=inner.language_model,
        vision_tower=inner.vision_tower,
        projector=inner.multi_modal_projector,
        llm_attention=leaf_attention_modules(inner.language_model),
        vision_attention=leaf_attention_modules(inner.vision_tower),
        projector_kind="mlp",
        # The largest grid (images are seen at their own size, up to vision_config.image_size).
        patch_grid=grid,
        query_grid=(grid[0] // merge, grid[1] // merge),
        image_token_id=int(cfg.image_token_id),
        vision_feature_layer=layer if layer >= 0 else n_layers + 1 + layer,
        vision_prefix=0,
        feature_prefix=0,
        projector_type=f"rmsnorm_patch_merger{merge}x{merge}_mlp2x_gelu",
    )


FAMILY = Family(
    name="mistral3",
    model_classes=("Mistral3ForConditionalGeneration",),
    build=mistral3_adapter,
    connector="RMSNorm + patch merger 2×2 (concatenate, linear), 2-layer MLP per token; one view at the image's own "
    "size, rows ended by [IMG_BREAK]/[IMG_END]",
    query_to_patch="block: each token uniform over the 2×2 patches it merges; row ends are placeholders",
)
