"""Out-of-vocabulary target words: a UserWarning naming them, recorded in ``Explanation.options["unknown_words"]``."""

from __future__ import annotations

import warnings

import pytest

from rgae import Explanation
from rgae.commands.demo import demo_scene, tiny_random_model
from rgae.methods import GradCAM, RawAttention
from rgae.methods.base import unknown_words


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_model("avgpool2_36")


@pytest.mark.parametrize("method", [RawAttention, GradCAM])
def test_unknown_target_word_warns_and_is_recorded(tiny, method, tmp_path):
    model, processor = tiny
    with pytest.warns(UserWarning, match=r"'kangaroo', 'wombat' are not in the tokenizer's vocabulary") as record:
        e = method(model, processor).attribute(demo_scene().image, target="a red kangaroo left of a wombat")
    assert "'<unk>'" in str(record[0].message)
    assert e.options["unknown_words"] == ["kangaroo", "wombat"]
    assert e.output_tokens.count("<unk>") == 2
    assert Explanation.load(e.save(tmp_path / "e")).options["unknown_words"] == ["kangaroo", "wombat"]


def test_known_words_do_not_warn(tiny):
    model, processor = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        e = RawAttention(model, processor).attribute(demo_scene().image, target="a red circle left of a square")
    assert "unknown_words" not in e.options


def test_unknown_words_by_hand():
    from deco_models.recipes.shapes_mini import build_tokenizer

    tok = build_tokenizer()
    assert unknown_words(tok, "a red circle") == []
    assert unknown_words(tok, "a purple circle purple") == ["purple"]  # each word once, in order
    ids = tok("a red circle", add_special_tokens=False)["input_ids"]
    assert unknown_words(tok, "a red circle", ids) == []


def test_doctest():
    import doctest

    import rgae.methods.base

    result = doctest.testmod(rgae.methods.base)
    assert result.attempted > 0 and result.failed == 0
