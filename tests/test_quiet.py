"""Quiet by default: no per-load "Loading weights" bars, one progress bar for the demo (and none in logs), and
``--verbose`` brings transformers' details back; every switch the API or a command changes is restored."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image
from transformers.utils import logging as hf_logging

import deco_models
from rgae.cli import main as rgae

ZOO_MODEL = "shapes-mini-avgpool2_36"


@pytest.fixture(params=[True, False], ids=["bars-on", "bars-off"])
def bars_switch(request):
    """transformers' progress-bar switch set to each state for the test, and put back afterwards."""
    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if request.param else hf_logging.disable_progress_bar)()
    yield request.param
    (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def test_loading_a_model_draws_no_bars_and_restores_the_switch(bars_switch, capfd):
    verbosity = hf_logging.get_verbosity()
    deco_models.load(ZOO_MODEL)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "%|" not in err
    assert hf_logging.is_progress_bar_enabled() == bars_switch
    assert hf_logging.get_verbosity() == verbosity


def test_info_verbosity_brings_the_loading_bars_back(capfd):
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    try:
        deco_models.load(ZOO_MODEL)
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
    assert "Loading weights" in capfd.readouterr().err


@pytest.fixture
def scene_png(tmp_path):
    from deco_models.data.shapes import generate_scene

    path = tmp_path / "scene.png"
    Image.fromarray(generate_scene(2, n_objects=3).image).save(path)
    return path


def _explain(scene_png, out, *extra) -> int:
    return rgae(["explain", "--model", ZOO_MODEL, "--image", str(scene_png), "--text", "a large yellow square",
                 "--method", "rawattn", "--out", str(out), *extra])


def test_explain_is_quiet_and_verbose_shows_details(scene_png, tmp_path, capfd):
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    assert _explain(scene_png, tmp_path / "quiet") == 0
    quiet = capfd.readouterr()
    assert "Loading weights" not in quiet.err and quiet.err.strip() == ""
    assert "written to" in quiet.out

    assert _explain(scene_png, tmp_path / "verbose", "--verbose") == 0
    verbose = capfd.readouterr()
    assert "Loading weights" in verbose.err
    # --verbose changed transformers' switches for the command only.
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_demo_draws_one_bar_without_cursor_moves_and_none_in_logs(tmp_path, monkeypatch):
    from rgae.commands.demo import run_demo

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run_demo(tmp_path / "tty", models=["tiny-avgpool2_36", "tiny-mlp2x_gelu"], methods=["rawattn", "rollout"],
             dpi=20)
    drawn = terminal.getvalue()
    assert "rgae demo" in drawn and "100%" in drawn
    assert "\x1b[A" not in drawn  # no cursor-up: nested bars leave these in logs
    redraws = [part for part in drawn.replace("\n", "\r").split("\r") if part.strip()]
    assert redraws and all(part.startswith("rgae demo:") for part in redraws)  # one bar, redrawn in place

    log = io.StringIO()  # a file, as in `rgae demo 2> log`: not a terminal, so no bar at all
    monkeypatch.setattr(sys, "stderr", log)
    run_demo(tmp_path / "log", models=["tiny-avgpool2_36"], methods=["rawattn"], dpi=20)
    assert log.getvalue() == ""


def test_verbose_output_restores_levels():
    import logging

    from rgae.verbosity import verbose_output

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    level = logging.getLogger("deco_models").level
    handlers = list(logging.getLogger("rgae").handlers)
    with verbose_output():
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
        assert logging.getLogger("deco_models").getEffectiveLevel() == logging.INFO
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
    assert logging.getLogger("deco_models").level == level and logging.getLogger("rgae").handlers == handlers


def test_verbosity_doctests():
    import doctest

    import rgae.verbosity

    result = doctest.testmod(rgae.verbosity)
    assert result.attempted > 0 and result.failed == 0
