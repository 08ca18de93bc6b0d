"""Dataset readers: a data spec (``--data``) → the list of :class:`~rgae.datasets.records.Record`.

Built in:

- ``PATH.jsonl`` (or ``jsonl:PATH``): the record format of :mod:`rgae.datasets.records` (``docs/datasets.md``);
- ``rec:PATH`` or a JSONL whose first line has a ``bbox``: the REC question files ``deco eval --task refcoco``
  reads (``question_id``, ``image``, ``text``, ``bbox`` = ``[x1, y1, x2, y2]`` normalized to the original image,
  optional ``width``/``height``; the phrase is ``phrase``/``sent``/``expression`` or the question after its last
  ``": "``). The phrase is the explained text; its content words are scored against the box.

Other schemes (``NAME:ARGS``) come from readers registered with :func:`register_reader` or advertised by installed
packages in the ``rgae.datasets`` entry-point group — that is how ``shapes:SEED:N`` (the shapes world of
``deco_models``) is found without rgae importing deco_models.

Example:
    >>> import json, pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "d.jsonl").write_text(json.dumps({"id": 1, "image": "a.png", "text": "a dog"}) + "\\n")
    >>> [r.id for r in read_dataset(str(folder / "d.jsonl"))]
    ['1']
    >>> register_reader("const", lambda args, image_folder: [Record(id=args, image="x.png")])
    >>> read_dataset("const:7")[0].id
    '7'
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from rgae.datasets.records import Record, normalize_word, record_from_json

__all__ = ["ENTRY_POINT_GROUP", "Reader", "data_file", "read_dataset", "read_jsonl", "read_rec", "register_reader",
           "readers"]

ENTRY_POINT_GROUP = "rgae.datasets"
Reader = Callable[[str, "str | None"], list[Record]]
_READERS: dict[str, Reader] = {}
# Words of a referring expression that name no part of the object (articles, prepositions, spatial relations).
_REC_STOPWORDS = frozenset(
    "a an the of in on at to with and or is are this that its his her their it which who whose by for from near "
    "next beside behind front back left right top bottom middle center centre up down far closest close side "
    "upper lower first second third one two".split()
)
_SCHEME = re.compile(r"^([A-Za-z][\w.+-]*):(.*)$")


def register_reader(scheme: str, reader: Reader) -> None:
    """Make ``--data SCHEME:ARGS`` call ``reader(ARGS, image_folder)`` (returns a list of records)."""
    if not re.fullmatch(r"[A-Za-z][\w.+-]*", scheme) or len(scheme) < 2:
        raise ValueError(f"a reader scheme must be a name of two or more letters/digits, got {scheme!r}")
    _READERS[scheme] = reader


def _discover() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _READERS:
            _READERS[ep.name] = ep.load()


def readers() -> list[str]:
    """The registered and installed schemes, sorted."""
    _discover()
    return sorted(_READERS)


def _read_lines(path: Path) -> list:
    if not path.is_file():
        raise ValueError(f"--data {path}: no such file")
    values = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                values.append((line_no, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not a JSON record ({exc})") from None
    if not values:
        raise ValueError(f"{path}: no records")
    return values


def _check_unique(records: list[Record], source) -> list[Record]:
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"{source}: duplicate record id {r.id!r}")
        seen.add(r.id)
    return records


def read_jsonl(path: str | os.PathLike, image_folder: str | None = None) -> list[Record]:
    """Records of a JSON Lines file in rgae's format (``image_folder`` is used when the records are loaded)."""
    path = Path(path)
    return _check_unique([record_from_json(v, f"{path}:{n}") for n, v in _read_lines(path)], path)


def _rec_phrase(question: dict) -> str:
    for key in ("phrase", "sent", "expression", "caption"):
        if isinstance(question.get(key), str) and question[key].strip():
            return question[key].strip()
    text = question.get("text", question.get("question"))
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no phrase: expected 'phrase'/'sent'/'expression' or a 'text' question")
    # LLaVA's REC prompt: "Please provide the bounding box coordinate of the region this sentence describes: <phrase>"
    return text.rsplit(": ", 1)[-1].strip().rstrip(".") or text.strip()


def _image_size(question: dict, image_folder: str | None) -> tuple[int, int]:
    if "width" in question and "height" in question:
        return int(question["width"]), int(question["height"])
    from PIL import Image

    path = Path(image_folder or ".") / question["image"]
    try:
        with Image.open(path) as img:  # the header only
            return img.size
    except OSError as exc:
        raise ValueError(f"needs 'width'/'height' or a readable image to take the size from ({exc})") from None


def read_rec(path: str | os.PathLike, image_folder: str | None = None) -> list[Record]:
    """Records of a REC question file: the phrase explained, its content words scored against the ground-truth box
    (converted from normalized to original-image pixels)."""
    path = Path(path)
    records = []
    for line_no, q in _read_lines(path):
        source = f"{path}:{line_no}"
        try:
            if not isinstance(q, dict):
                raise ValueError("expected a JSON object")
            qid = q.get("question_id", q.get("id"))
            if qid is None or not isinstance(q.get("image"), str):
                raise ValueError("a REC question needs 'question_id' (or 'id') and 'image'")
            bbox = q.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise ValueError(f"'bbox' must be [x1, y1, x2, y2] normalized to the image, got {bbox!r}")
            phrase = _rec_phrase(q)
            width, height = _image_size(q, image_folder)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        words = [w for w in (normalize_word(t) for t in phrase.split()) if w and w not in _REC_STOPWORDS]
        box = {"words": words, "box": [bbox[0] * width, bbox[1] * height, bbox[2] * width, bbox[3] * height]}
        extra = {k: v for k, v in q.items() if k in ("category", "split", "ref_id", "ann_id")}
        records.append(record_from_json({"id": qid, "image": q["image"], "text": phrase, "boxes": [box], **extra},
                                        source))
    return _check_unique(records, path)


def _looks_like_rec(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        value = json.loads(first)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(value, dict) and "bbox" in value and "boxes" not in value


def _scheme(spec: str) -> tuple[str, str] | None:
    """``(scheme, args)`` of ``SCHEME:ARGS``; None for a plain path (an existing file wins over a scheme, and
    "C:\\data.jsonl" is a path, not the scheme "C")."""
    match = _SCHEME.match(spec)
    if match and len(match.group(1)) > 1 and not Path(spec).exists():
        return match.group(1), match.group(2)
    return None


def data_file(spec: str) -> Path | None:
    """The file a data spec reads (``PATH``, ``jsonl:PATH``, ``rec:PATH``); None for another reader's
    ``SCHEME:ARGS``.

    Example:
        >>> data_file("rec:refs.jsonl"), data_file("shapes:1:4")
        (PosixPath('refs.jsonl'), None)
    """
    parts = _scheme(spec)
    if parts is None:
        return Path(spec)
    return Path(parts[1]) if parts[0] in ("jsonl", "rec") else None


def read_dataset(spec: str, image_folder: str | None = None) -> list[Record]:
    """The records of a data spec: a ``.jsonl`` path, ``jsonl:PATH``, ``rec:PATH`` or ``SCHEME:ARGS`` of a registered
    reader. ``ValueError`` names what was expected."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"--data must be a .jsonl path or SCHEME:ARGS, got {spec!r}")
    parts = _scheme(spec)
    if parts is not None:
        scheme, args = parts
        if scheme == "jsonl":
            return read_jsonl(args, image_folder)
        if scheme == "rec":
            return read_rec(args, image_folder)
        if scheme not in _READERS:
            _discover()
        if scheme not in _READERS:
            known = ", ".join(["jsonl", "rec", *sorted(_READERS)])
            raise ValueError(f"--data {spec!r}: unknown scheme {scheme!r} (known: {known}; a reader is added with "
                             f"rgae.datasets.register_reader or the {ENTRY_POINT_GROUP!r} entry-point group)")
        records = list(_READERS[scheme](args, image_folder))
        if not records:
            raise ValueError(f"--data {spec!r}: the reader returned no records")
        return _check_unique(records, spec)
    path = Path(spec)
    return read_rec(path, image_folder) if _looks_like_rec(path) else read_jsonl(path, image_folder)
