"""Help texts: self-contained (no internal documents), each default said once and true per backbone."""

import argparse
import importlib
import re

import pytest

from dp2osr.backbones import backbone_class
from dp2osr.cli import COMMANDS, main
from dp2osr.config import add_arguments

FORBIDDEN = re.compile(r"METHOD\.md|\bissues?\b|shared/|ENVIRONMENT\.md", re.IGNORECASE)


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_is_self_contained_and_says_each_default_once(command, capsys):
    text = _help(command, capsys)
    assert "(default: None)" not in text
    assert not FORBIDDEN.search(text), FORBIDDEN.search(text)
    module, cls_name, _ = COMMANDS[command]
    parser = argparse.ArgumentParser()
    add_arguments(parser, getattr(importlib.import_module(module), cls_name))
    for action in parser._actions:
        assert (action.help or "").lower().count("default") <= 1, (
            command,
            action.option_strings,
            action.help,
        )


def test_per_backbone_defaults_come_from_the_backbone_classes(capsys):
    text = " ".join(_help("upscale", capsys).split())  # argparse wraps lines
    for trait, flag in (("default_steps", "--steps"), ("default_process_size", "--process-size")):
        part = text.split(f"{flag} {flag[2:].upper().replace('-', '_')}", 1)[1][:300]
        for name in ("embedded", "sd2", "flux"):
            assert f"{name} {getattr(backbone_class(name), trait):g}" in part, (flag, part)
    assert "embedded 20" in text and "embedded 128" in text  # the embedded model's real defaults


def test_upscale_without_arguments_shows_the_positional_form(capsys):
    assert main(["upscale"]) == 2
    err = capsys.readouterr().err
    assert "dp2osr upscale PHOTO_OR_FOLDER" in err and "missing" not in err
    assert _help("upscale", capsys).startswith("usage: dp2osr upscale PHOTO_OR_FOLDER [options]")
