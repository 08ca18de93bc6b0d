"""Where the tiles of a tiling image processor lie in the original image.

InternVL's and Aya Vision's processor (GotOcr2's crop-to-patches) and Idefics3/SmolVLM's image splitting both resize
the whole image — stretched, not padded — to a canvas of whole tiles and cut it into ``rows × cols`` tiles, then add
one more view of the whole image resized to a single tile (InternVL's thumbnail, Idefics3's and Aya's global image).
A tile's box in the original image is therefore its share of the image, ``1/cols`` of the width by ``1/rows`` of the
height; the extra view's box is the whole image. The tile counts come from the processors' own functions or outputs.

Example:
    >>> grid_tile_boxes((24, 40), 1, 2)
    [(0.0, 0.0, 20.0, 24.0), (20.0, 0.0, 40.0, 24.0)]
"""

from __future__ import annotations

from rgae.layout import View

__all__ = ["crop_to_patches_views", "grid_tile_boxes", "whole_image_box"]


def whole_image_box(image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(0, 0, W, H)``: a view of the whole image resized (stretched) to the view's size."""
    return (0.0, 0.0, float(image_hw[1]), float(image_hw[0]))


def grid_tile_boxes(image_hw: tuple[int, int], rows: int, cols: int) -> list[tuple[float, float, float, float]]:
    """Boxes (original-image pixels) of the ``rows × cols`` tiles of the stretched canvas, row-major."""
    h, w = image_hw
    return [
        (c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows) for r in range(rows) for c in range(cols)
    ]


def crop_to_patches_views(processor, n_views: int, image_hw: tuple[int, int], grid: tuple[int, int],
                          whole_name: str = "thumbnail") -> list[View]:
    """The views of GotOcr2's crop-to-patches image processor (InternVL, Aya Vision): the tiles row-major, then the
    thumbnail (named ``whole_name``); one view over the whole image when the processor gave one image. ``n_views`` is
    what it gave (the length of ``pixel_values``); the tiling is recomputed with the processor's own
    ``get_optimal_tiled_canvas`` and its ``size``/``min_patches``/``max_patches``, and must agree with it."""
    if n_views == 1:
        return [View("image", grid, whole_image_box(image_hw))]
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise ValueError(f"{type(processor).__name__} has no image_processor: cannot place the tiles in the image")
    tile = (int(ip.size["height"]), int(ip.size["width"]))
    cols, rows = get_optimal_tiled_canvas(tuple(int(v) for v in image_hw), tile, ip.min_patches, ip.max_patches)
    if rows * cols + 1 != n_views:
        raise ValueError(
            f"the processor gave {n_views} images for one image, but its tiling of a {image_hw[0]}×{image_hw[1]} image "
            f"is {rows}×{cols} tiles + one = {rows * cols + 1} (min_patches/max_patches overridden in the call?)"
        )
    boxes = grid_tile_boxes(image_hw, rows, cols)
    tiles = [View(f"tile {r},{c}", grid, boxes[r * cols + c]) for r in range(rows) for c in range(cols)]
    return [*tiles, View(whole_name, grid, whole_image_box(image_hw))]
