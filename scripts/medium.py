"""The medium-scale DP²O recipe: hundreds of crops, M = 16, five variants trained from one pair of pools, and
the paper's claims as one table (``dp2osr.math.claims``).

    python scripts/train_embedded.py --export-photos PHOTOS --opencv-doc /tmp/opencv-doc [--debian DIR]
    python scripts/medium.py --photos PHOTOS --output runs/medium --seeds 0

Options default to ``configs/medium.yaml`` (another file: ``--config``; any quickstart option as a flag wins
over it). Per seed, under OUTPUT/seed_S/:

- crops: ``--images`` 64 px tiles (no two overlap) of the photos of PHOTOS the embedded model was trained on,
  and ``--heldout`` tiles of the photos it never saw (``train_embedded.HOLDOUT``: those in PHOTOS and the
  quickstart's bundled ones), drawn at random by the seed; tiles with almost no texture are skipped;
- the variants of ``scripts/ablations.py`` (default: hybrid, fr_only, nr_only, n1, no_hpo), each a quickstart
  in its own folder; the crops, the training pool and its scores and the base model's held-out pool are
  made once, in the first variant's folder, so each further variant costs its pairs, training and final pool;
- claims.md / claims.json: per claim the effect, its 95 % interval and "reproduced", "not reproduced" or "not
  measured" (a variant left out), all pools under the base held-out pool's bounds; report.html: the first
  variant's report with the claims table as a section; timings.json: seconds per stage and variant.

Across seeds, OUTPUT/seeds.md and seeds.json: per seed and variant the held-out preference accuracy, Mean@M,
Worst@M and the guards against the base model, each with its 95 % interval, and whether the target was met
(accuracy above 0.5, Mean@M up beyond the noise, no guard worse).

``--data-seed D``: every seed uses seed D's crops, training pool and base held-out pool (in the folder of
OUTPUT/seed_D/ that holds them; made first when needed), so a seed costs only its training and final pools,
and seeds differ only in training (data order, noise) and in the noise draws of the preference accuracy.
Without it each seed draws its own crops and pools. ``--tables-only`` rebuilds the tables from finished
runs. A rerun with the same options resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablations import VARIANTS, VariantLayout, run_variant, variant  # noqa: E402
from train_embedded import HOLDOUT  # noqa: E402

from dp2osr import before_after, degrade  # noqa: E402
from dp2osr import metrics as metric_lib  # noqa: E402
from dp2osr.config import add_arguments, build_config, check_resume  # noqa: E402
from dp2osr.engine.heldout import pool_rewards, step_dir  # noqa: E402
from dp2osr.images import checkerboard_tiles, list_images, save_image  # noqa: E402
from dp2osr.math import claims  # noqa: E402
from dp2osr.math.reward import fit_bounds, hybrid_reward  # noqa: E402
from dp2osr.quickstart import CONFIG_NAME, PHOTOS, Layout, QuickstartConfig, resolved  # noqa: E402
from dp2osr.runtime import output_lock  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "medium.yaml"
DEFAULT_VARIANTS = ["hybrid", "fr_only", "nr_only", "n1", "no_hpo"]
_SHARED_HINT = "give --data-seed the same data options as that seed's runs, or another --output"
MIN_TILE_STD = 0.02  # a tile this flat (std of its pixels in [0, 1]) gives every candidate the same score


def photo_sets(photos: Path) -> tuple[list[Path], list[Path]]:
    """(training photos, held-out photos): PHOTOS minus / among HOLDOUT, plus the bundled quickstart photos
    (all held out) among the held-out ones."""
    files = list_images(photos)
    train = [p for p in files if p.stem not in HOLDOUT]
    held = {p.stem: p for p in [*list_images(PHOTOS), *files] if p.stem in HOLDOUT}
    if not train:
        raise ValueError(f"--photos {photos}: no photo outside the embedded model's held-out set")
    return train, sorted(held.values())


def textured_tiles(photos: list[Path], size: int) -> list[tuple[str, object]]:
    """Every ``size`` tile of the photos (both checkerboard halves) with some texture."""
    both = checkerboard_tiles(photos, size)
    return sorted((t for half in both for t in half if float(t[1].std()) >= MIN_TILE_STD), key=lambda t: t[0])


def prepare_data(cfg: QuickstartConfig, folder: Path) -> None:
    """Stage 1: training tiles from the training photos, held-out tiles from the held-out photos."""
    if cfg.photos is None:
        raise ValueError("--photos is required: the folder of scripts/train_embedded.py --export-photos")
    sets = photo_sets(Path(cfg.photos))
    rng = np.random.default_rng(cfg.pool_seed)
    for name, photos, n in zip(("train", "heldout"), sets, (cfg.images, cfg.heldout)):
        tiles = textured_tiles(photos, cfg.hr_size)
        if len(tiles) < n:
            raise ValueError(f"--{'images' if name == 'train' else 'heldout'} {n}: only {len(tiles)} tiles")
        tile_dir = folder / f"tiles_{name}"
        for tile_id, tile in [tiles[i] for i in sorted(rng.permutation(len(tiles))[:n])]:
            if not (tile_dir / f"{tile_id}.png").is_file():
                save_image(tile, tile_dir / f"{tile_id}.png")
        degrade.run(dataclasses.replace(cfg.degrade, input=tile_dir, output=folder / name))


def read_pool(pool: Path, bounds: dict, metrics: list[str]) -> pd.DataFrame:
    """A held-out pool as `claims` reads it: reward (0.5/0.5), fr, nr (its parts), psnr, ssim per candidate,
    and the raw value of each guard metric (pool/guard, where the quickstart scored it)."""
    scores = pd.read_parquet(pool / "scores.parquet")
    df = pool_rewards(scores, pool, bounds, metrics)[["image_id", "seed", "reward", "psnr", "ssim"]]
    cat = metric_lib.catalogue(metrics)
    for part, w in (("fr", (1.0, 0.0)), ("nr", (0.0, 1.0))):
        r = hybrid_reward(scores, cat, w_fr=w[0], w_nr=w[1], bounds=bounds)[["image_id", "seed", "reward"]]
        df = df.merge(r.rename(columns={"reward": part}), on=["image_id", "seed"])
    guard = pool / "guard" / "scores.parquet"
    if guard.is_file():
        g = pd.read_parquet(guard).pivot_table(index=["image_id", "seed"], columns="metric", values="value")
        df = df.merge(g.reset_index(), on=["image_id", "seed"])
    return df


def read_pools(seed_dir: Path, names: list[str], cfg: QuickstartConfig) -> dict[str, pd.DataFrame]:
    """``{"base": …, variant: final pool}`` of one seed, under the base held-out pool's bounds."""
    metrics = cfg.reward_metrics
    base = step_dir(Layout(seed_dir / names[0]).eval, 0)
    bounds = fit_bounds(pd.read_parquet(base / "scores.parquet"), metric_lib.catalogue(metrics))
    pools = {"base": read_pool(base, bounds, metrics)}
    for name in names:
        steps = variant(cfg, name, 0, seed_dir / name, False).train.steps  # the variant's own final step
        pools[name] = read_pool(step_dir(Layout(seed_dir / name).eval, steps), bounds, metrics)
    return pools


def winner_error(train_dir: Path, last: int = 10) -> float:
    """The policy's denoising error on the winners minus the reference's, averaged over the last ``last``
    logged steps of metrics.jsonl: above 0 when DPO made the model worse on the images it should prefer."""
    lines = (train_dir / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(x) for x in lines if x.strip()]
    steps = [r for r in logged if "policy_err_w" in r][-last:]
    return float(np.mean([r["policy_err_w"] - r["ref_err_w"] for r in steps])) if steps else float("nan")


def target_rows(cfg: QuickstartConfig, seed: int, pools: dict, summaries: dict, seed_dir: Path) -> list[dict]:
    """Per variant of one seed, `claims.seed_target`: held-out preference accuracy, Mean@M and the guards
    (PSNR-Y, SSIM-Y and the guard metrics, which are not in the reward) against the base pool, and the
    policy's change of error on the training winners (`winner_error`)."""
    guards = {"psnr": False, "ssim": False}
    guards |= {m: metric_lib.get_spec(m).lower_better for m in before_after.cfg_guards(cfg)}
    rows = []
    for name, s in summaries.items():
        acc = s["pref_accuracy"]
        t = claims.seed_target(pools["base"], pools[name], acc["heldout"], guards)
        err = winner_error(Layout(seed_dir / name).train)
        rows.append({"seed": seed, "variant": name, "train_accuracy": acc["train"], "winner_err": err, **t})
    return rows


def _span(r: dict, fmt: str = "+.4f") -> str:
    return f"{r['effect']:{fmt}} [{r['lo']:{fmt}}, {r['hi']:{fmt}}]"


def seeds_markdown(rows: list[dict]) -> str:
    """The across-seeds table: per seed and variant, the target's parts and whether it was met."""
    guards = [k for k in rows[0] if isinstance(rows[0][k], dict) and "worse" in rows[0][k]]
    head = ["seed", "variant", "held-out pref. accuracy [95 %]", "training-pair accuracy", "winner error Δ"]
    head += [
        "Mean@M Δ [95 %]",
        "Worst@M Δ [95 %]",
        *[f"{g} Δ [95 %]" for g in guards],
        "target met",
        "with the slight drop",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        a, tr = r["accuracy"], r["train_accuracy"]
        cells = [str(r["seed"]), r["variant"], f"{a['accuracy']:.3f} [{a['lo']:.3f}, {a['hi']:.3f}]"]
        cells += [f"{tr['accuracy']:.3f}", f"{r['winner_err']:+.5f}", _span(r["mean"]), _span(r["worst"])]
        cells += [_span(r[g], "+.3f") + (" worse" if r[g]["worse"] else "") for g in guards]
        slight = "yes" if r["met_slight"] else "no"
        miss = [k for k, ok in (("accuracy", r["accuracy_ok"]), ("Mean@M", r["mean_ok"])) if not ok]
        miss += r["worse_guards"]
        cells += ["yes" if r["met"] else "no (" + ", ".join(miss) + ")", slight]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in dict.fromkeys(r["variant"] for r in rows):
        part = [r for r in rows if r["variant"] == name]
        keys = ("accuracy_ok", "mean_ok", "guards_ok", "met", "met_slight")
        count = {k: sum(r[k] for r in part) for k in keys}
        lines.append(
            f"- {name}: accuracy above 0.5 in {count['accuracy_ok']} of {len(part)} seeds, Mean@M up beyond the "
            f"noise in {count['mean_ok']}, no guard worse beyond the noise in {count['guards_ok']}; all three in "
            f"**{count['met']} of {len(part)}** (target: 4 of 5); allowing PSNR-Y and SSIM-Y the paper's slight "
            f"drop (interval above −{claims.SLIGHT['psnr']} dB / −{claims.SLIGHT['ssim']}): {count['met_slight']} "
            f"of {len(part)}."
        )
    return "\n".join(lines) + "\n"


def claims_html(rows: list[dict], seed: int) -> str:
    """The report section of the claims table (escaped HTML)."""
    cells = []
    for r in rows:
        span = r["note"] if r["effect"] is None else f"[{r['lo']:+.4f}, {r['hi']:+.4f}]"
        effect = "–" if r["effect"] is None else f"{r['effect']:+.4f}"
        row = [r["claim"], r["measured_as"], effect, span, str(r["n"]), r["verdict"]]
        cells.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
    head = "".join(
        f"<th>{h}</th>" for h in ("claim", "measured as", "effect", "95 % interval", "images", "verdict")
    )
    return (
        f"<section><h2>The paper's claims (seed {seed})</h2><p>Held-out pools, all under the base pool's "
        f"min-max bounds; intervals: Student t over images (see claims.md).</p>"
        f"<table><tr>{head}</tr>{''.join(cells)}</table></section>"
    )


def finished_summary(folder: Path) -> dict:
    """A finished variant's summary (6_eval/summary.json), for ``--tables-only``."""
    path = Layout(folder).eval / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run that variant first (--tables-only reads finished runs)"
        )
    return json.loads(path.read_text())


def run_seed(
    cfg: QuickstartConfig, names: list[str], seed: int, root: Path, tables_only: bool = False
) -> list[dict]:
    """Every variant of one seed (sharing the pools of `pool_owner`), then its claims table and report;
    returns its `target_rows`. ``tables_only``: read the finished variants' summaries instead of running them,
    and write the tables but not the report."""
    seed_dir, summaries, timings = root / f"seed_{seed}", {}, {}
    shared = None if tables_only else pool_owner(cfg, names, seed, root)
    for name in names:
        c = variant(cfg, name, seed, seed_dir / name, False)
        if shared is None:
            summaries[name] = finished_summary(c.output)
        else:
            lay = VariantLayout(c.output, shared=shared.output, own_score=c.score != shared.score)
            summaries[name] = run_variant(c, lay, prepare=prepare_data)
        timings[name] = summaries[name]["timings"]
    pools = read_pools(seed_dir, names, cfg)
    rows = claims.claim_rows(pools)
    (seed_dir / "claims.json").write_text(json.dumps(rows, indent=1))
    text = claims.claims_markdown(rows)
    (seed_dir / "claims.md").write_text(f"# Claims, seed {seed} ({', '.join(names)})\n\n{text}")
    (seed_dir / "timings.json").write_text(json.dumps(timings, indent=1))
    first = variant(cfg, names[0], seed, seed_dir / names[0], False)
    lay = Layout(first.output)
    c = resolved(first, lay)
    if not tables_only:
        before_after.write_report(
            c, summaries[names[0]], lay.eval, seed_dir / "report.html", [claims_html(rows, seed)]
        )
    print(text)
    return target_rows(c, seed, pools, summaries, seed_dir)


def pool_owner(cfg: QuickstartConfig, names: list[str], seed: int, root: Path) -> QuickstartConfig:
    """The run whose folder holds a seed's crops, training pool and base held-out pool: that of the seed (or
    with --data-seed D of seed D) whose folder already holds a training pool, else its first variant in
    ``names``. Run first when it is not among this seed's variants and has not finished."""
    owner = seed if cfg.data_seed is None else cfg.data_seed
    seed_dir = root / f"seed_{owner}"
    holders = sorted(p.parent.name for p in seed_dir.glob(f"*/{Layout(Path()).sample.name}") if p.is_dir())
    name = holders[0] if holders else names[0]
    c = variant(cfg, name, owner, seed_dir / name, False)
    # Its folder is shared: made with other options (crops, photos, M, ...) it is refused, not added to.
    check_resume(resolved(c, Layout(c.output)), c.output / CONFIG_NAME, f"seed {owner}'s pools", _SHARED_HINT)
    if (owner != seed or name not in names) and not (Layout(c.output).eval / "summary.json").is_file():
        run_variant(c, VariantLayout(c.output, shared=c.output), prepare=prepare_data)
    return c


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="whole-run seeds")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument(
        "--tables-only",
        action="store_true",
        help="rebuild claims.md and seeds.md (and their JSON) from the finished variants' summaries and pools "
        "(give the options the runs were made with); runs nothing and leaves the reports as they are",
    )
    add_arguments(parser, QuickstartConfig)
    args = parser.parse_args(argv)
    if args.config is None:
        args.config = CONFIG
    if "output" not in vars(args):
        args.output = Path("medium_runs")
    cfg = build_config(QuickstartConfig, args)
    if cfg.photos is None:
        parser.error("--photos is required: the folder of scripts/train_embedded.py --export-photos")
    photo_sets(Path(cfg.photos))  # before any work: a folder with no training photo is refused
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    command = "python scripts/medium.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.tables_only and (root / "command.txt").is_file():
        command = f"{(root / 'command.txt').read_text().strip()}` (tables rebuilt by `{command}"
    else:
        (root / "command.txt").write_text(command + "\n")
    t0 = time.perf_counter()
    rows = []
    with output_lock(root, "medium"):  # one recipe per OUTPUT at a time: its seeds may share one folder
        for seed in args.seeds:
            rows += run_seed(cfg, args.variants, seed, root, args.tables_only)
            text = seeds_markdown(rows)
            (root / "seeds.md").write_text(f"Command: `{command}`\n\n{text}")
            (root / "seeds.json").write_text(json.dumps(rows, indent=1))
    print(text)
    print(f"{time.perf_counter() - t0:.0f} s; claims: {root}/seed_*/claims.md; across seeds: {root}/seeds.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
