"""Tiny random ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` with their processors, built offline.

The real processors (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``) take a video processor,
and the Qwen video processors need torchvision: :func:`rgae.adapters.qwen_vl_base.image_text_processor` makes a
subclass of the family's own processor class whose ``__init__`` takes no video processor, so everything else —
``__call__``, the image-token expansion of ``replace_image_token`` (``image_grid_thw.prod() // merge_size²``
``<|image_pad|>`` tokens), ``mm_token_type_ids`` — is the processor's own code. The image processor is the real
``Qwen2VLImageProcessorPil`` (Qwen3-VL uses it too, with 16-px patches) and the tokenizer a word-level one built in
memory with Qwen's special tokens and a minimal ChatML template.

Sizes keep the real patch geometry (14-px patches and 28-px merge blocks for Qwen2/2.5-VL, 16 px / 32 px for
Qwen3-VL) with tiny widths, so that the processor's ``smart_resize`` rounds to the real multiples.

Example:
    >>> model, processor = tiny_qwen2_vl()
    >>> batch = processor(images=tiny_image(56, 84), text=processor.apply_chat_template(MESSAGES,
    ...                   add_generation_prompt=True), return_tensors="pt")
    >>> batch["image_grid_thw"].tolist(), int((batch["mm_token_type_ids"] == 1).sum())  # 4×6 patches, 2×3 tokens
    ([[1, 4, 6]], 6)
"""

from __future__ import annotations

import torch

from rgae.adapters.qwen_vl_base import image_text_processor
from tests.families.word_tokenizer import word_tokenizer
from tests.tiny import tiny_image

__all__ = ["MESSAGES", "SPECIALS", "tiny_image", "tiny_qwen2_5_vl", "tiny_qwen2_vl",
           "tiny_qwen3_vl"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
#: Tokens a random model must not generate (an image token in the target would be taken for an image; padding
#: would end the answer).
NOT_GENERATED = ["<|endoftext|>", *SPECIALS[4:]]
WORDS = "user assistant system"


def qwen_tokenizer():
    return word_tokenizer(
        SPECIALS, words=WORDS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )


def _image_processor(patch: int, min_pixels: int, max_pixels: int, **kwargs):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, **kwargs)


def _finish(model, tok, dtype):
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(NOT_GENERATED)
    model.generation_config.min_new_tokens = 1  # a random model may end at once: there would be nothing to explain
    return model


def _token_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _text_kwargs(tok, text_layers: int) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=len(tok), max_position_embeddings=1024,
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _eager(config):
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    return config


def tiny_qwen2_vl(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 2,
                  processor_kwargs: dict | None = None, max_pixels: int = 28 * 28 * 64):
    """``(model, processor)`` of a tiny Qwen2-VL: 14-px patches, 2×2 merger, GQA text model; eager attention,
    ``dtype`` (float64 for the exactness checks)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    tok = qwen_tokenizer()
    processor = image_text_processor(Qwen2VLProcessor, _image_processor(14, 28 * 28, max_pixels,
                                                                        **(processor_kwargs or {})), tok,
                                     CHAT_TEMPLATE)
    config = Qwen2VLConfig(
        vision_config=dict(depth=vision_layers, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(**_text_kwargs(tok, text_layers),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
        **_token_ids(tok),
    )
    torch.manual_seed(seed)
    return _finish(Qwen2VLForConditionalGeneration(_eager(config)), tok, dtype), processor


def tiny_qwen2_5_vl(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 2,
                    processor_kwargs: dict | None = None, fullatt_block_indexes=(1,), window_size: int = 56,
                    max_pixels: int = 28 * 28 * 64):
    """``(model, processor)`` of a tiny Qwen2.5-VL: 14-px patches, windows of ``window_size`` px (56: 2×2 merge
    blocks) in every vision layer but ``fullatt_block_indexes``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

    tok = qwen_tokenizer()
    processor = image_text_processor(Qwen2_5_VLProcessor, _image_processor(14, 28 * 28, max_pixels,
                                                                           **(processor_kwargs or {})), tok,
                                     CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=vision_layers, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                           fullatt_block_indexes=list(fullatt_block_indexes)),
        text_config=dict(**_text_kwargs(tok, text_layers),
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
        **_token_ids(tok),
    )
    torch.manual_seed(seed)
    return _finish(Qwen2_5_VLForConditionalGeneration(_eager(config)), tok, dtype), processor


def _qwen3_vl_parts(text_layers: int, vision_layers: int, processor_kwargs: dict | None, deepstack_visual_indexes,
                    max_pixels: int):
    """``(tokenizer, processor, config kwargs)`` that Qwen3-VL and Qwen3-VL-MoE share: the vision tower, DeepStack,
    the dense text settings and the Qwen3-VL processor."""
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    tok = qwen_tokenizer()
    image_processor = _image_processor(16, 32 * 32, max_pixels, **{"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                                     **(processor_kwargs or {})})
    processor = image_text_processor(Qwen3VLProcessor, image_processor, tok, CHAT_TEMPLATE)
    config = dict(
        vision_config=dict(depth=vision_layers, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=list(deepstack_visual_indexes)),
        text_config=dict(**_text_kwargs(tok, text_layers), head_dim=16,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        **_token_ids(tok),
    )
    return tok, processor, config


def tiny_qwen3_vl(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 2,
                  processor_kwargs: dict | None = None, deepstack_visual_indexes=(0,), max_pixels: int = 32 * 32 * 64):
    """``(model, processor)`` of a tiny Qwen3-VL: 16-px patches (32-px merge blocks), learned position embeddings
    interpolated to each grid, DeepStack mergers after the vision layers ``deepstack_visual_indexes`` whose features
    are added to the LLM's hidden states at the image positions after its first decoder layers."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok, processor, parts = _qwen3_vl_parts(text_layers, vision_layers, processor_kwargs, deepstack_visual_indexes,
                                            max_pixels)
    config = Qwen3VLConfig(**parts)
    torch.manual_seed(seed)
    return _finish(Qwen3VLForConditionalGeneration(_eager(config)), tok, dtype), processor


def tiny_qwen3_vl_moe(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 2,
                      processor_kwargs: dict | None = None, deepstack_visual_indexes=(0,),
                      max_pixels: int = 32 * 32 * 64):
    """``(model, processor)`` of a tiny Qwen3-VL-MoE (Qwen3-VL-30B-A3B's class): Qwen3-VL's vision tower, merger and
    DeepStack, and an LLM whose MLPs are sparse mixtures of 4 experts (2 per token); Qwen3-VL's processor."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    tok, processor, parts = _qwen3_vl_parts(text_layers, vision_layers, processor_kwargs, deepstack_visual_indexes,
                                            max_pixels)
    parts["text_config"].update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(**parts)
    # The experts' grouped matmul kernel has no float64; the loop over experts (transformers' "eager") computes the
    # same mixture.
    config.text_config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return _finish(Qwen3VLMoeForConditionalGeneration(_eager(config)), tok, dtype), processor
