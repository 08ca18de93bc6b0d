"""Named training recipes for ``deco train --recipe NAME``: a registry other modules add to.

A recipe is a callable ``recipe(overrides: dict[str, object], resume: bool | str | None) -> object`` (typically a
:class:`~deco_models.train.trainer.TrainResult` or a list of them); ``overrides`` are the command line's dotted
``--key value`` pairs, for the recipe to interpret. Modules under :mod:`deco_models.recipes` are imported before a
lookup so that they can register themselves:

>>> from deco_models.train.recipes import RECIPES, register_recipe
>>> @register_recipe("hello")
... def hello(overrides, resume=None):
...     return overrides
>>> RECIPES["hello"]({"a": 1}, None)
{'a': 1}
>>> del RECIPES["hello"]
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

RECIPES: dict[str, Callable[..., Any]] = {}


def register_recipe(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator adding a recipe to :data:`RECIPES` under ``name``."""

    def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
        RECIPES[name] = function
        return function

    return decorate


def discover() -> None:
    """Import every module of the :mod:`deco_models.recipes` package (they register on import)."""
    try:
        package = importlib.import_module("deco_models.recipes")
    except ModuleNotFoundError:
        return
    for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
        try:
            importlib.import_module(f"deco_models.recipes.{info.name}")
        except Exception as exc:  # one broken recipe must not hide the others
            logger.warning("could not import recipe module deco_models.recipes.%s: %s", info.name, exc)


def get_recipe(name: str) -> Callable[..., Any]:
    """The recipe called ``name`` (``shapes-mini`` and ``shapes_mini`` are the same name)."""
    discover()
    for key in (name, name.replace("_", "-"), name.replace("-", "_")):
        if key in RECIPES:
            return RECIPES[key]
    raise ValueError(f"unknown recipe {name!r}; available: {sorted(RECIPES) or 'none registered'}")
