"""The explanation store: a folder of shard files that ``rgae explain-dataset`` writes and :class:`ExplanationStore`
reads.

Layout::

    STORE/store.json                     the manifest: model (and its weight fingerprint), method, options, data
    STORE/shards/<shard>.safetensors     the tensors of a batch of records (identical tensors stored once)
    STORE/shards/<shard>.json            the shard's index: finished ids, each record's annotations (boxes, mask,
                                         image size) and Explanation metadata, and the failed ids with their errors

Each shard is written atomically (temporary file, then rename), tensors first and the index last: a shard counts only
once its index exists, so a process killed mid-write leaves at most an orphan tensor file (removed on the next run)
and its records are redone. No pickle anywhere: tensors are safetensors, the rest is JSON.

Example:
    >>> store = ExplanationStore("runs/shapes-rgae")  # doctest: +SKIP
    >>> len(store), store.ids()[:2], store.failures  # doctest: +SKIP
    (40, ['000000', '000001'], {})
    >>> store["000000"].patch_map(word="circle").shape  # doctest: +SKIP
    torch.Size([12, 12])
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rgae.datasets.records import Record, record_from_json, record_to_json
from rgae.explanation import Explanation
from rgae.io import atomic_write

__all__ = ["MANIFEST", "ExplanationStore", "ShardWriter", "StoreError", "check_manifest", "clean_shards",
           "finished_ids", "write_bytes_atomic", "write_json_atomic", "write_manifest"]

MANIFEST = "store.json"
SHARDS = "shards"
FORMAT = "rgae-explanation-store"
VERSION = 1
# What makes two runs incompatible; the rest of the manifest (versions, dates, the model's display name) is not.
COMPARED_KEYS = ("method", "options", "data", "model_fingerprint")


class StoreError(ValueError):
    """A folder that is not a usable store for this run: not a store, damaged, made with other settings, or being
    written by another run. The command lines report it as a one-line usage error."""


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` with :func:`rgae.io.atomic_write` (a temporary file in the same folder, then a
    rename: a reader, or a process killed mid-write, never sees a half-written ``path``; the umask's normal mode)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json_atomic(path: Path, value) -> Path:
    """``value`` as JSON through :func:`write_bytes_atomic`."""
    return write_bytes_atomic(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


# ------------------------------------------------------------------------------------------------------- manifest


def _read_manifest(path: Path) -> dict | None:
    file = path / MANIFEST
    if not file.is_file():
        # Hidden files (a run's lock, temporary files) do not make a folder a store or a non-store.
        if path.is_dir() and any(not f.name.startswith(".") for f in path.iterdir()):
            raise StoreError(f"{path} exists and is not an explanation store (no {MANIFEST}); choose another --out")
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"{file} is not an rgae explanation store manifest")
    return manifest


def check_manifest(path: str | os.PathLike, manifest: dict) -> dict | None:
    """The existing manifest of the store at ``path`` (None when there is no store yet), after checking that every
    compared setting in ``manifest`` matches it; :class:`StoreError` naming the first difference otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"--out {path} is a file, not a store folder")
    existing = _read_manifest(path)
    if existing is None:
        return None
    for key in COMPARED_KEYS:
        if key in manifest and key in existing and existing[key] != manifest[key]:
            if key == "model_fingerprint":
                raise StoreError(f"{path} was made with another model ({existing.get('model')!r}; the weights "
                                 f"differ): re-run with that model to resume it, or write to a new --out")
            raise StoreError(
                f"{path} was made with {key} = {json.dumps(existing[key], sort_keys=True)}, this run has "
                f"{json.dumps(manifest[key], sort_keys=True)}: re-run with the store's settings to resume it, or "
                f"write to a new --out"
            )
    return existing


def write_manifest(path: str | os.PathLike, manifest: dict) -> dict:
    """Create the store folder and its manifest (when absent) and return the manifest in force."""
    path = Path(path)
    existing = check_manifest(path, manifest)
    if existing is not None:
        return existing
    (path / SHARDS).mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "version": VERSION, **manifest}
    write_json_atomic(path / MANIFEST, full)
    return full


# ---------------------------------------------------------------------------------------------- explanation parts


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------- writing


def _compact_labels(mask) -> np.ndarray:
    """A label mask in the smallest integer type that holds it (most masks have < 256 labels)."""
    mask = np.ascontiguousarray(mask)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if mask.size == 0 or (mask.min() >= info.min and mask.max() <= info.max):
            return mask.astype(dtype)
    return mask.astype(np.int64)


class ShardWriter:
    """Collects one process's finished records and writes them as shards (:meth:`flush`)."""

    def __init__(self, path: str | os.PathLike, rank: int = 0):
        self.folder = Path(path) / SHARDS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rank = int(rank)
        self._records: dict[str, dict] = {}
        self._failures: dict[str, dict] = {}
        self._tensors: dict[str, torch.Tensor] = {}
        self.written: list[Path] = []

    def __len__(self) -> int:
        """Records collected since the last flush."""
        return len(self._records) + len(self._failures)

    def _keep(self, tensor: torch.Tensor) -> str:
        key = _digest(tensor)
        self._tensors.setdefault(key, tensor)
        return key

    def add(self, index: int, record: Record, explanation: Explanation, seconds: float, mask=None) -> None:
        """A finished record (``index``: its position in the dataset, which orders the store) with its label mask
        (default: ``record.mask`` when it is an array)."""
        meta, tensors = explanation.to_parts()
        entry: dict[str, Any] = {"index": int(index), "record": record_to_json(record), "explanation": meta,
                                 "tensors": {name: self._keep(t) for name, t in tensors.items()},
                                 "seconds": round(float(seconds), 6)}
        if mask is None and record.mask is not None and not isinstance(record.mask, str):
            mask = record.mask
        if mask is not None:
            entry["mask"] = self._keep(torch.from_numpy(_compact_labels(mask)))
        self._records[record.id] = entry

    def add_failure(self, index: int, record: Record, error: str) -> None:
        self._failures[record.id] = {"index": int(index), "record": record_to_json(record), "error": error}

    def flush(self) -> Path | None:
        """Write the collected records as one shard (tensors, then the index) and start a new one."""
        if not len(self):
            return None
        ids = [*self._records, *self._failures]
        name = f"r{self.rank:03d}-{hashlib.sha1(chr(10).join(ids).encode()).hexdigest()[:16]}"
        tensor_file = None
        if self._tensors:
            from safetensors.torch import save

            tensor_file = f"{name}.safetensors"
            write_bytes_atomic(self.folder / tensor_file, save(self._tensors))
        index = {"format": "rgae-store-shard", "version": VERSION, "rank": self.rank, "tensors": tensor_file,
                 "ids": list(self._records), "records": self._records, "failures": self._failures}
        write_json_atomic(self.folder / f"{name}.json", index)
        self._records, self._failures, self._tensors = {}, {}, {}
        self.written.append(self.folder / f"{name}.json")
        return self.written[-1]


def _shard_indexes(path: Path) -> list[tuple[Path, dict]]:
    out = []
    for file in sorted((path / SHARDS).glob("*.json")):
        try:
            out.append((file, json.loads(file.read_text(encoding="utf-8"))))
        except json.JSONDecodeError as exc:  # written atomically, so this is damage from outside
            raise StoreError(f"{file} is not valid JSON ({exc}); delete it to redo its records") from None
    return out


def finished_ids(path: str | os.PathLike, include_failures: bool = True) -> set[str]:
    """Ids the store at ``path`` already holds (explained, and failed unless ``include_failures`` is False)."""
    done: set[str] = set()
    for _, index in _shard_indexes(Path(path)):
        done.update(index["records"])
        if include_failures:
            done.update(index["failures"])
    return done


def clean_shards(path: str | os.PathLike) -> list[Path]:
    """Remove what a killed writer can leave behind: temporary files and tensor files whose index was never
    written. Call it only while no process writes to the store. Returns the removed files."""
    folder = Path(path) / SHARDS
    if not folder.is_dir():
        return []
    removed = [f for f in folder.glob(".*.tmp")]
    removed += [f for f in folder.glob("*.safetensors") if not f.with_suffix(".json").is_file()]
    for f in removed:
        f.unlink(missing_ok=True)
    return removed


# ---------------------------------------------------------------------------------------------------------- reading


class ExplanationStore:
    """Read access to a store written by ``rgae explain-dataset``.

    ``len(store)`` and ``store.ids()`` count the explained records (in dataset order), ``store[id]`` is its
    :class:`~rgae.Explanation`, iteration yields ids, ``store.record(id)`` the record's annotations
    (:class:`~rgae.datasets.records.Record` with boxes, mask and ``original_hw``), ``store.failures`` maps each failed
    id to its error, and ``store.manifest`` holds the model, method and options the store was made with.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = _read_manifest(self.path) if self.path.is_dir() else None
        if manifest is None:
            raise StoreError(f"{self.path} is not an explanation store (no {MANIFEST}; write one with "
                             f"`rgae explain-dataset`)")
        self.manifest = manifest
        entries: dict[str, tuple[Path | None, dict, Path]] = {}
        failed: dict[str, tuple[int, str]] = {}
        for file, index in _shard_indexes(self.path):
            tensor_file = None if index.get("tensors") is None else file.parent / index["tensors"]
            for rid, entry in index["records"].items():
                if rid in entries:
                    raise StoreError(f"{self.path}: record {rid!r} is in two shards ({entries[rid][2].name} and "
                                     f"{file.name}); was the store written by two runs at once?")
                entries[rid] = (tensor_file, entry, file)
            for rid, entry in index["failures"].items():
                failed[rid] = (entry["index"], entry["error"])
        self._entries = {rid: (t, e) for rid, (t, e, _) in sorted(entries.items(), key=lambda kv: kv[1][1]["index"])}
        # A record retried successfully (--retry-failed) is no longer a failure.
        self.failures: dict[str, str] = {rid: err for rid, (_, err) in sorted(failed.items(), key=lambda kv: kv[1][0])
                                         if rid not in self._entries}

    def __len__(self) -> int:
        return len(self._entries)

    def ids(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self.ids())

    def __contains__(self, rid) -> bool:
        return rid in self._entries

    def _entry(self, rid: str) -> tuple[Path | None, dict]:
        try:
            return self._entries[rid]
        except KeyError:
            hint = " (it failed: " + self.failures[rid] + ")" if rid in self.failures else ""
            raise KeyError(f"record {rid!r} is not in the store{hint}") from None

    def _tensors(self, tensor_file: Path | None, keys: dict[str, str]) -> dict[str, torch.Tensor]:
        if not keys:
            return {}
        from safetensors import safe_open

        with safe_open(str(tensor_file), framework="pt") as f:
            return {name: f.get_tensor(key) for name, key in keys.items()}

    def __getitem__(self, rid: str) -> Explanation:
        tensor_file, entry = self._entry(rid)
        return Explanation.from_parts(entry["explanation"], self._tensors(tensor_file, entry["tensors"]))

    def record(self, rid: str) -> Record:
        """The record's annotations as stored (its mask as an array)."""
        tensor_file, entry = self._entry(rid)
        record = record_from_json(entry["record"], f"{self.path}: record {rid!r}")
        if "mask" in entry:
            record.mask = self._tensors(tensor_file, {"mask": entry["mask"]})["mask"].numpy()
        return record

    def seconds(self, rid: str) -> float:
        """Wall-clock seconds the record's explanation took."""
        return float(self._entry(rid)[1]["seconds"])

    def __repr__(self) -> str:
        return (f"ExplanationStore({str(self.path)!r}, records={len(self)}, failures={len(self.failures)}, "
                f"method={self.manifest.get('method')!r}, model={self.manifest.get('model')!r})")
