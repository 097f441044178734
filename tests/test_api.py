"""The Python API (`dp2osr.SRPipeline`): the pixels and choice of `dp2osr upscale`, the README's examples run."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import dp2osr
from dp2osr.backbones.embedded import EmbeddedBackbone
from dp2osr.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def _png(path: Path, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    small = rng.random((max(side // 4, 2), max(side // 4, 2), 3))
    im = Image.fromarray((small * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    im.save(path)
    return path


@pytest.fixture(scope="module")
def pipe():
    return dp2osr.SRPipeline.from_pretrained(device="cpu")


def test_import_is_cheap_and_exports_lazily():
    code = "import sys, dp2osr; assert 'torch' not in sys.modules; dp2osr.SRPipeline; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no_such"):
        dp2osr.no_such  # noqa: B018


def test_same_pixels_and_choice_as_the_cli(pipe, tmp_path):
    lr = _png(tmp_path / "lr.png", 16, 0)
    small = ["--steps", "2", "--process-size", "64"]
    args = ["upscale", str(lr), "--output", str(tmp_path / "cli"), "--samples", "2", "--seed", "3"]
    assert main([*args, "--select", "nr", "--device", "cpu", *small]) == 0
    out = pipe(Image.open(lr), samples=2, seed=3, select="nr", steps=2, process_size=64, show_progress=False)
    cli_scores = pd.read_csv(tmp_path / "cli" / "lr" / "scores.csv")
    assert out.seeds == [int(cli_scores.loc[cli_scores["chosen"], "seed"].iloc[0])]
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(Image.open(tmp_path / "cli" / "lr.png")))
    assert out.scores[0]["seed"].tolist() == [3, 4]
    assert np.allclose(out.scores[0]["piqe"], cli_scores["piqe"], atol=1e-5)
    # every sample of a path, a uint8 array and a float array: the CLI's files, seed by seed
    arr = np.asarray(Image.open(lr))
    every = pipe(
        [str(lr), arr, arr / 255.0], samples=2, seed=3, steps=2, process_size=64, show_progress=False
    )
    assert every.scores is None and every.seeds == [3, 4] * 3
    for image, seed in zip(every.images[:4], every.seeds):
        cli = np.asarray(Image.open(tmp_path / "cli" / "lr" / f"seed_{seed:04d}.png"))
        assert image.size == (64, 64) and np.array_equal(np.asarray(image), cli)
    assert np.abs(np.asarray(every.images[4], dtype=int) - np.asarray(every.images[0], dtype=int)).max() <= 1


def test_bad_calls_name_the_value(pipe):
    image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="samples"):
        pipe(image, samples=0)
    with pytest.raises(ValueError, match="backbone"):
        pipe(image, backbone="sd2")
    with pytest.raises(ValueError, match="int64"):
        pipe(np.zeros((16, 16, 3), np.int64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pipe(np.full((16, 16, 3), 2.0))
    with pytest.raises(ValueError, match="smallest supported side"):
        pipe(np.zeros((4, 4, 3), np.uint8))


def _readme_blocks() -> list[str]:
    section = README.read_text().split("## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 2, "the README's Python API section has the pipeline and the stage examples"
    return blocks


def test_readme_python_examples_run(tmp_path, monkeypatch):
    """The README's examples as written, with the model's default steps and process size and the crop size
    made small for a CPU test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(EmbeddedBackbone, "default_steps", 2)
    monkeypatch.setattr(EmbeddedBackbone, "default_process_size", 64)
    _png(tmp_path / "photo.png", 16, 0)
    _png(tmp_path / "other.png", 12, 1)
    (tmp_path / "photos").mkdir()
    for i in range(2):
        _png(tmp_path / "photos" / f"p{i}.png", 80, 2 + i)
    pipeline_block, stages_block = _readme_blocks()
    exec(compile(pipeline_block, "README:pipeline", "exec"), {})
    assert Image.open("photo_x4.png").size == (64, 64)
    exec(compile(stages_block.replace("hr_size=256", "hr_size=64"), "README:stages", "exec"), {})
    pairs = pd.read_parquet(tmp_path / "pool" / "pref_pairs.parquet")
    assert len(pairs) >= 2 and (pairs["win_reward"] > pairs["lose_reward"]).all()
