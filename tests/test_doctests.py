"""Run the docstring examples of the public modules, so documented examples stay true."""

import doctest
import importlib

import pytest

MODULES = [
    "rgae.explanation",
    "rgae.rules",
    "rgae.recompute",
    "rgae.methods.relevance",
    "rgae.methods.rgae",
    "rgae.methods.occlusion",
    "rgae.layout",
    "rgae.adapters",
    "rgae.adapters.blocks",
    "rgae.adapters.geometry",
    "rgae.adapters.tiling",
    # every family module
    "rgae.adapters.aya_vision",
    "rgae.adapters.blip2",
    "rgae.adapters.deco",
    "rgae.adapters.gemma3",
    "rgae.adapters.idefics3",
    "rgae.adapters.instructblip",
    "rgae.adapters.internvl",
    "rgae.adapters.llava",
    "rgae.adapters.llava_next",
    "rgae.adapters.llava_onevision",
    "rgae.adapters.mistral3",
    "rgae.adapters.mllama",
    "rgae.adapters.qwen2_vl",
    "rgae.adapters.qwen2_5_vl",
    "rgae.adapters.qwen3_vl",
    "rgae.adapters.qwen_vl_base",
    "rgae.adapters.paligemma",
    "rgae.adapters.smolvlm",
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


def test_every_family_module_is_listed():
    import pkgutil

    import rgae.adapters as adapters

    names = [f"rgae.adapters.{info.name}" for info in pkgutil.iter_modules(adapters.__path__)]
    family_modules = {name for name in names if hasattr(importlib.import_module(name), "FAMILY")}
    assert len(family_modules) >= 14
    assert family_modules <= set(MODULES), sorted(family_modules - set(MODULES))
