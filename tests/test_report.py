"""report: a self-contained, escaped HTML page; checked in a real (headless) browser when one is installed."""

import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dp2osr import tables
from dp2osr.evaluate import EvalConfig
from dp2osr.evaluate import run as evaluate
from dp2osr.report import ReportConfig, build_html
from dp2osr.report import run as report

NASTY_ID = 'im<b>&"0'  # file names, model names and prompts must be escaped
NASTY_MODEL = "base <i>SD2</i>"
NASTY_PROMPT = "<script>alert('x')</script> a cat"


def _image(rng, size):
    small = (rng.random((6, 6, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.BICUBIC)


@pytest.fixture
def results(tmp_path):
    """Two pools (4 seeds x 3 images) whose rewards tables name LR/HR and prompt, an eval folder, a curve."""
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
        rows = []
        for i in ids:
            (root / i).mkdir(parents=True)
            for s in range(4):
                rel = f"{i}/seed_{s:04d}.png"
                _image(rng, 128).save(root / rel)
                rows.append(
                    {
                        "image_id": i,
                        "seed": s,
                        "path": str(root / rel),
                        "lr_path": str(tmp_path / "lr" / f"{i}.png"),
                        "hr_path": str(tmp_path / "hr" / f"{i}.png"),
                        "prompt": NASTY_PROMPT,
                        "reward": 0.4 + shift + 0.05 * s,
                    }
                )
        tables.write(tables.REWARDS, pd.DataFrame(rows), root / "rewards.parquet")
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


def test_page_in_browser(results, tmp_path, chromium):
    page_path = _write(results)
    errors, requests = [], []
    with chromium() as browser:
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
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert shot.stat().st_size > 10_000


def test_report_puts_scored_pools_on_one_scale_with_the_verdict(results):
    """Pools with raw scores are renormalised jointly (the stale rewards.parquet values are not used) and the
    page says, under the table, whether the last pool changed the reward beyond the noise (method in the
    tooltip)."""
    for k, path in enumerate(results["pools"]):
        df = pd.read_parquet(path)
        raw = (
            30 + 10 * k + 2 * df["seed"] + df.index % 3
        )  # piqe: lower is better, so the second pool is worse
        pd.DataFrame(
            {"image_id": df.image_id, "seed": df.seed, "metric": "piqe", "value": raw.astype(float)}
        ).to_parquet(path.parent / "scores.parquet")
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


def test_extra_sections_follow_the_title(results):
    """Fragments passed as ``sections`` sit right after the <h1>, in order, before the built sections; the page
    is otherwise the page without them."""
    cfg = ReportConfig(output=results["root"] / "page", pools=results["pools"], allow_separate_scales=True)
    plain = build_html(cfg)
    extra = ["<section><h2>Summary</h2><p>a &amp; b</p></section>", "<p>second</p>"]
    page = build_html(cfg, sections=extra)
    assert page == plain.replace("</h1>", "</h1>" + "".join(extra), 1)
    assert page.index("</h1><section><h2>Summary</h2>") < page.index("<p>second</p><h2>Best / Mean / Worst@M")
    assert report(cfg, sections=extra).read_text(encoding="utf-8") == page
    with pytest.raises(ValueError, match="nothing to report"):
        build_html(
            ReportConfig(output=results["root"] / "x.html"), sections=extra
        )  # fragments alone: no report
