"""What an image processor does to an image's geometry: the region of the original image its output shows.

Image processors resize (to a fixed size, by the shortest edge, within a longest edge or a maximum box), center-crop
and pad. Each step scales an axis uniformly or shifts it, so the model's pixel extent is one axis-aligned box of the
original image, possibly reaching outside it (padding). The sizes are computed with transformers' own helpers, read
from the processor's settings, so they match what the processor does (tests perturb pixels to check it).

Example (CLIP's processor: shortest edge to 32, then a 32×32 center crop of a 40×24 image):
    >>> from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    >>> ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    >>> [round(v, 3) for v in resize_crop_box(ip, (24, 40))]  # resized to 32×53, crop from x = 10
    [7.547, 0.0, 31.698, 24.0]
"""

from __future__ import annotations

from collections.abc import Mapping


def _get(size, key):
    if size is None:
        return None
    if isinstance(size, Mapping):
        return size.get(key)
    return getattr(size, key, None)


def resized_size(image_processor, image_hw: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` the processor's resize step gives an image of ``image_hw`` (unchanged when it does not resize)."""
    import numpy as np
    from transformers.image_transforms import get_resize_output_image_size

    height, width = (int(v) for v in image_hw)
    if not getattr(image_processor, "do_resize", False):
        return height, width
    size = getattr(image_processor, "size", None)
    shortest, longest = _get(size, "shortest_edge"), _get(size, "longest_edge")
    if shortest and longest:
        from transformers.image_transforms import get_size_with_aspect_ratio

        return tuple(int(v) for v in get_size_with_aspect_ratio((height, width), shortest, longest))
    if shortest:
        dummy = np.zeros((1, height, width), dtype=np.uint8)  # only its shape is read
        return tuple(int(v) for v in get_resize_output_image_size(dummy, size=shortest, default_to_square=False,
                                                                  input_data_format="channels_first"))
    if _get(size, "max_height") and _get(size, "max_width"):
        from transformers.image_utils import get_image_size_for_max_height_width

        return tuple(int(v) for v in get_image_size_for_max_height_width((height, width), _get(size, "max_height"),
                                                                          _get(size, "max_width")))
    if _get(size, "height") and _get(size, "width"):
        return int(_get(size, "height")), int(_get(size, "width"))
    raise ValueError(f"{type(image_processor).__name__}: cannot read its resize size {size!r}")


def resize_crop_box(image_processor, image_hw: tuple[int, int]) -> tuple[float, float, float, float]:
    """``(x0, y0, x1, y1)`` in original-image pixels of what a resize → center-crop image processor outputs.

    Raises ``ValueError`` for processors whose output is not one resized/cropped box (tiling processors have their
    own adapters).
    """
    height, width = (int(v) for v in image_hw)
    new_h, new_w = resized_size(image_processor, (height, width))
    top, left, out_h, out_w = 0, 0, new_h, new_w
    if getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        out_h, out_w = int(_get(crop, "height")), int(_get(crop, "width"))
        # transformers' center_crop: the crop starts at (size - crop) // 2, negative when it pads a small image.
        top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    sy, sx = new_h / height, new_w / width
    return (left / sx, top / sy, (left + out_w) / sx, (top + out_h) / sy)


def content_box_view(content_box, model_hw: tuple[int, int], image_hw: tuple[int, int]):
    """The view box (original-image pixels) of a model image of ``model_hw`` in which the original image of
    ``image_hw`` occupies ``content_box = (x0, y0, x1, y1)`` (model pixels): LLaVA's pad-to-square, for instance.

    Example:
        >>> content_box_view((0, 8, 40, 32), (40, 40), (24, 40))
        (0.0, -8.0, 40.0, 32.0)
    """
    cx0, cy0, cx1, cy1 = (float(v) for v in content_box)
    mh, mw = model_hw
    h, w = image_hw
    sx, sy = (cx1 - cx0) / w, (cy1 - cy0) / h
    return (0.0 - cx0 / sx, 0.0 - cy0 / sy, (mw - cx0) / sx, (mh - cy0) / sy)


def piece_box(image_processor, piece_hw: tuple[int, int], region: tuple[float, float, float, float]):
    """The original-image box of what ``image_processor``'s resize/center-crop makes of a piece of an image (a tile,
    a crop, the image squashed to a square) that is ``piece_hw`` pixels and shows the original-image ``region``
    ``(x0, y0, x1, y1)``: :func:`resize_crop_box` inside the piece, mapped linearly onto the region.

    Example (a 20×10 tile showing original x 40–80, y 0–20, resized to 32×32 and center-cropped to 32×16):
        >>> from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        >>> ip = CLIPImageProcessorPil(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 16})
        >>> piece_box(ip, (20, 10), (40.0, 0.0, 80.0, 20.0))
        (50.0, 0.0, 70.0, 20.0)
    """
    bx0, by0, bx1, by1 = resize_crop_box(image_processor, piece_hw)
    x0, y0, x1, y1 = region
    sx, sy = (x1 - x0) / piece_hw[1], (y1 - y0) / piece_hw[0]
    return (x0 + bx0 * sx, y0 + by0 * sy, x0 + bx1 * sx, y0 + by1 * sy)
