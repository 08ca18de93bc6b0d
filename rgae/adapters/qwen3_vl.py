"""Adapter for ``Qwen3VLForConditionalGeneration`` (Qwen3-VL).

Connector and layout as Qwen2-VL's (:mod:`rgae.adapters.qwen_vl_base`) with 16-px patches: images are resized to
multiples of 32 px, each token is uniform over its 2×2 merge block (rule ``"block"``). The vision tower adds learned
position embeddings, bilinearly interpolated to each image's grid, to the patch embeddings (per patch: they move no
relevance between patches).

DeepStack: after each vision layer in ``deepstack_visual_indexes`` the features go through their own merger (the
same 2×2 concatenation, post-shuffle LayerNorm, 2-layer MLP) and are added to the LLM's hidden states at the image
positions after the first ``len(deepstack_visual_indexes)`` decoder layers. How they enter the maps:

* Text-to-Query: image position q of the LLM then carries the main merger's token plus the DeepStack additions;
  R-GAE follows the LLM's self-attention, so T2Q[q] is the relevance of everything at position q, all branches
  together (the additions are part of the residual stream at q, which GAE's rules propagate as one token).
* Query-to-Patch: every branch reads the same 2×2 block at the same position (the mergers pack the same sequence
  the same way), so the block rule is exact for all of them together (tests check it through each branch).
* ``through_vision=True`` would have to propagate each branch through a different depth of the vision tower (layer
  k's features for DeepStack merger k, the last layer's for the main merger) and split T2Q[q] among branches, which
  GAE's rules do not define: it is refused with a ValueError for models with DeepStack layers (a Qwen3-VL config
  with ``deepstack_visual_indexes=[]`` propagates like Qwen2-VL).

Example:
    >>> from rgae.adapters import families
    >>> family = next(f for f in families() if f.name == "qwen3-vl")
    >>> "Qwen3VLForConditionalGeneration" in family.model_classes, family.query_to_patch is not None
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rgae.adapters import Family
from rgae.adapters.qwen_vl_base import QwenVLAdapter, qwen_vl_fields


@dataclass
class Qwen3VLAdapter(QwenVLAdapter):
    """:class:`QwenVLAdapter` that refuses ``through_vision`` and ``q2p_rule="gradient"`` when DeepStack branches
    feed the LLM (module docs)."""

    deepstack_layers: tuple[int, ...] = ()

    def patch_tokens(self, layout, inputs=None):
        """:meth:`vision_tokens` for ``through_vision``, which is refused for a model with DeepStack layers."""
        if self.deepstack_layers:
            raise ValueError(
                f"through_vision=True is not supported for {type(self.model).__name__} with DeepStack: the features "
                f"of vision layers {list(self.deepstack_layers)} (through their own mergers) are added to the LLM's "
                "hidden states at the image positions, so an image token's relevance comes from several depths of "
                "the vision tower, which one vision-tower propagation cannot split; use through_vision=False (its "
                "block Query-to-Patch is exact for every DeepStack branch)"
            )
        return super().patch_tokens(layout, inputs)

    def gradient_split_rows(self, layout, inputs=None):
        """Refused for a model with DeepStack layers: the rule differentiates the LLM's input embeddings w.r.t. the
        main merger's input, and the DeepStack branches reach the LLM elsewhere (module docs)."""
        if self.deepstack_layers:
            raise ValueError(
                f"q2p_rule='gradient' is not supported for {type(self.model).__name__} with DeepStack: the features "
                f"of vision layers {list(self.deepstack_layers)} reach the LLM through their own mergers after its "
                "first layers, not through the input embeddings the rule differentiates; use the default "
                "structural rule (exact for every branch)"
            )
        return super().gradient_split_rows(layout, inputs)


def qwen3_vl_adapter(model: nn.Module) -> QwenVLAdapter:
    """The adapter of a ``Qwen3VLForConditionalGeneration``."""
    vcfg = model.config.vision_config
    merge = int(vcfg.spatial_merge_size)
    deepstack = tuple(int(k) for k in (getattr(vcfg, "deepstack_visual_indexes", None) or ()))
    suffix = f"_deepstack{len(deepstack)}" if deepstack else ""
    return Qwen3VLAdapter(**qwen_vl_fields(model, f"layernorm_patch_merger{merge}x{merge}_mlp2x_gelu{suffix}"),
                          deepstack_layers=deepstack)


FAMILY = Family(
    name="qwen3-vl",
    model_classes=("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"),
    build=qwen3_vl_adapter,
    connector="patch merger inside the vision tower (16-px patches, 2×2 blocks, LayerNorm + 2-layer MLP) plus "
    "DeepStack mergers whose features are added to the first LLM layers at the image positions; dynamic resolution",
    query_to_patch="block: each token uniform over the 2×2 patches it merges, for the main and every DeepStack "
    "branch alike; through_vision refused with DeepStack",
)
