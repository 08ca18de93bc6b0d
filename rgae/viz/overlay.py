"""Heatmap overlays: a patch-grid relevance map upsampled, normalized, colored and blended over the image.

Geometry: patch ``(i, j)`` of a ``[grid_h, grid_w]`` map covers the pixel box
``[j·W/grid_w, (j+1)·W/grid_w) × [i·H/grid_h, (i+1)·H/grid_h)`` of an ``H × W`` image (the image the model saw).
``nearest`` paints exactly those boxes; ``bilinear`` interpolates between patch centers with PyTorch's
``align_corners=False`` convention (the same numbers as ``F.interpolate(..., mode="bilinear")``).

Example:
    >>> import numpy as np
    >>> from rgae.viz import overlay
    >>> image = np.full((64, 96, 3), 128, np.uint8)
    >>> patch_map = np.zeros((4, 6)); patch_map[1, 2] = 1.0
    >>> out = overlay(image, patch_map, interpolation="nearest")
    >>> out.shape, out.dtype
    ((64, 96, 3), dtype('uint8'))
"""

from __future__ import annotations

from typing import Any

import numpy as np

INTERPOLATIONS = ("bilinear", "nearest")
NORMALIZATIONS = ("per_map", "global", "none")


def to_numpy_map(patch_map: Any, name: str = "patch_map") -> np.ndarray:
    """A 2-D real-valued map (numpy array or torch tensor on any device, any float dtype) → float64 numpy."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of rgae
        torch = None
    if torch is not None and isinstance(patch_map, torch.Tensor):
        if patch_map.is_complex() or patch_map.dtype == torch.bool:
            raise ValueError(f"{name} must be a real-valued float tensor, got dtype {patch_map.dtype}")
        # .float() first: numpy has no bfloat16.
        patch_map = patch_map.detach().to("cpu").float().numpy()
    arr = np.asarray(patch_map)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers (a float array/tensor), got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [grid_h, grid_w], got shape {tuple(arr.shape)}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def to_rgb_image(image: Any) -> np.ndarray:
    """A PIL image or ``uint8 [H, W, 3]`` array → ``uint8 [H, W, 3]`` (RGB; grayscale ``[H, W]`` is expanded)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).copy()
    try:
        import torch

        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a uint8 [H, W, 3] array or a PIL image, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3] (values 0..255), got dtype {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be uint8 [H, W, 3] (RGB), got shape {tuple(image.shape)}")
    return image


def _interp_matrix(out_size: int, in_size: int, interpolation: str) -> np.ndarray:
    """``[out_size, in_size]`` 1-D resampling matrix; the 2-D resize is ``Ry @ map @ Rxᵀ`` (separable)."""
    mat = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    if interpolation == "nearest":
        # Integer arithmetic: pixel x belongs to patch floor(x · in / out), i.e. x ∈ [j·out/in, (j+1)·out/in).
        mat[rows, (rows * in_size) // out_size] = 1.0
        return mat
    # align_corners=False: pixel centers map to src = (x + 0.5)·in/out − 0.5, clamped to the border patches.
    src = (rows + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    np.add.at(mat, (rows, lo), 1.0 - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def upsample(patch_map: Any, size: tuple[int, int], interpolation: str = "bilinear") -> np.ndarray:
    """Resize a ``[grid_h, grid_w]`` map to ``size = (H, W)`` (height first, explicitly) → float64 ``[H, W]``.

    Example:
        >>> upsample(np.array([[0.0, 1.0]]), (1, 4), "nearest").tolist()
        [[0.0, 0.0, 1.0, 1.0]]
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    arr = to_numpy_map(patch_map)
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be (H, W) with positive entries, got {size}")
    ry = _interp_matrix(height, arr.shape[0], interpolation)
    rx = _interp_matrix(width, arr.shape[1], interpolation)
    return ry @ arr @ rx.T


def normalize_map(
    values: Any, normalize: str | None = "per_map", vmin: float | None = None, vmax: float | None = None
) -> np.ndarray:
    """Scale a map to [0, 1] for display.

    - ``"per_map"``: min–max of this map. A constant (or all-zero) map has no range and becomes all 0, the
      colormap's low end — never a division by zero or NaN.
    - ``"global"``: ``(v − vmin) / (vmax − vmin)`` with the caller's ``vmin``/``vmax`` (shared across maps, so maps
      are comparable), clipped to [0, 1]; ``vmin == vmax`` gives all 0.
    - ``"none"`` (or ``None``): the values as they are, clipped to [0, 1].

    Example:
        >>> normalize_map(np.array([[2.0, 4.0]])).tolist()
        [[0.0, 1.0]]
        >>> normalize_map(np.array([[2.0, 4.0]]), "global", vmin=0.0, vmax=8.0).tolist()
        [[0.25, 0.5]]
    """
    arr = np.asarray(values, dtype=np.float64)
    if normalize is None:
        normalize = "none"
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize != "global" and (vmin is not None or vmax is not None):
        raise ValueError(f"vmin/vmax only apply to normalize='global' (got normalize={normalize!r})")
    if normalize == "per_map":
        lo, hi = float(arr.min()), float(arr.max())
    elif normalize == "global":
        if vmin is None or vmax is None:
            raise ValueError("normalize='global' needs both vmin and vmax (the range shared by the maps compared)")
        lo, hi = float(vmin), float(vmax)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise ValueError(f"global normalization needs finite vmin <= vmax, got vmin={vmin}, vmax={vmax}")
    else:
        return np.clip(arr, 0.0, 1.0)
    span = hi - lo
    if span <= 0:
        return np.zeros_like(arr)
    return np.clip((arr - lo) / span, 0.0, 1.0)


def colorize(unit_map: np.ndarray, cmap: Any = "jet") -> np.ndarray:
    """Values in [0, 1] → ``float [..., 3]`` RGB in [0, 1] through a matplotlib colormap (name or object)."""
    import matplotlib

    colormap = matplotlib.colormaps[cmap] if isinstance(cmap, str) else cmap
    if not callable(colormap):
        raise ValueError(f"cmap must be a matplotlib colormap or its name, got {cmap!r}")
    return np.asarray(colormap(np.asarray(unit_map, dtype=np.float64)))[..., :3]


def overlay(
    image: Any,
    patch_map: Any,
    alpha: float = 0.5,
    cmap: Any = "jet",
    interpolation: str = "bilinear",
    normalize: str | None = "per_map",
    vmin: float | None = None,
    vmax: float | None = None,
) -> np.ndarray:
    """Blend a colored relevance map over an image → ``uint8 [H, W, 3]`` RGB.

    Args:
        image: ``uint8 [H, W, 3]`` RGB array or a PIL image — the image as the model saw it (after pad/resize).
        patch_map: ``[grid_h, grid_w]`` relevance (numpy or torch, any float dtype, any device).
        alpha: weight of the colored map (0 = image only, 1 = map only).
        cmap: any matplotlib colormap (name or object); default ``"jet"`` like the original tool.
        interpolation: ``"bilinear"`` (smooth) or ``"nearest"`` (shows the patch grid honestly).
        normalize: ``"per_map"`` (min–max of this map), ``"global"`` (with ``vmin``/``vmax``) or ``"none"``.

    The map is normalized on the patch grid and then upsampled: both steps are linear, so the order does not
    change the result, and upsampling normalized values keeps them inside [0, 1].

    Example:
        >>> img = np.zeros((96, 96, 3), np.uint8)
        >>> m = np.zeros((12, 12)); m[3, 7] = 1.0
        >>> out = overlay(img, m, alpha=1.0, cmap="gray", interpolation="nearest")
        >>> ys, xs = np.nonzero(out[..., 0] == 255)
        >>> [int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())]
        [24, 31, 56, 63]
    """
    rgb = to_rgb_image(image)
    arr = to_numpy_map(patch_map)
    if not (0.0 <= float(alpha) <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    unit = normalize_map(arr, normalize, vmin=vmin, vmax=vmax)
    big = upsample(unit, rgb.shape[:2], interpolation)
    colors = colorize(np.clip(big, 0.0, 1.0), cmap) * 255.0
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colors
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def crop_to_box(array: np.ndarray, content_box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Crop an ``[H, W, ...]`` array to ``content_box = (x0, y0, x1, y1)`` (the original image inside the padding)."""
    if content_box is None:
        return array
    x0, y0, x1, y1 = (int(v) for v in content_box)
    height, width = array.shape[:2]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"content_box {content_box} must satisfy 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height}")
    return array[y0:y1, x0:x1]
