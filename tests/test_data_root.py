"""--data-root: the folders a user vouches for, accepted as roots of every table a stage reads
(tables.with_data_roots), given repeatedly or joined by os.pathsep."""

import argparse
import os

import pandas as pd
import pytest
from test_score import make_pool

from dp2osr import tables
from dp2osr.cli import main
from dp2osr.config import add_arguments, build_config
from dp2osr.pair import PairConfig


def _rewards_without_roots(tmp_path):
    """A rewards table in ``score/`` naming the pool's candidates and LR/HR outside its folder, stripped of the
    folders recorded when it was written (as a table copied by hand loses them)."""
    pool = make_pool(tmp_path, n_images=2, seeds=(0, 1, 2, 3))
    cands = tables.read(tables.CANDIDATES, pool)[0]
    df = cands[["image_id", "seed", "path", "lr_path", "hr_path"]].assign(reward=[0.1, 0.9, 0.5, 0.3] * 2)
    rewards = tables.write(tables.REWARDS, df, tmp_path / "score")
    pd.read_parquet(rewards).to_parquet(rewards)  # the same rows without the recorded roots
    return rewards, pool, tmp_path / "data"


def test_pair_refuses_a_path_outside_the_roots_naming_the_option(tmp_path, capsys):
    rewards, _, _ = _rewards_without_roots(tmp_path)
    assert main(["pair", "--rewards", str(rewards), "--output", str(tmp_path / "pp.parquet")]) == 2
    err = capsys.readouterr().err
    assert "row 0" in err and "--data-root" in err and "Traceback" not in err
    assert not (tmp_path / "pp.parquet").exists()


def test_pair_accepts_the_folders_given_repeatedly_or_joined(tmp_path, capsys):
    rewards, pool, data = _rewards_without_roots(tmp_path)
    out = tmp_path / "pp.parquet"
    args = ["pair", "--rewards", str(rewards), "--output", str(out)]
    assert main([*args, "--data-root", str(pool)]) == 2  # the LR/HR folder is not vouched for
    assert "lr_path" in capsys.readouterr().err
    assert main([*args, "--data-root", str(pool), "--data-root", str(data)]) == 0
    first = pd.read_parquet(out)
    out.unlink()
    assert main([*args, "--data-root", f"{pool}{os.pathsep}{data}"]) == 0
    assert len(first) > 0 and first.equals(pd.read_parquet(out))
    with tables.data_roots([pool, data]):  # the same mechanism from Python
        assert len(tables.read(tables.REWARDS, rewards)[0]) == 8
    with pytest.raises(ValueError, match="row 0"):
        tables.read(tables.REWARDS, rewards)  # only within the block


def test_data_root_flag_adds_up_and_a_missing_folder_is_one_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser, PairConfig)
    ns = parser.parse_args(["--rewards", "r", "--data-root", "a", "b", "--data-root", f"c{os.pathsep}d"])
    cfg = build_config(PairConfig, ns)
    assert [str(p) for p in cfg.data_root] == ["a", "b", f"c{os.pathsep}d"]
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match=r"--data-root 'd' is not a folder"):
        tables.split_roots([tmp_path / "c", "d"])
    assert tables.split_roots([f"{tmp_path / 'c'}{os.pathsep}"]) == (str(tmp_path / "c"),)
    rewards, _, _ = _rewards_without_roots(tmp_path)
    rc = main(["pair", "--rewards", str(rewards), "--data-root", str(tmp_path / "nowhere")])
    assert rc == 2 and "nowhere' is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["sample", "score", "pair", "train", "eval", "curve", "report"])
def test_every_stage_reading_tables_explains_data_root(stage, capsys):
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data-root" in text and "the folders recorded in the table when it was written" in text
