"""Progress output: redrawn tqdm bars on a terminal, plain lines (every 10 % or 30 s) in a file."""

import io

from tqdm import tqdm

from dp2osr import progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_a_line_per_tenth_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(progress, "LINE_MIN_SECONDS", 0.0)
    out = io.StringIO()
    for _ in progress.bar(range(100), desc="degrade", unit="img", file=out):
        pass
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("degrade: 10/100 (10%), ") and "img/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("degrade: 100/100 (100%), ") and "ETA" not in lines[-1]


def test_a_fast_stage_prints_its_last_line_only():
    out = io.StringIO()
    with progress.bar(total=24, desc="score", unit="score", file=out) as bar:
        for _ in range(6):
            bar.update(4)
    assert out.getvalue().count("\n") == 1 and out.getvalue().startswith("score: 24/24 (100%)")


def test_resumed_bar_postfix_time_lines_and_close():
    out = io.StringIO()
    with progress.bar(total=10, initial=4, desc="train dpo", unit="step", file=out) as bar:
        bar.last_time -= progress.LINE_MIN_SECONDS
        bar.update(1)  # 5/10 crosses 50 %
        bar.set_postfix({"loss": "0.5"})
        bar.last_time -= progress.LINE_EVERY_SECONDS  # 30 s pass without crossing a tenth
        bar.update(0.5)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train dpo: 5/10 (50%)")
    assert lines[1].startswith("train dpo: 5.5/10 (55%)") and lines[1].endswith("loss=0.5")
    assert len(lines) == 2  # close prints nothing new after the last line


def test_nested_bars_only_on_a_terminal_and_disable_is_silent():
    out = io.StringIO()
    nested = progress.bar(total=5, desc="  image", nested=True, file=out)
    nested.update(5)
    nested.close()
    with progress.bar(total=3, disable=True, file=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""
    term = _Terminal()
    bar = progress.bar(total=5, desc="sample", nested=True, file=term)
    assert isinstance(bar, tqdm)
    bar.update(5)
    bar.close()
    assert "sample" in term.getvalue()
