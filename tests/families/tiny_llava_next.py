"""Tiny LLaVA-NeXT (and LLaVA-NeXT-Video) for tests: the real transformers classes with minute sizes, the real
``LlavaNextProcessor`` with the PIL image processor and a word-level tokenizer built in memory, a Mistral-style
``[INST]`` chat template (llava-v1.6-mistral's format).

Sizes: CLIP tiles of 32 px with 8-px patches (4×4 patches per view), pinpoints 32×64 / 64×32 / 64×64 / 32×96 /
96×32, so a 40×88 image gets a base view + 3 tiles with padding on both sides; Llama text, 2 layers.

Example:
    >>> model, processor = tiny_llava_next(), tiny_llava_next_processor()
    >>> import numpy as np
    >>> batch = processor(images=np.zeros((40, 88, 3), np.uint8), text="[INST] <image>\\nwhat [/INST]",
    ...                   return_tensors="pt")
    >>> tuple(batch["pixel_values"].shape), model(**batch).logits.shape[1] == batch["input_ids"].shape[1]
    ((1, 4, 3, 32, 32), True)
"""

from __future__ import annotations

import torch

from tests.tiny import tiny_text_config, tiny_tokenizer, tiny_vision_config

PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
TILE = 32
PATCH = 8

#: llava-v1.6-mistral's format: ``[INST] <image>\n{text} [/INST]``, answers end with ``</s>``.
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}[INST] "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %} [/INST]{% else %} {{ message['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
)

WORDS = "[INST] [/INST]"


def _eager(config):
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    return config


def tiny_llava_next_config(video: bool = False, text_layers: int = 2, **kwargs):
    """A LlavaNextConfig (or LlavaNextVideoConfig), eager attention, tokens of :func:`tiny_llava_next_tokenizer`."""
    from transformers import LlavaNextConfig, LlavaNextVideoConfig

    tok = tiny_llava_next_tokenizer()
    common = dict(
        vision_config=tiny_vision_config("clip", image_size=TILE, patch_size=PATCH),
        text_config=tiny_text_config("llama", vocab_size=len(tok), num_layers=text_layers),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        **{"vision_feature_layer": -2, "vision_feature_select_strategy": "default", **kwargs},
    )
    if video:
        return _eager(LlavaNextVideoConfig(**common, video_token_index=tok.convert_tokens_to_ids("<video>")))
    return _eager(LlavaNextConfig(**common))


def tiny_llava_next(video: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    """A random LlavaNextForConditionalGeneration (``video=True``: LlavaNextVideoForConditionalGeneration), eval."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextVideoForConditionalGeneration

    cls = LlavaNextVideoForConditionalGeneration if video else LlavaNextForConditionalGeneration
    torch.manual_seed(seed)
    return cls(tiny_llava_next_config(video=video, **kwargs)).to(dtype).eval()


def tiny_llava_next_tokenizer():
    tok = tiny_tokenizer(WORDS)
    tok.add_tokens(["<video>"], special_tokens=True)
    return tok


def tiny_llava_next_image_processor(**overrides):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    settings = dict(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                    image_grid_pinpoints=PINPOINTS)
    return LlavaNextImageProcessorPil(**{**settings, **overrides})


def _processor_parts(**image_overrides) -> dict:
    return dict(
        image_processor=tiny_llava_next_image_processor(**image_overrides),
        tokenizer=tiny_llava_next_tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )


def tiny_llava_next_processor(**image_overrides):
    """The real LlavaNextProcessor: CLIP-style anyres PIL image processor, tiny tokenizer, ``[INST]`` template."""
    from transformers import LlavaNextProcessor

    return LlavaNextProcessor(**_processor_parts(**image_overrides))


def without_video_processor(processor_cls):
    """``processor_cls`` (a processor with a video processor: LLaVA-NeXT-Video, OneVision) accepting
    ``video_processor=None``: transformers' video processors need torchvision, which this project does not install,
    and ProcessorMixin checks every sub-processor's class. Images go through the class's own code unchanged."""

    class ImagesOnly(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = processor_cls.__name__
    return ImagesOnly


def tiny_llava_next_video_processor(**image_overrides):
    """The real LlavaNextVideoProcessor for images (no video processor: see :func:`without_video_processor`)."""
    from transformers import LlavaNextVideoProcessor

    return without_video_processor(LlavaNextVideoProcessor)(video_processor=None, **_processor_parts(**image_overrides))
