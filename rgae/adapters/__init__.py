"""Model adapters: one small declarative description per model family (see :class:`ModelAdapter`).

:func:`get_adapter` picks the adapter of a model by its class (most specific first); :func:`register_adapter` adds a
family (``docs/adapters.md`` shows how).

Example:
    >>> from rgae.adapters import get_adapter
    >>> get_adapter(model).projector_kind  # doctest: +SKIP
    'avgpool'
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from rgae.adapters.base import PROJECTOR_KINDS, ModelAdapter, leaf_attention_modules

__all__ = ["PROJECTOR_KINDS", "ModelAdapter", "get_adapter", "leaf_attention_modules", "register_adapter"]

# (predicate, builder), tried newest first so a registered subclass family wins over its base class.
_ADAPTERS: list[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], ModelAdapter], str]] = []


def register_adapter(name: str, matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], ModelAdapter]):
    """Register an adapter: ``matches(model)`` says whether ``build(model)`` describes it."""
    _ADAPTERS.insert(0, (matches, build, name))


def _is_llava(model) -> bool:
    from transformers import LlavaForConditionalGeneration

    return isinstance(model, LlavaForConditionalGeneration)


def _is_deco(model) -> bool:
    return type(model).__name__ == "DecoForConditionalGeneration" or getattr(
        getattr(model, "config", None), "model_type", None
    ) == "deco"


def _llava(model):
    from rgae.adapters.llava import llava_adapter

    return llava_adapter(model)


def _deco(model):
    from rgae.adapters.deco import deco_adapter

    return deco_adapter(model)


register_adapter("llava", _is_llava, _llava)
register_adapter("deco", _is_deco, _deco)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The :class:`ModelAdapter` of ``model`` (a ModelAdapter passes through)."""
    if isinstance(model, ModelAdapter):
        return model
    for matches, build, _ in _ADAPTERS:
        if matches(model):
            return build(model)
    known = ", ".join(name for _, _, name in _ADAPTERS)
    raise ValueError(
        f"no rgae adapter for {type(model).__name__} (known families: {known}); see docs/adapters.md to add one"
    )
