"""The dataset record: one image, the text to explain, and the ground truth its maps are scored against.

A record is one JSON object per line of a ``.jsonl`` file (the format is documented in ``docs/datasets.md``)::

    {"id": "0001", "image": "images/0001.png", "text": "a small red circle", "prompt": "Describe the image.",
     "boxes": [{"words": "red circle", "box": [10, 12, 40, 44], "label": 1}], "mask": "masks/0001.png"}

Boxes are ``[x0, y0, x1, y1]`` in pixels of the **original** image, end exclusive. Every word of the explained text
that is one of a box's ``words`` is scored against that box (and against the mask's region ``label`` when the record
has a mask). Words are compared after :func:`normalize_word` (lower case, surrounding punctuation stripped).
:func:`load_record` reads a record's image and label mask.

Example:
    >>> r = record_from_json({"id": 7, "image": "a.png", "text": "A red circle.",
    ...                       "boxes": [{"words": "red circle", "box": [0, 0, 8, 8]}]})
    >>> r.id, r.boxes[0].words, r.boxes[0].kind("red"), r.boxes[0].kind("circle")
    ('7', ('red', 'circle'), 'color', 'shape')
"""

from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COLOR_WORDS", "SHAPE_WORDS", "WORD_KINDS", "Box", "Record", "load_record", "normalize_word",
           "record_from_json", "record_to_json", "word_kind"]

# Basic colour terms and geometric shape names; every other box word counts as a noun (the words of a box name the
# object) unless the box says otherwise in "kinds".
COLOR_WORDS = frozenset(
    "red green blue yellow orange purple violet pink brown black white gray grey beige cyan magenta gold silver "
    "tan maroon navy teal turquoise".split()
)
SHAPE_WORDS = frozenset(
    "circle square triangle rectangle ellipse oval star diamond hexagon pentagon octagon cross heart ring "
    "cube sphere cylinder cone".split()
)
WORD_KINDS = ("color", "shape", "noun")
_KNOWN_KEYS = {"id", "image", "text", "prompt", "boxes", "mask", "original_hw"}


def normalize_word(word: str) -> str:
    """The form words are matched in: stripped of whitespace and surrounding punctuation, lower case.

    Example:
        >>> normalize_word(" Circle. "), normalize_word("(red)")
        ('circle', 'red')
    """
    return word.strip().strip(string.punctuation).lower()


def word_kind(word: str) -> str:
    """``"color"``, ``"shape"`` or ``"noun"`` (the default kind of a box word) from the built-in lexicon.

    Example:
        >>> [word_kind(w) for w in ("Red", "triangle", "dog")]
        ['color', 'shape', 'noun']
    """
    w = normalize_word(word)
    if w in COLOR_WORDS:
        return "color"
    if w in SHAPE_WORDS:
        return "shape"
    return "noun"


@dataclass(frozen=True)
class Box:
    """A ground-truth region: ``box = (x0, y0, x1, y1)`` original-image pixels (end exclusive), the normalized
    ``words`` scored against it, the mask value ``label`` of its pixels (None: the mask's nonzero pixels when the
    record has a single box) and per-word ``kinds`` overriding :func:`word_kind`."""

    words: tuple[str, ...]
    box: tuple[float, float, float, float]
    label: int | None = None
    kinds: dict[str, str] = field(default_factory=dict)

    def kind(self, word: str) -> str:
        w = normalize_word(word)
        return self.kinds.get(w) or word_kind(w)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"words": " ".join(self.words), "box": list(self.box)}
        if self.label is not None:
            out["label"] = self.label
        if self.kinds:
            out["kinds"] = dict(self.kinds)
        return out


@dataclass
class Record:
    """One item of a dataset.

    ``image`` and ``mask`` are paths (relative to the image folder) or arrays (``uint8 [H, W, 3]`` image, integer
    ``[H, W]`` label mask) for readers that generate their data. ``text`` None explains the model's own answer;
    ``prompt`` None uses the explainer's default instruction. ``extra`` keeps any other fields of the JSON record.
    ``original_hw`` is the image's ``(height, width)``: the store records it when the image has been read.
    """

    id: str
    image: Any
    text: str | None = None
    prompt: str | None = None
    boxes: tuple[Box, ...] = ()
    mask: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    original_hw: tuple[int, int] | None = None

    def mask_region(self, mask: np.ndarray, box: Box) -> np.ndarray:
        """``bool [H, W]``: the pixels of ``box``'s object in the label ``mask``."""
        if box.label is not None:
            return mask == box.label
        if len(self.boxes) != 1:
            raise ValueError(f"record {self.id!r}: a mask with {len(self.boxes)} boxes needs a 'label' per box")
        return mask != 0


def _fail(source: str, message: str):
    raise ValueError(f"{source}: {message}")


def _optional_text(value, key: str, source: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        _fail(source, f"'{key}' must be a non-empty string (or absent), got {value!r}")
    return value


def _box_from_json(value, source: str) -> Box:
    if not isinstance(value, dict):
        _fail(source, f"each box must be an object {{\"words\": ..., \"box\": [x0, y0, x1, y1]}}, got {value!r}")
    unknown = set(value) - {"words", "box", "label", "kinds"}
    if unknown:
        _fail(source, f"unknown box fields {sorted(unknown)} (expected words, box, label, kinds)")
    words = value.get("words", "")
    if isinstance(words, str):
        words = words.split()
    if not isinstance(words, list | tuple) or not all(isinstance(w, str) for w in words):
        _fail(source, f"box 'words' must be a string or a list of strings, got {words!r}")
    coords = value.get("box")
    if (not isinstance(coords, list | tuple) or len(coords) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in coords)):
        _fail(source, f"'box' must be 4 numbers [x0, y0, x1, y1] in original-image pixels, got {coords!r}")
    x0, y0, x1, y1 = (float(v) for v in coords)
    if not (x1 > x0 and y1 > y0):
        _fail(source, f"'box' must satisfy x1 > x0 and y1 > y0, got {list(coords)}")
    label = value.get("label")
    if label is not None and (not isinstance(label, int) or isinstance(label, bool)):
        _fail(source, f"box 'label' must be an integer mask value, got {label!r}")
    kinds = value.get("kinds") or {}
    if not isinstance(kinds, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in kinds.items()):
        _fail(source, f"box 'kinds' must map words to kinds, got {kinds!r}")
    normalized = tuple(n for n in (normalize_word(w) for w in words) if n)
    return Box(words=normalized, box=(x0, y0, x1, y1), label=label,
               kinds={normalize_word(k): v for k, v in kinds.items()})


def record_from_json(value, source: str = "record") -> Record:
    """A :class:`Record` from one parsed JSON line; ``ValueError`` naming ``source`` when it does not fit the format.

    Example:
        >>> record_from_json({"id": "a", "image": "a.png"}).text is None
        True
    """
    if not isinstance(value, dict):
        _fail(source, f"expected a JSON object, got {type(value).__name__}")
    rid = value.get("id")
    if isinstance(rid, bool) or not isinstance(rid, str | int) or str(rid) == "":
        _fail(source, f"'id' must be a non-empty string or an integer, got {rid!r}")
    image = value.get("image")
    if not isinstance(image, str) or not image:
        _fail(source, f"'image' must be a path (relative to the image folder), got {image!r}")
    boxes = value.get("boxes") or []
    if not isinstance(boxes, list):
        _fail(source, f"'boxes' must be a list, got {type(boxes).__name__}")
    mask = value.get("mask")
    if mask is not None and (not isinstance(mask, str) or not mask):
        _fail(source, f"'mask' must be the path of a label image, got {mask!r}")
    hw = value.get("original_hw")
    if hw is not None and (not isinstance(hw, list | tuple) or len(hw) != 2
                           or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)):
        _fail(source, f"'original_hw' must be [height, width] in pixels, got {hw!r}")
    return Record(
        id=str(rid),
        image=image,
        text=_optional_text(value.get("text"), "text", source),
        prompt=_optional_text(value.get("prompt"), "prompt", source),
        boxes=tuple(_box_from_json(b, f"{source}, box {k}") for k, b in enumerate(boxes)),
        mask=mask,
        extra={k: v for k, v in value.items() if k not in _KNOWN_KEYS},
        original_hw=None if hw is None else (int(hw[0]), int(hw[1])),
    )


def record_to_json(record: Record) -> dict:
    """The record in the JSON Lines format (:func:`record_from_json` reads it back), with ``original_hw`` when known.
    Arrays are described, not embedded (the store keeps a generated mask as a tensor).

    Example:
        >>> record_to_json(record_from_json({"id": 1, "image": "a.png", "text": "a dog", "split": "val"}))
        {'id': '1', 'image': 'a.png', 'text': 'a dog', 'split': 'val'}
    """
    def describe(value):
        return value if isinstance(value, str) else f"<array {list(np.shape(value))}>"

    out: dict[str, Any] = {"id": record.id, "image": describe(record.image)}
    for key in ("text", "prompt"):
        if getattr(record, key) is not None:
            out[key] = getattr(record, key)
    if record.boxes:
        out["boxes"] = [b.to_json() for b in record.boxes]
    if record.mask is not None:
        out["mask"] = describe(record.mask)
    if record.original_hw is not None:
        out["original_hw"] = list(record.original_hw)
    return {**out, **record.extra}


# ----------------------------------------------------------------------------------------------------------- I/O


def _resolve(path: str, folder: str | os.PathLike | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or folder is None else Path(folder) / p


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mask = np.asarray(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"mask {path} cannot be read as an image ({exc})") from None
    if mask.ndim == 3:
        if not (mask == mask[..., :1]).all():
            raise ValueError(f"mask {path} must be a single-channel label image, got {mask.shape[2]} channels")
        mask = mask[..., 0]
    return mask


def load_record(record: Record, image_folder: str | os.PathLike | None = None):
    """``(RGB PIL image, label mask array or None)`` of a record; ``ValueError`` for an unreadable image, a mask of
    another size, or a mask that cannot tell several boxes apart (no ``label``)."""
    from rgae.images import load_pil_image

    source = _resolve(record.image, image_folder) if isinstance(record.image, str) else record.image
    image = load_pil_image(source)
    mask = record.mask
    if mask is None:
        return image, None
    mask = np.asarray(_read_mask(_resolve(mask, image_folder)) if isinstance(mask, str) else mask)
    if mask.shape != (image.height, image.width):
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {image.width}x{image.height}")
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
        raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
    if len(record.boxes) > 1 and any(b.label is None for b in record.boxes):
        raise ValueError(f"a mask with {len(record.boxes)} boxes needs a 'label' in every box")
    return image, mask.astype(np.int32)
