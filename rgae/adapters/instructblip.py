"""Adapter for transformers ``InstructBlipForConditionalGeneration`` (InstructBLIP with a decoder-only LLM: Vicuna,
...): BLIP-2's layout (:mod:`rgae.adapters.blip2`) with an instruction-aware Q-Former.

The processor tokenizes the prompt a second time with the Q-Former's own tokenizer (``qformer_input_ids``); the
Q-Former's self-attention runs over the M learned queries **followed by those instruction tokens**, while only the
queries cross-attend to the vision tokens (CLS included) and only the queries reach the LLM. Query-to-Patch is GAE
through that stack with the instruction tokens as part of the self-attention stream: they gather image relevance
from the queries in one layer and hand it back to them in a later one, and they take part in the row normalization
of every cross-attention rule (``RGAE._qformer_q2p``; tests check it against a float64 oracle written out there).

Example:
    >>> from rgae.adapters import get_adapter
    >>> get_adapter(instructblip_model).projector_type  # doctest: +SKIP
    'instructblip_qformer2_32'
"""

from __future__ import annotations

from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter
from rgae.adapters.blip2 import blip_adapter

#: InstructBLIP is prompted with the instruction itself (to the LLM and to the Q-Former).
INSTRUCTBLIP_PROMPT = "{instruction}"


def instructblip_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of an ``InstructBlipForConditionalGeneration`` (module docs)."""
    return blip_adapter(model, "instructblip_qformer", INSTRUCTBLIP_PROMPT)


FAMILY = Family(
    name="instructblip",
    model_classes=("InstructBlipForConditionalGeneration",),
    build=instructblip_adapter,
    connector="instruction-aware Q-Former: queries + instruction tokens in self-attention, queries cross-attend to "
    "every vision token (CLS included), then a linear projection",
    query_to_patch="GAE through the Q-Former with the instruction tokens in the self-attention stream "
    "(target-dependent); the CLS column is dropped from Text-to-Patch and its share reported",
)
