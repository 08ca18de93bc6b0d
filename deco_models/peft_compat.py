"""peft entry points without the deprecation notice peft itself triggers.

peft (0.21) reads ``model.is_gradient_checkpointing`` whenever it wraps a model, a property transformers 5.24
deprecated in favour of ``is_activation_checkpointing``. The warning is about peft's call, not ours, so it is
silenced for exactly that message and only while peft wraps; every other warning still shows.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """A block in which peft may wrap models without warning about its own deprecated transformers call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def get_peft_model(model, config, **kwargs):
    """``peft.get_peft_model(model, config, **kwargs)`` inside :func:`peft_wrapping`."""
    import peft

    with peft_wrapping():
        return peft.get_peft_model(model, config, **kwargs)
