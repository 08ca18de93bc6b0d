"""Tiny real models for tests: real transformers classes (CLIP/SigLIP/ViT vision, Llama/Qwen2 text, Llava) with
minute sizes, and a real word-level tokenizer built in memory. No hub access, no mocks.

Typical use:
    >>> from tests.tiny import tiny_deco_model, tiny_processor
    >>> model = tiny_deco_model("avgpool2_4")          # CLIP 32px/8px patches (4x4 grid) + Llama, M = 4
    >>> processor = tiny_processor(model)
    >>> inputs = processor(text=processor.render_prompt("what color"), images=tiny_image())
    >>> model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]
    True
"""

from __future__ import annotations

import numpy as np
import torch

# Words the tiny tokenizer always knows: LLaVA's vicuna_v1 system prompt and roles, plus a small shapes vocabulary.
_BASE_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. USER: ASSISTANT: "
    "what color shape is the object in this image picture describe there are a an and of on at left right middle "
    "top bottom red green blue yellow circle square triangle small large one two three yes no ? , . !"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # Words, punctuation runs and newlines are tokens (LLaVA's plain template ends captions with "\n").
    return pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), behavior="removed", invert=True)


def tiny_tokenizer(words: list[str] | str | None = None):
    """A real fast tokenizer (word-level, ``tokenizers`` library): special tokens ``<unk> <s> </s> <pad> <image>``
    (ids 0-4), BOS added like Llama's, the vicuna_v1 prompt words, shapes words and ``words`` (list or text).

    Example:
        >>> tok = tiny_tokenizer(["zebra"])
        >>> tok.convert_ids_to_tokens(tok("a zebra <image>")["input_ids"])
        ['<s>', 'a', 'zebra', '<image>']
    """
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    pre = _pre_tokenizer()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    extra = " ".join(words) if isinstance(words, list | tuple) else (words or "")
    for piece, _ in pre.pre_tokenize_str(_BASE_TEXT + "\n" + extra):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def tiny_vision_config(kind: str = "clip", image_size=32, patch_size=8, hidden_size: int = 32, num_layers: int = 2):
    """CLIP (``clip``, with CLS), SigLIP (``siglip``, no CLS) or ViT (``vit``, CLS; accepts a tuple image_size for
    rectangular patch grids) vision config, 2 heads."""
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
    )
    if kind == "clip":
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**common, projection_dim=hidden_size)
    if kind == "siglip":
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(**common)
    if kind == "vit":
        from transformers import ViTConfig

        return ViTConfig(**common)
    raise ValueError(f"vision kind must be 'clip', 'siglip' or 'vit', got {kind!r}")


def tiny_text_config(kind: str = "llama", vocab_size: int | None = None, hidden_size: int = 32, num_layers: int = 2):
    """Llama or Qwen2 text config, 2 heads (GQA-free), vocab = the tiny tokenizer's size by default."""
    vocab_size = vocab_size or len(tiny_tokenizer())
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    if kind == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if kind == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    raise ValueError(f"text kind must be 'llama' or 'qwen2', got {kind!r}")


def tiny_deco_config(
    projector: str = "mlp2x_gelu",
    vision: str = "clip",
    text: str = "llama",
    image_size=32,
    patch_size=8,
    tokenizer=None,
    attn_implementation: str | None = "eager",
    **kwargs,
):
    """A DecoConfig with tiny vision/text configs; image token = the tiny tokenizer's ``<image>``."""
    from deco_models.configuration import DecoConfig

    tokenizer = tokenizer or tiny_tokenizer()
    config = DecoConfig(
        vision_config=tiny_vision_config(vision, image_size=image_size, patch_size=patch_size),
        text_config=tiny_text_config(text, vocab_size=len(tokenizer)),
        projector_type=projector,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        **kwargs,
    )
    if attn_implementation:
        config._attn_implementation = attn_implementation
        config.vision_config._attn_implementation = attn_implementation
        config.text_config._attn_implementation = attn_implementation
    return config


def tiny_deco_model(
    projector: str = "mlp2x_gelu",
    vision: str = "clip",
    text: str = "llama",
    image_size=32,
    patch_size=8,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **kwargs,
):
    """A randomly initialised (seeded) DecoForConditionalGeneration in eval mode, eager attention.

    Example:
        >>> tiny_deco_model("avgpool2_4").config.num_image_tokens
        4
    """
    from deco_models.modeling import DecoForConditionalGeneration

    config = tiny_deco_config(projector, vision, text, image_size=image_size, patch_size=patch_size, **kwargs)
    torch.manual_seed(seed)
    return DecoForConditionalGeneration(config).to(dtype).eval()


def tiny_image_processor(kind: str = "clip", image_size=32):
    """The PIL-backend CLIP or SigLIP image processor for ``image_size`` (int or (h, w))."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if kind == "siglip":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        return SiglipImageProcessorPil(size={"height": h, "width": w})
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": min(h, w)}, crop_size={"height": h, "width": w})


def tiny_processor(model=None, image_aspect: str = "pad", chat_template: str = "vicuna_v1", tokenizer=None):
    """A DecoProcessor matching ``model`` (its M, image size and backbone kind); the tiny tokenizer by default."""
    from deco_models.processing import DecoProcessor

    config = model.config if model is not None else tiny_deco_config()
    kind = "siglip" if config.vision_config.model_type.startswith("siglip") else "clip"
    return DecoProcessor(
        tiny_image_processor(kind, config.vision_config.image_size),
        tokenizer or tiny_tokenizer(),
        num_image_tokens=config.num_image_tokens,
        image_aspect=image_aspect,
        chat_template=chat_template,
    )


def tiny_llava_hf_model(seed: int = 0, image_size: int = 32, patch_size: int = 8):
    """A stock transformers LlavaForConditionalGeneration (CLIP + Llama, llava-hf layout), eval mode, eager."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny_tokenizer()
    config = LlavaConfig(
        vision_config=tiny_vision_config("clip", image_size=image_size, patch_size=patch_size),
        text_config=tiny_text_config("llama", vocab_size=len(tokenizer)),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_image(height: int = 24, width: int = 40, seed: int = 0) -> np.ndarray:
    """A random uint8 RGB image (non-square by default, so padding matters)."""
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def tiny_inputs(model, processor=None, question: str = "what color is the object ?", image=None):
    """Processor outputs for one image + a vicuna_v1 prompt (``model(**inputs)`` ready)."""
    processor = processor or tiny_processor(model)
    image = tiny_image() if image is None else image
    return processor(text=processor.render_prompt(question), images=image)


__all__ = [
    "tiny_deco_config",
    "tiny_deco_model",
    "tiny_image",
    "tiny_image_processor",
    "tiny_inputs",
    "tiny_llava_hf_model",
    "tiny_processor",
    "tiny_text_config",
    "tiny_tokenizer",
    "tiny_vision_config",
]
