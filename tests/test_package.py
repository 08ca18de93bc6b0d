"""``import deco_models`` stays cheap and reaches its subpackages lazily (``deco_models.zoo.available()``)."""

import subprocess
import sys


def test_subpackages_are_attributes_after_a_bare_import():
    code = ("import sys, deco_models; assert 'deco_models.zoo' not in sys.modules; "
            "names = deco_models.zoo.available(); assert 'shapes-mini-avgpool2_36' in names, names; "
            "assert deco_models.io.read_json_lines('{\"a\": 1}', 'x') == [{'a': 1}]; "
            "assert 'zoo' in dir(deco_models) and 'torch' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_unknown_attribute_is_still_an_attribute_error():
    import pytest

    import deco_models

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        deco_models.nonexistent  # noqa: B018


def test_command_line_parsers_do_not_import_torch():
    """`rgae --help` / `deco --help` answer at once: building the parsers imports neither torch nor transformers."""
    code = ("import sys, deco_models.cli, rgae.cli; deco_models.cli.build_parser(); rgae.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not heavy, heavy; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
