"""Shared input handling for every explainer: image loading, the prompt, the target (given or generated), the
teacher-forced inputs, token probabilities, and packing the result into an :class:`~rgae.explanation.Explanation`.

Teacher forcing: the prompt (with the processor's image tokens) and the target tokens are concatenated into one
sequence; target token t sits at ``target_positions[t]`` and is predicted by the logits at ``target_positions[t] - 1``.
A causal LLM's rows up to a position do not depend on later tokens, so one forward over the whole sequence gives what
step-by-step generation of the same target would give (tests/test_reference.py checks this).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from rgae.adapters import ModelAdapter, get_adapter
from rgae.explanation import Explanation
from rgae.images import load_pil_image
from rgae.layout import ImageLayout

DEFAULT_INSTRUCTION = "Describe the image in one sentence."


class InputError(ValueError):
    """What was passed to ``attribute`` (image, prompt, target) cannot be explained: a ``ValueError`` that says
    what was expected. Command lines print it as a one-line usage error; other ValueErrors are bugs."""


def load_image(image):
    """A PIL RGB image from a path, a PIL image or an array, in any mode (one image: batches are refused).

    Conversion is :func:`rgae.images.load_pil_image`'s: grayscale replicated, alpha composited on white, 16-bit
    scaled (not clipped), floats read as [0, 1]; what cannot be read raises :class:`InputError`.

    Example:
        >>> import numpy as np
        >>> load_image(np.zeros((4, 5), dtype=np.uint16)).size, load_image(np.zeros((4, 5), dtype=np.uint16)).mode
        ((5, 4), 'RGB')
    """
    try:
        return load_pil_image(image)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(str(exc)) from None


def unknown_words(tokenizer, text: str, ids=None) -> list[str]:
    """The words of ``text`` that ``tokenizer`` maps (in part) to its unknown token, in order, each once.

    Example:
        >>> from tests.tiny import tiny_tokenizer
        >>> unknown_words(tiny_tokenizer(["a", "red", "circle"]), "a red kangaroo")
        ['kangaroo']
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return []
    if ids is not None and unk not in list(ids):
        return []  # the common case: one look at the ids, no per-word tokenization
    found: list[str] = []
    for word in text.split():
        if word not in found and unk in tokenizer(word, add_special_tokens=False)["input_ids"]:
            found.append(word)
    return found


def tokenizer_of(processor):
    return getattr(processor, "tokenizer", processor)


def build_prompt(processor, prompt: str | None, template: str | None = None, n_images: int = 1) -> str:
    """The rendered prompt: ``prompt`` as is when it already holds the image token, else the chat template around
    the instruction; a processor without one gets ``template`` (``{image}``/``{instruction}`` fields: the adapter's
    ``prompt_template``) or, without that, a plain ``USER: <image>\\n... ASSISTANT:`` template. ``n_images``: the
    images the prompt shows, in order (a given prompt must hold that many image tokens when there are several)."""
    image_token = str(getattr(processor, "image_token", None) or "<image>")  # BLIP-2 keeps an AddedToken
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"prompt must be a non-empty string or None, got {prompt!r}")
        if image_token in prompt:
            if n_images > 1 and prompt.count(image_token) != n_images:
                raise InputError(f"the prompt holds {prompt.count(image_token)} image token(s) {image_token!r} for "
                                 f"{n_images} images")
            return prompt
    instruction = prompt or DEFAULT_INSTRUCTION
    if callable(getattr(processor, "render_prompt", None)) and n_images == 1:  # deco_models.DecoProcessor
        return processor.render_prompt(instruction)
    if getattr(processor, "chat_template", None) and callable(getattr(processor, "apply_chat_template", None)):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": instruction}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = "\n".join([image_token] * n_images)
    if template is not None:
        return template.format(image=images, instruction=instruction)
    return f"USER: {images}\n{instruction} ASSISTANT:"


@dataclass
class PreparedInputs:
    """Everything one teacher-forced forward needs, plus what the Explanation records."""

    input_ids: torch.Tensor  # [1, S] prompt + target
    pixel_values: torch.Tensor
    prompt_len: int
    target_ids: torch.Tensor  # [T]
    target_text: str
    prompt: str
    layout: ImageLayout  # where the image tokens are and which patches / pixels they come from
    image: np.ndarray  # uint8 [H, W, 3]: the original image
    word_ids: list[int] | None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # other model inputs (image_sizes, ...)
    target_values: dict[str, int] = field(default_factory=dict)  # per-token inputs' value over the target (else 0)
    unknown_words: list[str] = field(default_factory=list)  # target words the tokenizer maps to its unknown token

    @property
    def image_positions(self) -> torch.Tensor:
        """``[M]`` sequence positions of the image's tokens (on the inputs' device)."""
        return self.layout.positions.to(self.input_ids.device)

    @property
    def target_positions(self) -> torch.Tensor:
        t = self.target_ids.numel()
        return torch.arange(self.prompt_len, self.prompt_len + t, device=self.input_ids.device)

    @property
    def predicting_positions(self) -> torch.Tensor:
        return self.target_positions - 1

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the teacher-forced forward. Per-token processor outputs (``token_type_ids``,
        ``mm_token_type_ids``: shaped like the prompt's ids) are extended over the target with 0, the value of text,
        or with ``target_values[name]`` (the adapter's ``target_token_values``); per-token outputs with more axes
        (Mllama's ``cross_attention_mask [1, S, images, tiles]``: what each token sees) repeat the prompt's last row,
        as ``generate`` extends them."""
        total = self.input_ids.shape[1]
        extra = {}
        for key, value in self.extra.items():
            if value.ndim >= 2 and value.shape[:2] == (1, self.prompt_len) and total > self.prompt_len:
                if value.ndim == 2:
                    pad = torch.full((1, total - self.prompt_len), self.target_values.get(key, 0), dtype=value.dtype,
                                     device=value.device)
                else:
                    pad = value[:, -1:].expand(1, total - self.prompt_len, *value.shape[2:])
                value = torch.cat([value, pad], dim=1)
            extra[key] = value
        return {
            "input_ids": self.input_ids,
            "pixel_values": self.pixel_values,
            "attention_mask": torch.ones_like(self.input_ids),
            **extra,
        }


class Explainer:
    """Base of the explainers: holds the model, its processor and adapter; prepares teacher-forced inputs.

    Subclasses implement :meth:`_attribute` and set :attr:`method`.
    """

    method = "base"

    def __init__(self, model, processor, adapter: ModelAdapter | None = None, model_name: str | None = None):
        self.model = model
        self.processor = processor
        self.adapter = adapter if adapter is not None else get_adapter(model)
        self.model_name = model_name or getattr(getattr(model, "config", None), "_name_or_path", None) or None

    # ---- inputs ----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.model.parameters() if p.is_floating_point()).dtype

    def encode_prompt(self, image, prompt: str | None):
        """``(rendered prompt, prompt ids [1, S], model inputs, layout, original image)`` for one image."""
        text, input_ids, inputs, layouts, images = self.encode_images([image], prompt)
        return text, input_ids, inputs, layouts[0], images[0]

    def encode_images(self, images, prompt: str | None):
        """``(rendered prompt, prompt ids [1, S], model inputs, [layout per image], [original image per image])``
        for one prompt showing ``images`` in order (several only for families whose adapter lays out several images
        of a prompt, :meth:`~rgae.adapters.ModelAdapter.image_layouts`)."""
        pils = [load_image(image) for image in images]
        if not pils:
            raise InputError("no image to explain")
        text = build_prompt(self.processor, prompt, self.adapter.prompt_template, n_images=len(pils))
        batch, inputs = self.process(pils[0] if len(pils) == 1 else pils, text)
        input_ids = batch["input_ids"]
        if input_ids.shape[0] != 1:
            raise ValueError(f"explain one example at a time (batch size 1); the processor gave {input_ids.shape[0]}")
        layouts = self.adapter.image_layouts(self.processor, batch, [(p.height, p.width) for p in pils])
        return text, input_ids.to(self.device), inputs, layouts, [np.array(p, dtype=np.uint8) for p in pils]

    def process(self, pil, text: str) -> tuple:
        """``(the processor's output, the model inputs it gives on the model's device and dtype)`` for one PIL image
        (or a list of them) and a rendered prompt."""
        try:
            batch = self.processor(images=pil, text=text, return_tensors="pt")
        except TypeError:
            batch = self.processor(text=text, images=pil, return_tensors="pt")
        inputs = {}
        for key, value in self.adapter.model_inputs(batch).items():
            value = value.to(self.device)
            inputs[key] = value.to(self.dtype) if value.is_floating_point() else value
        return batch, inputs

    def tokenize_target(self, target: str) -> tuple[torch.Tensor, list[int] | None]:
        if not isinstance(target, str):
            raise InputError(f"target must be a string (or None to explain the model's own answer), got {target!r}")
        if not target.strip():
            raise InputError("target is empty: give the text to explain, or target=None to explain the model's answer")
        tok = tokenizer_of(self.processor)
        enc = tok(target, add_special_tokens=False)
        ids = list(enc["input_ids"])
        if not ids:
            raise InputError(f"target {target!r} tokenizes to no tokens")
        word_ids = None
        try:
            wids = enc.word_ids()
            if wids and all(w is not None for w in wids):
                # Renumber from 0 in order of appearance.
                mapping: dict[int, int] = {}
                word_ids = [mapping.setdefault(w, len(mapping)) for w in wids]
        except (AttributeError, ValueError, TypeError):
            word_ids = None
        return torch.tensor(ids, dtype=torch.long), word_ids

    @torch.no_grad()
    def generate_target(self, input_ids, pixel_values, extra, max_new_tokens: int) -> torch.Tensor:
        """Greedy answer of the model (without the trailing end-of-sequence token)."""
        out = self.model.generate(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **extra,
        )
        new = out[0, input_ids.shape[1] :].cpu()
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        pad = self.model.generation_config.pad_token_id
        if pad is not None:
            eos_ids.add(pad)
        keep = []
        for t in new.tolist():
            if t in eos_ids:
                break
            keep.append(t)
        if not keep:
            raise InputError("the model generated no tokens to explain (it ended at once); pass target= explicitly")
        return torch.tensor(keep, dtype=torch.long)

    def prepare(self, image, target: str | None, prompt: str | None, max_new_tokens: int = 32) -> PreparedInputs:
        return self.prepare_images([image], target, prompt, max_new_tokens)[0]

    def prepare_images(self, images, target: str | None, prompt: str | None,
                       max_new_tokens: int = 32) -> list[PreparedInputs]:
        """One :class:`PreparedInputs` per image of a prompt that shows ``images``: the same teacher-forced
        sequence (and generated target), each with its own image's layout and original image."""
        text, prompt_ids, model_inputs, layouts, images_np = self.encode_images(images, prompt)
        pixel_values = model_inputs.pop("pixel_values")
        extra = model_inputs
        tok = tokenizer_of(self.processor)
        if target is None:
            target_ids = self.generate_target(prompt_ids, pixel_values, extra, max_new_tokens)
            target_text = tok.decode(target_ids.tolist(), skip_special_tokens=True)
            word_ids = None
            unknown = []
        else:
            target_ids, word_ids = self.tokenize_target(target)
            target_text = target
            unknown = unknown_words(tok, target, target_ids.tolist())
            if unknown:
                warnings.warn(
                    f"target word(s) {', '.join(repr(w) for w in unknown)} are not in the tokenizer's vocabulary: "
                    f"they become the unknown token {getattr(tok, 'unk_token', None)!r}, so their maps explain that "
                    "token, not the word (Explanation.options['unknown_words'] records them)",
                    UserWarning,
                    stacklevel=4,  # the caller of attribute() (attribute -> prepare -> prepare_images)
                )
        limit = self.adapter.max_positions
        total = prompt_ids.shape[1] + target_ids.numel()
        if limit is not None and total > limit:
            raise InputError(
                f"prompt ({prompt_ids.shape[1]} tokens) + target ({target_ids.numel()} tokens) = {total} tokens is "
                f"longer than the model's context (max_position_embeddings = {limit})"
            )
        input_ids = torch.cat([prompt_ids, target_ids.view(1, -1).to(prompt_ids.device)], dim=1)
        return [
            PreparedInputs(
                input_ids=input_ids,
                pixel_values=pixel_values,
                prompt_len=prompt_ids.shape[1],
                target_ids=target_ids.to(self.device),
                target_text=target_text,
                prompt=text,
                layout=layout,
                image=image_np,
                word_ids=word_ids,
                extra=extra,
                target_values=dict(self.adapter.target_token_values),
                unknown_words=unknown,
            )
            for layout, image_np in zip(layouts, images_np)
        ]

    # ---- outputs ---------------------------------------------------------------------------------------------
    def forward(self, inputs: PreparedInputs, keep_logits: bool = True):
        """The teacher-forced forward; logits are kept only for the last ``T + 1`` positions (the lm_head over the
        whole prompt is wasted work). Returns ``(logits [1, T + 1, V], offset)`` with ``offset`` the sequence position
        of ``logits[:, 0]``."""
        keep = inputs.target_ids.numel() + 1
        out = self.model(**inputs.model_kwargs(), use_cache=False, logits_to_keep=keep if keep_logits else 0)
        logits = out.logits
        return logits, inputs.input_ids.shape[1] - logits.shape[1]

    @staticmethod
    def target_logits(logits: torch.Tensor, inputs: PreparedInputs, offset: int = 0) -> torch.Tensor:
        """``[T]`` raw logits of the target tokens at their predicting positions (with graph)."""
        return logits[0, inputs.predicting_positions - offset, inputs.target_ids]

    @staticmethod
    def token_probs(logits: torch.Tensor, inputs: PreparedInputs, offset: int = 0) -> torch.Tensor:
        rows = logits[0, inputs.predicting_positions - offset].detach().float()
        return rows.softmax(-1).gather(-1, inputs.target_ids.view(-1, 1)).squeeze(-1).cpu()

    def pack(
        self,
        inputs: PreparedInputs,
        text_to_patch: torch.Tensor,
        token_probs: torch.Tensor | None,
        text_to_query: torch.Tensor | None = None,
        query_to_patch: torch.Tensor | None = None,
        options: dict | None = None,
    ) -> Explanation:
        tok = tokenizer_of(self.processor)
        ids = inputs.target_ids.tolist()
        tokens = tok.convert_ids_to_tokens(ids)
        layout = inputs.layout
        query_grid = layout.query_grid
        if text_to_query is not None and query_grid is not None and math.prod(query_grid) != text_to_query.shape[1]:
            query_grid = None
        return Explanation(
            method=self.method,
            target_text=inputs.target_text,
            output_tokens=[str(t) for t in tokens],
            text_to_patch=text_to_patch.detach().cpu(),
            patch_grid=layout.views[0].grid if layout.is_single_grid else None,
            layout=layout,
            text_to_query=None if text_to_query is None else text_to_query.detach().cpu(),
            query_to_patch=None if query_to_patch is None else query_to_patch.detach().cpu(),
            query_grid=query_grid,
            token_ids=inputs.target_ids.detach().cpu(),
            token_probs=token_probs,
            word_ids=inputs.word_ids,
            image=inputs.image,
            input_ids=inputs.input_ids.detach().cpu(),
            pixel_values=inputs.pixel_values.detach().cpu(),
            target_positions=inputs.target_positions.detach().cpu(),
            image_positions=inputs.image_positions.detach().cpu(),
            prompt=inputs.prompt,
            projector_type=self.adapter.projector_type,
            model_name=self.model_name,
            options={**(options or {}), **({"unknown_words": inputs.unknown_words} if inputs.unknown_words else {})},
        )

    # ---- API -------------------------------------------------------------------------------------------------
    def attribute(self, image, target: str | None = None, prompt: str | None = None, **options) -> Explanation:
        """Explain ``target`` (or, when None, the model's greedy answer) for ``image``; see the class docs."""
        max_new_tokens = int(options.pop("max_new_tokens", 32))
        inputs = self.prepare(image, target, prompt, max_new_tokens=max_new_tokens)
        return self._attribute(inputs, **options)

    def attribute_images(self, images, target: str | None = None, prompt: str | None = None,
                         **options) -> list[Explanation]:
        """Explain ``target`` (or the model's greedy answer) for one prompt that shows several ``images`` in order:
        one :class:`~rgae.Explanation` per image, each over its own image and tokens (the same answer for all;
        one explanation pass per image). Families whose prompts hold several images (Qwen-VL) support it."""
        max_new_tokens = int(options.pop("max_new_tokens", 32))
        prepared = self.prepare_images(list(images), target, prompt, max_new_tokens=max_new_tokens)
        return [self._attribute(inputs, **dict(options)) for inputs in prepared]

    def _attribute(self, inputs: PreparedInputs, **options) -> Explanation:  # pragma: no cover - abstract
        raise NotImplementedError
