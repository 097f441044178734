"""Before/after DP²O on held-out crops: the quickstart's verdict, from the pools `dp2osr curve` wrote.

The base model's pool (step 0) and the final checkpoint's pool hold the same held-out crops sampled with the
same seeds. Their hybrid rewards are normalised jointly (`reward.fit_bounds` over both), and the table always
shows guard metrics that are not in the reward — PSNR-Y, SSIM-Y and a no-reference metric — so a reward that
rises while they fall (reward hacking) is visible; one sentence says whether the change of Mean@M is beyond
its standard error (`math.change.change_sentence`). The joint tables go to ``joint/{base,dp2o}`` for `dp2osr eval`
and `dp2osr report`.
"""

from __future__ import annotations

import hashlib
import html
import time
from pathlib import Path

import pandas as pd

from dp2osr import evaluate, pair, report, score, tables
from dp2osr import metrics as metric_lib
from dp2osr.engine import heldout, pref_accuracy
from dp2osr.engine.options import load_model
from dp2osr.engine.pools import read_pool
from dp2osr.math.change import NOISE_METHOD, change_sentence, pool_change
from dp2osr.math.reward import fit_bounds, hybrid_reward

BASE_LABEL, DPO_LABEL = "base ControlNet", "DP²O ControlNet"
# Offline no-reference guards, in order of preference (NIQE needs >= 96 px; BRISQUE and PIQE work at any size).
GUARD_CHOICES = ("niqe", "brisque", "piqe")
_REWARD, _GUARD = "reward", "guard (not in the reward)"
HELDOUT_PAIRS = "heldout_pref_pairs.parquet"  # in the eval folder: pairs of the base model's held-out pool


def guards(given: list[str] | None, reward: list[str], size: int) -> list[str]:
    """The guard metrics: ``given``, or the first offline NR metric that works at ``size`` px and is not in the
    ``reward``. A guard that is also in the reward is a ValueError."""
    if given:
        both = sorted(set(given) & set(reward))
        if both:
            raise ValueError(
                f"--guard-metrics {both} are in the reward (--score.metrics); a guard must not be"
            )
        metric_lib.catalogue(given)  # unknown names fail here
        return list(dict.fromkeys(given))
    usable = [m for m in GUARD_CHOICES if m not in reward and size >= metric_lib.get_spec(m).min_size]
    if not usable:
        raise ValueError(
            f"the reward's metrics {reward} use every offline guard {list(GUARD_CHOICES)}; give --guard-metrics"
        )
    return usable[:1]


def cfg_guards(cfg) -> list[str]:
    return guards(cfg.guard_metrics, cfg.reward_metrics, cfg.hr_size)


def score_guards(cfg, eval_dir: Path, final_step: int) -> dict[str, Path]:
    """`dp2osr score` of the step-0 and final held-out pools with the guard metrics, into each pool's guard/;
    returns ``{"base": pool, "dp2o": pool}``."""
    pools = {"base": heldout.step_dir(eval_dir, 0), "dp2o": heldout.step_dir(eval_dir, final_step)}
    for pool in pools.values():
        options = {"weights_dir": cfg.score.weights_dir, "device": cfg.device}
        score.run(
            score.ScoreConfig(candidates=pool, output=pool / "guard", metrics=cfg_guards(cfg), **options)
        )
    return pools


def fingerprint(cfg) -> str:
    """A short hash of the weights (denoiser and ControlNet): which model a result was measured with."""
    bb = load_model(cfg.sample)
    h = hashlib.sha256()
    for module in [*bb.frozen_modules().values(), bb.controlnet]:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def compare(cfg, pools: dict[str, Path], joint: Path) -> dict:
    """Base vs final held-out pool, rewards normalised jointly; writes ``joint/{base,dp2o}`` (rewards and
    scores tables) and returns the summary."""
    metrics = cfg.reward_metrics
    scores = {k: pd.read_parquet(d / "scores.parquet") for k, d in pools.items()}
    bounds = fit_bounds(pd.concat(scores.values(), ignore_index=True), metric_lib.catalogue(metrics))
    out: dict = {"final_step": int(pools["dp2o"].name.removeprefix("step_")), "images": 0}
    out["seeds"] = cfg.eval_samples or cfg.sample.samples
    means, frames = {}, {}
    for key, d in pools.items():
        df = heldout.pool_rewards(scores[key], d, bounds, metrics)
        meta = {"metrics": metrics, "w_fr": 0.5, "w_nr": 0.5, "scope": "pool"}
        tables.write(tables.REWARDS, df.assign(path=df.pop("abs_path")), joint / key, meta)
        tables.write(tables.SCORES, scores[key], joint / key)  # `dp2osr eval` re-derives the joint scale
        out[key] = heldout.pool_stats(df)
        raw = scores[key].groupby("metric")["value"].mean()
        out[key].update({f"raw_{m}": float(raw[m]) for m in metrics if m in raw})
        guard = pd.read_parquet(d / "guard" / "scores.parquet").groupby("metric")["value"].mean()
        out[key].update({f"guard_{m}": float(guard[m]) for m in cfg_guards(cfg) if m in guard})
        means[key], frames[key] = df.groupby("image_id")["reward"].mean(), df
        out["images"] = len(means[key])
    gain = (means["dp2o"] - means["base"]).dropna()
    out["improved_images"] = int((gain > 0).sum())
    out["delta"] = {k: out["dp2o"][k] - out["base"][k] for k in out["base"]}
    out["change"] = pool_change(frames["base"], frames["dp2o"])
    out["change"]["sentence"] = change_sentence(out["change"], BASE_LABEL, DPO_LABEL)
    out["model"] = f"{cfg.backbone} {fingerprint(cfg)}"
    out["pref_accuracy"] = preference_accuracy(cfg, pools["base"], joint.parent)
    return out


def heldout_pairs(cfg, pool: Path, output: Path) -> pd.DataFrame:
    """Preference pairs of the base model's held-out pool, curated as the training pairs are: the reward of
    `dp2osr score` (its metrics, FR/NR weights and scope; bounds of this pool), then `pair.build_pairs`
    (top-N x bottom-N, the pair stage's N and HPO). Written to ``output`` (a pref_pairs table)."""
    scores = pd.read_parquet(pool / "scores.parquet")
    specs = metric_lib.catalogue(cfg.reward_metrics)
    rewards = hybrid_reward(scores, specs, w_fr=cfg.score.w_fr, w_nr=cfg.score.w_nr, scope=cfg.score.scope)
    cands, meta = read_pool(pool)
    info = cands[["image_id", "seed", "abs_path", "lr_path"]].rename(columns={"abs_path": "path"})
    ratio = cfg.pair.ratio if cfg.pair.ratio is not None else meta.get("pair_ratio", pair.DEFAULT_RATIO)
    pairs = pair.build_pairs(rewards.merge(info, on=["image_id", "seed"]), cfg.pair.n, ratio, cfg.pair.hpo)
    tables.write(tables.PREF_PAIRS, pairs, output)
    return pairs


def preference_accuracy(cfg, base_pool: Path, eval_dir: Path) -> dict:
    """The implicit-reward accuracy of every checkpoint against the base ControlNet on the held-out pairs
    (`heldout_pairs`) and the training pairs (`engine.pref_accuracy.over_checkpoints`, K = --train.pref-draws),
    written to ``eval_dir``/pref_accuracy.{csv,png}; returns the final step's rows and the seconds it took."""
    start = time.perf_counter()
    heldout_pairs(cfg, base_pool, eval_dir / HELDOUT_PAIRS)
    sets = {"heldout": eval_dir / HELDOUT_PAIRS, "train": cfg.train.data}
    sets = {k: pref_accuracy.read_pairs(p, pref_accuracy.TRAIN_PAIRS, cfg.seed) for k, p in sets.items()}
    table = pref_accuracy.over_checkpoints(
        load_model(cfg.sample),
        heldout.run_checkpoints(cfg.train.output),
        sets,
        upscale=cfg.train.upscale,
        draws=cfg.train.pref_draws,
        seed=cfg.seed,
    )
    pref_accuracy.write_table(table, eval_dir)
    last = table[table.step == table.step.max()].set_index("set")
    out = {k: {c: _plain(v) for c, v in last.loc[k].items()} for k in last.index}
    return {**out, "seconds": time.perf_counter() - start}


def _plain(value):
    """A JSON-ready Python number from a pandas cell."""
    return value.item() if hasattr(value, "item") else value


def accuracy_sentence(s: dict) -> str:
    """The verdict's line on the held-out preference accuracy of the final model (empty without one)."""
    acc = s.get("pref_accuracy")
    if not acc:
        return ""
    verdict = (
        "above 0.5: the preference learned on the training pairs carries over to new crops"
        if acc["heldout"]["lo"] > 0.5
        else "its interval reaches 0.5 or below: no preference that carries over to new crops is shown"
    )
    return (
        f"{DPO_LABEL} against {BASE_LABEL}: {pref_accuracy.sentence(acc['heldout'])}, {verdict} (training "
        f"pairs: {acc['train']['accuracy']:.2f}, {acc['train']['lo']:.2f}–{acc['train']['hi']:.2f})."
    )


def _arrow(name: str) -> str:
    return "↓" if metric_lib.get_spec(name).lower_better else "↑"


def summary_rows(cfg, s: dict) -> list[tuple[str, str, float, float, float]]:
    """(label, role, base, DP²O, Δ) rows of the before/after table (M = the whole held-out pool); role says
    whether the row is the reward (or one of its metrics) or a guard metric outside it."""
    m = s["seeds"]
    keys = [
        ("best", f"Best@{m} ↑", _REWARD),
        ("mean", f"Mean@{m} ↑", _REWARD),
        ("worst", f"Worst@{m} ↑", _REWARD),
        ("psnr", "PSNR-Y (dB) ↑", _GUARD),
        ("ssim", "SSIM-Y ↑", _GUARD),
        *[(f"guard_{x}", f"{x} (raw value) {_arrow(x)}", _GUARD) for x in cfg_guards(cfg)],
        *[(f"raw_{x}", f"{x} (raw value) {_arrow(x)}", f"in the {_REWARD}") for x in cfg.reward_metrics],
    ]
    return [
        (label, role, s["base"][k], s["dp2o"][k], s["delta"][k]) for k, label, role in keys if k in s["base"]
    ]


def guard_note(cfg) -> str:
    dither = f", each scored as the mean over {cfg.score.dither} dithered copies" if cfg.score.dither else ""
    return (
        f"Guards: PSNR-Y, SSIM-Y and {', '.join(cfg_guards(cfg))} are not in the reward (hybrid of "
        f"{', '.join(cfg.reward_metrics)}{dither}): if the reward rises while the guards get worse, DP²O is "
        "exploiting the reward."
    )


def summary_markdown(cfg, s: dict) -> str:
    lines = [
        (
            f"Held-out crops: {s['images']} (never in the DPO pairs) x {s['seeds']} seeds, the same for both "
            f"models. DP²O = step {s['final_step']}. Reward: hybrid, normalised jointly over both pools; "
            "PSNR/SSIM and the raw metric values are not normalised."
        ),
        "",
        f"| held-out | role | {BASE_LABEL} | {DPO_LABEL} | Δ |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {role} | {b:.4f} | {d:.4f} | {x:+.4f} |"
        for label, role, b, d, x in summary_rows(cfg, s)
    ]
    rose = f"Held-out crops whose mean reward rose: {s['improved_images']} of {s['images']}."
    lines += ["", guard_note(cfg), "", rose]
    if "change" in s:
        lines += ["", s["change"]["sentence"], "", f"(How the noise is measured: {NOISE_METHOD})"]
    if accuracy_sentence(s):
        lines += ["", accuracy_sentence(s)]
    return "\n".join(lines) + "\n"


def summary_html(cfg, s: dict) -> str:
    """The report's first section: what DP²O did on the held-out crops (escaped HTML)."""
    rows = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{html.escape(role)}</td><td>{b:.4f}</td><td>{d:.4f}</td>"
        f"<td>{x:+.4f}</td></tr>"
        for label, role, b, d, x in summary_rows(cfg, s)
    )
    change = s.get("change")
    verdict = (
        f'<p class="verdict" title="{html.escape(NOISE_METHOD)}">{html.escape(change["sentence"])}</p>'
        if change
        else ""
    )
    if accuracy_sentence(s):
        verdict += f'<p class="verdict">{html.escape(accuracy_sentence(s))}</p>'
    t, tr = s.get("timings", {}), cfg.train
    return (
        "<h2>What DP²O did on held-out crops</h2>"
        f"<p>{s['images']} held-out crops, never in the DPO pairs, {s['seeds']} seeds each (the same seeds for "
        f"both models). {DPO_LABEL} = step {s['final_step']} of DPO on {s['pairs']} pairs from "
        f"{cfg.images} training crops (β {tr.beta:g}, lr {tr.lr:g}, batch {tr.batch_size}, HPO "
        f"{html.escape(cfg.pair.hpo)}, pair reward {html.escape(_pair_reward(cfg))}"
        f"{f', winner term λ {tr.winner_sft:g}' if tr.winner_sft else ''}). Hybrid reward of "
        f"{html.escape(', '.join(cfg.reward_metrics))}, min-max normalised jointly over both pools. "
        f"{html.escape(guard_note(cfg))} Held-out crops whose mean reward rose: "
        f"<b>{s['improved_images']} of {s['images']}</b>.</p>"
        f"<table><thead><tr><th>held-out</th><th>role</th><th>{BASE_LABEL}</th><th>{DPO_LABEL}</th><th>Δ</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>{verdict}"
        f'<p class="note">Model {html.escape(s.get("model", "?"))} (weights hash). Run time {t.get("total", 0):.0f} s'
        + (f" over {t.get('runs')} runs (resumed)" if t.get("runs", 1) > 1 else "")
        + " ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k not in ("total", "runs"))
        + "). The reward curve below normalises with the step-0 pool's bounds, so its values are not those of "
        "this table.</p>"
    )


def _pair_reward(cfg) -> str:
    """How the training pool's reward weighs FR and NR: hybrid (the paper's 0.5/0.5), fr, nr, or the weights."""
    w = (cfg.score.w_fr, cfg.score.w_nr)
    names = {(0.5, 0.5): "hybrid", (1.0, 0.0): "fr", (0.0, 1.0): "nr"}
    return names.get(w, f"{w[0]:g} FR + {w[1]:g} NR")


def write_report(cfg, s: dict, eval_dir: Path, page: Path, sections=()) -> Path:
    """`dp2osr eval` of the two joint pools (Best/Mean/Worst@M, the curve's plot) into ``eval_dir``, and
    `dp2osr report` into ``page`` with the before/after summary as its first section (then ``sections``);
    returns the page."""
    joint = [eval_dir / "joint" / k for k in ("base", "dp2o")]
    names = [BASE_LABEL, DPO_LABEL]
    curve_csv = eval_dir / heldout.CURVE_CSV
    evaluate.run(evaluate.EvalConfig(output=eval_dir, pools=joint, pool_names=names, reward_curve=curve_csv))
    options = {"max_images": 6, "select": "first", "title": "dp2osr quickstart: DP²O on held-out crops"}
    acc_csv = eval_dir / pref_accuracy.ACCURACY_CSV
    options["pref_accuracy"] = acc_csv if acc_csv.is_file() else None
    cfg_page = report.ReportConfig(output=page, pools=joint, names=names, reward_curve=curve_csv, **options)
    return report.run(cfg_page, sections=[summary_html(cfg, s), *sections])
