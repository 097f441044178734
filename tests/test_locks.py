"""One run per output folder for every stage that writes one (``upscale`` and ``curve`` included), the same
refusal on every process of a multi-process launch, and configs written without following symbolic links."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp2osr import runtime
from dp2osr.cli import main
from dp2osr.config import save_config
from dp2osr.paths import append_text
from dp2osr.upscale import UpscaleConfig


@pytest.fixture
def busy():
    """A live process of this host that a lock file can name as its holder."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield other.pid
    other.kill()
    other.wait()


def _lock(folder: Path, pid: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / runtime.LOCK_NAME
    path.write_text(json.dumps({"pid": pid, "host": runtime.host_name(), "command": "upscale"}))
    return path


def _one_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_upscale_into_a_busy_folder_is_refused(tmp_path, capsys, busy):
    src = tmp_path / "in" / "a.png"
    src.parent.mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(src)
    out = tmp_path / "out"
    _lock(out, busy)
    rc = main(
        ["upscale", "--input", str(src), "--output", str(out), "--backbone", "sd2-tiny", "--device", "cpu"]
    )
    assert rc == 2
    assert str(busy) in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == [runtime.LOCK_NAME]  # nothing written, the lock kept


def test_curve_into_a_busy_folder_is_refused(tmp_path, capsys, busy):
    out = tmp_path / "curve"
    _lock(out, busy)
    args = ["--run-dir", str(tmp_path / "run"), "--heldout", str(tmp_path / "held"), "--output", str(out)]
    rc = main(["curve", *args, "--device", "cpu"])
    assert rc == 2
    assert str(busy) in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == [runtime.LOCK_NAME]


@pytest.mark.parametrize("command", ["degrade", "eval"])
def test_degrade_and_eval_into_a_busy_folder_are_refused(tmp_path, capsys, busy, command):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(photos / "a.png")
    out = tmp_path / "out"
    _lock(out, busy)
    given = ["--input", str(photos)] if command == "degrade" else ["--sr", str(photos), "--hr", str(photos)]
    assert main([command, *given, "--output", str(out)]) == 2
    assert str(busy) in _one_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == [runtime.LOCK_NAME]


def test_a_refused_run_leaves_no_folder_it_made(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="bad input"), runtime.output_lock(out, "upscale"):
        raise ValueError("bad input")
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ValueError), runtime.output_lock(kept, "upscale"):
        raise ValueError("bad input")
    assert kept.is_dir()  # the user's folder stays


def test_a_planted_link_at_the_lock_temp_name_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "o"
    out.mkdir()
    (out / f"{runtime.LOCK_NAME}.{os.getpid()}.tmp").symlink_to(victim)
    with runtime.output_lock(out, "sample"):
        assert json.loads((out / runtime.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert victim.read_text() == "precious"


def test_save_config_replaces_a_link_instead_of_writing_through_it(tmp_path):
    victim = tmp_path / "thesis.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "upscale_config.yaml").symlink_to(victim)
    save_config(UpscaleConfig(input=Path("in"), output=out), out / "upscale_config.yaml")
    assert victim.read_text() == "precious"
    assert not (out / "upscale_config.yaml").is_symlink()
    assert "output:" in (out / "upscale_config.yaml").read_text()
    assert [p.name for p in out.iterdir()] == ["upscale_config.yaml"]  # no temporary file left


def test_a_log_is_appended_to_but_never_through_a_link(tmp_path):
    log = tmp_path / "upscale_runs.jsonl"
    append_text(log, "one\n")
    append_text(log, "two\n")
    assert log.read_text() == "one\ntwo\n"
    victim = tmp_path / "thesis.txt"
    victim.write_text("precious")
    planted = tmp_path / "metrics.jsonl"
    planted.symlink_to(victim)
    with pytest.raises(ValueError, match="metrics.jsonl is a symbolic link"):
        append_text(planted, "row\n")
    assert victim.read_text() == "precious"


_RANK = textwrap.dedent(
    """
    import sys
    from accelerate import PartialState
    from dp2osr.runtime import output_lock

    state = PartialState(cpu=True)
    try:
        with output_lock(sys.argv[1], "sample", state):
            print("went on")
    except ValueError as exc:
        print(f"refused: {exc}")
    finally:  # as the CLI does: a gloo process left to the exit can abort
        state.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(folder: Path, n: int = 2) -> list[str]:
    """Run ``_RANK`` as the ``n`` processes of one launch (as torchrun sets them up); their outputs."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(n),
            "LOCAL_WORLD_SIZE": str(n),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")]
            ),
        }
        cmd = [sys.executable, "-c", _RANK, str(folder)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        outs.append(out.strip())
    return outs


def test_every_process_of_a_launch_stops_when_the_folder_is_busy(tmp_path, busy):
    out = tmp_path / "pool"
    _lock(out, busy)
    outs = _launch(out)
    assert all(o.startswith("refused:") and str(busy) in o for o in outs), outs
    assert len(set(outs)) == 1  # the same one-line error on every process
    free = _launch(tmp_path / "free")
    assert free == ["went on", "went on"]
    assert not (tmp_path / "free").exists()  # made for the run, left empty, removed with the lock
