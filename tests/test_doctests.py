"""Run the docstring examples of the public modules, so documented examples stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "rgae.explanation",
    "rgae.rules",
    "rgae.recompute",
    "rgae.methods.relevance",
    "rgae.metrics",
    "deco_models.projectors.registry",
    "deco_models.eval.scorers",
    "deco_models.eval.rec",
    "deco_models.eval.tasks",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
