"""The `dp2osr` entry point parses the list it is given (or sys.argv) without modifying either."""

import sys
from pathlib import Path

import pytest

import dp2osr.upscale as upscale_module
from dp2osr.cli import build_parser, main


@pytest.fixture
def captured_run(monkeypatch):
    """Replace upscale's run with one that records the resolved config (no model is loaded)."""
    seen = []
    monkeypatch.setattr(upscale_module, "run", seen.append)
    return seen


def test_positional_input_is_rewritten_on_a_copy(captured_run):
    before = list(sys.argv)
    argv = ["upscale", "photo.png", "--samples", "3"]
    assert main(argv) == 0
    assert argv == ["upscale", "photo.png", "--samples", "3"]  # the caller's list is untouched
    assert sys.argv == before
    (cfg,) = captured_run
    assert cfg.input == Path("photo.png") and cfg.samples == 3


def test_without_argv_it_reads_sys_argv_and_leaves_it_alone(monkeypatch, captured_run):
    monkeypatch.setattr(sys, "argv", ["dp2osr", "upscale", "photo.png"])
    assert main() == 0
    assert sys.argv == ["dp2osr", "upscale", "photo.png"]
    assert captured_run[0].input == Path("photo.png")


def test_command_help_lists_its_options_and_keeps_sys_argv(capsys):
    before = list(sys.argv)
    with pytest.raises(SystemExit) as done:
        main(["upscale", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dp2osr upscale PHOTO_OR_FOLDER [options]")
    for flag in ("--input", "--output", "--samples", "--steps", "--backbone"):
        assert flag in out, flag
    assert sys.argv == before


def test_build_parser_adds_only_the_wanted_commands_options():
    parser, commands = build_parser("upscale")
    assert "upscale" in commands and "quickstart" in commands
    assert parser.parse_args(["upscale", "--input", "x.png"]).input == Path("x.png")
    bare, _ = build_parser()  # no command wanted: sub-commands exist, none has options
    with pytest.raises(SystemExit):
        bare.parse_args(["upscale", "--input", "x.png"])
