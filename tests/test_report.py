"""report: a self-contained, escaped HTML page; checked in a real (headless) browser when one is installed."""

import base64
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dp2osr.evaluate import EvalConfig
from dp2osr.evaluate import run as evaluate
from dp2osr.report import ReportConfig, change_sentence, pool_change
from dp2osr.report import run as report

NASTY_ID = 'im<b>&"0'  # file names, model names and prompts must be escaped
NASTY_MODEL = "base <i>SD2</i>"
NASTY_PROMPT = "<script>alert('x')</script> a cat"
CHROMIUM = "/usr/bin/chromium"


def _image(rng, size):
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


@pytest.fixture
def results(tmp_path):
    """Two pools (4 seeds x 3 images) with candidates.parquet, LR/HR folders, an eval folder, a curve."""
    rng = np.random.default_rng(0)
    ids = [NASTY_ID, "im1", "im2"]
    (tmp_path / "lr").mkdir()
    (tmp_path / "hr").mkdir()
    for i in ids:
        _image(rng, 32).save(tmp_path / "lr" / f"{i}.png")
        _image(rng, 128).save(tmp_path / "hr" / f"{i}.png")
    pools = []
    for name, shift in (("base", 0.0), ("dpo", 0.15)):
        root = tmp_path / name
        rows, cands = [], []
        for i in ids:
            (root / i).mkdir(parents=True)
            for s in range(4):
                rel = f"{i}/seed_{s:04d}.png"
                _image(rng, 128).save(root / rel)
                rows.append({"image_id": i, "seed": s, "path": rel, "reward": 0.4 + shift + 0.05 * s})
                cands.append(
                    {
                        "image_id": i,
                        "seed": s,
                        "path": rel,
                        "lr_path": str(tmp_path / "lr" / f"{i}.png"),
                        "hr_path": str(tmp_path / "hr" / f"{i}.png"),
                        "model": name,
                        "prompt": NASTY_PROMPT,
                    }
                )
        pd.DataFrame(rows).to_parquet(root / "rewards.parquet", index=False)
        pd.DataFrame(cands).to_parquet(root / "candidates.parquet", index=False)
        pools.append(root / "rewards.parquet")
    curve = tmp_path / "curve.csv"
    pd.DataFrame({"step": np.arange(0, 200, 10), "reward": np.linspace(0.5, 0.62, 20)}).to_csv(
        curve, index=False
    )
    sr = tmp_path / "sr"
    sr.mkdir()
    for i in ids:
        _image(rng, 128).save(sr / f"{i}.png")
    evaluate(
        EvalConfig(
            output=tmp_path / "eval", sr=[sr], names=[NASTY_MODEL], hr=tmp_path / "hr", metrics=["none"]
        )
    )
    return {"pools": pools, "curve": curve, "eval": tmp_path / "eval", "root": tmp_path}


def _write(results, **kw):
    out = results["root"] / "page"
    cfg = ReportConfig(
        output=out,
        eval_dirs=[results["eval"]],
        pools=results["pools"],
        names=[NASTY_MODEL, "DP²O"],
        reward_curve=results["curve"],
        **{"allow_separate_scales": True, **kw},
    )
    assert report(cfg).is_file()
    return out / "report.html"


def test_page_is_self_contained_and_escaped(results):
    page = _write(results)
    text = page.read_text(encoding="utf-8")
    # Every src/href is inline data; nothing points to the network or to local files.
    refs = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert refs and all(r.startswith("data:") for r in refs)
    assert "http://" not in text and "https://" not in text and "<link" not in text
    # Raw user-controlled strings never appear unescaped.
    for raw in (NASTY_ID, NASTY_MODEL, NASTY_PROMPT):
        assert raw not in text
    assert "im&lt;b&gt;&amp;&quot;0" in text and "base &lt;i&gt;SD2&lt;/i&gt;" in text
    assert "&lt;script&gt;alert(" in text and text.count("<script>") == 1
    # Sections: eval table, Best/Mean/Worst@M, reward curve, 3 comparison rows with LR, 2x2 seeds, HR.
    for heading in ("Image-quality metrics", "Best / Mean / Worst@M", "Reward curve", "Per-image comparison"):
        assert heading in text
    assert text.count('class="row"') == 3 and text.count('class="cmp"') == 3
    assert text.count("data:image/jpeg") == 3 * 6 and text.count("data:image/png") == 2
    assert "seed 3 · 0.700" in text  # DP²O best: 0.55 + 0.05 * 3


def test_max_images_and_downscale(results):
    page = _write(results, max_images=1, max_side=64, image_format="png", select="gain")
    text = page.read_text(encoding="utf-8")
    assert text.count('class="row"') == 1
    assert "1 of 3 images shown (the largest mean-reward gains)." in text
    assert "All 3 images shown." in _write(results).read_text(encoding="utf-8")
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    sizes = [Image.open(io.BytesIO(base64.b64decode(u))).size for u in uris]
    assert max(max(s) for s in sizes[2:]) <= 64  # first two are the plots


def _browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser: {CHROMIUM} missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no `playwright install` needed)")
    return sync_playwright


def test_page_in_browser(results, tmp_path):
    sync_playwright = _browser()
    page_path = _write(results)
    errors, requests = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
            assert len(widths) == 2 + 3 * 6 + 3 * 2 and all(w > 0 for w in widths), widths
            before = page.locator(".cmp-before").first
            clip0 = before.evaluate("e => getComputedStyle(e).clipPath")
            slider = page.locator(".cmp-range").first
            slider.scroll_into_view_if_needed()
            box = slider.bounding_box()
            page.mouse.click(box["x"] + 0.2 * box["width"], box["y"] + box["height"] / 2)
            value = int(slider.input_value())
            clip1 = before.evaluate("e => getComputedStyle(e).clipPath")
            assert value < 35 and clip1 != clip0, (value, clip0, clip1)
            assert f"{100 - value}%" in clip1
            # Changing the right-hand select swaps the compared image.
            src0 = page.locator(".cmp-after").first.evaluate("e => e.src")
            page.locator(".cmp-right").first.select_option("5")  # HR
            assert page.locator(".cmp-after").first.evaluate("e => e.src") != src0
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 10_000


def _pool_table(rewards):
    """A rewards table from an (images, seeds) matrix."""
    return pd.DataFrame(
        [
            {"image_id": f"im{i}", "seed": s, "reward": float(v)}
            for i, row in enumerate(rewards)
            for s, v in enumerate(row)
        ]
    )


def test_change_sentence_improved_worse_and_within_noise():
    base = _pool_table([[0.40, 0.50], [0.50, 0.60], [0.60, 0.70]])
    # per-image changes .10, .12, .08: mean .10, std (ddof 1) .02, s.e. .02 / sqrt(3) = .011547, 2 df (t 4.30)
    up = _pool_table([[0.50, 0.60], [0.62, 0.72], [0.68, 0.78]])
    change = pool_change(base, up)
    assert change == {"delta": pytest.approx(0.10), "se": pytest.approx(0.02 / np.sqrt(3)), "df": 2, "m": 2}
    assert change_sentence(change, "base", "DP²O") == (
        "DP²O improved the held-out reward beyond the noise: Mean@2 changed by +0.1000 (DP²O minus base); the "
        "standard error of this change is 0.0115, so the change is 8.7 standard errors (beyond noise: more "
        "than 4.30)."
    )
    assert change_sentence(pool_change(up, base), "a", "b").startswith(
        "b lowered the held-out reward beyond the noise: Mean@2 changed by −0.1000"
    )
    # changes +.05, -.05, +.01: mean .00333, s.e. .0291 -> within noise
    noisy = _pool_table([[0.45, 0.55], [0.45, 0.55], [0.61, 0.71]])
    change = pool_change(base, noisy)
    assert change["delta"] == pytest.approx(0.01 / 3)
    assert change["se"] == pytest.approx(np.std([0.05, -0.05, 0.01], ddof=1) / np.sqrt(3))
    assert change_sentence(change) == (
        "Mean@2 changed by +0.0033 (DP²O minus the base model); the standard error of this change is 0.0291, so "
        "this is within noise: no measurable change of the held-out reward."
    )
    # 8.7 s.e. is beyond noise with 3 images; 6 s.e. is not with 2 images (1 df: t threshold 12.7)
    two = pool_change(base.iloc[:4], _pool_table([[0.50, 0.60], [0.64, 0.74]]))  # changes .10, .14: 6 s.e.
    assert two["df"] == 1 and "within noise" in change_sentence(two)
    tiny = {"delta": -4e-5, "se": 1e-5, "df": 7, "m": 8}
    assert change_sentence(tiny).startswith("DP²O lowered the held-out reward beyond the noise: Mean@8 changed by "
                                            "−4.0e−05")  # fmt: skip


def test_report_puts_scored_pools_on_one_scale_with_the_verdict(results):
    """Pools with raw scores are renormalised jointly (the stale rewards.parquet values are not used) and the
    page says, under the table, whether the last pool changed the reward beyond the noise (method in the
    tooltip)."""
    for k, path in enumerate(results["pools"]):
        df = pd.read_parquet(path)
        raw = (
            30 + 10 * k + 2 * df["seed"] + df.index % 3
        )  # piqe: lower is better, so the second pool is worse
        pd.DataFrame({"image_id": df.image_id, "seed": df.seed, "metric": "piqe", "value": raw.astype(float)}
                     ).to_parquet(path.parent / "scores.parquet")  # fmt: skip
    text = _write(results, allow_separate_scales=False).read_text(encoding="utf-8")
    assert (
        "Scale: hybrid reward, min-max normalised jointly over pools base &lt;i&gt;SD2&lt;/i&gt;, DP²O."
        in text
    )
    verdict = re.search(r'<p class="verdict" title="([^"]+)">([^<]+)</p>', text)
    assert verdict and "Standard error of the change of Mean@M" in verdict.group(1)
    assert verdict.group(2).startswith(
        "DP²O lowered the held-out reward beyond the noise: Mean@4 changed by −"
    )
