"""LLaVA's chat templates (``plain`` for projector pretraining, ``vicuna_v1`` for LLaVA-1.5 chat), as exact strings.

``render_prompt`` builds the inference prompt; ``render_training_example`` tokenizes a LLaVA-format conversation
(``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]``) and masks the labels to the
assistant turns (IGNORE_INDEX = -100 elsewhere), like LLaVA's ``preprocess_plain`` / ``preprocess_v1``.

Masking is done on character spans of the full rendered string (tokenizer offsets), so the input ids are exactly the
tokenization of the string the model sees at inference, for any fast tokenizer.

Example:
    >>> from deco_models.conversation import render_prompt
    >>> render_prompt("What is this?", "vicuna_v1").endswith("questions. USER: <image>\\nWhat is this? ASSISTANT:")
    True
    >>> render_prompt("", "plain")
    '<image>'
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class ChatTemplate:
    """A LLaVA ``Conversation`` reduced to what rendering needs (``sep_style`` TWO or PLAIN)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str | None
    style: str  # "two" (USER:/ASSISTANT: turns) or "plain" (image + caption)


TEMPLATES = {
    "vicuna_v1": ChatTemplate("vicuna_v1", VICUNA_V1_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", "two"),
    "plain": ChatTemplate("plain", "", ("", ""), "\n", None, "plain"),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    """Look a template up by name (``plain``, ``vicuna_v1``)."""
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def _with_image_first(text: str, image_token: str) -> str:
    # LLaVA's preprocess_multimodal: the image placeholder is moved to the front, followed by a newline.
    rest = text.replace(image_token, "").strip()
    return f"{image_token}\n{rest}".strip()


def render_prompt(question: str, template: str = "vicuna_v1", image: bool = True, image_token: str = "<image>") -> str:
    """The inference prompt for one question, exactly as LLaVA's ``conv.get_prompt()`` builds it.

    ``vicuna_v1``: ``"<system> USER: <image>\\n{question} ASSISTANT:"`` (``image=False`` leaves out the image).
    ``plain``: ``"<image>"`` for an empty question (LLaVA pretraining: the caption follows the image directly),
    else ``"<image>\\n{question}\\n"``.

    Example:
        >>> render_prompt("Describe.", "vicuna_v1", image=False).endswith("questions. USER: Describe. ASSISTANT:")
        True
    """
    tpl = get_template(template)
    if image and image_token not in question:
        question = f"{image_token}\n{question}" if question else image_token
    if tpl.style == "plain":
        if not image and not question:
            raise ValueError("the plain template needs an image or a question")
        if question in (image_token, ""):
            return question
        return question + tpl.sep
    return f"{tpl.system}{tpl.sep}{tpl.roles[0]}: {question}{tpl.sep}{tpl.roles[1]}:"


def _normalize_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list of {'from': 'human'|'gpt', 'value': str} dicts")
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"conversations[{i}] must be a dict with 'from' and 'value', got {turn!r}")
        role = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}.get(turn["from"])
        if role is None:
            raise ValueError(f"conversations[{i}]['from'] must be 'human' or 'gpt', got {turn['from']!r}")
        turns.append((role, str(turn["value"])))
    # LLaVA skips a leading non-human turn.
    if turns[0][0] != "human":
        turns = turns[1:]
    for i, (role, _) in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turns must alternate human/gpt starting with human; turn {i} is {role!r}")
    return turns


def render_conversation(
    conversations: list[dict], template: str = "vicuna_v1", eos_token: str = "</s>", image_token: str = "<image>"
) -> tuple[str, list[tuple[int, int]]]:
    """Render a full LLaVA-format conversation; returns ``(text, target_spans)``.

    ``target_spans`` are the character ranges ``[start, end)`` the model is trained on: each assistant answer plus
    the separator that ends it (``eos_token`` for vicuna_v1, ``"\\n"`` for plain), as in LLaVA.

    Example:
        >>> text, spans = render_conversation(
        ...     [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a red circle"}], "plain")
        >>> text, [text[s:e] for s, e in spans]
        ('<image>a red circle\\n', ['a red circle\\n'])
    """
    tpl = get_template(template)
    turns = _normalize_turns(conversations)
    if tpl.style == "plain":
        # LLaVA's preprocess_plain: exactly one (image, caption) pair; the human text is replaced by the image.
        if len(turns) != 2 or image_token not in turns[0][1]:
            raise ValueError(
                f"the plain template takes one human turn containing {image_token!r} and one gpt turn (a caption), "
                f"got {len(turns)} turns"
            )
        text = image_token
        start = len(text)
        text += turns[1][1] + tpl.sep
        return text, [(start, len(text))]

    text = tpl.system + tpl.sep
    spans = []
    for role, value in turns:
        if role == "human":
            if image_token in value:
                value = _with_image_first(value, image_token)
            text += f"{tpl.roles[0]}: {value}{tpl.sep}"
        else:
            text += f"{tpl.roles[1]}: "
            start = len(text)
            text += value + eos_token
            spans.append((start, len(text)))
    if turns[-1][0] == "human":
        text += f"{tpl.roles[1]}:"
    return text, spans


def render_training_example(
    conversations: list[dict],
    template: str,
    tokenizer,
    num_image_tokens: int = 1,
    image_token: str = "<image>",
    max_length: int | None = None,
) -> dict:
    """Tokenize a LLaVA-format conversation with labels masked to the assistant turns.

    Each ``<image>`` is expanded to ``num_image_tokens`` image tokens (the projector's M). Returns
    ``{"input_ids": list[int], "labels": list[int]}``; labels are -100 outside the assistant answers (system prompt,
    user turns, ``ASSISTANT: `` prefixes, BOS, image tokens). Text-only conversations work the same way.
    ``max_length`` truncates both (from the right), as LLaVA does with ``model_max_length``.

    Example:
        >>> from tests.tiny import tiny_tokenizer
        >>> tok = tiny_tokenizer()
        >>> ex = render_training_example([{"from": "human", "value": "<image>\\nwhat color ?"},
        ...                               {"from": "gpt", "value": "red"}], "vicuna_v1", tok, num_image_tokens=2)
        >>> tok.convert_ids_to_tokens([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
        ['red', '</s>']
    """
    if num_image_tokens < 1:
        raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    eos = getattr(tokenizer, "eos_token", None) or "</s>"
    text, spans = render_conversation(conversations, template, eos_token=eos, image_token=image_token)
    if image_token in text and num_image_tokens > 1:
        # Expand each placeholder to M image tokens; a span start/end after k placeholders moves by k * extra chars.
        hits, pos = [], 0
        while (hit := text.find(image_token, pos)) != -1:
            hits.append(hit)
            pos = hit + len(image_token)
        extra = len(image_token) * (num_image_tokens - 1)
        spans = [(s + extra * sum(h < s for h in hits), e + extra * sum(h < e for h in hits)) for s, e in spans]
        text = text.replace(image_token, image_token * num_image_tokens)
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    input_ids = list(encoded["input_ids"])
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"]):
        # SentencePiece-style tokens ("▁Red") include the space before them in their offsets; that space belongs
        # to the prompt ("ASSISTANT: "), so compare the token's visible characters only.
        while start < end and text[start].isspace() and not text[start:end].isspace():
            start += 1
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


__all__ = [
    "IGNORE_INDEX",
    "TEMPLATES",
    "VICUNA_V1_SYSTEM",
    "ChatTemplate",
    "get_template",
    "render_conversation",
    "render_prompt",
    "render_training_example",
]
