"""--base / --controlnet as Hugging Face Hub references, resolved in a local cache only (no network)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dp2osr.backbones import load_backbone, save_release
from dp2osr.backbones.hub import parse_hub_ref, resolve_model_ref
from dp2osr.cli import main

SRC = Path(__file__).resolve().parent.parent / "src"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(hf_home: Path, repo: str, build) -> Path:
    """A Hub cache entry for ``repo`` the way huggingface_hub lays it out: refs/main -> snapshots/COMMIT/...;
    ``build(folder)`` fills the snapshot. Returns the snapshot folder."""
    entry = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    build(snap)
    return snap


def _tiny_repo(name: str):
    def build(folder: Path) -> None:
        bb = load_backbone(name)
        bb.save_pretrained(folder)
        save_release(bb.controlnet, folder / "release" / "model.safetensors")

    return build


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    fake_cache(home, "acme/tiny-sd2", _tiny_repo("sd2-tiny"))
    fake_cache(home, "acme/tiny-flux", _tiny_repo("flux-tiny"))
    return home


@pytest.fixture
def in_cache(hf_home, monkeypatch):
    """Point huggingface_hub (already imported in this process) at the fake cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    return hf_home


def _inputs(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(folder / f"im{i}.png")
    return folder


def test_parse_hub_ref():
    assert parse_hub_ref("acme/tiny-sd2") == ("acme/tiny-sd2", None, None)
    assert parse_hub_ref("acme/tiny-sd2@v1.0") == ("acme/tiny-sd2", "v1.0", None)
    assert parse_hub_ref("acme/x:c-sd2/model.safetensors") == ("acme/x", None, "c-sd2/model.safetensors")
    assert parse_hub_ref("acme/x@main:model.safetensors") == ("acme/x", "main", "model.safetensors")
    for not_an_id in ("runs/dpo/final/model.safetensors", "/abs/path", "model.safetensors", "../a/b"):
        assert parse_hub_ref(not_an_id) is None


def test_resolve_prefers_local_paths_and_finds_cached_refs(in_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap = in_cache / "hub" / "models--acme--tiny-sd2" / "snapshots" / COMMIT
    assert resolve_model_ref("acme/tiny-sd2", "base model") == snap
    assert resolve_model_ref(f"acme/tiny-sd2@{COMMIT}", "base model") == snap
    assert resolve_model_ref("acme/tiny-sd2:release/model.safetensors", "ControlNet") == (
        snap / "release" / "model.safetensors"
    )
    (tmp_path / "acme" / "tiny-sd2").mkdir(parents=True)  # a local folder of the same spelling wins
    assert resolve_model_ref("acme/tiny-sd2", "base model") == Path("acme/tiny-sd2")
    assert resolve_model_ref(None, "base model") is None


def test_missing_hub_model_is_one_line_naming_id_cache_and_fetch(in_cache, tmp_path, capsys):
    rc = main(
        [
            "upscale",
            "--input",
            str(_inputs(tmp_path / "in", 1)),
            "--output",
            str(tmp_path / "o"),
            "--backbone",
            "sd2",
            "--base",
            "acme/absent-model",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    line = [x for x in err.splitlines() if "error" in x]
    assert len(line) == 1 and line[0] == err.splitlines()[-1]
    assert "acme/absent-model" in err and str(in_cache / "hub") in err
    assert "hf download acme/absent-model" in err
    with pytest.raises(
        FileNotFoundError, match="release/none.safetensors of Hugging Face model acme/tiny-sd2"
    ):
        resolve_model_ref("acme/tiny-sd2:release/none.safetensors", "ControlNet")
    with pytest.raises(FileNotFoundError, match="acme/tiny-sd2@v9"):
        resolve_model_ref("acme/tiny-sd2@v9", "base model")


def test_upstream_flux_command_with_hub_ids(in_cache, tmp_path):
    """The upstream C-FLUX / DP²O-FLUX command, translated (README table), on a tiny FLUX in the cache."""
    out = tmp_path / "test_oup_c_flux"
    rc = main(
        [
            "upscale",
            "--backbone",
            "flux",
            "--base",
            "acme/tiny-flux",
            "--controlnet",
            "acme/tiny-flux:release/model.safetensors",
            "--input",
            str(_inputs(tmp_path / "test_inp")),
            "--output",
            str(out),
            "--color-fix",
            "adain",
            "--guidance",
            "2.5",
            "--steps",
            "2",
            "--dtype",
            "fp32",
            "--layout",
            "flat",
        ]
    )
    assert rc == 0
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["im0.png", "im1.png"]


def test_upscale_offline_with_hf_home_in_a_fresh_process(hf_home, tmp_path):
    """`dp2osr upscale --backbone sd2 --base acme/tiny-sd2 --controlnet DIR` with HF_HOME at the cache, offline,
    in a new interpreter (huggingface_hub reads HF_HOME at import); also the release file form of the upstream
    C-SD2 command. Neither prints a third-party warning."""
    controlnet_dir = tmp_path / "controlnet"
    load_backbone("sd2-tiny").controlnet.save_pretrained(controlnet_dir)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    inp = _inputs(tmp_path / "in")
    for k, controlnet in enumerate([str(controlnet_dir), "acme/tiny-sd2:release/model.safetensors"]):
        out = tmp_path / f"out{k}"
        cmd = [
            sys.executable,
            "-m",
            "dp2osr",
            "upscale",
            "--backbone",
            "sd2",
            "--base",
            "acme/tiny-sd2",
            "--controlnet",
            controlnet,
            "--input",
            str(inp),
            "--output",
            str(out),
            "--steps",
            "2",
            "--guidance",
            "3.5",
            "--color-fix",
            "adain",
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert len(list(out.rglob("seed_0000.png"))) == 2
        text = proc.stdout + proc.stderr
        for noise in ("kernels", "gemm_4bit", "FutureWarning", "Warning:"):
            assert noise not in text, text
