"""File size and save/load time of an ``Explanation`` with a LLaVA-OneVision-sized image layout, with the
Query-to-Patch maps stored sparsely (``Explanation.save``) against dense (the former format).

The layout is the real one: llava-onevision-qwen2's geometry (SigLIP 384-px tiles of 14-px patches, 27×27 per view,
``image_grid_pinpoints`` up to 6×6 tiles, ``anyres_max_9``) read off the model's own ``pack_image_features`` by the
OneVision adapter, for a 1024×768 photo; the vision tower and the LLM are tiny (their width does not enter the
layout). The explanation is R-GAE-shaped: T target tokens, Text-to-Query random, Query-to-Patch the layout's
(structural: bilinear weights), Text-to-Patch their product. Median of ``--repeats`` timed runs after one warm-up.

Usage:
    python bench/bench_storage.py --tokens 16 --out bench/storage.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import rgae.explanation as explanation_module
from rgae import Explanation
from rgae.layout import ImageLayout

TILE, PATCH = 384, 14
PINPOINTS = [[TILE * i, TILE * j] for i in range(1, 7) for j in range(1, 7)]


def onevision_layout(image_hw=(768, 1024)) -> ImageLayout:
    """The layout the OneVision adapter gives llava-onevision-qwen2's geometry for an image of ``image_hw``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from rgae.adapters import get_adapter
    from rgae.adapters.llava_next import anyres_views

    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH)
    text = Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=5,
                                  image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    adapter = get_adapter(model)
    ip = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    views = anyres_views(ip, image_hw, adapter.patch_grid)
    with torch.no_grad():
        q2p, placeholder = adapter.query_to_patch_of_packing(image_hw, len(views))
    rule = adapter.packing_rule(q2p, placeholder)
    return ImageLayout(image_hw, views, torch.arange(q2p.shape[0]) + 10, q2p, placeholder, rule, None)


def explanation(layout: ImageLayout, tokens: int) -> Explanation:
    gen = torch.Generator().manual_seed(0)
    t2q = torch.rand(tokens, layout.n_tokens, generator=gen, dtype=torch.float64)
    words = [f"w{i}" for i in range(tokens)]
    return Explanation(method="rgae", target_text=" ".join(words), output_tokens=words,
                       text_to_patch=t2q @ layout.query_to_patch, layout=layout, text_to_query=t2q,
                       query_to_patch=layout.query_to_patch.clone(), image=np.zeros((*layout.image_size, 3), np.uint8),
                       image_positions=layout.positions)


def measure(e: Explanation, folder: Path, repeats: int) -> tuple[int, float, float]:
    """``(bytes on disk, median save seconds, median load seconds)``; asserts the round trip is exact."""
    saves, loads = [], []
    for i in range(repeats + 1):
        start = time.perf_counter()
        e.save(folder)
        saved = time.perf_counter() - start
        start = time.perf_counter()
        back = Explanation.load(folder)
        loaded = time.perf_counter() - start
        if i:  # the first run warms up
            saves.append(saved)
            loads.append(loaded)
    assert torch.equal(back.query_to_patch, e.query_to_patch)
    assert torch.equal(back.layout.query_to_patch, e.layout.query_to_patch)
    size = sum(p.stat().st_size for p in folder.iterdir())
    return size, statistics.median(saves), statistics.median(loads)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16, help="target tokens T")
    parser.add_argument("--sizes", nargs="+", default=["768x1024", "1536x2048"], help="image sizes HxW")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = parser.parse_args(argv)
    lines = [f"T = {args.tokens} target tokens; median of {args.repeats} runs after a warm-up.", "",
             "| image | views | M × N | non-zero Q2P | rule | storage | files | save | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in args.sizes:
        h, w = (int(v) for v in size.lower().split("x"))
        layout = onevision_layout((h, w))
        e = explanation(layout, args.tokens)
        nnz = int((layout.query_to_patch != 0).sum())
        with tempfile.TemporaryDirectory() as tmp:
            sparse = measure(e, Path(tmp) / "sparse", args.repeats)
            original = explanation_module._pack_maps
            explanation_module._pack_maps = lambda tensors: None  # the former format: dense maps, stored twice
            try:
                dense = measure(e, Path(tmp) / "dense", args.repeats)
            finally:
                explanation_module._pack_maps = original
        for name, (nbytes, save, load) in (("dense (before)", dense), ("sparse (now)", sparse)):
            lines.append(f"| {h}×{w} | {len(layout.views)} | {layout.n_tokens} × {layout.n_patches} | {nnz} | "
                         f"{layout.rule} | {name} | {nbytes / 2**20:.1f} MiB | {save:.2f} s | {load:.2f} s |")
        lines.append(f"| | | | | | ratio | {dense[0] / sparse[0]:.0f}× smaller | | |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()
