"""Tiny LLaVA-OneVision for tests: the real ``LlavaOnevisionForConditionalGeneration`` (SigLIP tiles of 32 px with
8-px patches, no CLS, ``vision_feature_select_strategy="full"``, Qwen2 text) and the real ``LlavaOnevisionProcessor``
with its PIL image processor (images only: see :func:`tests.families.tiny_llava_next.without_video_processor`), a
word-level tokenizer with Qwen's ``<|im_start|>``/``<|im_end|>`` and a minimal Qwen-style chat template.

``vision_aspect_ratio="anyres_max_2"`` (the real models use ``anyres_max_9`` with 384-px tiles): an image whose
unpadded tile grid holds more than ~2.4 tiles of tokens is downsampled bilinearly by the model, as a large photo is
by the real one.

Example:
    >>> model, processor = tiny_llava_onevision(), tiny_llava_onevision_processor()
    >>> import numpy as np
    >>> batch = processor(images=np.zeros((72, 100, 3), np.uint8), text="<image>what", return_tensors="pt")
    >>> model(**batch).logits.shape[1] == batch["input_ids"].shape[1]
    True
"""

from __future__ import annotations

import torch

from tests.families.tiny_llava_next import without_video_processor
from tests.tiny import tiny_text_config, tiny_tokenizer, tiny_vision_config

PINPOINTS = [[32 * i, 32 * j] for i in range(1, 4) for j in range(1, 4)]
TILE = 32
PATCH = 8
ASPECT = "anyres_max_2"
IM_TOKENS = ["<|im_start|>", "<|im_end|>", "<video>"]

#: Qwen's chat format, as the llava-onevision-qwen2 checkpoints use it (no system prompt).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_onevision_tokenizer():
    tok = tiny_tokenizer("user assistant")
    tok.add_tokens(IM_TOKENS, special_tokens=True)
    return tok


def tiny_llava_onevision_config(text_layers: int = 2, **kwargs):
    from transformers import LlavaOnevisionConfig

    tok = tiny_llava_onevision_tokenizer()
    config = LlavaOnevisionConfig(
        vision_config=tiny_vision_config("siglip", image_size=TILE, patch_size=PATCH),
        text_config=tiny_text_config("qwen2", vocab_size=len(tok), num_layers=text_layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ASPECT,
        **kwargs,
    )
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    return config


def tiny_llava_onevision(dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    """A random LlavaOnevisionForConditionalGeneration in eval mode, eager attention."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(tiny_llava_onevision_config(**kwargs)).to(dtype).eval()


def tiny_llava_onevision_image_processor(**overrides):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    settings = dict(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    return LlavaOnevisionImageProcessorPil(**{**settings, **overrides})


def tiny_llava_onevision_processor(**image_overrides):
    """The real LlavaOnevisionProcessor (without a video processor), tiny tokenizer, Qwen chat template."""
    from transformers import LlavaOnevisionProcessor

    return without_video_processor(LlavaOnevisionProcessor)(
        video_processor=None,
        image_processor=tiny_llava_onevision_image_processor(**image_overrides),
        tokenizer=tiny_llava_onevision_tokenizer(),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=ASPECT,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
