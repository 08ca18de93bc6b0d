"""Adapter for ``Idefics3ForConditionalGeneration`` (Idefics3-8B-Llama3); SmolVLM reuses it (``smolvlm.py``).

Connector: the connector's own ``pixel_shuffle`` concatenates every ``scale_factor × scale_factor`` block of a
frame's patch features, then one linear layer per token (``modality_projection``). Query-to-Patch: each token is
uniform over its block (rule ``"block"``, :mod:`rgae.adapters.blocks`).

Layout: with image splitting, the processor resizes the whole image (stretched) to a canvas of ``rows × cols``
square tiles and appends the global image (the whole image resized to one tile); the prompt holds, per tile,
``<fake_token_around_image><row_r_col_c>`` then the tile's image tokens, and ``<global-img>`` before the global
image's. The views are read from those tags (the row/column counts are not among the processor's outputs): tile
``(r, c)`` shows its ``1/rows × 1/cols`` share of the image. The tag tokens (``<row_r_col_c>``, ``<global-img>``) are
placeholders of the layout: they are part of the image block the LLM reads but carry no patch.

``pixel_attention_mask`` marks padded pixels (bottom/right, when frames of different sizes share a batch): a
frame's box is its content's region of the image extended over the padding, so padded patches fall outside the
image and carry no relevance; the vision tower masks them in attention. Frames that are entirely zero are batch
padding that the model drops; they are not views.

Example (a 32×32 frame whose top 16 rows show the 40×24 global image; the rest is padding below it):
    >>> frame_box((0.0, 0.0, 40.0, 24.0), content_hw=(16, 32), frame_hw=(32, 32))
    (0.0, 0.0, 40.0, 48.0)
    >>> from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector
    >>> from rgae.adapters.blocks import blocks_from_packed, patch_indices
    >>> blocks_from_packed(Idefics3Connector.pixel_shuffle(None, patch_indices((4, 4)), 2), 16)[:2].tolist()
    [[0, 1, 4, 5], [2, 3, 6, 7]]
"""

from __future__ import annotations

import re

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules
from rgae.adapters.blocks import (
    blocks_from_packed,
    example_ids,
    image_layout,
    patch_indices,
    token_runs,
    views_query_to_patch,
)
from rgae.adapters.tiling import grid_tile_boxes, whole_image_box
from rgae.layout import View

_TILE_TAG = re.compile(r"<row_(\d+)_col_(\d+)>")


def frame_box(box, content_hw: tuple[int, int], frame_hw: tuple[int, int]):
    """A frame's box when only its top-left ``content_hw`` pixels show ``box`` (the rest is padding)."""
    x0, y0, x1, y1 = box
    (ch, cw), (fh, fw) = content_hw, frame_hw
    return (x0, y0, x0 + (x1 - x0) * fw / cw, y0 + (y1 - y0) * fh / ch)


class Idefics3Adapter(ModelAdapter):
    """:class:`ModelAdapter` whose layout is Idefics3/SmolVLM's tiles + global image, read from the prompt's tags."""

    def token_blocks(self) -> torch.Tensor:
        """``[tokens per frame, s²]``: the connector's ``pixel_shuffle`` run on patch indices."""
        packed = self.projector.pixel_shuffle(patch_indices(self.patch_grid), self.projector.scale_factor)
        return blocks_from_packed(packed, self.n_patches)

    def layout(self, processor, batch, image_size):
        ids = example_ids(batch)
        pixel_values = batch["pixel_values"]
        frames = pixel_values.reshape(-1, *pixel_values.shape[-3:])
        # The model drops all-zero frames (batch padding) before the vision tower.
        real = frames.flatten(1).ne(0).any(1)
        frame_hw = tuple(frames.shape[-2:])
        patch = _as_hw(self.model.config.vision_config.patch_size)
        if (frame_hw[0] // patch[0], frame_hw[1] // patch[1]) != self.patch_grid:
            raise ValueError(f"the processor's frames are {frame_hw} pixels; the connector expects a "
                             f"{self.patch_grid} patch grid of {patch} pixels")
        mask = batch.get("pixel_attention_mask")
        masks = None if mask is None else mask.reshape(-1, *mask.shape[-2:])[real].bool()
        blocks = self.token_blocks()
        per_view = blocks.shape[0]
        runs = token_runs(ids == self.image_token_id)
        n_views = int(real.sum())
        if len(runs) != n_views or any(stop - start != per_view for start, stop in runs):
            raise ValueError(
                f"expected {n_views} runs of {per_view} image tokens (id {self.image_token_id}), one per frame, found "
                f"runs of {[stop - start for start, stop in runs]}; was the prompt built by the model's processor?"
            )
        tok = getattr(processor, "tokenizer", processor)
        global_tag = getattr(processor, "global_image_token", None) or getattr(processor, "global_image_tag", None)
        global_tag = global_tag or "<global-img>"
        tags = [int(ids[start - 1]) if start > 0 else None for start, _ in runs]
        names = [None if t is None else tok.convert_ids_to_tokens(t) for t in tags]
        cells = []
        for name in names:
            found = _TILE_TAG.fullmatch(name or "")
            if found:
                cells.append((int(found.group(1)) - 1, int(found.group(2)) - 1))
            elif name == global_tag:
                cells.append(None)
            else:
                raise ValueError(
                    f"each view's image tokens must follow a <row_r_col_c> or {global_tag} tag, found {name!r}; "
                    "does the tokenizer hold the tags as single tokens?"
                )
        tiles = [c for c in cells if c is not None]
        rows = 1 + max((r for r, _ in tiles), default=0)
        cols = 1 + max((c for _, c in tiles), default=0)
        boxes = grid_tile_boxes(image_size, rows, cols)
        views = []
        for v, cell in enumerate(cells):
            box = whole_image_box(image_size) if cell is None else boxes[cell[0] * cols + cell[1]]
            if masks is not None:
                content = (int(masks[v].any(1).sum()), int(masks[v].any(0).sum()))
                box = frame_box(box, content, frame_hw)
            views.append(View("global" if cell is None else f"tile {cell[0]},{cell[1]}", self.patch_grid, box))
        q2p = views_query_to_patch(blocks, self.n_patches, n_views)
        positions = torch.cat([torch.arange(start, stop) for start, stop in runs])
        placeholders = torch.tensor([start - 1 for start, _ in runs], dtype=torch.long)
        return image_layout(image_size, views, positions, q2p, placeholders)


def idefics3_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of an ``Idefics3ForConditionalGeneration`` or ``SmolVLMForConditionalGeneration``."""
    cfg = model.config
    inner = getattr(model, "model", model)
    vcfg = cfg.vision_config
    image_hw, patch_hw = _as_hw(vcfg.image_size), _as_hw(vcfg.patch_size)
    grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    scale = int(cfg.scale_factor)
    return Idefics3Adapter(
        model=model,
        language_model=inner.text_model,
        vision_tower=inner.vision_model,
        projector=inner.connector,
        llm_attention=leaf_attention_modules(inner.text_model),
        vision_attention=leaf_attention_modules(inner.vision_model),
        projector_kind="linear",
        patch_grid=grid,
        query_grid=(grid[0] // scale, grid[1] // scale),
        image_token_id=int(cfg.image_token_id),
        # The connector reads the vision tower's last hidden state (after its post-LayerNorm).
        vision_feature_layer=-1,
        vision_prefix=0,
        feature_prefix=0,
        projector_type=f"pixel_shuffle{scale}x{scale}_linear",
    )


FAMILY = Family(
    name="idefics3",
    model_classes=("Idefics3ForConditionalGeneration",),
    build=idefics3_adapter,
    connector="pixel shuffle s×s (scale_factor), one linear layer per token; tiles + global image, "
    "<row_r_col_c>/<global-img> tags",
    query_to_patch="block: each token uniform over the s×s patches it concatenates, per view; tags are placeholders",
)
