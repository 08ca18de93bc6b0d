"""Concatenating connectors (pixel shuffle, patch merger): which patches each LLM image token is built from.

InternVL, Idefics3/SmolVLM, Aya Vision and Mistral3 compress a view's patch grid by concatenating the features of
every s×s block of patches into one vector, which an MLP (or a linear layer) maps to one LLM token. A token is a
function of its block's patches only, and of all of them alike: its Query-to-Patch row is uniform over the block,
``1 / s²`` on each of its patches (rule ``"block"``), the structural operator of the connector as the pooling
operator is for average pooling. (Which patch of the block matters more for a given target is what the gradient
rule would say; the structural map does not guess it.)

The blocks are found by running the model's **own** packing code (``pixel_shuffle``, the patch merger's ``unfold``)
on a tensor holding each patch's index instead of its features, so the map follows the model's exact ordering
(InternVL's transposes included) rather than a re-implementation of it.

Example (a 4×4 grid, 2×2 blocks, row-major tokens):
    >>> import torch
    >>> packed = patch_indices((4, 4)).view(1, 2, 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(1, 4, 4)
    >>> blocks = blocks_from_packed(packed, 16)
    >>> blocks[0].tolist(), block_query_to_patch(blocks, 16)[0, [0, 1, 4, 5]].tolist()
    ([0, 1, 4, 5], [0.25, 0.25, 0.25, 0.25])
"""

from __future__ import annotations

import torch

from rgae.layout import ImageLayout, View

__all__ = [
    "block_query_to_patch",
    "blocks_from_packed",
    "example_ids",
    "image_layout",
    "patch_indices",
    "token_runs",
    "views_query_to_patch",
]


def patch_indices(grid: tuple[int, int]) -> torch.Tensor:
    """``[1, rows·cols, 1]`` float64: patch ``i`` (row-major) holds the value ``i`` — a one-channel "feature" map to
    feed to a connector's packing code (float64 keeps every index exact)."""
    rows, cols = grid
    return torch.arange(rows * cols, dtype=torch.float64).view(1, rows * cols, 1)


def blocks_from_packed(packed: torch.Tensor, n_patches: int) -> torch.Tensor:
    """``[T, s²]`` long: the patch indices each token concatenates, from the packing code's output on
    :func:`patch_indices` (any shape ending in the concatenated channel axis: ``[..., T..., s²]``).

    Raises ``ValueError`` unless every patch is used exactly once (what a concatenating connector does)."""
    blocks = packed.reshape(-1, packed.shape[-1])
    idx = blocks.round().long()
    if not torch.equal(idx.to(blocks.dtype), blocks):
        raise ValueError("the packed patch indices are not integers: the packing code mixed its input")
    counts = torch.bincount(idx.flatten(), minlength=n_patches)
    if counts.numel() != n_patches or not bool((counts == 1).all()):
        raise ValueError(f"the connector's packing does not use each of the {n_patches} patches exactly once")
    return idx


def block_query_to_patch(blocks: torch.Tensor, n_patches: int, offset: int = 0, total: int | None = None):
    """``[T, total]`` float64 Query-to-Patch of the ``"block"`` rule: token t is ``1/s²`` on each patch of
    ``blocks[t]`` (shifted by ``offset``, the view's first patch in the concatenated numbering)."""
    total = n_patches if total is None else total
    t, k = blocks.shape
    q2p = torch.zeros(t, total, dtype=torch.float64)
    q2p.scatter_(1, blocks + offset, 1.0 / k)
    return q2p


def views_query_to_patch(blocks: torch.Tensor, n_patches: int, n_views: int) -> torch.Tensor:
    """``[n_views · T, n_views · n_patches]``: the block rule of ``n_views`` views that share one packing, their
    tokens and patches numbered view after view."""
    total = n_patches * n_views
    return torch.cat([block_query_to_patch(blocks, n_patches, v * n_patches, total) for v in range(n_views)])


def example_ids(batch) -> torch.Tensor:
    """``[S]``: the ``input_ids`` of the batch's one example (``ValueError`` for a batch of several)."""
    ids = batch["input_ids"]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, S] (one example), got {tuple(ids.shape)}")
    return ids[0]


def token_runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, stop)]`` of the maximal runs of True in a 1-D bool tensor (the image tokens of each view/row).

    Example:
        >>> token_runs(torch.tensor([0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool))
        [(1, 3), (4, 5), (6, 8)]
    """
    m = mask.to(torch.int8).flatten()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), m, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    return list(zip(starts, stops))


def image_layout(
    image_size: tuple[int, int],
    views: list[View],
    token_positions: torch.Tensor,
    token_q2p: torch.Tensor,
    placeholder_positions: torch.Tensor | None = None,
    query_grid: tuple[int, int] | None = None,
    rule: str = "block",
) -> ImageLayout:
    """An :class:`~rgae.layout.ImageLayout` from the positions of the tokens that carry patches (``[T]``, with their
    Query-to-Patch rows ``[T, N]``) and of the placeholder tokens (row/column tags, row breaks: zero rows)."""
    token_positions = torch.as_tensor(token_positions, dtype=torch.long).flatten().cpu()
    if placeholder_positions is None:
        placeholder_positions = torch.zeros(0, dtype=torch.long)
    placeholder_positions = torch.as_tensor(placeholder_positions, dtype=torch.long).flatten().cpu()
    positions = torch.cat([token_positions, placeholder_positions])
    is_placeholder = torch.arange(positions.numel()) >= token_positions.numel()
    q2p = torch.cat([token_q2p, torch.zeros(placeholder_positions.numel(), token_q2p.shape[1], dtype=token_q2p.dtype)])
    order = torch.argsort(positions)
    return ImageLayout(image_size, views, positions[order], q2p[order], is_placeholder[order], rule, query_grid)
