"""Tiny random ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration`` (32-px frames of 8-px
patches, pixel shuffle 2×2, Llama text) with their processors, built offline.

Idefics3 gets its real ``Idefics3Processor`` (``Idefics3ImageProcessorPil``, a word-level tokenizer with the
``<row_r_col_c>``/``<global-img>``/``<fake_token_around_image>`` tokens, Idefics3's chat template). SmolVLM's
processor cannot be built here (``SmolVLMProcessor`` requires a ``SmolVLMVideoProcessor``, which needs torchvision,
and num2words): :class:`SmolVLMInputs` assembles its image outputs from the real ``SmolVLMImageProcessorPil``, the
tokenizer and SmolVLM's own prompt-expansion function ``get_image_prompt_string``.

Example:
    >>> model, processor = tiny_idefics3()
    >>> batch = processor(images=tiny_image(24, 64), text="User:<image>describe", return_tensors="pt")
    >>> tuple(batch["pixel_values"].shape), tuple(batch["pixel_attention_mask"].shape)  # 1×2 tiles + global
    ((1, 3, 3, 32, 32), (1, 3, 32, 32))
"""

from __future__ import annotations

import torch

from tests.families.word_tokenizer import word_tokenizer
from tests.tiny import tiny_image

__all__ = ["MESSAGES", "SmolVLMInputs", "tiny_idefics3", "tiny_image", "tiny_smolvlm"]

FRAME = 32
PATCH = 8
SCALE = 2
TOKENS_PER_FRAME = (FRAME // PATCH // SCALE) ** 2
CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<fake_token_around_image>", "<image>",
            "<end_of_utterance>", "<global-img>", *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]]


def tiny_idefics3_tokenizer():
    return word_tokenizer(SPECIALS, words="User Assistant", eos="<end_of_utterance>", pad="<pad>",
                          chat_template=CHAT_TEMPLATE)


def _image_processor_kwargs(kwargs):
    return {"size": {"longest_edge": 2 * FRAME}, "max_image_size": {"longest_edge": FRAME}, **kwargs}


def tiny_idefics3_processor(**image_kwargs):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    ip = Idefics3ImageProcessorPil(**_image_processor_kwargs(image_kwargs))
    return Idefics3Processor(image_processor=ip, tokenizer=tiny_idefics3_tokenizer(), image_seq_len=TOKENS_PER_FRAME,
                             chat_template=CHAT_TEMPLATE)


class SmolVLMInputs:
    """What ``SmolVLMProcessor(images=..., text=...)`` returns for images, from the real image processor and
    ``transformers.models.smolvlm.processing_smolvlm.get_image_prompt_string`` (module docs say why)."""

    fake_image_token = "<fake_token_around_image>"
    image_token = "<image>"
    global_image_token = "<global-img>"

    def __init__(self, image_processor, tokenizer, image_seq_len: int, chat_template: str):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.image_seq_len, self.chat_template = image_seq_len, chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text=None, return_tensors=None):
        from transformers import BatchFeature
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        if text.count(self.image_token) != 1:
            raise ValueError("one image placeholder per prompt")
        image = self.image_processor(images=[[images]], return_row_col_info=True, return_tensors=return_tensors)
        rows, cols = image.pop("rows")[0][0], image.pop("cols")[0][0]
        expanded = get_image_prompt_string(
            rows, cols, self.image_seq_len, fake_token_around_image=self.fake_image_token,
            image_token=self.image_token, global_image_token=self.global_image_token,
        )
        encoded = self.tokenizer(text.replace(self.image_token, expanded), return_tensors=return_tensors)
        return BatchFeature({**encoded, **image}, tensor_type=return_tensors)


def tiny_smolvlm_processor(**image_kwargs):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    ip = SmolVLMImageProcessorPil(**_image_processor_kwargs(image_kwargs))
    return SmolVLMInputs(ip, tiny_idefics3_tokenizer(), TOKENS_PER_FRAME, CHAT_TEMPLATE)


def _build(kind: str, dtype, seed, text_layers, vision_layers, processor_kwargs):
    from transformers import LlamaConfig

    if kind == "idefics3":
        from transformers import Idefics3Config as Config
        from transformers import Idefics3ForConditionalGeneration as Model
        from transformers import Idefics3VisionConfig as VisionConfig

        processor = tiny_idefics3_processor(**(processor_kwargs or {}))
    else:
        from transformers import SmolVLMConfig as Config
        from transformers import SmolVLMForConditionalGeneration as Model
        from transformers import SmolVLMVisionConfig as VisionConfig

        processor = tiny_smolvlm_processor(**(processor_kwargs or {}))
    tok = processor.tokenizer
    vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers, num_attention_heads=2,
                          image_size=FRAME, patch_size=PATCH)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512,
                       bos_token_id=tok.convert_tokens_to_ids("<|begin_of_text|>"), eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    config = Config(vision_config=vision, text_config=text, scale_factor=SCALE,
                    image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Model(config).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # A random model could generate image tokens, which the teacher-forced forward would take for an image.
    model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(SPECIALS[4:])
    return model, processor


def tiny_idefics3(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 1,
                  processor_kwargs: dict | None = None):
    """``(model, processor)``: eval mode, eager attention, ``dtype`` (float64 for exactness checks)."""
    return _build("idefics3", dtype, seed, text_layers, vision_layers, processor_kwargs)


def tiny_smolvlm(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 1,
                 processor_kwargs: dict | None = None):
    """``(model, processor)`` for SmolVLM (its processor assembled: :class:`SmolVLMInputs`)."""
    return _build("smolvlm", dtype, seed, text_layers, vision_layers, processor_kwargs)
