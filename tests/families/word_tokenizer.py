"""A real word-level fast tokenizer built in memory with a family's special tokens (like
:func:`tests.tiny.tiny_tokenizer`, which has LLaVA's only), for the family tests of InternVL, Idefics3/SmolVLM,
Aya Vision and Mistral3.

Example:
    >>> tok = word_tokenizer(["<s>", "<pad>", "<img>"], named={"start_image_token": "<img>"}, bos="<s>")  # <unk> is 0
    >>> tok.convert_ids_to_tokens(tok("a red <img> circle")["input_ids"]), tok.start_image_token_id
    (['<s>', 'a', 'red', '<img>', 'circle'], 3)
"""

from __future__ import annotations

from tests.tiny import _BASE_TEXT, _pre_tokenizer


def word_tokenizer(special_tokens, named: dict[str, str] | None = None, words: str = "", bos: str | None = None,
                   eos: str | None = None, pad: str | None = None, unk: str = "<unk>",
                   chat_template: str | None = None):
    """``special_tokens`` (ids from 0, in order; ``unk`` is added first when missing) are matched whole, before the
    word split; ``named`` become tokenizer attributes (``tok.<name>`` and ``tok.<name>_id``, transformers'
    ``extra_special_tokens``); ``bos`` is prepended to every encoding when given. The vocabulary holds the shapes
    words of :mod:`tests.tiny` and ``words``."""
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    specials = [unk, *[t for t in special_tokens if t != unk]]
    vocab = {tok: i for i, tok in enumerate(specials)}
    pre = _pre_tokenizer()
    for piece, _ in pre.pre_tokenize_str(_BASE_TEXT + "\n" + words):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    kwargs = {k: v for k, v in {"bos_token": bos, "eos_token": eos, "pad_token": pad}.items() if v is not None}
    named = dict(named or {})
    # Every special token is matched whole (added tokens), also those without a name of their own.
    extra = [t for t in specials if t not in (unk, bos, eos, pad) and t not in named.values()]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, extra_special_tokens=named, **kwargs)
    if extra:
        tokenizer.add_tokens(extra, special_tokens=True)  # already in the vocabulary: their ids stay
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
