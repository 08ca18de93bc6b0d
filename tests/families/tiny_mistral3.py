"""A tiny random ``Mistral3ForConditionalGeneration`` (Pixtral vision with 8-px patches up to 64 px, 2×2 patch
merger, Mistral text) and its processor's outputs, built offline.

``PixtralProcessor`` cannot even be imported without torchvision (its module imports the torchvision image
processor), so :class:`PixtralInputs` assembles what it returns for one image from the real
``PixtralImageProcessorPil`` (called with the merged patch size, as ``PixtralProcessor._process_images`` does), the
tokenizer and the token expansion of ``PixtralProcessor.replace_image_token``: per row of merged tokens
``[IMG] … [IMG]`` then ``[IMG_BREAK]``, the last row ended by ``[IMG_END]``.

Example:
    >>> model, processor = tiny_mistral3()
    >>> batch = processor(images=tiny_image(24, 40), text="[INST][IMG]describe[/INST]", return_tensors="pt")
    >>> batch["image_sizes"].tolist()  # rounded up to whole 16-px merge blocks
    [[32, 48]]
"""

from __future__ import annotations

import torch

from tests.families.word_tokenizer import word_tokenizer
from tests.tiny import tiny_image

__all__ = ["MESSAGES", "PixtralInputs", "tiny_image", "tiny_mistral3"]

PATCH = 8
MERGE = 2
MAX_SIZE = 64
CHAT_TEMPLATE = (
    "<s>{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}[IMG]{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}[/INST]{% else %}{{ message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}"
)
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]


class PixtralInputs:
    """``PixtralProcessor(images=image, text=...)`` for one image (module docs say why it is assembled)."""

    image_token, image_break_token, image_end_token = "[IMG]", "[IMG_BREAK]", "[IMG_END]"

    def __init__(self, image_processor, tokenizer, patch_size: int, spatial_merge_size: int, chat_template: str):
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.patch_size, self.spatial_merge_size, self.chat_template = patch_size, spatial_merge_size, chat_template

    def apply_chat_template(self, messages, add_generation_prompt: bool = False):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images=None, text=None, return_tensors=None):
        from transformers import BatchFeature

        if text.count(self.image_token) != 1:
            raise ValueError("one image placeholder per prompt")
        merged = self.patch_size * self.spatial_merge_size
        image = self.image_processor(images=images, patch_size={"height": merged, "width": merged},
                                     return_tensors=return_tensors)
        height, width = (int(v) for v in image["image_sizes"][0])
        rows = [[self.image_token] * (width // merged) + [self.image_break_token]] * (height // merged)
        tokens = [t for row in rows for t in row]
        tokens[-1] = self.image_end_token
        encoded = self.tokenizer(text.replace(self.image_token, "".join(tokens)), add_special_tokens=False,
                                 return_tensors=return_tensors)
        return BatchFeature({**encoded, **image}, tensor_type=return_tensors)


def tiny_mistral3_processor(**image_kwargs):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = word_tokenizer(SPECIALS, bos="<s>", eos="</s>", pad="<pad>", chat_template=CHAT_TEMPLATE)
    ip = PixtralImageProcessorPil(size={"longest_edge": MAX_SIZE}, patch_size={"height": PATCH, "width": PATCH},
                                  **image_kwargs)
    return PixtralInputs(ip, tok, PATCH, MERGE, CHAT_TEMPLATE)


def tiny_mistral3(dtype=torch.float64, seed: int = 0, text_layers: int = 2, vision_layers: int = 1,
                  processor_kwargs: dict | None = None):
    """``(model, processor)``: eval mode, eager attention, ``dtype`` (float64 for exactness checks)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    processor = tiny_mistral3_processor(**(processor_kwargs or {}))
    tok = processor.tokenizer
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=vision_layers,
                                 num_attention_heads=2, image_size=MAX_SIZE, patch_size=PATCH)
    text = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tok), max_position_embeddings=512,
                         sliding_window=None, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=MERGE,
                            image_token_index=tok.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    # A random model could generate image tokens, which the teacher-forced forward would take for an image.
    model.generation_config.suppress_tokens = tok.convert_tokens_to_ids(SPECIALS[6:])
    return model, processor
