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

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deco_models' has no attribute {name!r}")
