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

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from rgae.datasets.records import Record
from rgae.datasets.store import ShardWriter, _write_json, check_manifest, clean_shards, finished_ids, write_manifest

__all__ = ["ProgressBoard", "explain_dataset", "load_record", "model_fingerprint", "partial_state"]

PROGRESS = "progress"


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
    """``(RGB PIL image, mask array or None)`` of a record, with ``record.original_hw`` set and its mask loaded;
    ``ValueError`` for an unreadable image or a mask of another size."""
    from rgae.methods.base import load_image

    source = _resolve(record.image, image_folder) if isinstance(record.image, str) else record.image
    image = load_image(str(source) if isinstance(source, Path) else source)
    record.original_hw = (image.height, image.width)
    mask = record.mask
    if isinstance(mask, str):
        mask = _read_mask(_resolve(mask, image_folder))
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != record.original_hw:
            raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                             f"{record.original_hw[1]}x{record.original_hw[0]}")
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
            raise ValueError(f"mask must hold integer labels, got dtype {mask.dtype}")
        mask = mask.astype(np.int32)
    record.mask = mask
    return image, mask


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


def _explain_one(explainer, record: Record, image_folder, options: dict, prompt: str | None):
    image, _ = load_record(record, image_folder)
    return explainer.attribute(image, target=record.text, prompt=record.prompt or prompt, **options)


def explain_dataset(explainer, records: list[Record], out: str | os.PathLike, manifest: dict,
                    options: dict | None = None, prompt: str | None = None, image_folder: str | None = None,
                    batch_records: int = 16, fail_fast: bool = False, retry_failed: bool = False,
                    progress: bool = True, state=None) -> dict:
    """Explain ``records`` with ``explainer.attribute(image, target=record.text, prompt=record.prompt or prompt,
    **options)`` into the store ``out``; returns this process's counts (the main process's include the store's
    totals after every rank is done).

    ``manifest`` (``model``, ``model_fingerprint``, ``method``, ``options``, ``data``, ...) is written to a new store
    and checked against an existing one (``ValueError`` on a difference). Finished records are skipped (failed ones
    too, unless ``retry_failed``). A record that raises is recorded as a failure with its error; ``fail_fast``
    re-raises instead (after writing what is done).
    """
    if batch_records < 1:
        raise ValueError(f"batch_records must be >= 1, got {batch_records}")
    state = state if state is not None else partial_state()
    options = dict(options or {})
    out = Path(out)
    check_manifest(out, manifest)
    board_dir = out / PROGRESS
    if state.is_main_process:
        write_manifest(out, manifest)
        clean_shards(out)
        shutil.rmtree(board_dir, ignore_errors=True)
        board_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    done = finished_ids(out, include_failures=not retry_failed)
    # Everyone reads the store before anyone writes to it: the shares below are computed from the same `done`.
    state.wait_for_everyone()
    pending = [(i, r) for i, r in enumerate(records) if r.id not in done]
    share = pending[state.process_index :: state.num_processes]
    writer = ShardWriter(out, rank=state.process_index)
    board = ProgressBoard(board_dir, state, total=len(pending), desc=f"explain ({state.num_processes} proc)",
                          enabled=progress)
    explained = failed = 0
    t_start = time.perf_counter()
    try:
        for index, record in share:
            t0 = time.perf_counter()
            try:
                explanation = _explain_one(explainer, record, image_folder, options, prompt)
            except Exception as exc:
                if fail_fast:
                    raise
                writer.add_failure(index, record, f"{type(exc).__name__}: {exc}")
                failed += 1
                board.update(failed=True)
            else:
                writer.add(index, record, explanation, time.perf_counter() - t0)
                explained += 1
                board.update()
            if len(writer) >= batch_records:
                writer.flush()
    finally:
        writer.flush()
    board.finish()
    state.wait_for_everyone()
    summary = {"records": len(records), "explained": explained, "failed": failed, "skipped": len(records) -
               len(pending), "processes": state.num_processes, "seconds": round(time.perf_counter() - t_start, 3)}
    if state.is_main_process:
        from rgae.datasets.store import ExplanationStore

        store = ExplanationStore(out)
        summary.update(store_records=len(store), store_failures=len(store.failures))
        shutil.rmtree(board_dir, ignore_errors=True)
    return summary
