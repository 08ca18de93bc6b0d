"""Any image a user has → an 8-bit RGB array, the same way everywhere (explainers, processors, data loaders).

Accepted: file paths (EXIF orientation applied), PIL images of any mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1, ...),
numpy arrays (uint8, uint16, bool, float in [0, 1]; HxW, HxWx1, HxWx3, HxWx4) and torch tensors. 16-bit data is
scaled by 255/65535 (never clipped), transparency is composited onto white, floats are read as [0, 1].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["load_image", "load_pil_image"]



def _scale_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """Integer/float/bool pixel array -> uint8 with the full input range mapped to 0..255 (no clipping)."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        # 65535 -> 255 exactly; rounding, not truncation, so mid-grey stays mid-grey.
        return np.round(array.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min(initial=0)), int(array.max(initial=0))
        if lo < 0 or hi > 65535:
            raise ValueError(f"{what}: integer pixels must lie in 0..255 (8-bit) or 0..65535 (16-bit), got {lo}..{hi}")
        if hi > 255:  # 16-bit data stored in a wider integer type (e.g. PIL mode "I" from a 16-bit PNG)
            return _scale_to_uint8(array.astype(np.uint16), what)
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{what}: float pixels contain NaN or infinity")
        lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{what}: float pixels must lie in [0, 1], got [{lo:g}, {hi:g}] (scale them first)")
        return np.round(array.astype(np.float64) * 255.0).astype(np.uint8)
    raise ValueError(f"{what}: unsupported pixel dtype {array.dtype} (expected uint8, uint16, bool or float)")


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.float64)
    alpha = rgba[..., 3:4].astype(np.float64) / 255.0
    return np.round(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _array_to_rgb(array: np.ndarray, what: str = "image array") -> np.ndarray:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        gray = _scale_to_uint8(array, what)
        return np.repeat(gray[..., None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        pixels = _scale_to_uint8(array, what)
        return _composite_on_white(pixels) if pixels.shape[2] == 4 else np.ascontiguousarray(pixels)
    raise ValueError(
        f"{what}: expected an HxW, HxWx1, HxWx3 or HxWx4 array (channels last), got shape {tuple(array.shape)}"
    )


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8).copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        # PIL's own convert("RGB") clips these to 0..255; scale the full range instead.
        return _array_to_rgb(np.asarray(image), f"PIL image (mode {mode})")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    if mode == "L" and "transparency" in image.info:
        return _composite_on_white(np.asarray(image.convert("RGBA"), dtype=np.uint8))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(image) -> np.ndarray:
    """Any supported image input -> uint8 RGB array HxWx3.

    Accepts a file path (str/Path; EXIF orientation applied), a PIL image of any mode, a numpy array (uint8, uint16,
    bool, float in [0, 1]) or a torch tensor HxW[xC]. Raises ValueError for unreadable or corrupt files and
    unsupported arrays, FileNotFoundError for missing files.

    Example:
        >>> import numpy as np
        >>> load_image(np.full((2, 2), 65535, np.uint16))[0, 0].tolist()
        [255, 255, 255]
    """
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.exists():
            raise FileNotFoundError(f"image file not found: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()  # decode now so truncated/corrupt data fails here, not later
                opened = ImageOps.exif_transpose(opened)
                return _pil_to_rgb(opened)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise ValueError(f"cannot read image file {path}: not a readable image or corrupt ({exc})") from None
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise ValueError(
        f"unsupported image type {type(image).__name__}: expected a file path, PIL image, numpy array or tensor"
    )


def load_pil_image(image):
    """A PIL RGB image from a path, a PIL image or an array, in any mode (one image: batches are refused).

    Conversion is :func:`load_image`'s; ``[C, H, W]`` arrays are moved to channels-last, a batch of one is unwrapped,
    and a missing or corrupt file raises ``ValueError``.

    Example:
        >>> import numpy as np
        >>> image = load_pil_image(np.zeros((4, 5), dtype=np.uint16))
        >>> image.size, image.mode
        ((5, 4), 'RGB')
    """
    if isinstance(image, list | tuple):
        raise ValueError("explain one image at a time (batch size 1); got a sequence of images")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        if image.ndim == 4:
            if image.shape[0] != 1:
                raise ValueError(f"explain one image at a time (batch size 1); got an array of shape {image.shape}")
            image = image[0]
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = np.moveaxis(image, 0, -1)  # [C, H, W] -> [H, W, C]
        if image.size == 0:
            raise ValueError(f"image array is empty (shape {image.shape})")
        if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
            raise ValueError("image array contains NaN or inf")
    if isinstance(image, Image.Image) and image.mode == "RGB":
        return image
    try:
        rgb = load_image(image)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    return Image.fromarray(rgb, mode="RGB")
