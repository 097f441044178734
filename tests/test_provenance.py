"""Provenance of what a rerun skips, one run per output folder, one-line errors for I/O faults and broken files,
and the permissions of model files."""

import errno
import json
import os
import pathlib
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dp2osr import runtime
from dp2osr.backbones import load_backbone, save_release
from dp2osr.cli import main
from dp2osr.config import save_config
from dp2osr.engine.options import ModelOptions
from dp2osr.engine.provenance import model_fields
from dp2osr.paths import file_sha
from dp2osr.train import TrainConfig


def _png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _one_line(err: str) -> str:
    # the error line, after whatever a progress bar left on the terminal line
    lines = [line[line.index("dp2osr ") :] for line in err.strip().splitlines() if "dp2osr " in line]
    assert "Traceback" not in err, err
    assert lines and ": error: " in lines[-1], err
    return lines[-1]


def _perturbed_controlnet(path, seed):
    """A sd2-tiny ControlNet with weights changed by ``seed``, saved in the release format at ``path``."""
    net = load_backbone("sd2-tiny").controlnet
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_release(net, path)
    return path


def _upscale(inp, out, *extra):
    args = ["upscale", "--input", str(inp), "--output", str(out), "--backbone", "sd2-tiny", "--steps", "2"]
    return main([*args, *extra])


# ------------------------------------------------------------------------------------ skipped outputs
def test_flat_layout_rerun_with_another_seed_redoes(tmp_path):
    inp, out = _png(tmp_path / "x.png", 16, 16, 0), tmp_path / "out"
    assert _upscale(inp, out, "--layout", "flat", "--seed", "0") == 0
    seed0 = (out / "x.png").read_bytes()
    assert _upscale(inp, out, "--layout", "flat", "--seed", "1") == 0
    seed1 = (out / "x.png").read_bytes()
    assert seed1 != seed0  # not the old seed's image
    fresh = tmp_path / "fresh"
    assert _upscale(inp, fresh, "--layout", "flat", "--seed", "1") == 0
    assert (fresh / "x.png").read_bytes() == seed1


def test_controlnet_replaced_at_the_same_path_redoes(tmp_path, capsys):
    inp, out = _png(tmp_path / "x.png", 16, 16, 0), tmp_path / "out"
    net = _perturbed_controlnet(tmp_path / "net" / "model.safetensors", 1)
    assert _upscale(inp, out, "--controlnet", str(net)) == 0
    first = (out / "x" / "seed_0000.png").read_bytes()
    _perturbed_controlnet(net, 2)  # another model, same path
    capsys.readouterr()
    assert _upscale(inp, out, "--controlnet", str(net)) == 0
    assert "1 done" in capsys.readouterr().err
    second = (out / "x" / "seed_0000.png").read_bytes()
    assert second != first
    fresh = tmp_path / "fresh"
    assert _upscale(inp, fresh, "--controlnet", str(net)) == 0
    assert (fresh / "x" / "seed_0000.png").read_bytes() == second
    capsys.readouterr()
    assert _upscale(inp, out, "--controlnet", str(net)) == 0  # unchanged: kept
    assert "1 already finished" in capsys.readouterr().err
    # the tables keep naming the model by its path
    fields = model_fields(ModelOptions(backbone="sd2-tiny", controlnet=net))
    assert fields["controlnet"] == str(net.resolve())


def test_degrade_redoes_the_pair_of_a_replaced_photo(tmp_path):
    photos, out = tmp_path / "photos", tmp_path / "pairs"
    _png(photos / "a.png", 80, 80, 1)
    _png(photos / "b.png", 80, 80, 2)
    args = ["degrade", "--input", str(photos), "--output", str(out), "--hr-size", "64"]
    assert main(args) == 0
    table = pd.read_parquet(out / "pairs.parquet").set_index("image_id")
    assert table.loc["a", "source_sha"] == file_sha(photos / "a.png")
    old_a, old_b = (out / "hr" / "a.png").read_bytes(), (out / "hr" / "b.png").read_bytes()
    _png(photos / "a.png", 80, 80, 3)  # replaced
    assert main(args) == 0
    assert (out / "hr" / "a.png").read_bytes() != old_a
    assert (out / "hr" / "b.png").read_bytes() == old_b
    table = pd.read_parquet(out / "pairs.parquet").set_index("image_id")
    assert table.loc["a", "source_sha"] == file_sha(photos / "a.png")
    fresh = tmp_path / "fresh"
    assert main(["degrade", "--input", str(photos), "--output", str(fresh), "--hr-size", "64"]) == 0
    assert (fresh / "hr" / "a.png").read_bytes() == (out / "hr" / "a.png").read_bytes()
    assert (fresh / "lr" / "a.png").read_bytes() == (out / "lr" / "a.png").read_bytes()


def _fake_run(root, seeds):
    """A `dp2osr train` output folder with a checkpoint per step, each a perturbed sd2-tiny ControlNet."""
    save_config(
        TrainConfig(mode="dpo", data=root, output=root, backbone="sd2-tiny"), root / "train_config.yaml"
    )
    for step, seed in seeds.items():
        ckpt = root / f"checkpoint-{step:06d}"
        _perturbed_controlnet(ckpt / "model.safetensors", seed)
        (ckpt / "train_state.json").write_text(json.dumps({"step": step}))
    return root


@pytest.fixture
def heldout(tmp_path):
    folder = tmp_path / "heldout"
    for i, name in enumerate(["h1", "h2"]):
        _png(folder / f"{name}.png", 16, 16, 20 + i)
    return folder


def _curve(run_dir, heldout, out):
    args = ["curve", "--run-dir", str(run_dir), "--heldout", str(heldout), "--output", str(out)]
    return main([*args, "--samples", "2", "--steps", "2", "--metrics", "piqe"])


def test_curve_of_another_run_into_the_same_output_is_refused(tmp_path, heldout, capsys):
    run_a = _fake_run(tmp_path / "a", {2: 1})
    run_b = _fake_run(tmp_path / "b", {2: 2})
    out = tmp_path / "curve"
    assert _curve(run_a, heldout, out) == 0
    curve_a = (out / "reward_curve.csv").read_text()
    capsys.readouterr()
    assert _curve(run_b, heldout, out) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(run_a.resolve()) in line and "--output" in line
    assert (out / "reward_curve.csv").read_text() == curve_a  # A's curve is not replaced by a mixed one


def test_curve_redoes_a_checkpoint_replaced_at_the_same_path(tmp_path, heldout):
    run = _fake_run(tmp_path / "run", {2: 1})
    out = tmp_path / "curve"
    assert _curve(run, heldout, out) == 0
    old = (out / "step_000002" / "h1" / "seed_50000.png").read_bytes()
    _fake_run(run, {2: 2})  # retrained: same paths, other weights
    assert _curve(run, heldout, out) == 0
    new = (out / "step_000002" / "h1" / "seed_50000.png").read_bytes()
    assert new != old
    fresh = tmp_path / "fresh"
    assert _curve(run, heldout, fresh) == 0
    assert (fresh / "step_000002" / "h1" / "seed_50000.png").read_bytes() == new
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "reward_curve.csv"), pd.read_csv(fresh / "reward_curve.csv")
    )


# --------------------------------------------------------------------------------------------- train
@pytest.fixture
def data(tmp_path):
    """A preference-pair table over 2 images x 4 candidates (16 -> 64 px)."""
    root = tmp_path / "data"
    rows = []
    for i, name in enumerate(["a", "b"]):
        _png(root / "lr" / f"{name}.png", 16, 16, i)
        for s in range(4):
            _png(root / "pool" / name / f"seed_{s:04d}.png", 64, 64, 100 + 10 * i + s)
        for w, lo in ((0, 3), (1, 2)):
            lr = str(root / "lr" / f"{name}.png")
            rows.append((name, w, lo, f"{name}/seed_{w:04d}.png", f"{name}/seed_{lo:04d}.png", lr, 0.9, 0.1))
    cols = [
        "image_id",
        "win_seed",
        "lose_seed",
        "win_path",
        "lose_path",
        "lr_path",
        "win_reward",
        "lose_reward",
    ]
    df = pd.DataFrame(rows, columns=cols)
    df["w_intra"], df["w_inter"], df["weight"] = 1.0, 1.0, 1.0
    df.to_parquet(root / "pool" / "pref_pairs.parquet")
    return root / "pool"


def _train(data, out, steps, *extra):
    args = ["train", "--mode", "dpo", "--data", str(data), "--output", str(out), "--backbone", "sd2-tiny"]
    args += ["--steps", str(steps), "--batch-size", "2", "--lr", "1e-3", "--beta", "500"]
    return main([*args, "--checkpoint-every", "2", "--keep-checkpoints", "0", *extra])


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_on_rebuilt_data_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, 2) == 0
    state = json.loads((out / "checkpoint-000002" / "train_state.json").read_text())
    assert state["data_sha"] == file_sha(data / "pref_pairs.parquet")
    table = pd.read_parquet(data / "pref_pairs.parquet")
    table["w_intra"] = 2.0  # the pairs rebuilt
    table.to_parquet(data / "pref_pairs.parquet")
    capsys.readouterr()
    assert _train(data, out, 4, "--resume") == 2
    line = _one_line(capsys.readouterr().err)
    assert "pref_pairs.parquet" in line and "checkpoint-000002" in line
    assert not (out / "checkpoint-000004").exists()


def _resume_after_damage(data, tmp_path, capsys, damage) -> str:
    """6 steps in one run; 4 steps in another, ``damage(checkpoint-000004)``, then --resume to 6: the two finals
    must be equal. Returns the resumed run's stderr."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert _train(data, full, 6) == 0
    assert _train(data, part, 4) == 0
    damage(part / "checkpoint-000004")
    capsys.readouterr()
    assert _train(data, part, 6, "--resume") == 0
    err = capsys.readouterr().err
    wa, wb = _weights(full / "final"), _weights(part / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    return err


def test_truncated_checkpoint_falls_back_to_the_previous_one(data, tmp_path, capsys):
    def truncate(ckpt):
        broken = ckpt / "model.safetensors"
        broken.write_bytes(broken.read_bytes()[:1000])

    err = _resume_after_damage(data, tmp_path, capsys, truncate)
    assert "checkpoint-000004" in err and "checkpoint-000002" in err


def test_truncated_train_state_is_named_and_skipped(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, 4) == 0
    state = out / "checkpoint-000004" / "train_state.json"
    state.write_text(state.read_text()[:3])
    capsys.readouterr()
    assert _train(data, out, 6, "--resume") == 0
    err = capsys.readouterr().err
    assert str(state) in err and "checkpoint-000002" in err
    # every checkpoint broken: one line
    for ckpt in out.glob("checkpoint-*"):
        (ckpt / "train_state.json").write_text("{")
    capsys.readouterr()
    assert _train(data, out, 8, "--resume") == 2
    assert "train_state.json" in _one_line(capsys.readouterr().err)


class _Payload:
    """Unpickling this touches ``marker``: the stand-in for code hidden in a file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_planted_pickle_in_a_checkpoint_is_refused_in_one_line(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, 2) == 0
    marker = tmp_path / "pwned"
    planted = next((out / "checkpoint-000002" / "state").glob("optimizer*.bin"))
    torch.save({"state": _Payload(marker)}, planted)
    capsys.readouterr()
    assert _train(data, out, 4, "--resume") == 2
    line = _one_line(capsys.readouterr().err)
    assert "checkpoint-000002" in line
    assert not marker.exists()


def test_planted_pickle_in_a_model_folder_is_refused_in_one_line(tmp_path, capsys):
    folder = tmp_path / "net"
    load_backbone("sd2-tiny").controlnet.save_pretrained(folder, safe_serialization=False)
    marker = tmp_path / "pwned"
    torch.save({"w": _Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    inp = _png(tmp_path / "x.png", 16, 16, 0)
    rc = _upscale(inp, tmp_path / "out", "--controlnet", str(folder))
    err = capsys.readouterr().err
    assert rc == 2
    assert str(folder) in _one_line(err)
    assert not marker.exists()


def test_binary_yaml_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "opts.yaml"
    cfg.write_bytes(bytes(range(256)))
    assert main(["upscale", "--config", str(cfg)]) == 2
    assert str(cfg) in _one_line(capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------- locks
def test_a_second_run_into_a_busy_folder_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / runtime.LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": runtime.host_name()}))
        assert _train(data, out, 2) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(other.pid) in line
        assert not (out / "checkpoint-000002").exists()
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / runtime.LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": runtime.host_name()}))
    assert _train(data, out, 2) == 0
    assert str(gone.pid) in capsys.readouterr().err  # said so
    assert not (out / runtime.LOCK_NAME).exists()  # released at the end


def test_lock_is_held_for_the_run_and_released(tmp_path):
    with runtime.output_lock(tmp_path / "o", "train"):
        owner = json.loads((tmp_path / "o" / runtime.LOCK_NAME).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == runtime.host_name()
        with runtime.output_lock(tmp_path / "o", "train"):  # the same process again: no deadlock
            pass
        assert (tmp_path / "o" / runtime.LOCK_NAME).is_file()
    assert not (tmp_path / "o" / runtime.LOCK_NAME).exists()


# ------------------------------------------------------------------------------------------ I/O faults
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_io_fault_is_one_line_with_exit_1(tmp_path, monkeypatch, capsys, code):
    import dp2osr.engine.jobs as jobs

    def full_disk(image, path, text=None):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(jobs, "save_image", full_disk)
    inp = _png(tmp_path / "x.png", 16, 16, 0)
    assert _upscale(inp, tmp_path / "out") == 1
    line = _one_line(capsys.readouterr().err)
    assert os.strerror(code) in line and str(tmp_path / "out" / "x" / "seed_0000.png") in line
    assert line.endswith("finished outputs are kept, rerun to resume")


# ----------------------------------------------------------------------------------------- permissions
def test_model_files_follow_the_umask(data, tmp_path):
    old = os.umask(0o022)
    try:
        save_release(load_backbone("sd2-tiny").controlnet, tmp_path / "m" / "model.safetensors")
        assert _train(data, tmp_path / "run", 2) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "m" / "model.safetensors").st_mode) == 0o644
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    wrong = {
        str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644
    }
    assert not wrong


def test_resume_on_an_image_replaced_in_place_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(data, out, 2) == 0
    _png(data / "a" / "seed_0000.png", 64, 64, 999)  # same path, same table, other content
    capsys.readouterr()
    assert _train(data, out, 4, "--resume") == 2
    line = _one_line(capsys.readouterr().err)
    assert "seed_0000.png changed since" in line and not (out / "checkpoint-000004").exists()


@pytest.mark.parametrize("name", ["final", "frozen"])
def test_an_output_subfolder_that_is_a_link_is_refused_before_training(data, tmp_path, capsys, name):
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (elsewhere / "model.safetensors").parent.mkdir(parents=True)
    (elsewhere / "model.safetensors").write_text("keep")
    out.mkdir()
    (out / name).symlink_to(elsewhere)
    assert _train(data, out, 2) == 2
    line = _one_line(capsys.readouterr().err)
    assert name in line and "symbolic link" in line and not (out / "checkpoint-000002").exists()
    assert (elsewhere / "model.safetensors").read_text() == "keep"


def test_a_checkpoint_damaged_in_place_falls_back_to_the_previous_one(data, tmp_path, capsys):
    def zero_a_block(ckpt):
        damaged = ckpt / "state" / "optimizer.bin"
        raw = bytearray(damaged.read_bytes())
        raw[len(raw) // 2 : len(raw) // 2 + 4096] = bytes(4096)  # same size, whole zip: torch.load takes it
        damaged.write_bytes(bytes(raw))

    err = _resume_after_damage(data, tmp_path, capsys, zero_a_block)
    assert "optimizer.bin is damaged" in err and "resuming from checkpoint-000002" in err
