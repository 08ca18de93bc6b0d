"""Tiny real BLIP-2 and InstructBLIP models and processors for tests, built offline.

Real transformers classes (``Blip2ForConditionalGeneration`` with an OPT language model, ``InstructBlipForConditional
Generation`` with a Llama/Vicuna one, optionally Flan-T5), minute sizes, random seeded weights; the real processors
(``Blip2Processor``, ``InstructBlipProcessor``) around ``BlipImageProcessorPil`` and word-level tokenizers built in
memory with each family's special tokens (OPT's ``</s>`` BOS, Llama's ``<s>``, BERT's ``[CLS]``/``[SEP]`` for the
Q-Former's instruction tokenizer), and a chat template in the family's prompt format.

Example:
    >>> model, processor = tiny_blip2()
    >>> batch = processor(images=tiny_image(), text="Question: what color ? Answer:", return_tensors="pt")
    >>> int((batch["input_ids"] == model.config.image_token_id).sum()) == model.config.num_query_tokens
    True
"""

from __future__ import annotations

import numpy as np
import torch

WORDS = (
    "Question Answer what color shape is the object in this image picture describe there are a an and of on at "
    "left right top bottom red green blue yellow circle square triangle cat dog small large one two yes no ? , . :"
).split()

# BLIP-2's checkpoints are prompted "Question: {q} Answer:" (the processor puts the image tokens in front itself).
BLIP2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "Question: {{ item['text'] }} Answer:{% endif %}{% endfor %}{% endfor %}"
)
# InstructBLIP passes the instruction as is, to the LLM and (tokenized by its own tokenizer) to the Q-Former.
INSTRUCTBLIP_CHAT_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def _word_tokenizer(specials: list[str], template: str, **special_kwargs):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="removed", invert=True)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=special_kwargs["unk_token"]))
    tk.pre_tokenizer = pre
    used = [s for s in specials if s in template]
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(s, vocab[s]) for s in used])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **special_kwargs)


def opt_tokenizer():
    """OPT's special tokens (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2 = BOS and EOS, ``<unk>`` 3), ``</s>`` prepended like
    OPT's tokenizer, and BLIP-2's ``<image>`` token."""
    return _word_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>", "<image>"], "</s> $A",
        bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def llama_tokenizer():
    """Vicuna/Llama's special tokens (``<unk>`` 0, ``<s>`` 1 = BOS, ``</s>`` 2), ``<s>`` prepended, ``<image>``."""
    return _word_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"], "<s> $A",
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def bert_tokenizer():
    """The Q-Former's instruction tokenizer (BERT's specials: ``[PAD]`` 0, ``[CLS] ... [SEP]`` around the text)."""
    return _word_tokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]",
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )


def _vision_qformer_configs(family: str, image_size: int, patch_size: int, qformer_layers: int,
                            cross_attention_frequency: int, vision_layers: int, qformer_vocab: int | None):
    if family == "blip2":
        from transformers import Blip2QFormerConfig as QConfig
        from transformers import Blip2VisionConfig as VConfig
    else:
        from transformers import InstructBlipQFormerConfig as QConfig
        from transformers import InstructBlipVisionConfig as VConfig
    vision = VConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=2,
        image_size=image_size, patch_size=patch_size, initializer_range=0.02,
    )
    qkw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=qformer_layers, num_attention_heads=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=32, max_position_embeddings=64,
    )
    if qformer_vocab is not None:
        qkw["vocab_size"] = qformer_vocab
    return vision, QConfig(**qkw)


def _text_config(text: str, tokenizer):
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name.replace("_id", "")))
           for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if text == "opt":
        from transformers import OPTConfig

        return OPTConfig(vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, num_hidden_layers=2,
                         ffn_dim=64, num_attention_heads=2, max_position_embeddings=128, dropout=0.0, **ids)
    if text == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, **ids)
    if text == "t5":
        from transformers import T5Config

        return T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                        dropout_rate=0.0, decoder_start_token_id=ids["pad_token_id"], **ids)
    raise ValueError(f"text must be 'opt', 'llama' or 't5', got {text!r}")


def _finish(model_cls, config, dtype, seed):
    config._attn_implementation = "eager"
    for sub in ("vision_config", "qformer_config", "text_config"):
        getattr(config, sub)._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        # transformers initializes the queries to zeros (checkpoints overwrite them): identical queries would make
        # every query's map the same.
        model.query_tokens.normal_(0.0, 1.0)
    return model.to(dtype).eval()


def image_processor(image_size: int = 32, **kwargs):
    """BLIP's PIL image processor resizing to ``image_size`` (no aspect kept: the box is the whole image)."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size}, **kwargs)


def tiny_blip2(text: str = "opt", qformer_layers: int = 2, cross_attention_frequency: int = 1,
               num_query_tokens: int = 4, image_size: int = 32, patch_size: int = 8, vision_layers: int = 2,
               dtype: torch.dtype = torch.float64, seed: int = 0, chat_template: bool = True, **image_kwargs):
    """``(Blip2ForConditionalGeneration, Blip2Processor)``: BLIP vision 32 px / 8 px patches (4×4 grid + CLS),
    Q-Former with ``num_query_tokens`` queries, OPT (or ``text="t5"``) language model; eval mode, eager attention."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    tok = opt_tokenizer() if text == "opt" else llama_tokenizer()
    vision, qformer = _vision_qformer_configs("blip2", image_size, patch_size, qformer_layers,
                                              cross_attention_frequency, vision_layers, None)
    config = Blip2Config(
        vision_config=vision, qformer_config=qformer, text_config=_text_config(text, tok),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = _finish(Blip2ForConditionalGeneration, config, dtype, seed)
    processor = Blip2Processor(image_processor(image_size, **image_kwargs), tok, num_query_tokens=num_query_tokens)
    if chat_template:
        processor.chat_template = BLIP2_CHAT_TEMPLATE
    return model, processor


def tiny_instructblip(text: str = "llama", qformer_layers: int = 3, cross_attention_frequency: int = 1,
                      num_query_tokens: int = 4, image_size: int = 32, patch_size: int = 8, vision_layers: int = 2,
                      dtype: torch.dtype = torch.float64, seed: int = 0, chat_template: bool = True, **image_kwargs):
    """``(InstructBlipForConditionalGeneration, InstructBlipProcessor)``: as :func:`tiny_blip2` with a Vicuna-style
    Llama language model and a Q-Former that reads the instruction (BERT-style word tokenizer)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    tok = llama_tokenizer() if text == "llama" else opt_tokenizer()
    qtok = bert_tokenizer()
    vision, qformer = _vision_qformer_configs("instructblip", image_size, patch_size, qformer_layers,
                                              cross_attention_frequency, vision_layers, len(qtok))
    config = InstructBlipConfig(
        vision_config=vision, qformer_config=qformer, text_config=_text_config(text, tok),
        num_query_tokens=num_query_tokens, image_token_index=tok.convert_tokens_to_ids("<image>"),
    )
    model = _finish(InstructBlipForConditionalGeneration, config, dtype, seed)
    processor = InstructBlipProcessor(image_processor(image_size, **image_kwargs), tok, qtok,
                                      num_query_tokens=num_query_tokens)
    if chat_template:
        processor.chat_template = INSTRUCTBLIP_CHAT_TEMPLATE
    return model, processor


def tiny_image(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """A random uint8 RGB image (non-square: BLIP's resize stretches it)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


__all__ = ["bert_tokenizer", "image_processor", "llama_tokenizer", "opt_tokenizer", "tiny_blip2", "tiny_image",
           "tiny_instructblip"]
