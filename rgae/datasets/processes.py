"""Coordination between the processes of one run: accelerate's state, one progress bar for all of them, and the
lock that keeps two runs off one store.

Example:
    >>> state = partial_state()  # doctest: +SKIP
    >>> state.process_index, state.num_processes  # doctest: +SKIP
    (0, 1)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from rgae.datasets.store import StoreError, write_json_atomic

__all__ = ["ProgressBoard", "StoreLock", "partial_state"]


def partial_state(cpu: bool | None = None):
    """accelerate's :class:`~accelerate.PartialState` for this process: gloo on the CPU when CUDA is absent (so
    ``torchrun --nproc_per_node 2`` gives two real CPU processes), NCCL on GPUs."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available() if cpu is None else cpu)


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
            write_json_atomic(self.folder / f"rank-{self.state.process_index}.json",
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
                raise StoreError(f"another run is writing to {self.file.parent} (its processes hold "
                                 f"{self.file.name}); wait for it to end or stop it, then re-run") from None
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
