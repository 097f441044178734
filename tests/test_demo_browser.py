"""`dp2osr demo` in a real browser (Playwright driving Debian's chromium): the page served on localhost with the
embedded model, a photo uploaded and upscaled (every sample, the chosen one in the before/after slider, the
scores), an oversized photo refused with upscale's estimate; and the demo's logic and CLI without gradio."""

import ast
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dp2osr.demo as demo_module
from dp2osr.cli import main
from dp2osr.demo import EMBEDDED_LABEL, MISSING_GRADIO, Demo, DemoConfig

SMALL = dict(steps=2, process_size=64, max_pixels=128 * 128, device="cpu", samples=2)


def _png(path: Path, side: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_logic_without_gradio(tmp_path):
    """A request gives every sample with its reward, the chosen one (highest reward) beside the input at its
    size, and the scores; an oversized photo is refused before any work with upscale's estimate."""
    demo = Demo(DemoConfig(**SMALL))
    assert list(demo.models) == [EMBEDDED_LABEL]
    res = demo.run(_png(tmp_path / "p.png", 16, 0), EMBEDDED_LABEL, 2, 7, "adain")
    assert res.scores["seed"].tolist() == [7, 8] and res.scores["chosen"].sum() == 1
    best = int(res.scores.loc[res.scores["chosen"], "seed"].iloc[0])
    assert [caption.split(" · ")[0] for _, caption in res.gallery] == ["seed 7", "seed 8"]
    chosen_sample = res.gallery[best - 7][0]
    assert np.array_equal(np.asarray(chosen_sample), np.asarray(res.chosen))
    assert res.before.size == res.chosen.size == (64, 64) and f"chosen: seed {best}" in res.summary
    with pytest.raises(ValueError, match=r"big\.png: output 256x256 .* above --max-pixels 16384 pixels"):
        demo.run(_png(tmp_path / "big.png", 64, 1), EMBEDDED_LABEL, 2, 0, "adain")
    with pytest.raises(ValueError, match="samples"):
        demo.run(tmp_path / "p.png", EMBEDDED_LABEL, 9, 0, "adain")
    with pytest.raises(ValueError, match="model must be one of"):
        demo.pipeline("nope")
    two = Demo(DemoConfig(backbone="sd2-tiny", **SMALL))
    assert list(two.models) == ["sd2-tiny", EMBEDDED_LABEL]
    with pytest.raises(ValueError, match="--port"):
        DemoConfig(port=70000)


def test_cli_without_gradio_says_how_to_install(capsys, monkeypatch):
    """Without gradio, `dp2osr demo` exits 2 with one line naming the extra; demo.py imports gradio only in
    functions, so the package imports without it."""
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert main(["demo", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"dp2osr demo: error: {MISSING_GRADIO}"
    tree = ast.parse(Path(demo_module.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not any(str(n).startswith("gradio") for n in names)  # imported inside functions only


@pytest.fixture
def served(chromium):
    """The demo page on a free localhost port (embedded model, 2 steps, 2 samples); its URL. Skips, before the
    server starts, where gradio or the browser is missing."""
    pytest.importorskip("gradio", reason='gradio is not installed (pip install "dp2osr[demo]")')
    from dp2osr.demo import build_page, launch

    cfg = DemoConfig(port=_free_port(), **SMALL)
    assert cfg.host == "127.0.0.1"
    page = build_page(Demo(cfg))
    url = launch(page, cfg, block=False)
    try:
        yield url
    finally:
        page.close()


def _upload(page, url: str, photo: Path) -> None:
    page.goto(url)
    page.locator("input[type=file]").first.set_input_files(str(photo))
    page.locator("#upscale").click()


def test_demo_in_browser(served, tmp_path, chromium):
    errors, requests = [], []
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        _upload(page, served, _png(tmp_path / "photo.png", 16, 0))
        gallery = page.locator("#samples img")
        gallery.nth(1).wait_for(timeout=20_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('#samples img')].every(i => i.complete && i.naturalWidth)"
        )
        widths = gallery.evaluate_all("els => els.map(e => e.naturalWidth)")
        assert widths == [64, 64], widths
        assert "chosen: seed" in page.locator("#summary").inner_text()
        assert page.get_by_text("seed 0 · reward").count() and page.get_by_text("· chosen").count()
        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        # An oversized photo: refused before any work, with the estimate upscale gives.
        _upload(page, served, _png(tmp_path / "big.png", 64, 1))
        refusal = page.get_by_text("above --max-pixels 16384 pixels")
        refusal.first.wait_for(timeout=10_000)
        assert "big.png: output 256x256" in refusal.first.inner_text()
    assert errors == []
    host = served.split("//")[1].split("/")[0]
    assert all(u.startswith((f"http://{host}", "data:", "blob:")) for u in requests), requests
    assert shot.stat().st_size > 10_000
