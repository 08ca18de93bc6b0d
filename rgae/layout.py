"""Where every LLM image token comes from: one image layout for every model family.

A model sees an image as one or more **views** — the whole image resized (LLaVA-1.5), a base image plus anyres tiles
(LLaVA-NeXT, OneVision), tiles plus a thumbnail (InternVL) or a global image (Idefics3, SmolVLM, Aya Vision) — each a
patch grid cut from a known region of the original image after resizing and padding. An :class:`ImageLayout` says,
for one image in one prompt:

* which LLM sequence positions are the image's tokens (``positions [M]``), in order;
* which vision patches each token is built from, with weights: the connector's Query-to-Patch rule
  (``query_to_patch [M, N]`` over the N patches of all views, views concatenated in order, each view row-major);
* which tokens carry no patch at all (``placeholder [M]``: LLaVA-NeXT's ``image_newline``, Idefics3's row/column
  tokens, Pixtral's ``[IMG_BREAK]``; their Query-to-Patch rows are zero);
* where every patch lies in the **original** image (:meth:`View.patch_boxes`, in original-image pixels).

:meth:`ImageLayout.render` turns per-patch relevance ``[..., N]`` into relevance over the original image's pixels
``[..., H, W]``. Each patch's relevance is spread evenly over its pixel box (a density: a pixel gets the patch's value
times the fraction of the box it covers), views are summed, and the parts of boxes that fall on padding outside the
image are dropped. So the map of a single-grid model is its patch map upsampled (nearest) and scaled by one constant,
and for overlapping views (a base image and its tiles) the relevance of both lands on the pixels they share, each
in proportion to its share of the view's mass — the sum over pixels is the total relevance of the patches inside
the image.

Layouts hold no model: adapters (:mod:`rgae.adapters`) build them from the processor's outputs and the config.

Example (a 4×4 patch grid over a 40×24 image padded to a 40×40 square, as LLaVA's pad-to-square does):
    >>> import torch
    >>> layout = ImageLayout.single_view((24, 40), grid=(4, 4), box=(0, -8, 40, 32), positions=torch.arange(5, 21))
    >>> layout.n_patches, layout.n_tokens, layout.views[0].patch_boxes()[0].tolist()
    (16, 16, [0.0, -8.0, 10.0, 2.0])
    >>> m = layout.render(torch.ones(16))
    >>> tuple(m.shape), round(float(m.sum()), 6)  # 24 of the 40 rows are image: 60% of the mass
    ((24, 40), 9.6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["ImageLayout", "View", "box_weights", "linear_weights"]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    h, w = (int(v) for v in value)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


@dataclass(frozen=True)
class View:
    """One patch grid the vision tower sees.

    Attributes:
        name: what the view is (``"image"``, ``"base"``, ``"tile 0,1"``, ``"thumbnail"``, ``"global"``).
        grid: ``(rows, cols)`` of its patches (no CLS), row-major.
        box: ``(x0, y0, x1, y1)``: the region of the **original** image, in its pixels, that the view's whole pixel
            extent shows after resizing and padding. It may reach outside the image (padding): a 40×24 image padded
            to a square has the box ``(0, -8, 40, 32)``. Patch ``(r, c)`` covers the box's ``r``-th of ``rows`` equal
            slices vertically and ``c``-th of ``cols`` horizontally (resizing scales each axis uniformly).
    """

    name: str
    grid: tuple[int, int]
    box: tuple[float, float, float, float]

    def __post_init__(self):
        object.__setattr__(self, "grid", _pair(self.grid, "grid"))
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"box must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {self.box!r}")
        object.__setattr__(self, "box", box)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def patch_boxes(self) -> torch.Tensor:
        """``[rows·cols, 4]`` float64 ``(x0, y0, x1, y1)`` of each patch in original-image pixels, row-major."""
        rows, cols = self.grid
        x0, y0, x1, y1 = self.box
        xs = torch.linspace(x0, x1, cols + 1, dtype=torch.float64)
        ys = torch.linspace(y0, y1, rows + 1, dtype=torch.float64)
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        r, c = r.flatten(), c.flatten()
        return torch.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], dim=1)

    def to_dict(self) -> dict:
        return {"name": self.name, "grid": list(self.grid), "box": list(self.box)}


def box_weights(edges: torch.Tensor, size: int) -> torch.Tensor:
    """``[k, size]``: the fraction of each of ``k`` intervals ``[edges[i], edges[i+1])`` that pixel ``j`` (the unit
    interval ``[j, j+1)``) covers. Rows sum to the fraction of the interval that lies inside ``[0, size)``.

    Example:
        >>> box_weights(torch.tensor([0.0, 2.0, 3.0]), 3)
        tensor([[0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 1.0000]], dtype=torch.float64)
    """
    edges = edges.to(torch.float64)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = torch.arange(size, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(hi, px + 1) - torch.maximum(lo, px)).clamp(min=0)
    return overlap / (hi - lo)


def linear_weights(start: float, stop: float, cells: int, size: int) -> torch.Tensor:
    """``[cells, size]``: bilinear interpolation weights from ``cells`` equal cells spanning ``[start, stop)`` to
    the centers of pixels ``0..size-1`` (clamped at the view's edges, zero outside it). For display only: it smooths
    the patch grid the way an image resize would, without :func:`box_weights`' exact mass.

    Example:
        >>> linear_weights(0.0, 4.0, 2, 4)
        tensor([[1.0000, 0.7500, 0.2500, 0.0000],
                [0.0000, 0.2500, 0.7500, 1.0000]], dtype=torch.float64)
    """
    centers = torch.arange(size, dtype=torch.float64) + 0.5
    u = ((centers - start) / ((stop - start) / cells) - 0.5).clamp(0, cells - 1)
    lo = u.floor().long().clamp(max=cells - 1)
    hi = (lo + 1).clamp(max=cells - 1)
    frac = u - lo
    out = torch.zeros(cells, size, dtype=torch.float64)
    cols = torch.arange(size)
    out.index_put_((lo, cols), 1 - frac, accumulate=True)
    out.index_put_((hi, cols), frac, accumulate=True)
    out[:, (centers < start) | (centers >= stop)] = 0
    return out


@dataclass
class ImageLayout:
    """How one image's LLM tokens map to vision patches and original-image pixels (module docs).

    Attributes:
        image_size: ``(H, W)`` of the original image.
        views: the patch grids, in the order their patches are numbered (view 0's patches first).
        positions: ``[M]`` LLM sequence positions of the image's tokens, ascending (placeholders included).
        query_to_patch: ``[M, N]`` the connector's Query-to-Patch rule (zero rows for placeholders), or None when the
            method computes it (Q-Former GAE, gradient rule).
        placeholder: ``[M]`` bool, True where the token carries no patch.
        rule: the Query-to-Patch rule's name (``"identity"``, ``"pooling"``, ``"block"``, ``"bilinear"``, ...).
        query_grid: ``(rows, cols)`` when the tokens of a single view form a grid (for Text-to-Query figures).
    """

    image_size: tuple[int, int]
    views: tuple[View, ...]
    positions: torch.Tensor
    query_to_patch: torch.Tensor | None = None
    placeholder: torch.Tensor | None = None
    rule: str = "identity"
    query_grid: tuple[int, int] | None = None
    _offsets: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self):
        self.image_size = _pair(self.image_size, "image_size")
        self.views = tuple(self.views)
        if not self.views or not all(isinstance(v, View) for v in self.views):
            raise ValueError("views must be a non-empty sequence of View")
        self.positions = torch.as_tensor(self.positions, dtype=torch.long).flatten().cpu()
        m = self.positions.numel()
        if m == 0:
            raise ValueError("an image layout needs at least one image token position")
        if m > 1 and not bool((self.positions[1:] > self.positions[:-1]).all()):
            raise ValueError("positions must be strictly increasing (the image tokens in sequence order)")
        if self.placeholder is None:
            self.placeholder = torch.zeros(m, dtype=torch.bool)
        self.placeholder = torch.as_tensor(self.placeholder, dtype=torch.bool).flatten().cpu()
        if self.placeholder.numel() != m:
            raise ValueError(f"placeholder must have one entry per image token ({m}), got {self.placeholder.numel()}")
        self._offsets = [0]
        for v in self.views:
            self._offsets.append(self._offsets[-1] + v.n_patches)
        if self.query_to_patch is not None:
            q2p = self.query_to_patch
            if q2p.ndim != 2 or tuple(q2p.shape) != (m, self.n_patches):
                raise ValueError(
                    f"query_to_patch must be [M={m}, N={self.n_patches}] (image tokens × patches of all views), "
                    f"got {tuple(q2p.shape)}"
                )
            if bool(q2p[self.placeholder].ne(0).any()):
                raise ValueError("placeholder tokens carry no patch: their query_to_patch rows must be zero")
        if self.query_grid is not None:
            self.query_grid = _pair(self.query_grid, "query_grid")

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def single_view(
        cls,
        image_size,
        grid,
        box,
        positions,
        query_to_patch: torch.Tensor | None = None,
        rule: str = "identity",
        query_grid=None,
        name: str = "image",
    ) -> ImageLayout:
        """The layout of a model that sees the image as one patch grid (LLaVA-1.5, deco, Gemma3, PaliGemma, BLIP-2).

        ``query_to_patch`` defaults to the identity (one token per patch), which needs ``M == N``.
        """
        view = View(name, grid, box)
        positions = torch.as_tensor(positions, dtype=torch.long)
        if query_to_patch is None and rule == "identity":
            if positions.numel() != view.n_patches:
                raise ValueError(
                    f"an identity connector maps one token per patch: {positions.numel()} tokens for "
                    f"{view.n_patches} patches"
                )
            query_to_patch = torch.eye(view.n_patches, dtype=torch.float64)
            query_grid = query_grid or view.grid
        return cls(image_size, (view,), positions, query_to_patch, None, rule, query_grid)

    # ---- geometry --------------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """M: the image's LLM tokens (placeholders included)."""
        return self.positions.numel()

    @property
    def n_patches(self) -> int:
        """N: the patches of all views."""
        return self._offsets[-1]

    @property
    def is_single_grid(self) -> bool:
        """One view whose patches are all there is: ``Explanation.patch_map`` can reshape to its grid."""
        return len(self.views) == 1

    def view_slice(self, index: int) -> slice:
        """The patch indices of view ``index`` in the concatenated numbering."""
        return slice(self._offsets[index], self._offsets[index + 1])

    def patch_boxes(self) -> torch.Tensor:
        """``[N, 4]`` float64 pixel boxes of every patch of every view, in patch-index order."""
        return torch.cat([v.patch_boxes() for v in self.views])

    def render(self, values: torch.Tensor, smooth: bool = False, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-patch relevance ``[..., N]`` → relevance over the original image ``[..., H, W]`` (module docs), float64.

        ``smooth=True`` interpolates each view's grid bilinearly (:func:`linear_weights`) instead of spreading each
        patch evenly over its box: for display; the exact, mass-preserving map (the default) is what metrics read.
        ``size=(h, w)`` renders onto the image scaled to that size (thumbnails), boxes scaled with it.
        """
        values = torch.as_tensor(values)
        if values.shape[-1] != self.n_patches:
            raise ValueError(
                f"values must be [..., N={self.n_patches}] (patches of all views), got {tuple(values.shape)}"
            )
        lead = values.shape[:-1]
        values = values.detach().to("cpu", torch.float64)
        h, w = self.image_size if size is None else _pair(size, "size")
        sy, sx = h / self.image_size[0], w / self.image_size[1]
        out = torch.zeros(*lead, h, w, dtype=torch.float64)
        for i, view in enumerate(self.views):
            rows, cols = view.grid
            x0, y0, x1, y1 = view.box[0] * sx, view.box[1] * sy, view.box[2] * sx, view.box[3] * sy
            wy = box_weights(torch.linspace(y0, y1, rows + 1, dtype=torch.float64), h)  # [rows, H]
            wx = box_weights(torch.linspace(x0, x1, cols + 1, dtype=torch.float64), w)  # [cols, W]
            grid = values[..., self.view_slice(i)].reshape(*lead, rows, cols)
            if smooth:
                # The same density as the exact map (a patch's value over its area), interpolated between centers.
                area = ((x1 - x0) / cols) * ((y1 - y0) / rows)
                wy, wx = linear_weights(y0, y1, rows, h) / area, linear_weights(x0, x1, cols, w)
            # Separable: a pixel's share of a patch is its share of the patch's row slice times its column slice.
            out += wy.transpose(0, 1) @ grid @ wx
        return out

    # ---- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready geometry (the tensors are saved by :meth:`rgae.Explanation.save`)."""
        return {
            "image_size": list(self.image_size),
            "views": [v.to_dict() for v in self.views],
            "rule": self.rule,
            "query_grid": None if self.query_grid is None else list(self.query_grid),
        }

    @classmethod
    def from_dict(cls, meta: dict, positions, query_to_patch=None, placeholder=None) -> ImageLayout:
        views = tuple(View(v["name"], tuple(v["grid"]), tuple(v["box"])) for v in meta["views"])
        return cls(
            tuple(meta["image_size"]), views, positions, query_to_patch, placeholder, meta.get("rule", "identity"),
            None if meta.get("query_grid") is None else tuple(meta["query_grid"]),
        )

    def describe(self) -> dict:
        """A short summary for ``Explanation.options`` and reports."""
        return {
            "views": [f"{v.name} {v.grid[0]}x{v.grid[1]}" for v in self.views],
            "image_tokens": self.n_tokens,
            "placeholders": int(self.placeholder.sum()),
            "patches": self.n_patches,
            "query_to_patch_rule": self.rule,
        }
