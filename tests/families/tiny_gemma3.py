"""Tiny Gemma3 for tests: the real ``Gemma3ForConditionalGeneration`` (SigLIP 32 px with 4-px patches = 8×8 patches,
``mm_tokens_per_image=16`` so the connector average-pools 2×2; Gemma3 text with a sliding and a full layer) and the
real ``Gemma3Processor`` with ``Gemma3ImageProcessorPil`` (optionally pan-and-scan), a word-level tokenizer with
Gemma3's special tokens and a minimal Gemma3 chat template (``<start_of_turn>user`` ... ``<start_of_turn>model``).

Example:
    >>> model, processor = tiny_gemma3(), tiny_gemma3_processor()
    >>> import numpy as np
    >>> batch = processor(images=np.zeros((24, 40, 3), np.uint8), text="<start_of_image>what", return_tensors="pt")
    >>> int((batch["input_ids"] == model.config.image_token_id).sum()), int(batch["token_type_ids"].sum())
    (16, 16)
"""

from __future__ import annotations

import torch

IMAGE = 32
PATCH = 4
TOKENS = 16

#: Words of the prompts the tests use (pan-and-scan adds "Here is the original image ... see better").
WORDS = (
    "user model what color shape is the object in this image picture describe a an and of on at left right middle "
    "top bottom red green blue yellow circle square triangle small large one two three yes no ? , . ! Here original "
    "here are some crops to help you see better caption en Describe sentence \n"
)

#: Gemma3's chat format (google/gemma-3-*-it), reduced to what the explainer sends.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def word_tokenizer(words: str, special: list[str], named: dict[str, str], bos="<bos>", eos="<eos>", pad="<pad>",
                   unk="<unk>"):
    """A real fast word-level tokenizer (``tokenizers``), no automatic BOS (the family's template or processor adds
    it): ``special`` tokens first (atomic), ``named`` special tokens as attributes (``image_token``, ...)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from tests.tiny import _pre_tokenizer

    pre = _pre_tokenizer()
    vocab = {t: i for i, t in enumerate([pad, eos, bos, unk])}
    for piece, _ in pre.pre_tokenize_str(words):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
                                   extra_special_tokens=named)
    fast.add_tokens([t for t in special if t not in named.values()], special_tokens=True)
    return fast


def tiny_gemma3_tokenizer():
    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    return word_tokenizer(WORDS, ["<start_of_turn>", "<end_of_turn>"], named)


def tiny_gemma3_config(text_layers: int = 2, **kwargs):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    tok = tiny_gemma3_tokenizer()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE, patch_size=PATCH)
    text = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention"] * (text_layers - 1) + ["full_attention"],
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    config = Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=TOKENS,
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        **kwargs,
    )
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    return config


def tiny_gemma3(dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    """A random Gemma3ForConditionalGeneration in eval mode, eager attention."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(tiny_gemma3_config(**kwargs))
    # transformers initializes the connector's projection to zeros (checkpoints overwrite it): a zero projection
    # would hide the image from the LLM altogether.
    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(std=weight.shape[0] ** -0.5)
    return model.to(dtype).eval()


def tiny_gemma3_image_processor(**overrides):
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    return Gemma3ImageProcessorPil(**{"size": {"height": IMAGE, "width": IMAGE}, **overrides})


#: Pan-and-scan settings for the tiny sizes (the real defaults: crops of at least 256 px, up to 4, from aspect 1.2).
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 12, "pan_and_scan_max_num_crops": 3,
                "pan_and_scan_min_ratio_to_activate": 1.2}


def tiny_gemma3_processor(pan_and_scan: bool = False, **image_overrides):
    """The real Gemma3Processor. ``pan_and_scan=True``: every call makes pan-and-scan crops (:data:`PAN_AND_SCAN`;
    Gemma3's processor only takes them as call arguments, and the explainer calls it with none)."""
    from transformers import Gemma3Processor

    cls = Gemma3Processor
    if pan_and_scan:
        class PanAndScanGemma3Processor(Gemma3Processor):
            def __call__(self, images=None, text=None, **kwargs):
                return super().__call__(images=images, text=text, **{**PAN_AND_SCAN, **kwargs})

        cls = PanAndScanGemma3Processor
    return cls(
        image_processor=tiny_gemma3_image_processor(**image_overrides),
        tokenizer=tiny_gemma3_tokenizer(),
        image_seq_length=TOKENS,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
