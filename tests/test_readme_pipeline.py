"""The README's pipeline, command for command, on a tiny SD2 model and a few 16 px LR crops.

The commands are read from the README's "The DP²O pipeline" block; the test only puts the tiny model in for
BASE / C-SD2, takes the README's own `--preset offline` alternative to the weight-backed paper preset, and
appends flags that shrink the work (fewer seeds, steps and metrics that work at 64 px)."""

import json
import shlex
from pathlib import Path

import numpy as np
from PIL import Image

from dp2osr.backbones import load_backbone, save_release
from dp2osr.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
METRICS = ["fsim", "gmsd", "piqe"]  # the offline preset, named
SMALLER = {
    "degrade": ["--hr-size", "64"],
    "sample": ["--samples", "4", "--steps", "2"],
    "score": ["--metrics", *METRICS],
    "train": [
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-every",
        "1",
        "--eval-samples",
        "2",
        "--eval-sample-steps",
        "2",
        "--eval-metrics",
        *METRICS,
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "0",
    ],
    "curve": ["--samples", "2", "--steps", "2", "--metrics", *METRICS],
    "upscale": ["--steps", "2"],
    "eval": ["--metrics", *METRICS],
}


def readme_pipeline() -> list[list[str]]:
    """The `dp2osr ...` commands of the README's pipeline block, continuations joined, comments dropped."""
    text = README.read_text()
    block = text.split("## The DP²O pipeline", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    block = block.replace("\\\n", " ")
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert all(c[0] == "dp2osr" for c in commands), commands
    return [c[1:] for c in commands]


def _photos(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.random((10, 10, 3))
        im = Image.fromarray((small * 255).astype(np.uint8)).resize((80, 80), Image.BICUBIC)
        im.save(folder / f"photo{i}.png")


def _setup(tmp_path: Path, monkeypatch) -> dict[str, str]:
    monkeypatch.chdir(tmp_path)
    bb = load_backbone("sd2-tiny")
    bb.save_pretrained(tmp_path / "tiny_sd2")
    save_release(bb.controlnet, tmp_path / "c_sd2" / "model.safetensors")
    _photos(tmp_path / "hr_photos", 3, 0)
    _photos(tmp_path / "test_photos", 2, 1)
    return {"BASE": str(tmp_path / "tiny_sd2"), "C-SD2": str(tmp_path / "c_sd2" / "model.safetensors")}


def _smaller(args: list[str]) -> list[str]:
    if args[0] == "score":  # the README's alternative to the weight-backed paper preset
        i = args.index("--preset")
        args[i : i + 4] = ["--preset", "offline"]
    return args + SMALLER.get(args[0], [])


def test_readme_pipeline_runs_as_written(tmp_path, monkeypatch):
    commands = readme_pipeline()
    assert [c[0] for c in commands] == [
        "degrade",
        "degrade",
        "sample",
        "score",
        "pair",
        "train",
        "curve",
        "upscale",
        "upscale",
        "eval",
        "report",
    ]
    swap = _setup(tmp_path, monkeypatch)
    for args in commands:
        args = _smaller([swap.get(a, a) for a in args])
        assert main(args) == 0, args
    assert len(list(Path("sr_dpo").rglob("seed_0000.png"))) == 2
    assert (Path("runs/dpo/final/model.safetensors")).is_file()
    summary = json.loads(Path("eval/eval_summary.json").read_text())
    assert list(summary["models"]) == ["base", "dpo"] and summary["problems"] == []
    assert all(m["n_images"] == 2 and "psnr" in m["metrics"] for m in summary["models"].values())
    page = Path("report.html").read_text()
    assert "dpo" in page and "Best / Mean / Worst@M" in page


# Every folder of the README's pipeline moved to an unrelated place, and score's and pair's outputs away from
# the pool (the README lets them default to it): each stage must find what it needs in the tables it is given.
MOVED = {
    "data/": "in/a/data/",
    "heldout/": "in/b/heldout/",
    "pool/rewards.parquet": "out/scores/rewards.parquet",
    "pool/": "out/c/pool/",
    "runs/dpo": "out/d/runs/dpo",
    "sr_base/": "out/e/sr_base/",
    "sr_dpo/": "out/f/sr_dpo/",
    "eval/": "out/g/eval/",
    "report.html": "out/h/report.html",
}
EXTRA = {
    "score": ["--output", "out/scores"],
    "pair": ["--output", "out/pairs/pp.parquet"],
}


def _moved(token: str) -> str:
    for old, new in MOVED.items():
        if token.startswith(old):
            return new + token[len(old) :]
    return token


def test_readme_pipeline_with_every_output_elsewhere(tmp_path, monkeypatch):
    swap = _setup(tmp_path, monkeypatch)
    for args in readme_pipeline():
        args = [swap.get(a, _moved(a)) for a in args] + EXTRA.get(args[0], [])
        if args[0] == "train":
            args[args.index("--data") + 1] = "out/pairs/pp.parquet"
        assert main(_smaller(args)) == 0, args
        if args[0] == "score":  # nothing after score may look for the pool's own table beside another output
            Path("out/c/pool/candidates.parquet").rename("out/c/pool/hidden.parquet")
    assert not Path("pool").exists() and not Path("out/c/pool/rewards.parquet").exists()
    assert (Path("out/d/runs/dpo/final/model.safetensors")).is_file()
    assert len(list(Path("out/f/sr_dpo").rglob("seed_0000.png"))) == 2
    page = Path("out/h/report.html").read_text()
    assert "dpo" in page and "Best / Mean / Worst@M" in page
    # the LR and HR of each shown image came from the rewards table (no folder is guessed)
    assert '<figure class="cell missing">' not in page and page.count('<img class="lr"') == 3  # 3 pool images
