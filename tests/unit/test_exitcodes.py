"""One table of exit codes: the error classes, `pvehook --help` and the README agree with it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from pvehook import errors, exitcodes

README = Path(__file__).resolve().parents[2] / "README.md"


def _error_classes():
    return [c for _n, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.PvehookError) and c is not errors.Refusals]


@pytest.mark.parametrize("which", ["hook", "cli"])
def test_the_readme_tables_are_the_table(which):
    text = README.read_text()
    assert exitcodes.markdown(which) in text, (
        f"README's {which} exit-code table differs from pvehook/exitcodes.py; it should read:\n"
        + exitcodes.markdown(which))


def test_every_error_class_has_a_code_of_the_table():
    known = {code for code, _hook, _cli in exitcodes.TABLE}
    for cls in _error_classes():
        assert cls.exit_code in known, cls


def test_codes_are_unique_and_every_code_means_something():
    codes = [code for code, _hook, _cli in exitcodes.TABLE]
    assert len(codes) == len(set(codes))
    assert all(hook or cli for _code, hook, cli in exitcodes.TABLE)


def test_pvehook_help_lists_every_code_of_the_cli(capsys):
    from click.testing import CliRunner

    from pvehook.cli import cli

    out = CliRunner().invoke(cli, ["--help"]).output
    block = out[out.index("Exit codes:"):]
    for code, _meaning in exitcodes.cli_codes():
        assert f"\n    {code:<3} " in block, code  # click indents the help by two more
