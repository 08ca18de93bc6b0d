"""deco_models: LLaVA-style MLLMs that differ only in the projector (MLP, Q-Former, DeCo's adaptive average pooling,
max pooling, C-/D-Abstractor), built on transformers' Llava classes."""

from __future__ import annotations

__version__ = "0.1.0"

# Public names, imported lazily so `import deco_models` stays cheap (transformers is heavy).
_LAZY = {
    "build_projector": "deco_models.projectors",
    "parse_projector_spec": "deco_models.projectors",
    "DecoConfig": "deco_models.configuration",
    "DecoForConditionalGeneration": "deco_models.modeling",
    "DecoProcessor": "deco_models.processing",
    "load": "deco_models.loading",
}

# Subpackages reachable as attributes after a bare `import deco_models` (deco_models.zoo.available()), imported on
# first use like the names above.
# (Not in __all__: `from deco_models import *` should not import all of them.)
_SUBMODULES = ("cli", "cli_base", "commands", "configuration", "conversation", "convert", "data", "eval", "io",
               "loading", "modeling", "peft_compat", "processing", "projectors", "recipes", "train", "zoo")

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"deco_models.{name}")
    raise AttributeError(f"module 'deco_models' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__, *_SUBMODULES})
