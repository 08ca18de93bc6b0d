"""Adapter for ``PaliGemmaForConditionalGeneration`` (PaliGemma 1 and 2): SigLIP patches → one linear layer, so image
token i is patch i (Query-to-Patch is the identity over one view, the whole image resized to a square).

What differs from LLaVA is the prompt and the mask, both the processor's:

* no chat template: the processor puts the ``image_seq_length`` image tokens first, then ``<bos>``, the prompt and
  ``"\\n"``; the explainer's default prompt is therefore ``<image>`` + the instruction (``prompt_template``), and the
  processor adds the rest;
* the prefix (image tokens and prompt) attends bidirectionally and the answer causally, decided by
  ``token_type_ids`` (0 prefix, 1 suffix). The explainer passes them and marks the teacher-forced target as suffix
  (``target_token_values``); extended with 0 the target would sit in the bidirectional prefix and see its own
  future tokens, and the explained logits would not be the model's.

Example:
    >>> from rgae.adapters import families
    >>> [f.name for f in families() if "PaliGemmaForConditionalGeneration" in f.model_classes]
    ['paligemma']
"""

from __future__ import annotations

from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter
from rgae.adapters.llava import llava_fields

__all__ = ["paligemma_adapter"]


def paligemma_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a ``PaliGemmaForConditionalGeneration``."""
    vcfg = model.config.vision_config
    side = int(vcfg.image_size) // int(vcfg.patch_size)
    return ModelAdapter(
        **llava_fields(model),
        projector_kind="linear",
        patch_grid=(side, side),
        query_grid=(side, side),
        vision_feature_layer=-1,  # last_hidden_state: every SigLIP layer feeds the projector
        vision_prefix=0,
        feature_prefix=0,
        projector_type="linear",
        prompt_template="{image}{instruction}",
        target_token_values={"token_type_ids": 1},
    )


FAMILY = Family(
    name="paligemma",
    model_classes=("PaliGemmaForConditionalGeneration",),
    build=paligemma_adapter,
    connector="one linear layer per SigLIP patch; image tokens before <bos>, bidirectional prefix (token_type_ids)",
    query_to_patch="identity: token i is patch i",
)
