"""scripts/medium.py's crop choice: training tiles only from photos the embedded model was trained on,
held-out tiles only from photos it never saw; flat tiles skipped."""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import medium  # noqa: E402
from train_embedded import HOLDOUT  # noqa: E402


def photo(path: Path, flat: bool = False, side: int = 128) -> Path:
    rng = np.random.default_rng(len(path.stem))
    arr = np.full((side, side, 3), 128, np.uint8) if flat else rng.integers(0, 256, (side, side, 3), np.uint8)
    Image.fromarray(arr).save(path)
    return path


def test_photo_sets_keep_heldout_photos_out_of_training(tmp_path):
    for name in ("plant", "apple", "baboon", "astronaut"):
        photo(tmp_path / f"{name}.png")
    train, held = medium.photo_sets(tmp_path)
    assert [p.stem for p in train] == ["apple", "plant"]
    stems = [p.stem for p in held]
    assert "baboon" in stems and set(stems) <= set(HOLDOUT)
    assert {"astronaut", "chelsea", "coffee", "rocket"} <= set(stems)  # the bundled photos join them
    assert not {p.stem for p in train} & set(HOLDOUT)


def test_only_heldout_photos_is_an_error(tmp_path):
    photo(tmp_path / "baboon.png")
    with pytest.raises(ValueError, match="no photo outside"):
        medium.photo_sets(tmp_path)


def test_flat_tiles_are_skipped(tmp_path):
    tiles = medium.textured_tiles([photo(tmp_path / "a.png"), photo(tmp_path / "flat.png", flat=True)], 64)
    assert len(tiles) == 4 and all(t[0].startswith("a_") for t in tiles)  # 2 x 2 of a, none of flat


def test_variants_share_the_starting_models_pool_but_not_a_checkpoints(tmp_path):
    import json

    from dp2osr.curve import SOURCE_NAME, check_sources

    def record(step: int, run: str, checkpoint: str) -> None:
        folder = tmp_path / "eval" / f"step_{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SOURCE_NAME).write_text(json.dumps({"run": run, "checkpoint": checkpoint}))

    record(
        0, str(tmp_path / "hybrid" / "5_train"), ""
    )  # the base model's pool, linked from the first variant
    check_sources(tmp_path / "eval", tmp_path / "n1" / "5_train")  # no error
    record(100, str(tmp_path / "hybrid" / "5_train"), "/x/checkpoint-100/model.safetensors")
    with pytest.raises(ValueError, match="holds the reward curve of the run"):
        check_sources(tmp_path / "eval", tmp_path / "n1" / "5_train")


def test_claims_section_and_missing_photos():
    from dp2osr.math import claims

    rng = np.random.default_rng(1)
    rows_in = []
    for i in range(3):
        for s in range(4):
            r = float(rng.uniform())
            rows_in.append(
                {"image_id": f"i{i}", "seed": s, "reward": r, "fr": r, "nr": r, "psnr": 25.0, "ssim": 0.7}
            )
    base = pd.DataFrame(rows_in)
    rows = claims.claim_rows({"base": base, "hybrid": base.assign(reward=base.reward + 0.1)})
    page = medium.claims_html(rows, seed=7)
    assert "seed 7" in page and page.count("<tr>") == len(claims.CLAIMS) + 1
    assert "not run: fr_only, nr_only" in page and "+0.1000" in page
    with pytest.raises(SystemExit):
        medium.main(["--output", "/nonexistent/never-made"])


def test_data_seed_fixes_the_data_and_leaves_training_to_the_seed(tmp_path):
    from dp2osr.quickstart import Layout, QuickstartConfig, curve_config, resolved

    def parts(**kw):
        c = QuickstartConfig(output=tmp_path, **kw)
        r = resolved(c, Layout(tmp_path))
        return (r.degrade.seed, r.sample.seed, curve_config(r, Layout(tmp_path)).seed), r.train.seed

    data0, train0 = parts(seed=0)
    data1, train1 = parts(seed=1)
    shared, train_shared = parts(seed=1, data_seed=0)
    assert data1 != data0 and shared == data0  # the crops and pools of seed 0
    assert train_shared == train1 == 1 and train0 == 0  # training still follows --seed


def test_seeds_table_counts_the_target():
    def row(seed, acc_lo, mean_lo, worse):
        span = {"effect": 0.01, "lo": mean_lo, "hi": 0.02, "n": 24}
        guard = {"effect": -0.1, "lo": -0.2, "hi": 0.1, "n": 24, "worse": bool(worse)}
        return {
            "seed": seed,
            "variant": "hybrid",
            "train_accuracy": {"accuracy": 0.8},
            "winner_err": 0.0012,
            "accuracy": {"accuracy": 0.6, "lo": acc_lo, "hi": 0.7},
            "mean": span,
            "worst": span,
            "psnr": guard,
            "accuracy_ok": acc_lo > 0.5,
            "mean_ok": mean_lo > 0,
            "guards_ok": not worse,
            "worse_guards": ["psnr"] if worse else [],
            "met": acc_lo > 0.5 and mean_lo > 0 and not worse,
            "met_slight": acc_lo > 0.5 and mean_lo > 0,
        }

    text = medium.seeds_markdown(
        [row(0, 0.55, 0.001, False), row(1, 0.45, 0.001, False), row(2, 0.55, -0.01, True)]
    )
    assert (
        "all three in **1 of 3**" in text and "slight drop (interval above −0.5 dB / −0.02): 1 of 3" in text
    )
    assert "accuracy above 0.5 in 2 of 3" in text and "no guard worse beyond the noise in 2" in text
    assert (
        "+0.00120" in text
        and "no (accuracy)" in text
        and "no (Mean@M, psnr)" in text
        and "psnr Δ [95 %]" in text
    )


def test_the_data_seeds_own_runs_are_plain_quickstarts(tmp_path):
    from dp2osr.quickstart import Layout, QuickstartConfig, resolved

    assert resolved(QuickstartConfig(output=tmp_path, data_seed=0), Layout(tmp_path)).data_seed is None
    assert resolved(QuickstartConfig(output=tmp_path, seed=3, data_seed=0), Layout(tmp_path)).data_seed == 0


def test_a_shared_pool_made_with_other_options_is_refused_not_added_to(tmp_path):
    from dp2osr.config import save_config
    from dp2osr.quickstart import CONFIG_NAME, Layout, QuickstartConfig, resolved

    owner = tmp_path / "seed_0" / "hybrid"
    owner.mkdir(parents=True)
    made = QuickstartConfig(output=owner, images=100)
    save_config(resolved(made, Layout(owner)), owner / CONFIG_NAME)
    before = sorted(p.name for p in owner.iterdir())
    cfg = QuickstartConfig(output=tmp_path, images=200, data_seed=0)
    with pytest.raises(ValueError, match="images"):
        medium.pool_owner(cfg, ["hybrid"], 1, tmp_path)
    assert sorted(p.name for p in owner.iterdir()) == before  # nothing written into seed 0's folder


def test_the_steps_variant_triples_the_steps(tmp_path):
    from ablations import variant

    from dp2osr.quickstart import QuickstartConfig

    cfg = QuickstartConfig(output=tmp_path)
    c = variant(cfg, "steps3x", 0, tmp_path / "steps3x", False)
    assert c.train.steps == 3 * cfg.train.steps and c.train.checkpoint_every == c.train.steps
    assert variant(cfg, "lr1e4", 0, tmp_path / "lr", False).train.lr == 1e-4


def test_the_pools_are_taken_from_the_variant_that_holds_them(tmp_path):
    from dp2osr.quickstart import Layout, QuickstartConfig

    holder = Layout(tmp_path / "seed_0" / "hybrid")
    for folder in (holder.sample, holder.eval):
        folder.mkdir(parents=True)
    (holder.eval / "summary.json").write_text("{}")
    (tmp_path / "seed_0" / "lr1e4" / "6_eval").mkdir(parents=True)  # a variant that only links the pools
    cfg = QuickstartConfig(output=tmp_path, data_seed=0)
    for seed in (0, 1):  # seed 0's own later variant, and seed 1 sharing seed 0's data
        assert medium.pool_owner(cfg, ["lr1e4"], seed, tmp_path).output == holder.root
    assert medium.pool_owner(QuickstartConfig(output=tmp_path), ["n1"], 2, tmp_path).output.name == "n1"
