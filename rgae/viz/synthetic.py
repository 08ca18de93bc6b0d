"""A small synthetic :class:`~rgae.explanation.Explanation`, to try the figures without a model (and for examples).

Example:
    >>> from rgae.viz import synthetic_explanation, plot_decomposition
    >>> e = synthetic_explanation()
    >>> e.words, e.patch_grid, e.query_grid
    (['A', 'pot', 'of', 'green', 'plants'], (8, 8), (4, 4))
    >>> fig = plot_decomposition(e)
"""

from __future__ import annotations

import numpy as np
import torch


def synthetic_explanation(
    text: str = "A pot of green plants",
    patch_grid: tuple[int, int] = (8, 8),
    query_grid: tuple[int, int] = (4, 4),
    projector: str = "avgpool2_16",
    image_size: tuple[int, int] = (64, 64),
    method: str = "rgae",
    seed: int = 0,
):
    """An explanation built like R-GAE's, ``R_t2p = R_t2q · Q2P``: one Gaussian blob of Text-to-Query relevance per
    word (at seeded random spots) and the adaptive-average-pooling Query-to-Patch map (``projector`` starting with
    ``mlp``/``linear`` gives the identity and needs ``query_grid == patch_grid``), over a smooth random image.
    The maps mean nothing; they exercise every figure.
    """
    from rgae.explanation import Explanation
    from rgae.rules import pooling_map

    words = text.split()
    if not words:
        raise ValueError("text must contain at least one word")
    gen = torch.Generator().manual_seed(seed)
    qh, qw = query_grid
    ys, xs = torch.meshgrid(torch.arange(qh, dtype=torch.float32), torch.arange(qw, dtype=torch.float32),
                            indexing="ij")
    centers = torch.rand(len(words), 2, generator=gen) * torch.tensor([qh - 1.0, qw - 1.0])
    sigma = max(qh, qw) / 4
    t2q = torch.stack([torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma**2)).flatten()
                       for cy, cx in centers.tolist()])
    if projector.startswith(("mlp", "linear")):
        if tuple(query_grid) != tuple(patch_grid):
            raise ValueError(f"a token-wise projector needs query_grid == patch_grid, got {query_grid} vs {patch_grid}")
        q2p = torch.eye(qh * qw)
    else:
        q2p = pooling_map(patch_grid, query_grid)
    rng = np.random.default_rng(seed)
    h, w = image_size
    # A smooth, nearly gray texture (low-frequency sinusoids, warm tint): neutral under a jet overlay.
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.55 + 0.2 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * yy + rng.uniform(0.5, 2) * xx)) + 0.1 * np.cos(
        2 * np.pi * rng.uniform(1, 3) * xx)
    image = base[..., None] * np.array([1.0, 0.93, 0.85])
    image = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    return Explanation(method=method, target_text=text, output_tokens=words, text_to_patch=t2q @ q2p,
                       patch_grid=tuple(patch_grid), text_to_query=t2q, query_to_patch=q2p,
                       query_grid=tuple(query_grid), image=image, projector_type=projector, model_name="synthetic")
