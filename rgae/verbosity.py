"""How much the libraries underneath print: transformers' progress bars and log level, for one block of code.

transformers draws a "Loading weights" bar for every ``from_pretrained`` (three per shapes-mini model) and keeps its
switches in process-wide state. :func:`quiet_loading` hides those bars around a load and puts the switch back as it
found it; :func:`verbose_output` (what ``--verbose`` on the command lines turns on) shows transformers' info logs,
its bars and this project's own ``logging`` records, and also restores everything afterwards.

Example:
    >>> from transformers.utils import logging as hf_logging
    >>> before = hf_logging.is_progress_bar_enabled()
    >>> with quiet_loading():
    ...     hf_logging.is_progress_bar_enabled()
    False
    >>> hf_logging.is_progress_bar_enabled() == before
    True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# The loggers of this project's packages: --verbose shows their INFO records.
PROJECT_LOGGERS = ("rgae", "deco_models")


@contextlib.contextmanager
def transformers_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' (and huggingface_hub's) tqdm bars on or off inside the block; the old switch afterwards."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        if before != enabled:
            (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _details_requested() -> bool:
    """True when transformers' verbosity is INFO or DEBUG: someone asked for details (``--verbose`` does)."""
    from transformers.utils import logging as hf_logging

    return hf_logging.get_verbosity() <= hf_logging.INFO


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-load "Loading weights" bars inside the block, unless transformers' verbosity is INFO or lower."""
    if _details_requested():
        yield
        return
    with transformers_progress_bars(False):
        yield


@contextlib.contextmanager
def verbose_output() -> Iterator[None]:
    """transformers at INFO with its progress bars, and this project's loggers at INFO on stderr; all restored."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level))
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
    hf_logging.set_verbosity_info()
    try:
        with transformers_progress_bars(True):
            yield
    finally:
        hf_logging.set_verbosity(level)
        for logger, old in saved:
            logger.setLevel(old)
            logger.removeHandler(handler)
