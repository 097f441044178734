"""Shared test set-up: offline, CPU, deterministic."""

import contextlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


CHROMIUM = (
    "/usr/bin/chromium"  # Debian's; `.ci/run` installs it (playwright's own browser download fails here)
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def chromium():
    """``start()``: a context manager giving a Playwright browser on Debian's chromium (closed after). The test
    skips, with the reason, where chromium or playwright is missing."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no browser: {CHROMIUM} missing (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; no `playwright install` needed)")

    @contextlib.contextmanager
    def start():
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield browser
            finally:
                browser.close()

    return start
