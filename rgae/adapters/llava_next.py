"""Adapter for ``LlavaNextForConditionalGeneration`` (and the image path of ``LlavaNextVideoForConditionalGeneration``):
anyres tiles plus a base image, an MLP per vision token, stitched and unpadded, ``image_newline`` after each row.

What the model does with an image (transformers' own code, read from its processor and config):

* the processor picks the best of ``image_grid_pinpoints`` for the image's size, resizes the image into it keeping
  the aspect ratio, pads it (centered) and cuts it into square tiles; the **base** view is the whole image squashed
  to the tile size. Every piece then goes through the processor's resize/center-crop. So view 0 is the base image
  and views 1.. are the tiles in row-major order — exactly the order of the vision tower's batch;
* the MLP projector maps every patch feature to one token (no mixing): Query-to-Patch is the identity per view;
* ``pack_image_features`` keeps the base tokens as they are, stitches the tiles' tokens into one grid, crops away the
  rows or columns of patches that lie on padding (``unpad_image``) and appends ``image_newline`` after every row.

The layout's Query-to-Patch map is obtained by running the model's own ``pack_image_features`` on one-hot patch
features (chunks of an identity matrix as the channels), so it is whatever the model's packing does, unpadding and
all; the ``image_newline`` tokens come out as the rows fed by the newline channel and are placeholders (no patch).
LLaVA-OneVision (:mod:`rgae.adapters.llava_onevision`) reuses all of this: its packing may interpolate, and the same
run then yields the interpolation weights.

Example (the views of a 40×88 image: the best pinpoint is 32×96, the image is resized to 32×71 and pasted at x = 12,
so the first tile starts 12 · 88/71 px left of the image):
    >>> from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    >>> ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
    ...                                 image_grid_pinpoints=[[32, 64], [64, 32], [32, 96]])
    >>> for v in anyres_views(ip, (40, 88), (4, 4)):
    ...     print(v.name, [round(c, 2) for c in v.box])
    base [0.0, 0.0, 88.0, 40.0]
    tile 0,0 [-14.87, 0.0, 24.79, 40.0]
    tile 0,1 [24.79, 0.0, 64.45, 40.0]
    tile 0,2 [64.45, 0.0, 104.11, 40.0]
"""

from __future__ import annotations

import importlib

import numpy as np
import torch
from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter
from rgae.adapters.geometry import _get, piece_box
from rgae.adapters.llava import llava_fields, vision_geometry
from rgae.layout import ImageLayout, View

__all__ = ["AnyresAdapter", "anyres_views", "llava_next_adapter"]

#: Patches whose one-hot features go through ``pack_image_features`` at once (memory: tiles × patches × chunk).
PACK_CHUNK = 1024


def anyres_views(image_processor, image_hw: tuple[int, int], grid: tuple[int, int]) -> list[View]:
    """The base view and the tiles (row-major) of an anyres image processor (LLaVA-NeXT, OneVision) for an image of
    ``image_hw``, each a ``grid`` of patches, with its box in the original image.

    Follows the processor's ``get_image_patches``: ``select_best_resolution`` over ``image_grid_pinpoints``, resize
    keeping the aspect ratio (``get_patch_output_size``), pad centered, cut tiles of the crop size; the base image is
    the whole image resized to the processor's size; every piece is then resized/center-cropped as the processor does.
    """
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

    height, width = (int(v) for v in image_hw)
    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if not pinpoints:
        raise ValueError(f"{type(image_processor).__name__} has no image_grid_pinpoints: not an anyres processor")
    # The processor's own choice of sizes (LlavaNextImageProcessorPil._preprocess).
    if _get(size, "height") and _get(size, "width"):
        base_hw = (int(_get(size, "height")), int(_get(size, "width")))
    else:
        base_hw = (int(_get(size, "shortest_edge")),) * 2
    tile = _get(crop, "height") or _get(size, "height") or _get(size, "shortest_edge")
    tile = int(tile)
    best_h, best_w = (int(v) for v in select_best_resolution((height, width), pinpoints))
    new_h, new_w = get_patch_output_size(np.zeros((1, height, width), np.uint8), (best_h, best_w), "channels_first")
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    sy, sx = height / new_h, width / new_w  # original pixels per canvas pixel

    views = [View("base", grid, piece_box(image_processor, base_hw, (0.0, 0.0, float(width), float(height))))]
    for i, top in enumerate(range(0, best_h, tile)):
        for j, left in enumerate(range(0, best_w, tile)):
            bottom, right = min(top + tile, best_h), min(left + tile, best_w)
            region = ((left - paste_x) * sx, (top - paste_y) * sy, (right - paste_x) * sx, (bottom - paste_y) * sy)
            views.append(View(f"tile {i},{j}", grid, piece_box(image_processor, (bottom - top, right - left), region)))
    return views


class AnyresAdapter(ModelAdapter):
    """A :class:`~rgae.adapters.base.ModelAdapter` whose layout is the anyres base image + tiles (module docs).

    ``patch_grid`` is one view's grid (the vision tower's); the LLM's image tokens are the packed, unpadded tiles
    with newline placeholders, so there is no single query grid."""

    @property
    def family(self) -> str:
        """The model's class name, for messages."""
        return type(self.model).__name__

    def pack(self, features: list[torch.Tensor], image_sizes: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        """The model's own ``pack_image_features`` on ``features`` (``[views, tokens, C]`` per image), first image."""
        inner = getattr(self.model, "model", self.model)
        strategy = getattr(self.model.config, "vision_feature_select_strategy", "default")
        packed, _ = inner.pack_image_features(features, image_sizes, strategy, image_newline=newline)
        return packed[0]

    def num_views(self, image_size) -> int:
        """Base + tiles, as the model counts them (``image_size_to_num_patches`` of its modeling module)."""
        modeling = importlib.import_module(type(getattr(self.model, "model", self.model)).__module__)
        return int(modeling.image_size_to_num_patches(
            image_size=list(image_size),
            grid_pinpoints=self.model.config.image_grid_pinpoints,
            patch_size=self.model.config.vision_config.image_size,
        ))

    def query_to_patch_of_packing(self, image_size, n_views: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``([M, N] float64, placeholder [M])`` of the packing for an image of ``image_size`` (H, W): the packing
        run on one-hot features, a chunk of patches at a time, and once on the newline alone."""
        tokens = self.n_patches
        n = n_views * tokens
        sizes = torch.tensor([list(image_size)])
        zeros = torch.zeros(n_views, tokens, 1, dtype=torch.float64)
        newline_rows = self.pack([zeros], sizes, torch.ones(1, dtype=torch.float64))[:, 0]
        columns = []
        for start in range(0, n, PACK_CHUNK):
            stop = min(n, start + PACK_CHUNK)
            basis = torch.zeros(n, stop - start, dtype=torch.float64)
            basis[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
            columns.append(self.pack([basis.view(n_views, tokens, -1)], sizes,
                                     torch.zeros(stop - start, dtype=torch.float64)))
        q2p = torch.cat(columns, dim=1)
        placeholder = newline_rows != 0
        if not bool(((newline_rows == 0) | (newline_rows == 1)).all()) or bool(q2p[placeholder].ne(0).any()):
            raise ValueError(f"{self.family}: the packing mixes image_newline with patch features; cannot map it")
        return q2p, placeholder

    def packing_rule(self, q2p: torch.Tensor, placeholder: torch.Tensor) -> str:
        """``"identity"``: every token is one patch's feature as it is (LLaVA-NeXT always)."""
        rows = q2p[~placeholder]
        if not bool(((rows == 0) | (rows == 1)).all() and (rows.sum(1) == 1).all()):
            raise ValueError(f"{self.family}: a packed token is not exactly one patch; the packing changed?")
        return "identity"

    def layout(self, processor, batch, image_size: tuple[int, int]) -> ImageLayout:
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None:
            raise ValueError(f"{type(processor).__name__} has no image_processor: cannot place the tiles in the image")
        if self.feature_prefix:
            raise ValueError(
                f"{self.family}: vision_feature_select_strategy='full' with a CLS token feeds the CLS to the packing, "
                "which the model itself cannot stitch into tiles"
            )
        sizes = batch.get("image_sizes")
        if sizes is None or len(sizes) != 1:
            raise ValueError(f"{self.family}: expected the processor's image_sizes for one image, got {sizes!r}")
        processed_hw = tuple(int(v) for v in torch.as_tensor(sizes)[0].tolist())
        if processed_hw != tuple(int(v) for v in image_size):
            raise ValueError(f"{self.family}: the processor saw an image of {processed_hw}, not {tuple(image_size)}")
        views = anyres_views(image_processor, processed_hw, self.patch_grid)
        n_views = self.num_views(processed_hw)
        if n_views != len(views):
            raise ValueError(
                f"{self.family}: the processor made {len(views)} views (base + tiles) but the model expects "
                f"{n_views}; do the processor's and the config's image_grid_pinpoints agree?"
            )
        q2p, placeholder = self.query_to_patch_of_packing(processed_hw, n_views)
        input_ids = batch["input_ids"]
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, S] (one example), got {tuple(input_ids.shape)}")
        positions = (input_ids[0] == self.image_token_id).nonzero().flatten()
        if positions.numel() != q2p.shape[0]:
            raise ValueError(
                f"{self.family}: the model packs {q2p.shape[0]} image tokens for an image of {processed_hw}, but the "
                f"prompt has {positions.numel()} (id {self.image_token_id}); was it built by the model's processor?"
            )
        rule = self.packing_rule(q2p, placeholder)
        return ImageLayout(image_size, views, positions, q2p, placeholder, rule, None)


def anyres_parts(model: nn.Module) -> dict:
    """The fields every anyres adapter shares: parts, attention modules, per-view patch grid, prefixes."""
    fields = llava_fields(model)
    grid, vision_prefix, feature_prefix, layer = vision_geometry(model, fields["vision_tower"])
    return dict(
        **fields,
        projector_kind="mlp",
        patch_grid=grid,
        query_grid=None,
        vision_feature_layer=layer,
        vision_prefix=vision_prefix,
        feature_prefix=feature_prefix,
        projector_type="mlp2x_gelu",
    )


def llava_next_adapter(model: nn.Module) -> AnyresAdapter:
    """The adapter of a ``LlavaNextForConditionalGeneration`` / ``LlavaNextVideoForConditionalGeneration``."""
    return AnyresAdapter(**anyres_parts(model))


FAMILY = Family(
    name="llava-next",
    model_classes=("LlavaNextForConditionalGeneration", "LlavaNextVideoForConditionalGeneration"),
    build=llava_next_adapter,
    connector="2-layer MLP per vision token; anyres base image + tiles, stitched, unpadded, image_newline per row",
    query_to_patch="identity per view (token = one patch's feature), read off the model's own pack_image_features; "
    "image_newline tokens are placeholders",
)
