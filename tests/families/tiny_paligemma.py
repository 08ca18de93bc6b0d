"""Tiny PaliGemma for tests: the real ``PaliGemmaForConditionalGeneration`` (SigLIP 32 px with 8-px patches = 16 image
tokens, one linear projector, Gemma text) and the real ``PaliGemmaProcessor`` around ``SiglipImageProcessorPil``
(with the ``image_seq_length`` PaliGemma's preprocessor config carries) and a word-level Gemma-style tokenizer.
PaliGemma has no chat template: the processor writes ``<image>×16 <bos> prompt \\n`` itself.

Example:
    >>> model, processor = tiny_paligemma(), tiny_paligemma_processor()
    >>> import numpy as np
    >>> batch = processor(images=np.zeros((24, 40, 3), np.uint8), text="<image>caption en", return_tensors="pt")
    >>> processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][0, 15:])
    ['<image>', '<bos>', 'caption', 'en', '\\n']
    >>> batch["token_type_ids"].tolist() == [[0] * 20]  # the whole prompt is the bidirectional prefix
    True
"""

from __future__ import annotations

import torch

from tests.families.tiny_gemma3 import WORDS, word_tokenizer

IMAGE = 32
PATCH = 8


def tiny_paligemma_tokenizer():
    return word_tokenizer(WORDS, [], {"image_token": "<image>"})


def tiny_paligemma_config(text_layers: int = 2, **kwargs):
    from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    tok = tiny_paligemma_processor().tokenizer  # the processor adds its <loc>/<seg> tokens to the vocabulary
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE, patch_size=PATCH)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                             projection_dim=32, hidden_size=32, vocab_size=len(tok), **kwargs)
    for c in (config, config.vision_config, config.text_config):
        c._attn_implementation = "eager"
    return config


def tiny_paligemma(dtype: torch.dtype = torch.float32, seed: int = 0, **kwargs):
    """A random PaliGemmaForConditionalGeneration in eval mode, eager attention."""
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    return PaliGemmaForConditionalGeneration(tiny_paligemma_config(**kwargs)).to(dtype).eval()


def tiny_paligemma_processor(**image_overrides):
    """The real PaliGemmaProcessor (SigLIP PIL image processor resizing to 32×32, 16 image tokens)."""
    from transformers import PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(**{"size": {"height": IMAGE, "width": IMAGE}, **image_overrides})
    image_processor.image_seq_length = (IMAGE // PATCH) ** 2
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tiny_paligemma_tokenizer())
