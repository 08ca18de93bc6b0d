import logging
import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing, and keep tests deterministic.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# RGAE_STRICT_DEPRECATIONS=1 (CI's main run): a deprecation that transformers, peft or accelerate reports on the
# project's calls fails the test that made it, while the old API still works. They report it two ways: warnings
# (FutureWarning / DeprecationWarning raised from their modules) and their loggers ("... is deprecated ...").
STRICT_DEPRECATIONS = os.environ.get("RGAE_STRICT_DEPRECATIONS", "") not in ("", "0")
WATCHED_LIBRARIES = ("transformers", "peft", "accelerate")


class DeprecationLogged(AssertionError):
    """A watched library logged a deprecation notice."""


class _RaiseOnDeprecation(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            raise DeprecationLogged(f"{record.name}: {message}")


def pytest_configure(config):
    if not STRICT_DEPRECATIONS:
        return
    for library in WATCHED_LIBRARIES:
        for category in ("FutureWarning", "DeprecationWarning"):
            config.addinivalue_line("filterwarnings", f"error::{category}:{library}(\\..*)?")
        # transformers' library logger does not propagate to the root logger, so the handler sits on each one.
        logging.getLogger(library).addHandler(_RaiseOnDeprecation())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_warning_once():
    # transformers' `logger.warning_once` is cached per process: clear it so every test that triggers a deprecation
    # notice sees it, not only the first one.
    if STRICT_DEPRECATIONS:
        try:
            from transformers.utils import logging as hf_logging

            for name in ("warning_once", "info_once"):
                fn = getattr(hf_logging.logging.Logger, name, None)
                if fn is not None and hasattr(fn, "cache_clear"):
                    fn.cache_clear()
        except ImportError:
            pass
    yield
