"""Adapter for transformers ``Blip2ForConditionalGeneration`` (BLIP-2 with a decoder-only LLM: OPT, ...): the
Q-Former in the wild.

The model keeps its parts at the top level (no ``.model``): ``vision_model`` (a ViT with a CLS token in front of
the patches), ``query_tokens`` (M learned queries), ``qformer`` (query self-attention, and cross-attention to the
vision tokens every ``cross_attention_frequency`` layers), ``language_projection`` and ``language_model``. Its
processor puts M ``<image>`` tokens in front of the prompt (before BOS); the LLM gets the projected queries there.

Query-to-Patch is the deco Q-Former's: GAE through the Q-Former's self- and cross-attention layers with the target's
gradients (``rgae.rules.propagate_cross_stack``), so it depends on the target (rule ``"qformer_gae"``, no structural
map in the layout). The cross-attention reads **every** vision token, CLS included (``feature_prefix = 1``). CLS has
no pixel box: its column of ``R_qk`` is dropped from Text-to-Patch, and the share of the relevance that went to it
is reported in ``Explanation.options["non_patch_share"]`` (one value per target token). RawAttention and
AttentionRollout read Query-to-Patch from the last cross-attention layer, CLS column dropped likewise.

Example (a tiny random BLIP-2 with OPT; a two-layer Q-Former cross-attending in its first layer):
    >>> from transformers import Blip2Config, Blip2ForConditionalGeneration
    >>> from rgae.adapters import get_adapter
    >>> small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    >>> config = Blip2Config(vision_config=dict(small, image_size=32, patch_size=8),
    ...                      qformer_config=dict(small, encoder_hidden_size=16),
    ...                      text_config=dict(model_type="opt", hidden_size=16, word_embed_proj_dim=16, ffn_dim=32,
    ...                                       num_hidden_layers=1, num_attention_heads=2, vocab_size=64),
    ...                      num_query_tokens=4, image_token_id=5)
    >>> adapter = get_adapter(Blip2ForConditionalGeneration(config))
    >>> adapter.projector_kind, [kind for kind, _ in adapter.projector_attention], adapter.feature_prefix
    ('qformer', ['self', 'cross', 'self'], 1)
"""

from __future__ import annotations

from torch import nn

from rgae.adapters import Family
from rgae.adapters.base import ModelAdapter, _as_hw, leaf_attention_modules

#: BLIP-2's checkpoints are prompted "Question: {q} Answer:"; the processor adds the image tokens itself.
BLIP2_PROMPT = "Question: {instruction} Answer:"


def qformer_attention_layers(qformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[("self" | "cross", module)]`` of a BLIP-2 / InstructBLIP Q-Former in forward order: per layer its
    self-attention, then its cross-attention when the layer has one. Each module's forward returns
    ``(context, probabilities)`` in eager mode."""
    layers = []
    for layer in qformer.encoder.layer:
        layers.append(("self", layer.attention.attention))
        if getattr(layer, "has_cross_attention", False):
            layers.append(("cross", layer.crossattention.attention))
    if not any(kind == "cross" for kind, _ in layers):
        raise ValueError(f"{type(qformer).__name__} has no cross-attention layer: it never reads the image")
    return layers


def require_decoder_only(model: nn.Module) -> None:
    """Encoder–decoder language models (Flan-T5) are refused with the reason (see docs/adapters.md)."""
    cfg = model.config
    if not getattr(cfg, "use_decoder_only_language_model", True):
        raise ValueError(
            f"{type(model).__name__} with a {cfg.text_config.model_type} (encoder-decoder) language model is not "
            "supported: the image tokens sit in the encoder and the target in the decoder, so Text-to-Query needs the "
            "encoder-decoder GAE rules (decoder self-attention, decoder-to-encoder cross-attention, encoder "
            "self-attention), which rgae's teacher-forced decoder-only path does not implement yet. Decoder-only "
            "language models (OPT, Llama/Vicuna, ...) are supported; see docs/adapters.md"
        )


def blip_adapter(model: nn.Module, projector_type: str, prompt_template: str | None) -> ModelAdapter:
    """The adapter of a BLIP-2-shaped model (BLIP-2, InstructBLIP)."""
    require_decoder_only(model)
    cfg = model.config
    vision = model.vision_model
    image_hw, patch_hw = _as_hw(cfg.vision_config.image_size), _as_hw(cfg.vision_config.patch_size)
    grid = (image_hw[0] // patch_hw[0], image_hw[1] // patch_hw[1])
    attention = qformer_attention_layers(model.qformer)
    m = int(cfg.num_query_tokens)
    n_layers = len(model.qformer.encoder.layer)
    return ModelAdapter(
        model=model,
        language_model=model.language_model,
        vision_tower=vision,
        projector=model.qformer,
        llm_attention=leaf_attention_modules(model.language_model),
        vision_attention=leaf_attention_modules(vision),
        projector_attention=attention,
        projector_kind="qformer",
        patch_grid=grid,
        # The queries are a set, not a grid: one row of M for the Text-to-Query figures.
        query_grid=(1, m),
        image_token_id=int(cfg.image_token_id),
        # The Q-Former cross-attends to the vision model's last hidden state (after its post-layernorm), CLS first.
        vision_feature_layer=-1,
        vision_prefix=1,
        feature_prefix=1,
        projector_type=f"{projector_type}{n_layers}_{m}",
        projector_input="encoder_hidden_states",
        prompt_template=prompt_template,
    )


def blip2_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of a ``Blip2ForConditionalGeneration`` (module docs)."""
    return blip_adapter(model, "blip2_qformer", BLIP2_PROMPT)


FAMILY = Family(
    name="blip2",
    model_classes=("Blip2ForConditionalGeneration",),
    build=blip2_adapter,
    connector="Q-Former: M learned queries, self-attention + cross-attention to every vision token (CLS included), "
    "then a linear projection",
    query_to_patch="GAE through the Q-Former's self- and cross-attention (target-dependent, as the deco Q-Former); "
    "the CLS column is dropped from Text-to-Patch and its share reported",
)
