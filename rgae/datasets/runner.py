"""Explain every record of a dataset into a store, sharded over processes with accelerate, resumable.

Under ``torchrun`` or ``accelerate launch`` each process is one :class:`accelerate.PartialState` rank. All ranks read
the same records and the same store, agree (barrier) before anyone writes, and take the records still to do in
round-robin order: rank r explains ``pending[r::world]`` — disjoint, deterministic, and balanced on a resume. Each
rank writes its own shards (:class:`~rgae.datasets.store.ShardWriter`) every ``batch_records`` records; the main rank
shows one progress bar with the global count (every rank reports its count in a small file in the store).

Example:
    >>> from rgae import RGAE
    >>> from rgae.datasets import explain_dataset, read_dataset
    >>> explain_dataset(RGAE(model, processor), read_dataset("shapes:0:40"), "runs/shapes",
    ...                 manifest={"model": "shapes-mini-mlp2x_gelu", "method": "rgae", "options": {}})  # doctest: +SKIP
    {'records': 40, 'explained': 40, 'failed': 0, 'skipped': 0, ...}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from rgae.datasets.records import Record
from rgae.datasets.store import ShardWriter, _write_json, check_manifest, clean_shards, finished_ids, write_manifest

__all__ = ["ProgressBoard", "RecordError", "StoreLock", "explain_dataset", "load_record", "model_fingerprint",
           "partial_state"]

PROGRESS = "progress"


class RecordError(Exception):
    """A record failed under ``fail_fast``; ``error`` is the original exception."""

    def __init__(self, record_id: str, error: BaseException):
        super().__init__(f"record {record_id!r} failed: {type(error).__name__}: {error}")
        self.record_id, self.error = record_id, error


def partial_state(cpu: bool | None = None):
    """accelerate's :class:`~accelerate.PartialState` for this process: gloo on the CPU when CUDA is absent (so
    ``torchrun --nproc_per_node 2`` gives two real CPU processes), NCCL on GPUs."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)


def model_fingerprint(model) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first values of every parameter and
    buffer (a retrained or different model changes it; moving it to another device does not)."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        head = t.detach().reshape(-1)[:8].to("cpu", torch.float64).numpy()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(head.tobytes())
    return h.hexdigest()[:32]


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
    from rgae.methods.base import load_image

    source = _resolve(record.image, image_folder) if isinstance(record.image, str) else record.image
    image = load_image(str(source) if isinstance(source, Path) else source)
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


class ProgressBoard:
    """One progress bar on the main process counting every rank's finished records.

    Each rank writes ``{"done", "failed", "finished"}`` to ``folder/rank-R.json`` as it goes (only with several
    processes); the main rank sums them into its bar and, in :meth:`finish`, waits until every rank has finished.
    """

    def __init__(self, folder: Path, state, total: int, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.folder, self.state = folder, state
        self.done = self.failed = 0
        self.bar = tqdm(total=total, desc=desc, unit="rec", disable=not (enabled and state.is_main_process),
                        dynamic_ncols=True)

    def _publish(self, finished: bool = False) -> None:
        if self.state.num_processes > 1:
            _write_json(self.folder / f"rank-{self.state.process_index}.json",
                        {"done": self.done, "failed": self.failed, "finished": finished})

    def _others(self) -> list[dict]:
        out = []
        for r in range(self.state.num_processes):
            if r == self.state.process_index:
                continue
            try:
                out.append(json.loads((self.folder / f"rank-{r}.json").read_text()))
            except (OSError, json.JSONDecodeError):  # not written yet
                out.append({"done": 0, "failed": 0, "finished": False})
        return out

    def _refresh(self, others: list[dict]) -> None:
        self.bar.n = self.done + sum(o["done"] for o in others)
        self.bar.set_postfix(failed=self.failed + sum(o["failed"] for o in others), refresh=False)
        self.bar.refresh()

    def update(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += int(failed)
        self._publish()
        if self.state.is_main_process and not self.bar.disable:
            self._refresh(self._others() if self.state.num_processes > 1 else [])

    def finish(self) -> None:
        self._publish(finished=True)
        if self.state.is_main_process and self.state.num_processes > 1:
            while True:
                others = self._others()
                self._refresh(others)
                if all(o["finished"] for o in others):
                    break
                time.sleep(0.2)
        self.bar.close()


class StoreLock:
    """Keeps two runs from writing one store at once (an advisory ``flock`` on ``STORE/.lock``).

    The main process takes it exclusively to check that no other run holds it, then every process of the run holds
    it shared until it is done. The kernel drops a process's lock when it dies, even by SIGKILL, while workers that a
    killed launcher left running keep theirs — so a re-run cannot interleave with them. (No-op without ``fcntl``.)
    """

    def __init__(self, folder: Path):
        self.file = folder / ".lock"
        self.fd: int | None = None

    def acquire(self, check_exclusive: bool) -> None:
        if fcntl is None:  # pragma: no cover - Windows: runs are not guarded
            return
        self.fd = os.open(self.file, os.O_CREAT | os.O_RDWR, 0o666)
        if check_exclusive:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.release()
                raise ValueError(f"another run is writing to {self.file.parent} (its processes hold "
                                 f"{self.file.name}); wait for it to end or stop it, then re-run") from None
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _explain_one(explainer, record: Record, image_folder, options: dict, prompt: str | None):
    """``(explanation, the record with its image size, its mask array)``."""
    image, mask = load_record(record, image_folder)
    explanation = explainer.attribute(image, target=record.text, prompt=record.prompt or prompt, **options)
    return explanation, dataclasses.replace(record, original_hw=(image.height, image.width)), mask


def _open_store(out: Path, manifest: dict, state, lock: StoreLock, retry_failed: bool) -> set[str]:
    """Create or check the store, clean what a killed run left, and return the ids already done — read by every
    process before any writes (so all of them compute the same shares)."""
    check_manifest(out, manifest)
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire(check_exclusive=True)
        write_manifest(out, manifest)
        clean_shards(out)
        shutil.rmtree(out / PROGRESS, ignore_errors=True)
        (out / PROGRESS).mkdir()
    state.wait_for_everyone()
    if not state.is_main_process:
        lock.acquire(check_exclusive=False)
    done = finished_ids(out, include_failures=not retry_failed)
    state.wait_for_everyone()
    return done


def _explain_share(explainer, share, out: Path, state, board: ProgressBoard, image_folder, options, prompt,
                   batch_records: int, fail_fast: bool) -> tuple[int, int]:
    """Explain this process's records into its own shards; returns (explained, failed)."""
    writer = ShardWriter(out, rank=state.process_index)
    explained = failed = 0
    try:
        for index, record in share:
            t0 = time.perf_counter()
            try:
                explanation, record_hw, mask = _explain_one(explainer, record, image_folder, options, prompt)
            except Exception as exc:
                if fail_fast:
                    raise RecordError(record.id, exc) from exc
                writer.add_failure(index, record, f"{type(exc).__name__}: {exc}")
                failed += 1
                board.update(failed=True)
            else:
                writer.add(index, record_hw, explanation, time.perf_counter() - t0, mask=mask)
                explained += 1
                board.update()
            if len(writer) >= batch_records:
                writer.flush()
    finally:
        writer.flush()
    return explained, failed


def explain_dataset(explainer, records: list[Record], out: str | os.PathLike, manifest: dict,
                    options: dict | None = None, prompt: str | None = None, image_folder: str | None = None,
                    batch_records: int = 16, fail_fast: bool = False, retry_failed: bool = False,
                    progress: bool = True, state=None) -> dict:
    """Explain ``records`` with ``explainer.attribute(image, target=record.text, prompt=record.prompt or prompt,
    **options)`` into the store ``out``; returns the counts of this run over all processes (on the main process
    also the store's totals).

    ``manifest`` (``model``, ``model_fingerprint``, ``method``, ``options``, ``data``, ...) is written to a new store
    and checked against an existing one (``ValueError`` on a difference). Finished records are skipped (failed ones
    too, unless ``retry_failed``). A record that raises is recorded as a failure with its error; ``fail_fast``
    raises :class:`RecordError` instead (after writing what is done).
    """
    if batch_records < 1:
        raise ValueError(f"batch_records must be >= 1, got {batch_records}")
    state = state if state is not None else partial_state()
    out = Path(out)
    lock = StoreLock(out)
    t_start = time.perf_counter()
    try:
        done = _open_store(out, manifest, state, lock, retry_failed)
        pending = [(i, r) for i, r in enumerate(records) if r.id not in done]
        board = ProgressBoard(out / PROGRESS, state, total=len(pending), desc=f"explain ({state.num_processes} "
                              f"proc)", enabled=progress)
        counts = [_explain_share(explainer, pending[state.process_index :: state.num_processes], out, state, board,
                                 image_folder, dict(options or {}), prompt, batch_records, fail_fast)]
        board.finish()
        if state.num_processes > 1:
            from accelerate.utils import gather_object

            counts = gather_object(counts)
        state.wait_for_everyone()
        summary = {"records": len(records), "explained": sum(e for e, _ in counts),
                   "failed": sum(f for _, f in counts), "skipped": len(records) - len(pending),
                   "processes": state.num_processes, "seconds": round(time.perf_counter() - t_start, 3)}
        if state.is_main_process:
            from rgae.datasets.store import ExplanationStore

            store = ExplanationStore(out)
            summary.update(store_records=len(store), store_failures=len(store.failures))
            shutil.rmtree(out / PROGRESS, ignore_errors=True)
        return summary
    finally:
        lock.release()
