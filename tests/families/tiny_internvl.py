"""A tiny random ``InternVLForConditionalGeneration`` (InternVL vision 32-px tiles of 8-px patches, Qwen2 text) and
its real ``InternVLProcessor`` (``GotOcr2ImageProcessorPil`` with crop-to-patches, a word-level tokenizer with
InternVL's special tokens, an InternVL/Qwen2-style chat template), built offline.

Example:
    >>> model, processor = tiny_internvl()
    >>> batch = processor(images=tiny_image(24, 40), text=processor.apply_chat_template(MESSAGES,
    ...                   add_generation_prompt=True), return_tensors="pt")
    >>> tuple(batch["pixel_values"].shape)  # 1×2 tiles + thumbnail
    (3, 3, 32, 32)
"""

from __future__ import annotations

import torch

from tests.families.word_tokenizer import word_tokenizer
from tests.tiny import tiny_image

__all__ = ["MESSAGES", "tiny_image", "tiny_internvl", "tiny_internvl_processor", "without_video_processor"]

TILE = 32
PATCH = 8
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]


def without_video_processor(processor_class):
    """``processor_class`` accepting ``video_processor=None``: its video processors need torchvision, which this
    project must not install (DESIGN.md), and ``ProcessorMixin`` refuses a missing one. Images and text go through
    the processor's own code unchanged."""

    class WithoutVideoProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    WithoutVideoProcessor.__name__ = processor_class.__name__
    return WithoutVideoProcessor


def tiny_internvl_tokenizer():
    return word_tokenizer(
        SPECIALS,
        named={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
               "video_token": "<video>"},
        words="user assistant", eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHAT_TEMPLATE,
    )


def tiny_internvl_processor(max_patches: int = 4, **image_kwargs):
    """The real ``InternVLProcessor`` without its video processor (:func:`without_video_processor`)."""
    from transformers import InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                  max_patches=max_patches, **image_kwargs)
    return without_video_processor(InternVLProcessor)(
        image_processor=ip, tokenizer=tiny_internvl_tokenizer(), video_processor=None,
        image_seq_length=TOKENS_PER_TILE, chat_template=CHAT_TEMPLATE,
    )


def tiny_internvl(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 1,
                  processor_kwargs: dict | None = None):
    """``(model, processor)``: eval mode, eager attention, ``dtype`` (float64 for exactness checks)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

    processor = tiny_internvl_processor(**(processor_kwargs or {}))
    tok = processor.tokenizer
    vision = InternVLVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                                  num_attention_heads=2, image_size=TILE, patch_size=PATCH)
    text = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=TOKENS_PER_TILE, downsample_ratio=0.5)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # A random model could generate image tokens, which the teacher-forced forward would take for an image.
    model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(SPECIALS[4:])
    return model, processor
