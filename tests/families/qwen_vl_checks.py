"""Independent checks of the Qwen-VL layouts and of ``through_vision`` on them, written without rgae's code.

* :func:`merge_order_by_hand` — the processor's merge-block patch order from its documented reshape (blocks of
  ``merge × merge`` patches, row-major inside and across blocks).
* :func:`vision_records` — one eager forward in which every vision attention module's output is **replaced** by
  one recomputed from its own ``qkv`` and rotary embedding with a block-diagonal softmax over the ``cu_seqlens``
  segments it was given (checked equal to the module's output up to the float32 softmax of eager attention), so
  that the probabilities
  ``[H, n, n]`` are in the autograd graph; and the tower's attention order read off the model (which row of the
  patch embeddings each position of the first block's input holds: Qwen2.5-VL's window reordering).
* :func:`full_matrix_vision_query_to_patch` — ``[T, M, N]`` Query-to-Patch through the tower by the definition:
  ``cam = mean_h (G ⊙ A)+``, ``R = (I + cam_L) ⋯ (I + cam_1)``, ``R̄ = (R − I) / rowsum(R − I) + I``, and
  ``Q2P · R̄[patch tokens][:, patch tokens]`` with the patch tokens from :func:`vision_records`.
* :func:`branch_support` — which raster patches each LLM image position depends on through one merger (the main
  one or a DeepStack one), by autograd through the real model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


def merge_order_by_hand(grid: tuple[int, int], merge: int = 2) -> torch.Tensor:
    """``[h·w]``: the raster index of each token of an image's vision sequence (sequence index s: block
    ``s // merge²`` of the block grid, row-major; inside it, position ``s % merge²``, row-major)."""
    h, w = grid
    s = torch.arange(h * w)
    block, inner = s // merge**2, s % merge**2
    block_row, block_col = block // (w // merge), block % (w // merge)
    return (block_row * merge + inner // merge) * w + block_col * merge + inner % merge


@dataclass
class VisionRecords:
    logits: torch.Tensor  # [1, S, V]
    probabilities: list[torch.Tensor]  # per vision layer [H, n, n] (block-diagonal), in the graph
    attention_of_sequence: torch.Tensor  # [n]: attention position of each token of the packed merge-block sequence


def vision_records(model, inputs) -> VisionRecords:
    visual = model.model.visual
    modeling = sys.modules[type(visual).__module__]
    probabilities, seen = [], {}

    def attend(module, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        cu, (cos, sin) = kwargs["cu_seqlens"], kwargs["position_embeddings"]
        n = x.shape[0]
        q, k, v = module.qkv(x).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = modeling.apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        segment = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
        allowed = segment[:, None] == segment[None, :]
        a = (q @ k.transpose(1, 2) * module.scaling).masked_fill(~allowed, float("-inf")).softmax(-1)
        probabilities.append(a)
        recomputed = module.proj((a @ v).transpose(0, 1).reshape(n, -1))
        # Eager attention takes its softmax in float32 even in a float64 model; this one is float64 throughout.
        torch.testing.assert_close(recomputed, out, rtol=1e-5, atol=1e-9)
        return recomputed

    def leaf(module, args, out):
        seen["embed"] = out.detach().requires_grad_(True)
        return seen["embed"]

    def first_input(module, args, kwargs):
        seen.setdefault("first", args[0] if args else kwargs["hidden_states"])

    handles = [m.attn.register_forward_hook(attend, with_kwargs=True) for m in visual.blocks]
    handles.append(visual.patch_embed.register_forward_hook(leaf))
    handles.append(visual.blocks[0].register_forward_pre_hook(first_input, with_kwargs=True))
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            logits = model(**inputs.model_kwargs(), use_cache=False).logits
            # From the patch embeddings to the first block's input the tower only reorders rows (Qwen2.5-VL's
            # windows) and adds per-token position embeddings (Qwen3-VL): with position j of the first block
            # weighted j + 1, the gradient at patch-embedding row i is (its attention position + 1) everywhere.
            first = seen["first"]
            weights = torch.arange(1, first.shape[0] + 1, dtype=first.dtype)[:, None]
            (g,) = torch.autograd.grad((first * weights).sum(), seen["embed"], retain_graph=True)
    finally:
        for h in handles:
            h.remove()
    attention_of_sequence = g[:, 0].round().long() - 1
    assert torch.equal(g, g[:, :1].expand_as(g)) and torch.equal(attention_of_sequence.sort().values,
                                                                 torch.arange(first.shape[0]))
    return VisionRecords(logits, probabilities, attention_of_sequence)


def patch_tokens_by_hand(records: VisionRecords, grids: torch.Tensor, image: int) -> torch.Tensor:
    """``[h·w]``: the attention position of each raster patch of image ``image`` of the prompt."""
    offset = int(grids[:image].prod(-1).sum())
    order = merge_order_by_hand(tuple(int(v) for v in grids[image, 1:]))
    sequence_of_raster = torch.empty_like(order)
    sequence_of_raster[order] = torch.arange(order.numel())
    return records.attention_of_sequence[offset + sequence_of_raster]


def full_matrix_vision_query_to_patch(model, inputs, image: int = 0) -> torch.Tensor:
    """``[T, M, N]`` float64 (module docs) for image ``image`` of the prompt."""
    records = vision_records(model, inputs)
    tokens = patch_tokens_by_hand(records, inputs.extra["image_grid_thw"].cpu(), image)
    q2p = inputs.layout.query_to_patch.double()
    maps = []
    for pos, target in zip(inputs.predicting_positions.tolist(), inputs.target_ids.tolist()):
        grads = torch.autograd.grad(records.logits[0, pos, target], records.probabilities, retain_graph=True,
                                    allow_unused=True)
        n = records.probabilities[0].shape[-1]
        R = torch.eye(n, dtype=torch.float64)
        for a, g in zip(records.probabilities, grads):
            if g is not None:
                R = R + (g.double() * a.detach().double()).clamp(min=0).mean(0) @ R
        eye = torch.eye(n, dtype=torch.float64)
        sums = (R - eye).sum(1, keepdim=True)
        R_bar = (R - eye) / torch.where(sums == 0, torch.ones_like(sums), sums) + eye
        maps.append(q2p @ R_bar[tokens][:, tokens])
    return torch.stack(maps)


def branch_support(model, inputs, merger, tokens: torch.Tensor, at_layer: int = 0) -> torch.Tensor:
    """``[M, N]`` bool: which raster patches (``tokens``: their rows of the merger's input) each LLM image position
    of ``inputs.layout`` depends on through ``merger`` alone, at the input of LLM decoder layer ``at_layer`` (0: the
    input embeddings; DeepStack branches are added after the first layers)."""
    lm = model.model.language_model
    seen = {}

    def leaf(module, args):
        seen["x"] = args[0].detach().requires_grad_(True)
        return (seen["x"], *args[1:])

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    handles = [merger.register_forward_pre_hook(leaf),
               lm.layers[at_layer].register_forward_pre_hook(grab, with_kwargs=True)]
    try:
        with torch.enable_grad():
            model(**inputs.model_kwargs(), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for pos in inputs.layout.positions.tolist():
        (g,) = torch.autograd.grad(seen["h"][0, pos].sum(), seen["x"], retain_graph=True, allow_unused=True)
        g = torch.zeros_like(seen["x"]) if g is None else g
        rows.append(g.abs().sum(-1)[tokens] > 0)
    return torch.stack(rows)
