"""The console scripts: every subcommand has a working --help; user mistakes end in one line on stderr and exit code
2, checked before any model is loaded; bugs keep their traceback; --help texts (defaults, recipes, no RST)."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deco_models.cli import COMMANDS as DECO_COMMANDS
from deco_models.cli import main as deco
from rgae.cli import COMMANDS as RGAE_COMMANDS
from rgae.cli import main as rgae
from rgae.cli_base import UsageError

ZOO_MODEL = "shapes-mini-avgpool2_36"
CPU_BUILD = torch.version.cuda is None


@pytest.mark.parametrize("prog,commands", [("rgae", RGAE_COMMANDS), ("deco", DECO_COMMANDS)])
def test_console_script_help_lists_every_subcommand(prog, commands):
    exe = shutil.which(prog)
    assert exe, f"console script {prog!r} is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for name in commands:
        assert name in out


@pytest.mark.parametrize("prog,commands", [("rgae", RGAE_COMMANDS), ("deco", DECO_COMMANDS)])
def test_every_subcommand_help(prog, commands, capsys):
    main = rgae if prog == "rgae" else deco
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert f"{prog} {name}" in out and "--verbose" in out


def test_no_subcommand_prints_help(capsys):
    assert rgae([]) == 0
    assert "usage: rgae" in capsys.readouterr().out


# ---- one-line errors ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any attempt to load a model fails the test: the errors below must come from the cheap checks."""
    import transformers

    import deco_models.loading
    import deco_models.zoo

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(deco_models.loading, "load", forbidden)
    monkeypatch.setattr(deco_models.zoo, "load", forbidden)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(forbidden))


@pytest.fixture
def files(tmp_path):
    """An image, a text file posing as an image, an empty folder, a non-empty folder and a plain file."""
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "q.jsonl").write_text('{"question_id": 1, "image": "scene.png", "text": "Is it gray?"}\n')
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "a"}\n{"question_id": \n')
    return tmp_path


def one_line_error(capsys, code: int, prefix: str) -> str:
    """The exit code is 2 and stderr is exactly one line ``PREFIX: error: ...``; returns that line."""
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prefix}: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


ZOO_LISTING = ("zoo models: shapes-mini-avgpool2_36, shapes-mini-mlp2x_gelu, shapes-mini-qformer2_36",
               "a model folder must contain config.json")
CUDA_MESSAGE = "CUDA is not available; this torch is a CPU build"


def deco_cases(d):
    image, fake, empty, full, file = (str(d / n) for n in ("scene.png", "not-an-image.png", "empty", "full",
                                                            "file.txt"))
    generate = ["generate", "--prompt", "hi"]
    evaluate = ["eval", "--task", "pope", "--data", str(d / "q.jsonl"), "--out", str(d / "r.json")]
    return {
        "generate unknown model": (generate + ["--model", "nope"], ["--model nope: 'nope' is neither an existing "
                                                                    "path nor a zoo model name", *ZOO_LISTING]),
        "generate folder without config": (generate + ["--model", empty], [f"--model {empty}: ", "no config.json",
                                                                          *ZOO_LISTING]),
        "generate missing image": (generate + ["--model", ZOO_MODEL, "--image", str(d / "gone.png")],
                                   [f"--image {d / 'gone.png'}: no such file (expected an image file)"]),
        "generate unreadable image": (generate + ["--model", ZOO_MODEL, "--image", fake],
                                      [f"--image {fake} is not a readable image"]),
        "generate directory as image": (generate + ["--model", ZOO_MODEL, "--image", empty],
                                        [f"--image {empty} is a directory, not an image file"]),
        "generate bad length": (generate + ["--model", ZOO_MODEL, "--max-new-tokens", "0"],
                                ["--max-new-tokens must be >= 1, got 0"]),
        "eval missing data": (["eval", "--task", "pope", "--data", str(d / "gone.jsonl"), "--out", str(d / "r.json"),
                               "--model", ZOO_MODEL], [f"--data {d / 'gone.jsonl'}: no such file"]),
        "eval unknown model": (evaluate + ["--model", "nope"], ["--model nope:", *ZOO_LISTING]),
        "eval out is a folder": (["eval", "--task", "pope", "--data", str(d / "q.jsonl"), "--out", empty, "--model",
                                  ZOO_MODEL], [f"--out {empty} is a directory; give a file name"]),
        "eval missing image folder": (evaluate + ["--model", ZOO_MODEL, "--image-folder", str(d / "imgs")],
                                      [f"--image-folder {d / 'imgs'}: no such folder"]),
        "eval bad data file": (["eval", "--task", "pope", "--data", str(d / "bad.jsonl"), "--out", str(d / "r.json"),
                                "--model", ZOO_MODEL], [f"{d / 'bad.jsonl'}:2: not a JSON record"]),
        "eval missing predictions": (evaluate + ["--predictions", str(d / "answers.jsonl")],
                                     [f"--predictions {d / 'answers.jsonl'}: no such file"]),
        "convert unknown model": (["convert", "nope", str(d / "dst")], ["src nope:", *ZOO_LISTING]),
        "convert dst is a file": (["convert", ZOO_MODEL, file], [f"dst {file} is an existing file"]),
        "convert dst not empty": (["convert", ZOO_MODEL, full], [f"dst {full} exists and is not empty"]),
        "convert no dst": (["convert", ZOO_MODEL], ["dst is required unless --detect-only is given"]),
        "train missing config": (["train", "--config", str(d / "run.yaml")],
                                 [f"--config {d / 'run.yaml'}: no such file (expected a YAML config file)"]),
        "train unknown recipe": (["train", "--recipe", "nope"], ["unknown recipe 'nope'", "shapes-mini"]),
        "train unknown recipe option": (["train", "--recipe", "shapes-mini", "--recipe.steps", "3"],
                                        ["unknown recipe option(s) recipe.steps", "recipe.finetune_steps"]),
    }


@pytest.mark.parametrize("case", list(deco_cases(Path("/x"))))
def test_deco_user_mistakes_are_one_line_exit_2(case, files, no_model_loads, capsys):
    argv, expected = deco_cases(files)[case]
    line = one_line_error(capsys, deco(argv), f"deco {argv[0]}")
    for text in expected:
        assert text in line


def _train_config(d, **sections) -> str:
    config = {"data": {"data_path": str(d / "q.jsonl")}, "train": {"output_dir": str(d / "run")},
              "model": {"name_or_path": ZOO_MODEL}}
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = d / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return str(path)


@pytest.mark.parametrize("sections,expected", [
    ({"data": {"data_path": "gone.json"}}, ["data.data_path gone.json: no such file"]),
    ({"model": {"name_or_path": "nope"}}, ["model.name_or_path nope:", *ZOO_LISTING]),
    ({"model": {"name_or_path": None, "vision_name_or_path": "/models/clip", "llm_name_or_path": "org/llm",
                "projector": "mlp2x_gelu"}},
     ["model.vision_name_or_path /models/clip: no such folder"]),
    ({"train": {"output_dir": "FILE"}}, ["is an existing file; give a folder"]),
    ({"train": {"learning_rate": 1}}, ["learning_rate"]),
])
def test_deco_train_config_mistakes_are_one_line_exit_2(sections, expected, files, no_model_loads, capsys):
    if sections.get("train", {}).get("output_dir") == "FILE":
        sections["train"]["output_dir"] = str(files / "file.txt")
    line = one_line_error(capsys, deco(["train", "--config", _train_config(files, **sections)]), "deco train")
    for text in expected:
        assert text in line


@pytest.mark.skipif(not CPU_BUILD, reason="the message is for a CPU build of torch")
@pytest.mark.parametrize("argv", [["generate", "--model", ZOO_MODEL, "--prompt", "hi", "--device", "cuda"],
                                  ["eval", "--task", "pope", "--data", "Q", "--out", "r.json", "--model", ZOO_MODEL,
                                   "--device", "cuda:0"]])
def test_deco_cuda_on_a_cpu_build(argv, files, no_model_loads, capsys):
    argv = [str(files / "q.jsonl") if a == "Q" else a for a in argv]
    argv = [str(files / "r.json") if a == "r.json" else a for a in argv]
    assert one_line_error(capsys, deco(argv), f"deco {argv[0]}").endswith(CUDA_MESSAGE)


def rgae_cases(d):
    image, fake, empty, file = (str(d / n) for n in ("scene.png", "not-an-image.png", "empty", "file.txt"))
    explain = ["explain", "--model", ZOO_MODEL, "--image", image, "--out", str(d / "out")]
    return {
        "explain unknown model": (["explain", "--model", "nope", "--image", image, "--out", str(d / "o")],
                                  ["--model nope: neither a zoo model name nor an existing folder", *ZOO_LISTING]),
        "explain folder without config": (["explain", "--model", empty, "--image", image, "--out", str(d / "o")],
                                          [f"--model {empty}: no config.json there", *ZOO_LISTING]),
        "explain missing image": (["explain", "--model", ZOO_MODEL, "--image", str(d / "gone.png"), "--out",
                                   str(d / "o")], [f"--image {d / 'gone.png'}: no such file"]),
        "explain unreadable image": (["explain", "--model", ZOO_MODEL, "--image", fake, "--out", str(d / "o")],
                                     [f"--image {fake} is not a readable image"]),
        "explain directory as image": (["explain", "--model", ZOO_MODEL, "--image", empty, "--out", str(d / "o")],
                                       [f"--image {empty} is a directory, not an image file"]),
        "explain out is a file": (["explain", "--model", ZOO_MODEL, "--image", image, "--out", file],
                                  [f"--out {file} is an existing file; give a folder"]),
        "explain layer": (explain + ["--method", "rawattn", "--layer", "foo"],
                          ["--layer must be an integer or 'mean', got 'foo'"]),
        "explain empty text": (explain + ["--text", ""], ["--text is empty"]),
        "explain blank text": (explain + ["--text", "   "], ["--text is empty"]),
        "explain layer of another method": (explain + ["--layer", "2"], ["--layer is an option of --method rawattn"]),
        "demo unknown model": (["demo", "--models", "unknown", "--out", str(d / "demo")],
                               ["--models: unknown model(s) unknown; known: shapes-mini-avgpool2_36",
                                "tiny-<projector spec>"]),
        "demo out is a file": (["demo", "--out", file], [f"--out {file} is an existing file"]),
        "demo out below a file": (["demo", "--out", f"{file}/demo"],
                                  [f"--out {file}/demo: {file} is a file, so the folder cannot be created"]),
    }


@pytest.mark.parametrize("case", list(rgae_cases(Path("/x"))))
def test_rgae_user_mistakes_are_one_line_exit_2(case, files, no_model_loads, capsys):
    argv, expected = rgae_cases(files)[case]
    line = one_line_error(capsys, rgae(argv), f"rgae {argv[0]}")
    for text in expected:
        assert text in line
    assert not (files / "demo").exists() and not (files / "out").exists()  # nothing written either


@pytest.mark.skipif(not CPU_BUILD, reason="the message is for a CPU build of torch")
def test_rgae_cuda_on_a_cpu_build(files, no_model_loads, capsys):
    argv = ["explain", "--model", ZOO_MODEL, "--image", str(files / "scene.png"), "--out", str(files / "o"),
            "--device", "cuda"]
    assert one_line_error(capsys, rgae(argv), "rgae explain") == f"rgae explain: error: {CUDA_MESSAGE}"


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads any file")
def test_image_without_read_permission(files, no_model_loads, capsys):
    image = files / "scene.png"
    image.chmod(0)
    argv = ["explain", "--model", ZOO_MODEL, "--image", str(image), "--out", str(files / "o")]
    assert "permission denied" in one_line_error(capsys, rgae(argv), "rgae explain")


def test_argparse_errors_are_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        rgae(["explain", "--model", ZOO_MODEL])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == ("rgae explain: error: the following arguments are required: --image, --out "
                           "(see rgae explain --help)")
    with pytest.raises(SystemExit) as exit_info:
        deco(["eval", "--task", "mmmu"])
    assert exit_info.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_console_script_prints_one_line_and_exit_2(tmp_path):
    """Through the installed script, in a fresh process: no traceback, one line, exit code 2."""
    exe = shutil.which("rgae")
    result = subprocess.run([exe, "explain", "--model", "nope", "--image", "x.png", "--out", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("rgae explain: error: --model nope: ") and result.stderr.count("\n") == 1


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only UsageError is a user mistake: any other exception propagates (the console script shows the traceback)."""
    from rgae.commands import demo, explain

    def bug(*args, **kwargs):
        raise ValueError("a bug, not a user mistake")

    monkeypatch.setattr(explain, "load_model", lambda *a, **k: demo.tiny_random_model())
    monkeypatch.setattr("rgae.methods.RGAE._attribute", bug)
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    with pytest.raises(ValueError, match="a bug"):
        rgae(["explain", "--model", ZOO_MODEL, "--image", str(image), "--out", str(tmp_path / "o"),
              "--text", "a red circle"])


def test_input_errors_after_loading_are_one_line(monkeypatch, tmp_path, capsys):
    """Mistakes only the tokenizer can see (a text longer than the model's context) are still one line."""
    from rgae.commands import demo, explain

    monkeypatch.setattr(explain, "load_model", lambda *a, **k: demo.tiny_random_model())
    image = tmp_path / "scene.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(image)
    code = rgae(["explain", "--model", ZOO_MODEL, "--image", str(image), "--out", str(tmp_path / "o"),
                 "--text", "red " * 600])
    assert "longer than the model's context" in one_line_error(capsys, code, "rgae explain")


def test_run_turns_usage_errors_into_exit_2_and_nothing_else():
    from rgae.cli_base import OneLineErrorParser, run, user_errors

    parser = OneLineErrorParser(prog="tool")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("bug").set_defaults(func=lambda args: 1 / 0)
    sub.add_parser("ok").set_defaults(func=lambda args: None)
    with pytest.raises(ZeroDivisionError):
        run(parser, ["bug"])
    assert run(parser, ["ok"]) == 0
    with pytest.raises(UsageError, match="^line one line two$"), user_errors(KeyError, ValueError):
        raise ValueError("line one\n  line two")
    with pytest.raises(TypeError), user_errors(ValueError):
        raise TypeError("not converted")


# ---- help texts ---------------------------------------------------------------------------------------------------


def _subparser(build_parser, name):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def test_rgae_explain_help_has_a_text_and_the_default_of_every_option(capsys):
    from rgae.cli import build_parser

    parser = _subparser(build_parser, "explain")
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit):
        rgae(["explain", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: rgae)", "(default: float32)", "(default: 32)", "(default: the model's own greedy",
                  "(default: last)", "(default: cuda when available)", "(default: OUT/figures)"):
        assert shown in out


@pytest.mark.parametrize("name", ["generate", "eval", "convert", "train"])
def test_deco_help_has_no_rst_markup(name, capsys):
    with pytest.raises(SystemExit):
        deco([name, "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "::" not in out and ":func:" not in out
    assert f"deco {name}" in out


def test_deco_train_help_lists_the_recipes_and_their_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        deco(["train", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Recipes (deco train --recipe NAME" in out and "shapes-mini: Re-train the shipped mini zoo" in out
    for option in ("out=runs/shapes-mini", "quick=False", "finetune_steps=800", "lora_r=64",
                   "projectors=mlp2x_gelu,avgpool2_36,qformer2_36"):
        assert option in out


def test_cli_doctests():
    import doctest

    import deco_models.cli_base
    import rgae.cli_base

    for module in (rgae.cli_base, deco_models.cli_base):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0
