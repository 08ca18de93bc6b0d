"""Model adapters: one small declarative description per model family (see :class:`ModelAdapter`).

Each family is one module of this package that defines ``FAMILY = Family(...)``: the model classes it explains (by
class name, so transformers is imported only when a model is), how to build its adapter, and what its connector's
Query-to-Patch rule is. :func:`get_adapter` picks the family of a model by its class (the most specific class in the
model's MRO wins); :func:`families` lists them; :func:`register_adapter` adds a family from outside the package
(``docs/adapters.md`` shows how).

Example:
    >>> from rgae.adapters import families
    >>> {"deco", "llava", "blip2", "mllama"} <= {f.name for f in families()}
    True
    >>> from rgae.adapters import get_adapter
    >>> get_adapter(model).projector_kind  # doctest: +SKIP
    'avgpool'
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from rgae.adapters.base import PROJECTOR_KINDS, ModelAdapter, leaf_attention_modules

__all__ = [
    "PROJECTOR_KINDS",
    "Family",
    "ModelAdapter",
    "families",
    "get_adapter",
    "leaf_attention_modules",
    "register_adapter",
]

# Modules of this package that are not families.
_NOT_FAMILIES = {"base", "geometry"}


@dataclass(frozen=True)
class Family:
    """One model family rgae explains.

    Attributes:
        name: short name (``"llava-next"``).
        model_classes: class names of the models it explains (``"LlavaNextForConditionalGeneration"``), matched
            against the model's MRO.
        build: ``build(model) -> ModelAdapter``.
        connector: what the connector does (``"2-layer MLP per token"``).
        query_to_patch: the Query-to-Patch rule R-GAE uses and why it is exact (for docs and the README table).
        matches: optional extra test ``matches(model) -> bool`` (e.g. a config's ``model_type``).
    """

    name: str
    model_classes: tuple[str, ...]
    build: Callable[[nn.Module], ModelAdapter]
    connector: str = ""
    query_to_patch: str = ""
    matches: Callable[[nn.Module], bool] | None = None

    def rank(self, model: nn.Module) -> int | None:
        """Position in the model's MRO of the most specific class this family names (None: not this family)."""
        if self.matches is not None and self.matches(model):
            return -1
        names = [cls.__name__ for cls in type(model).__mro__]
        found = [names.index(c) for c in self.model_classes if c in names]
        return min(found) if found else None


_REGISTERED: list[Family] = []
_DISCOVERED: list[Family] | None = None


def _discover() -> list[Family]:
    global _DISCOVERED
    if _DISCOVERED is None:
        found = []
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
            if info.name.startswith("_") or info.name in _NOT_FAMILIES:
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            family = getattr(module, "FAMILY", None)
            if isinstance(family, Family):
                found.append(family)
        _DISCOVERED = found
    return _DISCOVERED


def families() -> list[Family]:
    """Every family rgae knows: those registered with :func:`register_adapter` first, then the package's own."""
    return [*_REGISTERED, *_discover()]


def register_adapter(name: str, matches: Callable[[nn.Module], bool], build: Callable[[nn.Module], ModelAdapter],
                     connector: str = "", query_to_patch: str = "") -> Family:
    """Register a family from outside the package: ``matches(model)`` says whether ``build(model)`` describes it.
    It takes precedence over the package's families."""
    family = Family(name, (), build, connector, query_to_patch, matches)
    _REGISTERED.insert(0, family)
    return family


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The :class:`ModelAdapter` of ``model`` (a ModelAdapter passes through)."""
    if isinstance(model, ModelAdapter):
        return model
    ranked = [(rank, i, f) for i, f in enumerate(families()) if (rank := f.rank(model)) is not None]
    if ranked:
        return min(ranked, key=lambda r: (r[0], r[1]))[2].build(model)
    known = ", ".join(f.name for f in families())
    raise ValueError(
        f"no rgae adapter for {type(model).__name__} (known families: {known}); see docs/adapters.md to add one"
    )
