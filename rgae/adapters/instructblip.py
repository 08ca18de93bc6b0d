"""Adapter for transformers ``InstructBlipForConditionalGeneration`` (InstructBLIP with a decoder-only LLM: Vicuna,
...): BLIP-2's layout (:mod:`rgae.adapters.blip2`) with an instruction-aware Q-Former.

The processor tokenizes the prompt a second time with the Q-Former's own tokenizer (``qformer_input_ids``); the
Q-Former's self-attention runs over the M learned queries **followed by those instruction tokens**, while only the
queries cross-attend to the vision tokens (CLS included) and only the queries reach the LLM. Query-to-Patch is GAE
through that stack with the instruction tokens as part of the self-attention stream: they gather image relevance
from the queries in one layer and hand it back to them in a later one, and they take part in the row normalization
of every cross-attention rule (``RGAE._qformer_q2p``; tests check it against a float64 oracle written out there).

Example (a tiny random InstructBLIP with Llama, 4 queries):
    >>> from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration
    >>> from rgae.adapters import get_adapter
    >>> small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    >>> config = InstructBlipConfig(vision_config=dict(small, image_size=32, patch_size=8),
    ...                             qformer_config=dict(small, encoder_hidden_size=16),
    ...                             text_config=dict(model_type="llama", hidden_size=16, intermediate_size=32,
    ...                                              num_hidden_layers=1, num_attention_heads=2,
    ...                                              num_key_value_heads=2, vocab_size=64),
    ...                             num_query_tokens=4, image_token_id=5)
    >>> get_adapter(InstructBlipForConditionalGeneration(config)).projector_type
    'instructblip_qformer2_4'
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
