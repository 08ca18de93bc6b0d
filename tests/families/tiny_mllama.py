"""A tiny real Mllama (Llama 3.2 Vision) for tests, built offline: ``MllamaForConditionalGeneration`` with minute
sizes and seeded random weights, the real ``MllamaProcessor`` around ``MllamaImageProcessorPil`` (16-px tiles of
8-px patches, at most 4 tiles), a word-level tokenizer built in memory with Llama 3's special tokens and a chat
template in Llama 3.2 Vision's format.

Example:
    >>> model, processor = tiny_mllama()
    >>> batch = processor(images=tiny_image(), text="<|image|>what color ?", return_tensors="pt")
    >>> batch["pixel_values"].shape, batch["aspect_ratio_ids"].tolist()  # 24×40 → 19×32 on a 2×2-tile canvas
    (torch.Size([1, 1, 4, 3, 16, 16]), [[6]])
"""

from __future__ import annotations

import numpy as np
import torch

WORDS = (
    "user assistant what color shape is the object in this image picture describe there are a an and of on at "
    "left right top bottom red green blue yellow circle square triangle cat dog small large one two yes no ? , . :"
).split()
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>", "<|image|>", "<unk>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>{% elif item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_tokenizer():
    """Word-level tokenizer with Llama 3's special tokens (BOS ``<|begin_of_text|>``, EOS ``<|eot_id|>``, pad
    ``<|finetune_right_pad_id|>``) and ``<|image|>``; no BOS added by the tokenizer (the chat template writes it)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>", unk_token="<unk>",
    )
    tok.add_special_tokens({"additional_special_tokens": [s for s in SPECIALS if s.startswith("<|")]})
    return tok


def tiny_mllama(tile: int = 16, patch: int = 8, max_tiles: int = 4, text_layers: int = 3,
                cross_attention_layers=(1,), dtype: torch.dtype = torch.float64, seed: int = 0,
                chat_template: bool = True, **image_kwargs):
    """``(MllamaForConditionalGeneration, MllamaProcessor)``: vision 16-px tiles of 2×2 8-px patches (+ CLS), one
    local and one global vision layer, a 3-layer text model whose layer 1 is a gated cross-attention layer;
    eval mode, eager attention."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = llama3_tokenizer()
    ids = {k: tok.convert_tokens_to_ids(getattr(tok, k.replace("_id", ""))) for k in
           ("bos_token_id", "eos_token_id", "pad_token_id")}
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_global_layers=1, attention_heads=2, intermediate_size=64,
            image_size=tile, patch_size=patch, max_num_tiles=max_tiles, intermediate_layers_indices=[0],
            vision_output_dim=64,
        ),
        text_config=dict(
            vocab_size=len(tok), hidden_size=32, num_hidden_layers=text_layers, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
            cross_attention_layers=list(cross_attention_layers), **ids,
        ),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    for cfg in (config, config.vision_config, config.text_config):
        cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    with torch.no_grad():
        # transformers starts the cross-attention gates at 0 (tanh(0): the image is shut out until trained).
        for layer in model.model.language_model.layers:
            for name in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, name):
                    getattr(layer, name).fill_(1.0)
    model = model.to(dtype).eval()
    image_processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=max_tiles,
                                              **image_kwargs)
    processor = MllamaProcessor(image_processor, tok, chat_template=CHAT_TEMPLATE if chat_template else None)
    return model, processor


def tiny_image(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """A random uint8 RGB image; 24×40 is resized to 19×32 and padded to a 2×2-tile canvas (32×32)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


__all__ = ["llama3_tokenizer", "tiny_image", "tiny_mllama"]
