"""Deletion, overwrite and path guards: nothing outside what dp2osr made is deleted or written, no path read
from a table or an image ID leaves its folder, and symbolic links are never written through."""

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_score import make_pool

from dp2osr import tables
from dp2osr.cli import main
from dp2osr.config import build_config
from dp2osr.engine.jobs import output_path, prompt_path
from dp2osr.engine.pools import read_inputs
from dp2osr.quickstart import CONFIG_NAME, QuickstartConfig, prepare_output
from dp2osr.score import ScoreConfig
from dp2osr.score import run as score


def _png(path: Path, size: int = 16, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(path, format="PNG")
    return path


def _earlier_quickstart(out: Path) -> None:
    """A folder as an earlier quickstart leaves it: its config, stage folders, report and timings."""
    prepare_output(QuickstartConfig(output=out))
    for stage in ("1_degrade", "2_sample", "6_eval"):
        _png(out / stage / "x.png")
    (out / "report.html").write_text("<html></html>")
    (out / "timings.json").write_text("{}")


# --- quickstart --overwrite -------------------------------------------------------------------------------


def test_overwrite_checks_inputs_before_deleting(tmp_path):
    out = tmp_path / "qs"
    _earlier_quickstart(out)
    with pytest.raises(FileNotFoundError, match="nonexistent"):
        prepare_output(QuickstartConfig(output=out, overwrite=True, photos=tmp_path / "nonexistent"))
    assert (out / "2_sample" / "x.png").is_file() and (out / "report.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        prepare_output(QuickstartConfig(output=out, overwrite=True, photos=empty))
    assert (out / "2_sample" / "x.png").is_file()


def test_overwrite_checks_the_photos_give_enough_tiles_before_deleting(tmp_path):
    out = tmp_path / "qs"
    _earlier_quickstart(out)
    _png(tmp_path / "photos" / "small.png", size=64)  # one 64 px tile: no held-out tile
    with pytest.raises(ValueError, match="--images"):
        prepare_output(QuickstartConfig(output=out, overwrite=True, photos=tmp_path / "photos"))
    assert (out / "2_sample" / "x.png").is_file()


def test_overwrite_removes_only_the_quickstarts_own_outputs(tmp_path):
    out = tmp_path / "qs"
    _earlier_quickstart(out)
    (out / "thesis.txt").write_text("years of work")
    (out / "notes").mkdir()
    (out / "notes" / "a.txt").write_text("mine")
    prepare_output(QuickstartConfig(output=out, overwrite=True))
    assert (out / "thesis.txt").read_text() == "years of work"
    assert (out / "notes" / "a.txt").read_text() == "mine"
    for name in ("1_degrade", "2_sample", "6_eval", "report.html", "timings.json"):
        assert not (out / name).exists(), name
    assert (out / CONFIG_NAME).is_file()


def test_overwrite_refuses_a_folder_whose_config_is_not_a_quickstarts(tmp_path):
    docs = tmp_path / "Documents"
    docs.mkdir()
    (docs / CONFIG_NAME).write_text("")
    (docs / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match="not .*quickstart"):
        prepare_output(QuickstartConfig(output=docs, overwrite=True))
    assert (docs / "thesis.txt").read_text() == "years of work"
    assert (docs / CONFIG_NAME).read_text() == ""


def test_overwrite_removes_a_link_not_its_target(tmp_path):
    out = tmp_path / "qs"
    _earlier_quickstart(out)
    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "keep.png")
    import shutil

    shutil.rmtree(out / "2_sample")
    (out / "2_sample").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "mine.html").write_text("mine")
    (out / "report.html").unlink()
    (out / "report.html").symlink_to(tmp_path / "mine.html")
    prepare_output(QuickstartConfig(output=out, overwrite=True))
    assert not os.path.lexists(out / "2_sample") and not os.path.lexists(out / "report.html")
    assert (elsewhere / "keep.png").is_file() and (tmp_path / "mine.html").read_text() == "mine"


@pytest.mark.parametrize("value", ['"false"', '"no"', "0", "1"])
def test_yaml_bool_option_must_be_a_bool(tmp_path, value):
    path = tmp_path / "c.yaml"
    path.write_text(f"overwrite: {value}\n")
    with pytest.raises(ValueError, match="overwrite"):
        build_config(QuickstartConfig, argparse.Namespace(config=path))
    path.write_text("overwrite: false\n")
    assert build_config(QuickstartConfig, argparse.Namespace(config=path)).overwrite is False
    path.write_text("sample:\n  channels_last: 'no'\n")  # a stage's option: checked the same way
    with pytest.raises(ValueError, match="channels_last"):
        build_config(QuickstartConfig, argparse.Namespace(config=path))


def test_yaml_string_bool_is_one_line_error_from_the_cli(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text('overwrite: "false"\n')
    assert main(["quickstart", "--config", str(path), "--output", str(tmp_path / "o")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- score part files ---------------------------------------------------------------------------------------


def test_score_touches_only_its_own_part_files(tmp_path):
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1))
    parts = pool / "scores_parts"
    parts.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(parts / "mine.parquet")
    pd.DataFrame({"a": [2]}).to_parquet(parts / "img00-backup.parquet")
    score(ScoreConfig(candidates=pool, metrics=["psnr"], device="cpu"))
    assert pd.read_parquet(parts / "mine.parquet").a.tolist() == [1]
    assert pd.read_parquet(parts / "img00-backup.parquet").a.tolist() == [2]
    own = sorted(p.name for p in parts.iterdir())
    assert own == ["_merged.parquet", "_stamps.parquet", "img00-backup.parquet", "mine.parquet"]


def test_score_refuses_a_linked_parts_folder(tmp_path):
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1))
    user = tmp_path / "user_data"
    user.mkdir()
    pd.DataFrame({"a": [1]}).to_parquet(user / "precious.parquet")
    (pool / "scores_parts").symlink_to(user, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        score(ScoreConfig(candidates=pool, metrics=["psnr"], device="cpu"))
    assert (user / "precious.parquet").is_file() and sorted(os.listdir(user)) == ["precious.parquet"]


# --- image IDs and output paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["../../x", "/tmp/x", "..", ".", "", "a/../../b", "a\\..\\b"])
def test_output_paths_refuse_ids_that_leave_the_output(tmp_path, bad):
    with pytest.raises(ValueError):
        output_path(tmp_path, bad, 0)
    with pytest.raises(ValueError):
        output_path(tmp_path, bad, 0, flat=True)
    with pytest.raises(ValueError):
        prompt_path(tmp_path, bad)
    assert output_path(tmp_path, "img_a", 3) == tmp_path / "img_a" / "seed_0003.png"


def _pairs(folder: Path, ids: list[str], lr: list[str] | None = None) -> Path:
    _png(folder / "lr" / "ok.png")
    pd.DataFrame(
        {
            "image_id": ids,
            "hr_path": [""] * len(ids),
            "lr_path": lr or ["lr/ok.png"] * len(ids),
            "source": [""] * len(ids),
            "seed": [0] * len(ids),
        }
    ).to_parquet(folder / "pairs.parquet")
    return folder


@pytest.mark.parametrize("bad", ["../../x", "/tmp/evil"])
def test_read_inputs_refuses_a_traversing_id_naming_the_row(tmp_path, bad):
    deg = _pairs(tmp_path / "deg", ["fine", bad])
    with pytest.raises(ValueError, match=rf"row 1.*{bad}"):
        read_inputs(deg)


def test_read_inputs_refuses_a_file_whose_stem_is_dot_dot(tmp_path):
    _png(tmp_path / "lr" / "...png")  # stem ".."
    with pytest.raises(ValueError, match=r"'\.\.'"):
        read_inputs(tmp_path / "lr")


def test_sample_with_a_traversing_id_writes_nothing_outside(tmp_path, capsys):
    deg = _pairs(tmp_path / "a" / "b" / "deg", ["../../../x"])
    out = tmp_path / "a" / "b" / "out"
    args = ["sample", "--input", str(deg), "--output", str(out), "--backbone", "sd2-tiny", "--steps", "1"]
    assert main([*args, "--samples", "2"]) == 2
    assert "image_id" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "a" / "x").exists()


def test_sample_refuses_an_output_subfolder_that_is_a_link(tmp_path, capsys):
    lr = tmp_path / "lr"
    _png(lr / "img.png")
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "img").symlink_to(elsewhere, target_is_directory=True)
    args = ["sample", "--input", str(lr), "--output", str(out), "--backbone", "sd2-tiny", "--steps", "1"]
    assert main([*args, "--samples", "2", "--overwrite"]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert os.listdir(elsewhere) == []


def test_upscale_flat_overwrite_replaces_a_link_not_its_target(tmp_path):
    inp = _png(tmp_path / "in" / "x.png", 12)
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "precious.png"
    target.write_bytes(b"not an image of dp2osr")
    (out / "x.png").symlink_to(target)
    args = ["upscale", "--input", str(inp), "--output", str(out), "--backbone", "sd2-tiny", "--steps", "1"]
    assert main([*args, "--layout", "flat", "--overwrite"]) == 0
    assert target.read_bytes() == b"not an image of dp2osr"
    assert not (out / "x.png").is_symlink() and Image.open(out / "x.png").size == (48, 48)


def test_upscale_refuses_an_input_whose_stem_is_dot_dot(tmp_path, capsys):
    inp = _png(tmp_path / "in" / "...png", 12)
    out = tmp_path / "o1" / "o2"
    assert main(["upscale", "--input", str(inp), "--output", str(out), "--backbone", "sd2-tiny"]) == 2
    assert "'..'" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "seed_0000.png").exists()


# --- paths read from tables ---------------------------------------------------------------------------------


def test_table_read_refuses_a_path_that_is_not_an_image(tmp_path):
    deg = _pairs(tmp_path / "deg", ["a", "b"], lr=["lr/ok.png", "/etc/passwd"])
    with pytest.raises(ValueError, match=r"pairs.parquet.*row 1.*lr_path.*/etc/passwd"):
        tables.read(tables.PAIRS, deg)


def test_table_read_refuses_a_candidate_outside_its_pool(tmp_path):
    pool = make_pool(tmp_path, n_images=1, seeds=(0, 1))
    df = pd.read_parquet(pool / "candidates.parquet")
    df.loc[1, "path"] = "../outside/secret.png"
    df.to_parquet(pool / "candidates.parquet")
    with pytest.raises(ValueError, match=r"row 1.*path.*outside"):
        tables.read(tables.CANDIDATES, pool)


def test_table_read_with_roots_refuses_paths_outside_them(tmp_path):
    pool = make_pool(tmp_path, n_images=1, seeds=(0, 1))
    rewards = tmp_path / "score" / "rewards.parquet"
    rewards.parent.mkdir()
    rows = {"image_id": ["img00"] * 2, "seed": [0, 1], "reward": [0.1, 0.2]}
    paths = [str(pool / "img00" / "seed_0000.png"), str(tmp_path / "outside" / "secret.png")]
    tables.write(tables.REWARDS, pd.DataFrame({**rows, "path": paths}), rewards)
    df, _ = tables.read(tables.REWARDS, rewards)  # written so: the folders it was written with are its roots
    assert df.path.tolist() == paths
    pd.read_parquet(rewards).to_parquet(rewards)  # the same rows without the recorded roots
    with pytest.raises(ValueError, match=r"row 0.*path.*seed_0000.png"):
        tables.read(tables.REWARDS, rewards)
    with pytest.raises(ValueError, match=r"row 1.*path.*secret.png"):
        tables.read(tables.REWARDS, rewards, roots=(pool, tmp_path / "data"))
    ok, _ = tables.read(tables.REWARDS, rewards, roots=(tmp_path,))
    assert ok.path.tolist() == paths


def _rewards_of(pool: Path, out: Path) -> Path:
    """A rewards table in ``out`` (beside the pool, as the quickstart lays them out) naming the pool's
    candidates and their LR images."""
    cands = tables.read(tables.CANDIDATES, pool)[0]
    df = cands[["image_id", "seed", "path", "lr_path", "hr_path"]].assign(reward=0.5)
    return tables.write(tables.REWARDS, df, out)


def test_table_roots_follow_the_folders_it_was_written_with_and_move_with_them(tmp_path):
    pool = make_pool(tmp_path / "run", n_images=1, seeds=(0, 1))
    rewards = _rewards_of(pool, tmp_path / "run" / "score")
    roots = tables.read_meta(rewards)["roots"]
    assert all(r.startswith("..") for r in roots) and len(roots) <= 3
    (tmp_path / "run").rename(tmp_path / "moved")  # a whole folder of results moved elsewhere
    df, _ = tables.read(tables.REWARDS, tmp_path / "moved" / "score")
    assert all(Path(p).is_file() for p in df.path)


@pytest.mark.parametrize("column", ["path", "lr_path"])
def test_an_edited_table_path_that_leaves_its_roots_is_refused(tmp_path, column):
    import pyarrow.parquet as pq

    pool = make_pool(tmp_path / "run", n_images=1, seeds=(0, 1))
    rewards = _rewards_of(pool, tmp_path / "run" / "score")
    secret = _png(tmp_path / "outside" / "secret.png")
    table = pq.read_table(rewards)  # edited keeping the table's metadata (its recorded roots)
    df = table.to_pandas()
    df.loc[1, column] = os.path.relpath(secret, rewards.parent)
    pq.write_table(pa_table(df, table.schema.metadata), rewards)
    with pytest.raises(ValueError, match=rf"rewards.parquet: row 1: {column} .*secret.png.*outside"):
        tables.read(tables.REWARDS, rewards)


def pa_table(df: pd.DataFrame, metadata: dict):
    import pyarrow as pa

    return pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(metadata)


def test_a_hand_written_pairs_table_may_name_images_by_absolute_path_but_not_climb_out(tmp_path):
    data = _png(tmp_path / "data" / "lr" / "a.png")
    deg = _pairs(tmp_path / "tables", ["a", "b"], lr=[str(data), "lr/ok.png"])
    df, _ = tables.read(tables.PAIRS, deg)  # an absolute path: the user's own choice of image
    assert df.lr_path[0] == str(data)
    deg = _pairs(tmp_path / "tables", ["a", "b"], lr=["lr/ok.png", "../data/lr/a.png"])
    with pytest.raises(ValueError, match=r"row 1: lr_path '../data/lr/a.png'.*absolute path"):
        tables.read(tables.PAIRS, deg)


def test_a_pool_sampled_from_absolute_paths_is_read_back_with_its_roots(tmp_path):
    pool = make_pool(tmp_path / "run", n_images=2, seeds=(0,))
    cands, meta = tables.read(tables.CANDIDATES, pool)
    data = tmp_path / "elsewhere" / "data"  # LR images a hand-written pairs table named by absolute path
    lrs = [str(_png(data / "lr" / f"{i}.png")) for i in cands.image_id]
    tables.write(tables.CANDIDATES, cands.assign(lr_path=lrs), pool, meta)
    df, _ = tables.read(tables.CANDIDATES, pool)
    assert df.lr_path.tolist() == lrs


@pytest.mark.parametrize("bad", ["../x", "/abs", ".."])
def test_tables_refuse_image_ids_that_are_not_plain_names(tmp_path, bad):
    df = pd.DataFrame({"image_id": ["a", bad], "seed": [0, 0], "metric": ["psnr"] * 2, "value": [1.0, 2.0]})
    with pytest.raises(ValueError, match=r"row 1.*image_id"):
        tables.write(tables.SCORES, df, tmp_path / "scores.parquet")
