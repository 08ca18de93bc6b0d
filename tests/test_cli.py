"""The console scripts are installed and every subcommand has a working --help."""

import shutil
import subprocess

import pytest

from deco_models.cli import COMMANDS as DECO_COMMANDS
from rgae.cli import COMMANDS as RGAE_COMMANDS


@pytest.mark.parametrize("prog,commands", [("rgae", RGAE_COMMANDS), ("deco", DECO_COMMANDS)])
def test_console_script_help_lists_every_subcommand(prog, commands):
    exe = shutil.which(prog)
    assert exe, f"console script {prog!r} is not installed (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    for name in commands:
        assert name in out


@pytest.mark.parametrize("prog,commands", [("rgae", RGAE_COMMANDS), ("deco", DECO_COMMANDS)])
def test_every_subcommand_help(prog, commands, capsys):
    main = __import__("rgae.cli" if prog == "rgae" else "deco_models.cli", fromlist=["main"]).main
    for name in commands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert f"{prog} {name}" in capsys.readouterr().out


def test_no_subcommand_prints_help(capsys):
    from rgae.cli import main

    assert main([]) == 0
    assert "usage: rgae" in capsys.readouterr().out
