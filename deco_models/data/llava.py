"""LLaVA-format conversation data: records, a lazily loading dataset, a padding collator and a length-grouped sampler.

A record is ``{"id", "image"?, "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}]}``
(LLaVA's ``blip_laion_cc_sbu_558k.json`` / ``llava_v1_5_mix665k.json``); records without ``"image"`` are text-only.
Images are opened only in ``__getitem__``; a missing or corrupt image is reported with the record's id and either
skipped (counted in :attr:`LlavaConversationDataset.bad_images`) or fatal, by ``on_bad_image``.

Example (a tiny model/processor from ``tests/tiny.py`` or a real one from ``deco_models.load``)::

    ds = LlavaConversationDataset("captions.json", image_folder="images", processor=processor, template="plain")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=LlavaCollator(processor.tokenizer.pad_token_id))
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from deco_models.io import read_json_lines

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
ON_BAD_IMAGE = ("skip", "error")
IMAGE_ASPECTS = ("pad", "square", "resize")  # "resize" is an alias of "square"
CHECK_IMAGES = ("none", "exists", "decode")


class BadImageError(ValueError):
    """An image of a record could not be read; the message names the record id and the path."""


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------


def load_records(path: str | os.PathLike) -> list[dict]:
    """Read LLaVA records from a ``.json`` list or a ``.jsonl`` file (one record per line), and validate their shape.

    >>> import json, tempfile
    >>> p = tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False)
    >>> _ = p.write(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "hi"},
    ...                                                      {"from": "gpt", "value": "hello"}]}) + "\\n"); p.close()
    >>> [r["id"] for r in load_records(p.name)]
    ['a']
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or (not text.lstrip().startswith("[") and "\n{" in text.strip()):
        records = read_json_lines(text, path)
    else:
        records = json.loads(text)
        if isinstance(records, dict):
            records = [records]
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records or JSONL, got {type(records).__name__}")
    for index, record in enumerate(records):
        validate_record(record, index)
    return records


def validate_record(record: Any, index: int = 0) -> None:
    """Raise ``ValueError`` naming the record (id or position) when it is not a LLaVA conversation record."""
    where = f"record {index}" + (f" (id {record.get('id')!r})" if isinstance(record, dict) and "id" in record else "")
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dict with 'conversations', got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: expected a non-empty list 'conversations' of {{'from', 'value'}} turns")
    for turn_no, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"{where}: turn {turn_no} must be a dict with 'from' and 'value', got {turn!r}")
        if turn["from"] not in ("human", "gpt", "system"):
            raise ValueError(f"{where}: turn {turn_no} has 'from'={turn['from']!r}; expected 'human' or 'gpt'")
    image = record.get("image")
    if image is not None and not isinstance(image, str):
        raise ValueError(f"{where}: 'image' must be a file name (one image per record), got {image!r}")


def estimate_length(record: dict, num_image_tokens: int) -> int:
    """Cheap token-count estimate for length grouping (words, plus the image tokens), without tokenizing."""
    words = sum(len(str(turn["value"]).split()) for turn in record["conversations"])
    return words + (num_image_tokens if record.get("image") else 0)


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def expand_to_square(image, background: tuple[int, int, int]):
    """Pad a PIL image to a square with ``background`` and the content centred (LLaVA-1.5's ``expand2square``)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def _image_mean_color(image_processor) -> tuple[int, int, int]:
    mean = getattr(image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    return tuple(int(round(float(m) * 255)) for m in mean)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------------


def _default_render() -> Callable:
    from deco_models.conversation import render_training_example

    return render_training_example


def _processor_parts(processor) -> tuple[Any, Any]:
    tokenizer = getattr(processor, "tokenizer", None) or processor
    image_processor = getattr(processor, "image_processor", None)
    return tokenizer, image_processor


def _num_image_tokens(processor, tokenizer) -> int:
    for owner in (processor, tokenizer):
        for name in ("num_image_tokens", "image_seq_length"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    raise ValueError(
        "cannot tell how many image tokens the model takes: pass num_image_tokens= or a processor with "
        "'num_image_tokens'/'image_seq_length'"
    )


def _image_token_id(processor, tokenizer) -> int:
    for owner in (processor, tokenizer):
        value = getattr(owner, "image_token_id", None)
        if isinstance(value, int):
            return value
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    if token_id is None or token_id == getattr(tokenizer, "unk_token_id", object()):
        raise ValueError(f"the tokenizer has no {IMAGE_PLACEHOLDER!r} token; pass image_token_id=")
    return int(token_id)


class LlavaConversationDataset(Dataset):
    """LLaVA conversation records rendered for training, images loaded lazily.

    Each item is ``{"input_ids", "labels", "pixel_values" (or None for text-only), "id"}``. ``labels`` are
    ``IGNORE_INDEX`` outside the assistant turns (rendering by ``deco_models.conversation.render_training_example``,
    template ``plain`` for alignment and ``vicuna_v1`` for instruction tuning); the ``<image>`` placeholder becomes
    exactly ``num_image_tokens`` image tokens.

    Args:
        data: path to ``.json``/``.jsonl`` or a list of records.
        image_folder: folder the records' ``image`` paths are relative to.
        processor: a ``DecoProcessor`` (tokenizer + image processor), or a tokenizer for text-only data.
        template: conversation template name.
        image_aspect: ``"pad"`` pads to a square with the image mean colour first (LLaVA-1.5), ``"square"``
            (alias ``"resize"``) resizes without keeping the aspect ratio; None: the processor's own setting (a
            ``DecoProcessor`` prepares images exactly as at inference).
        on_bad_image: ``"skip"`` reports the record id, counts it in :attr:`bad_images` and serves another record;
            ``"error"`` raises :class:`BadImageError` naming the id and the path. (Images found bad while loading
            in DataLoader worker processes are logged there; only the main process's :attr:`bad_images` is
            returned, so use ``check_images="decode"`` when every skip must be counted.)
        check_images: up-front check: ``"exists"`` (stat every file; cheap), ``"decode"`` (open and decode every
            image; slow on 558K images, thorough), ``"none"``. With ``skip`` the failing records are dropped from the
            index before training; with ``error`` the first one raises.
        max_length: truncate rendered sequences to this many tokens (never through the image tokens).
    """

    def __init__(
        self,
        data: str | os.PathLike | Sequence[dict],
        image_folder: str | os.PathLike | None = None,
        processor: Any = None,
        template: str = "plain",
        *,
        image_aspect: str | None = None,
        on_bad_image: str = "skip",
        check_images: str = "exists",
        max_length: int | None = None,
        num_image_tokens: int | None = None,
        image_token_id: int | None = None,
        render: Callable | None = None,
    ):
        # render(conversations, template, tokenizer, num_image_tokens=M) -> {"input_ids", "labels"}; default
        # deco_models.conversation.render_training_example.
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        if image_aspect is not None and image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect must be one of {IMAGE_ASPECTS}, got {image_aspect!r}")
        if check_images not in CHECK_IMAGES:
            raise ValueError(f"check_images must be one of {CHECK_IMAGES}, got {check_images!r}")
        if processor is None:
            raise ValueError("processor is required (a DecoProcessor, or a tokenizer for text-only data)")
        if isinstance(data, (str, os.PathLike)):
            records = load_records(data)
        else:
            records = list(data)
            for index, record in enumerate(records):
                validate_record(record, index)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.processor = processor
        self.tokenizer, self.image_processor = _processor_parts(processor)
        self.template = template
        if image_aspect is not None and hasattr(processor, "prepare_images"):
            wanted = "square" if image_aspect == "resize" else image_aspect
            if getattr(processor, "image_aspect", wanted) != wanted:
                processor = copy.copy(processor)
                processor.image_aspect = wanted
                self.processor = processor
        self.image_aspect = image_aspect or getattr(processor, "image_aspect", "pad")
        self.on_bad_image = on_bad_image
        self.max_length = max_length
        self.render = render
        has_images = any(r.get("image") for r in records)
        if has_images and self.image_processor is None:
            raise ValueError("the data has images but the processor has no image_processor")
        if has_images and self.image_folder is None:
            raise ValueError("the data has images: pass image_folder=")
        self.num_image_tokens = num_image_tokens or (_num_image_tokens(processor, self.tokenizer) if has_images else 0)
        self.image_token_id = image_token_id if image_token_id is not None else (
            _image_token_id(processor, self.tokenizer) if has_images else None
        )
        if template == "plain":
            # Checked up front: LLaVA's plain template is (image, caption) only; failing mid-epoch would waste a run.
            for index, record in enumerate(records):
                turns = [t for t in record["conversations"] if t["from"] != "system"]
                if not record.get("image") or len(turns) != 2:
                    raise ValueError(
                        f"record {self._record_id(record, index)!r}: the 'plain' (alignment) template needs an image "
                        f"and exactly one human + one gpt turn; got image={record.get('image')!r}, {len(turns)} turns"
                    )
        # id -> reason, for every record whose image could not be read (up front or while training).
        self.bad_images: dict[str, str] = {}
        self.records = self._check(records, check_images)
        self.lengths = [estimate_length(r, self.num_image_tokens) for r in self.records]
        # Positive for records with an image, negative for text-only ones (LLaVA's modality-grouping convention).
        self.modality_lengths = [n if r.get("image") else -n for n, r in zip(self.lengths, self.records)]

    # -- up-front checks ------------------------------------------------------------------------------------------

    def _record_id(self, record: dict, index: int) -> str:
        return str(record.get("id", f"#{index}"))

    def _image_path(self, record: dict) -> Path:
        return self.image_folder / record["image"]

    def _check(self, records: list[dict], mode: str) -> list[dict]:
        if mode == "none":
            return records
        kept = []
        iterator = records
        if len(records) > 5000:  # LLaVA's 558K/665K sets: stat-ing (or decoding) them all takes a while
            from tqdm.auto import tqdm

            iterator = tqdm(records, desc=f"checking images ({mode})", unit="img", mininterval=2)
        for index, record in enumerate(iterator):
            if record.get("image"):
                path = self._image_path(record)
                reason = None
                if not path.is_file():
                    reason = f"missing file {path}"
                elif mode == "decode":
                    try:
                        self._open_image(path)
                    except Exception as exc:  # PIL raises many types for corrupt files
                        reason = f"cannot decode {path}: {exc}"
                if reason is not None:
                    self._report_bad(self._record_id(record, index), reason)
                    continue
            kept.append(record)
        if self.bad_images:
            logger.warning("%d record(s) skipped for bad images: %s", len(self.bad_images), self._bad_summary())
        if not kept:
            raise ValueError("no usable records left after checking images")
        return kept

    def _report_bad(self, record_id: str, reason: str) -> None:
        message = f"bad image in record {record_id!r}: {reason}"
        if self.on_bad_image == "error":
            raise BadImageError(message + " (on_bad_image='error'; use 'skip' to drop such records)")
        self.bad_images[record_id] = reason
        logger.warning(message + " -- skipped")

    def _bad_summary(self, limit: int = 5) -> str:
        items = list(self.bad_images.items())
        text = "; ".join(f"{k}: {v}" for k, v in items[:limit])
        return text + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")

    # -- items ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _open_image(path: Path):
        from PIL import Image

        with Image.open(path) as image:
            return image.convert("RGB")  # convert() forces the full decode: corrupt data fails here

    def _load_pixel_values(self, path: Path) -> torch.Tensor:
        if hasattr(self.processor, "prepare_images"):
            # DecoProcessor: the same conversion, padding and resizing as at inference.
            pixel_values, _ = self.processor.prepare_images(str(path))
            return pixel_values[0]
        return self._pixel_values(self._open_image(path))

    def _pixel_values(self, image) -> torch.Tensor:
        if self.image_aspect == "pad":
            image = expand_to_square(image, _image_mean_color(self.image_processor))
        return self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # With on_bad_image="skip" a record whose image fails now (corrupt but present) is replaced by the next one,
        # so a batch never crashes; the replacement is deterministic (same index -> same sample on resume).
        for attempt in range(min(len(self.records), 16)):
            candidate = (index + attempt) % len(self.records)
            record = self.records[candidate]
            record_id = self._record_id(record, candidate)
            if record_id in self.bad_images:
                continue
            pixel_values = None
            if record.get("image"):
                path = self._image_path(record)
                try:
                    pixel_values = self._load_pixel_values(path)
                except Exception as exc:
                    self._report_bad(record_id, f"cannot read {path}: {exc}")
                    continue
            item = self._render(record)
            item["pixel_values"] = pixel_values
            item["id"] = record_id
            return item
        raise BadImageError(f"record {index} and the following ones all have unreadable images: {self._bad_summary()}")

    def _render(self, record: dict) -> dict[str, torch.Tensor]:
        conversations = record["conversations"]
        has_image = bool(record.get("image"))
        if has_image and not any(IMAGE_PLACEHOLDER in str(t["value"]) for t in conversations):
            # LLaVA puts the image before the first question when the text does not say where it goes.
            first = dict(conversations[0])
            first["value"] = IMAGE_PLACEHOLDER + "\n" + str(first["value"])
            conversations = [first, *conversations[1:]]
        elif not has_image and any(IMAGE_PLACEHOLDER in str(t["value"]) for t in conversations):
            raise ValueError(f"record {record.get('id')!r} mentions {IMAGE_PLACEHOLDER} but has no 'image'")
        render = self.render or _default_render()
        try:
            rendered = render(conversations, self.template, self.tokenizer,
                              num_image_tokens=max(1, self.num_image_tokens))
        except ValueError as exc:
            raise ValueError(
                f"record {record.get('id')!r}: cannot render with template {self.template!r}: {exc}"
            ) from exc
        input_ids = torch.as_tensor(rendered["input_ids"], dtype=torch.long).flatten()
        labels = torch.as_tensor(rendered["labels"], dtype=torch.long).flatten()
        if input_ids.shape != labels.shape:
            raise ValueError(f"renderer returned input_ids {tuple(input_ids.shape)} but labels {tuple(labels.shape)}")
        if has_image:
            input_ids, labels = self._expand_image_tokens(input_ids, labels, record)
        elif self.max_length is not None:
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return {"input_ids": input_ids, "labels": labels}

    def _expand_image_tokens(self, input_ids, labels, record):
        is_image = input_ids == self.image_token_id
        count = int(is_image.sum())
        if count == self.num_image_tokens:
            pass
        elif count == 1:
            # The renderer left one placeholder token: expand it to the projector's M tokens.
            at = int(is_image.nonzero()[0, 0])
            image_ids = torch.full((self.num_image_tokens,), self.image_token_id, dtype=torch.long)
            input_ids = torch.cat([input_ids[:at], image_ids, input_ids[at + 1 :]])
            labels = torch.cat([labels[:at], torch.full_like(image_ids, IGNORE_INDEX), labels[at + 1 :]])
        else:
            raise ValueError(
                f"record {record.get('id')!r}: rendered text has {count} image tokens, expected 1 or "
                f"{self.num_image_tokens} (one image per record)"
            )
        labels = labels.masked_fill(input_ids == self.image_token_id, IGNORE_INDEX)
        if self.max_length is not None and input_ids.numel() > self.max_length:
            last_image = int((input_ids == self.image_token_id).nonzero()[-1, 0])
            keep = max(self.max_length, last_image + 1)  # cutting image tokens would desynchronise the features
            input_ids, labels = input_ids[:keep], labels[:keep]
        return input_ids, labels


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LlavaCollator:
    """Pad a list of dataset items into a batch for ``DecoForConditionalGeneration``.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with ``IGNORE_INDEX``; ``pixel_values`` of the items
    that have an image are stacked in batch order (the model scatters them into the image tokens in that order) and
    omitted when no item has one. ``max_length`` truncates text after padding-free concatenation is impossible, so it
    is applied per item by the dataset; here it is only a guard.

    >>> c = LlavaCollator(pad_token_id=0)
    >>> b = c([{"input_ids": torch.tensor([5, 6, 7]), "labels": torch.tensor([-100, 6, 7]), "pixel_values": None},
    ...        {"input_ids": torch.tensor([8]), "labels": torch.tensor([8]), "pixel_values": None}])
    >>> b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()
    ([[5, 6, 7], [8, 0, 0]], [[-100, 6, 7], [8, -100, -100]], [[1, 1, 1], [1, 0, 0]])
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __post_init__(self):
        if self.pad_token_id is None:
            raise ValueError("pad_token_id is None: give the tokenizer a pad token (e.g. its unk or eos token)")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(int(item["input_ids"].numel()) for item in items)
        if self.pad_to_multiple_of:
            length = int(math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of)
        input_ids = torch.full((len(items), length), int(self.pad_token_id), dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.long)
        for row, item in enumerate(items):
            n = int(item["input_ids"].numel())
            span = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
            input_ids[row, span] = item["input_ids"]
            labels[row, span] = item["labels"]
            attention_mask[row, span] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [item["pixel_values"] for item in items if item.get("pixel_values") is not None]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Length-grouped sampling (LLaVA's modality-aware scheme)
# ---------------------------------------------------------------------------------------------------------------------


def _split_to_even_chunks(indices: list[int], lengths: Sequence[int], num_chunks: int) -> list[list[int]]:
    """Split ``indices`` into ``num_chunks`` chunks of equal count, balancing the total length greedily."""
    if len(indices) % num_chunks != 0:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0] * num_chunks
    for index in indices:
        shortest = min((c for c in range(num_chunks) if len(chunks[c]) < per_chunk), key=lambda c: totals[c])
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
    return chunks


def length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    megabatch_mult: int = 1,
) -> list[int]:
    """Random order in which each *step* (``world_size * batch_size`` samples) holds samples of similar length and
    is split evenly (by total length) across ranks, rank 0's batch first.

    Samples are shuffled, cut into megabatches of ``megabatch_mult`` steps, and each megabatch is sorted by length
    (longest first) and cut into steps, whose order inside the megabatch is shuffled again. ``megabatch_mult=1`` is
    exactly LLaVA's ``get_length_grouped_indices`` (it only balances ranks); larger values also cut padding."""
    if megabatch_mult < 1:
        raise ValueError(f"megabatch_mult must be >= 1, got {megabatch_mult}")
    indices = torch.randperm(len(lengths), generator=generator).tolist()
    step_size = world_size * batch_size
    megabatch_size = step_size * megabatch_mult
    sizes = [abs(x) for x in lengths]
    order: list[int] = []
    for start in range(0, len(indices), megabatch_size):
        megabatch = sorted(indices[start : start + megabatch_size], key=lambda i: sizes[i], reverse=True)
        steps = [megabatch[i : i + step_size] for i in range(0, len(megabatch), step_size)]
        full = [step for step in steps if len(step) == step_size]
        if len(full) > 1:
            # Shuffle the full steps; a partial step (only in the last megabatch) stays last so that
            # callers cutting the order into steps stay aligned.
            full = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        steps = full + [step for step in steps if len(step) != step_size]
        for step in steps:
            order.extend(i for chunk in _split_to_even_chunks(step, sizes, world_size) for i in chunk)
    return order


def modality_length_grouped_indices(
    lengths: Sequence[int],
    batch_size: int,
    world_size: int = 1,
    generator: torch.Generator | None = None,
    megabatch_mult: int = 1,
) -> list[int]:
    """Like :func:`length_grouped_indices`, but image records (positive lengths) and text-only records (negative)
    never share a megabatch except in the one leftover megabatch (LLaVA's ``get_modality_length_grouped_indices``)."""
    if all(x > 0 for x in lengths) or all(x < 0 for x in lengths):
        return length_grouped_indices(lengths, batch_size, world_size, generator, megabatch_mult)
    mm_indices = [i for i, x in enumerate(lengths) if x > 0]
    lang_indices = [i for i, x in enumerate(lengths) if x < 0]
    megabatch_size = world_size * batch_size  # LLaVA's unit here is one step; leftovers are < one step per modality

    def grouped(subset):
        order = length_grouped_indices(
            [lengths[i] for i in subset], batch_size, world_size, generator, megabatch_mult
        )
        shuffled = [subset[i] for i in order]
        return [shuffled[i : i + megabatch_size] for i in range(0, len(shuffled), megabatch_size)]

    mm_megabatches, lang_megabatches = grouped(mm_indices), grouped(lang_indices)
    last_mm, last_lang = mm_megabatches[-1], lang_megabatches[-1]
    megabatches = mm_megabatches[:-1] + lang_megabatches[:-1]
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    megabatches = [megabatches[i] for i in order]
    leftovers = last_mm + last_lang
    if leftovers:
        megabatches.append(sorted(leftovers, key=lambda i: abs(lengths[i]), reverse=True))
    return [i for mb in megabatches for i in mb]


class LengthGroupedSampler(Sampler[int]):
    """Sampler yielding :func:`modality_length_grouped_indices` (or plain length grouping with
    ``modality_aware=False``), megabatches of ``megabatch_mult`` steps (1 = LLaVA's exact scheme). The order depends
    only on ``seed`` and the epoch (``set_epoch``), so a resumed run sees the same batches.

    >>> s = LengthGroupedSampler([3, 9, 1, 8, 2, 7, 4, 6], batch_size=2, seed=0)
    >>> sorted(s) == list(range(8))
    True
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        modality_aware: bool = True,
        megabatch_mult: int = 8,
    ):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
        if not lengths:
            raise ValueError("lengths is empty")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.modality_aware = modality_aware
        self.megabatch_mult = megabatch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.modality_aware:
            indices = modality_length_grouped_indices(
                self.lengths, self.batch_size, self.world_size, generator, self.megabatch_mult
            )
        else:
            indices = length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator,
                                             self.megabatch_mult)
        return iter(indices)


def warn_if_bad_images(dataset: Any) -> None:
    """Report the records skipped for bad images (called by the trainer at the end of training)."""
    bad = getattr(dataset, "bad_images", None)
    if bad:
        warnings.warn(f"{len(bad)} record(s) were skipped for bad images: {dataset._bad_summary()}", stacklevel=2)
