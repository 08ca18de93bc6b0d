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
import os
import shutil
import time
from pathlib import Path

import torch

from rgae.datasets.processes import ProgressBoard, StoreLock, partial_state
from rgae.datasets.records import Record, load_record
from rgae.datasets.store import ShardWriter, check_manifest, clean_shards, finished_ids, write_manifest

__all__ = ["RecordError", "explain_dataset", "model_fingerprint"]

PROGRESS = ".progress"  # the ranks' progress files, removed at the end


class RecordError(Exception):
    """A record failed under ``fail_fast``; ``error`` is the original exception."""

    def __init__(self, record_id: str, error: BaseException):
        super().__init__(f"record {record_id!r} failed: {type(error).__name__}: {error}")
        self.record_id, self.error = record_id, error


def model_fingerprint(model) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and the first values of every parameter and
    buffer (a retrained or different model changes it; moving it to another device does not)."""
    h = hashlib.sha256()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        head = t.detach().reshape(-1)[:8].to("cpu", torch.float64).numpy()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(head.tobytes())
    return h.hexdigest()[:32]


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
    and checked against an existing one (:class:`~rgae.datasets.store.StoreError` on a difference). Finished records
    are skipped (failed ones too, unless ``retry_failed``). A record that raises is recorded as a failure with its
    error; ``fail_fast`` raises :class:`RecordError` instead (after writing what is done).
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
