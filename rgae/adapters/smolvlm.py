"""Adapter for ``SmolVLMForConditionalGeneration`` (SmolVLM / SmolVLM2): Idefics3's connector, processor layout and
adapter (:mod:`rgae.adapters.idefics3`) under SmolVLM's class names.

Example:
    >>> FAMILY.build is idefics3_adapter, FAMILY.model_classes
    (True, ('SmolVLMForConditionalGeneration',))
"""

from __future__ import annotations

from rgae.adapters import Family
from rgae.adapters.idefics3 import idefics3_adapter

FAMILY = Family(
    name="smolvlm",
    model_classes=("SmolVLMForConditionalGeneration",),
    build=idefics3_adapter,
    connector="pixel shuffle s×s (scale_factor), one linear layer per token; tiles + global image, "
    "<row_r_col_c>/<global-img> tags (as Idefics3)",
    query_to_patch="block: each token uniform over the s×s patches it concatenates, per view; tags are placeholders",
)
