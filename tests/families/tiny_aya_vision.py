"""A tiny random ``AyaVisionForConditionalGeneration`` (SigLIP 32-px tiles of 8-px patches, Cohere2 text) and its
real ``AyaVisionProcessor`` (``GotOcr2ImageProcessorPil`` crop-to-patches, a word-level tokenizer with Aya's special
tokens, a Cohere-style chat template), built offline.

Example:
    >>> model, processor = tiny_aya_vision()
    >>> batch = processor(images=tiny_image(24, 40), text="<image> describe", return_tensors="pt")
    >>> tuple(batch["pixel_values"].shape)  # 1×2 tiles + the global image
    (3, 3, 32, 32)
"""

from __future__ import annotations

import torch

from tests.families.word_tokenizer import word_tokenizer
from tests.tiny import tiny_image

__all__ = ["MESSAGES", "tiny_aya_vision", "tiny_aya_vision_processor", "tiny_image"]

TILE = 32
PATCH = 8
CHAT_TEMPLATE = (
    "<BOS_TOKEN>{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% else %}<|CHATBOT_TOKEN|>{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
SPECIALS = ["<unk>", "<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
            "<|IMG_LINE_BREAK|>"]


def tiny_aya_vision_processor(max_patches: int = 4, **image_kwargs):
    from transformers import AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = word_tokenizer(SPECIALS, words=" ".join(f"TILE_{i}" for i in range(1, 13)) + " TILE_GLOBAL",
                         eos="<|END_OF_TURN_TOKEN|>", pad="<PAD>", chat_template=CHAT_TEMPLATE)
    ip = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1,
                                  max_patches=max_patches, **image_kwargs)
    return AyaVisionProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH, img_size=TILE,
                              downsample_factor=2, chat_template=CHAT_TEMPLATE)


def tiny_aya_vision(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 1,
                    processor_kwargs: dict | None = None):
    """``(model, processor)``: eval mode, eager attention, ``dtype`` (float64 for exactness checks)."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config, SiglipVisionConfig

    processor = tiny_aya_vision_processor(**(processor_kwargs or {}))
    tok = processor.tokenizer
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                                num_attention_heads=2, image_size=TILE, patch_size=PATCH, vision_use_head=False)
    text = Cohere2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                         bos_token_id=tok.convert_tokens_to_ids("<BOS_TOKEN>"), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=2,
                             image_token_index=processor.image_token_id, vision_feature_select_strategy="full",
                             vision_feature_layer=-1)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AyaVisionForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # A random model could generate image tokens, which the teacher-forced forward would take for an image.
    model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(SPECIALS[7:])
    return model, processor
