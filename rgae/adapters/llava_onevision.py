"""Adapter for ``LlavaOnevisionForConditionalGeneration``: LLaVA-NeXT's anyres layout (base image + tiles, unpadding,
``image_newline`` per row; :mod:`rgae.adapters.llava_next`), plus one more step in the packing: when the unpadded
tile grid holds more than ``anyres_max_K`` tiles' worth of tokens (ratio > 1.1), the model shrinks it with
``F.interpolate(mode="bilinear")`` before adding the newlines.

Query-to-Patch is the packing's Jacobian, obtained by running the model's own ``pack_image_features`` on one-hot
patch features: the MLP projector acts per token before the packing, and bilinear interpolation is linear and acts
per channel, so a token's row holds exactly the interpolation weights of the (up to four) tile patches it mixes
(rule ``"bilinear"``); without interpolation it is the identity per view, as for LLaVA-NeXT.

Example (the views of a tiny OneVision image processor; ``anyres_views`` is LLaVA-NeXT's):
    >>> from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    ...     LlavaOnevisionImageProcessorPil)
    >>> ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
    ...                                      image_grid_pinpoints=[[32, 32], [32, 64], [64, 64]])
    >>> [(v.name, v.box) for v in anyres_views(ip, (32, 64), (4, 4))]
    [('base', (0.0, 0.0, 64.0, 32.0)), ('tile 0,0', (0.0, 0.0, 32.0, 32.0)), ('tile 0,1', (32.0, 0.0, 64.0, 32.0))]
"""

from __future__ import annotations

import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.llava_next import AnyresAdapter, anyres_parts, anyres_views

__all__ = ["OnevisionAdapter", "anyres_views", "llava_onevision_adapter"]


class OnevisionAdapter(AnyresAdapter):
    """The anyres adapter with OneVision's packing (``vision_aspect_ratio``) and its interpolation rule."""

    def pack(self, features, image_sizes, newline):
        inner = getattr(self.model, "model", self.model)
        aspect = getattr(self.model.config, "vision_aspect_ratio", "anyres_max_9")
        packed, _ = inner.pack_image_features(features, image_sizes, image_newline=newline, vision_aspect_ratio=aspect)
        return packed[0]

    def packing_rule(self, q2p: torch.Tensor, placeholder: torch.Tensor) -> str:
        """``"identity"`` when no token was interpolated, else ``"bilinear"`` (the rows are the weights)."""
        rows = q2p[~placeholder]
        if bool(((rows == 0) | (rows == 1)).all() and (rows.sum(1) == 1).all()):
            return "identity"
        if bool((rows < 0).any()) or not torch.allclose(rows.sum(1), torch.ones_like(rows[:, 0])):
            raise ValueError(f"{self.family}: packed tokens are not convex mixes of patches; the packing changed?")
        return "bilinear"


def llava_onevision_adapter(model: nn.Module) -> OnevisionAdapter:
    """The adapter of a ``LlavaOnevisionForConditionalGeneration``."""
    return OnevisionAdapter(**anyres_parts(model))


FAMILY = Family(
    name="llava-onevision",
    model_classes=("LlavaOnevisionForConditionalGeneration",),
    build=llava_onevision_adapter,
    connector="2-layer MLP per vision token; anyres base image + tiles, unpadded, bilinearly downsampled when the "
    "tile grid is large (anyres_max_K), image_newline per row",
    query_to_patch="identity per view, or the exact bilinear interpolation weights (the Jacobian of the model's "
    "F.interpolate, read off its own pack_image_features) when it downsamples; newlines are placeholders",
)
