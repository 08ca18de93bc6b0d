"""Adapter for ``Gemma3ForConditionalGeneration``: SigLIP patches → ``AvgPool2d(k)`` → RMSNorm → linear, so each of the
``mm_tokens_per_image`` soft tokens is the mean of one k×k window of patches followed by per-token maps: its
Query-to-Patch row is the pooling operator's (rule ``"pooling"``, as DeCo's average pooling). The map is the exact
Jacobian of the model's own ``avg_pool`` module, obtained by running it on one-hot patch images.

The soft tokens (``config.image_token_id``) sit between ``<start_of_image>`` and ``<end_of_image>``, which are
ordinary text tokens. The LLM attends bidirectionally inside each image's block of soft tokens only when the
processor's ``token_type_ids`` are passed (transformers' ``create_masks_for_vision_model``); the explainer passes
every per-token processor output, extended over the target with 0 (text), so the recorded attention — and the
full-matrix oracle in the tests — see the model's real mask.

Pan-and-scan: when the processor makes crops (``do_pan_and_scan``), each crop is one more image — its own 256 soft
tokens, its own ``<start_of_image>`` block — after the whole image. The layout then has one view per image (the whole
image, then the crops, boxes read off the image processor's own ``pan_and_scan`` run on a coordinate image) and a
block-diagonal pooling map.

Example (the views for a 24×60 image cut into 3 crops; the crops' boxes come from the processor's pan_and_scan):
    >>> from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    >>> ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    >>> [(v.name, v.box) for v in gemma3_views(ip, (24, 60), 3, (8, 8))][1:]
    [('crop 0', (0.0, 0.0, 20.0, 24.0)), ('crop 1', (20.0, 0.0, 40.0, 24.0)), ('crop 2', (40.0, 0.0, 60.0, 24.0))]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter
from rgae.adapters.geometry import piece_box
from rgae.adapters.llava import llava_fields
from rgae.layout import ImageLayout, View

__all__ = ["Gemma3Adapter", "gemma3_adapter", "gemma3_views", "pooling_jacobian"]


def pooling_jacobian(pool: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """``[M, N]`` float64: the Jacobian of a 2-D pooling module (linear, per channel) over a ``grid`` of patches,
    row-major on both sides — ``pool`` run on the N one-hot images.

    Example:
        >>> pooling_jacobian(nn.AvgPool2d(2), (2, 4))
        tensor([[0.2500, 0.2500, 0.0000, 0.0000, 0.2500, 0.2500, 0.0000, 0.0000],
                [0.0000, 0.0000, 0.2500, 0.2500, 0.0000, 0.0000, 0.2500, 0.2500]], dtype=torch.float64)
    """
    n = grid[0] * grid[1]
    basis = torch.eye(n, dtype=torch.float64).view(n, 1, *grid)
    return pool(basis).reshape(n, -1).transpose(0, 1).contiguous()


def gemma3_views(image_processor, image_hw: tuple[int, int], num_crops: int, grid: tuple[int, int]) -> list[View]:
    """The whole image, then its pan-and-scan crops, as views of ``grid`` patches with their original-image boxes.

    The crops are the image processor's own ``pan_and_scan`` of a coordinate image; settings that make exactly
    ``num_crops`` crops (its crop count only depends on the image's aspect, capped by the maximum: with no minimum
    crop size and no activation ratio, capping at ``num_crops`` reproduces the processor's crops).
    """
    height, width = (int(v) for v in image_hw)
    views = [View("image", grid, piece_box(image_processor, (height, width), (0.0, 0.0, float(width), float(height))))]
    if num_crops:
        coords = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).astype(np.float64)
        crops = image_processor.pan_and_scan(coords, pan_and_scan_min_crop_size=1,
                                             pan_and_scan_max_num_crops=num_crops,
                                             pan_and_scan_min_ratio_to_activate=0.0)
        if len(crops) != num_crops:
            raise ValueError(f"Gemma3: the processor made {num_crops} pan-and-scan crops, its pan_and_scan gives "
                             f"{len(crops)} for an image of {image_hw}")
        for i, (ys, xs) in enumerate(crops):
            region = (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)
            views.append(View(f"crop {i}", grid, piece_box(image_processor, ys.shape, region)))
    return views


@dataclass
class Gemma3Adapter(ModelAdapter):
    """Gemma3: one view (or the image + its pan-and-scan crops), the pooling operator per view (module docs)."""

    pool: nn.Module | None = None

    #: Processor outputs the forward does not take (transformers lists ``num_crops`` as unused).
    NON_MODEL_KEYS = (*ModelAdapter.NON_MODEL_KEYS, "num_crops")

    def layout(self, processor, batch, image_size: tuple[int, int]) -> ImageLayout:
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise ValueError(f"{type(processor).__name__} has no image_processor: cannot place the patches")
        n_images = int(batch["pixel_values"].shape[0])
        views = gemma3_views(image_processor, image_size, n_images - 1, self.patch_grid)
        pooled = pooling_jacobian(self.pool, self.patch_grid)
        if tuple(pooled.shape) != (self.n_queries, self.n_patches):
            raise ValueError(f"Gemma3: the connector pools {self.patch_grid} patches to {pooled.shape[0]} tokens, "
                             f"the config says {self.n_queries} (mm_tokens_per_image)")
        positions = (batch["input_ids"][0] == self.image_token_id).nonzero().flatten()
        if positions.numel() != n_images * self.n_queries:
            raise ValueError(
                f"Gemma3: expected {n_images} × {self.n_queries} image soft tokens (id {self.image_token_id}) for "
                f"{n_images} image(s) (the image and its crops), found {positions.numel()}; was the prompt built "
                "by the model's processor?"
            )
        q2p = torch.block_diag(*[pooled] * n_images)
        return ImageLayout(image_size, views, positions, q2p, None, "pooling",
                           self.query_grid if n_images == 1 else None)


def gemma3_adapter(model: nn.Module) -> Gemma3Adapter:
    """The adapter of a ``Gemma3ForConditionalGeneration``."""
    fields = llava_fields(model)
    projector = fields["projector"]
    vcfg = model.config.vision_config
    side = int(vcfg.image_size) // int(vcfg.patch_size)
    tokens = int(projector.tokens_per_side)
    return Gemma3Adapter(
        **fields,
        projector_kind="avgpool",
        patch_grid=(side, side),
        query_grid=(tokens, tokens),
        vision_feature_layer=-1,  # last_hidden_state: every SigLIP layer feeds the connector
        vision_prefix=0,
        feature_prefix=0,
        projector_type=f"avgpool{projector.kernel_size}_{tokens * tokens}",
        pool=projector.avg_pool,
    )


FAMILY = Family(
    name="gemma3",
    model_classes=("Gemma3ForConditionalGeneration",),
    build=gemma3_adapter,
    connector="SigLIP patches → AvgPool2d(k) → RMSNorm → linear (mm_tokens_per_image soft tokens per image); "
    "bidirectional attention inside each image block (token_type_ids); pan-and-scan crops as extra views",
    query_to_patch="the pooling operator: 1/k² over each token's k×k window (the exact Jacobian of the model's "
    "avg_pool); block-diagonal over the image and its crops",
)
