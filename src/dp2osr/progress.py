"""Progress bars of every long stage, in one place: a redrawn tqdm bar on a terminal, plain lines in a file.

A log file (stderr not a terminal: a cluster job, ``make demo > log 2>&1``) gets one line per 10 % of the work
(at most one a second) or per 30 s, whichever comes first, with the rate and the time left, and a last line
when the stage ends;
a bar nested in another (the denoising steps of one image) is shown only on a terminal. Base layer: the
engine's job runner, scorer and trainer and the degrade stage call `bar`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

LINE_EVERY_FRACTION = 0.1
LINE_EVERY_SECONDS = 30.0
LINE_MIN_SECONDS = 1.0  # a stage over in a second or two prints its last line only


def _interactive(file: IO) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


def bar(iterable: Iterable | None = None, *, nested: bool = False, file: IO | None = None, **kwargs: Any):
    """A progress bar with tqdm's arguments (``total``, ``desc``, ``unit``, ``initial``, ``disable`` ...):
    tqdm itself on a terminal, else a `LineBar` (``nested``: none at all)."""
    file = file or sys.stderr
    if _interactive(file):
        return tqdm(iterable, file=file, **kwargs)
    if nested:
        return tqdm(iterable, file=file, **{**kwargs, "disable": True})
    return LineBar(iterable, file=file, **kwargs)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class LineBar:
    """The part of tqdm's interface the stages use (iterate, ``update``, ``set_postfix``, ``close``, ``with``),
    printed as plain lines: ``desc: n/total (p%), rate, elapsed, ETA, postfix``."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None = None,
        desc: str = "",
        unit: str = "it",
        initial: float = 0,
        disable: bool = False,
        file: IO | None = None,
        **_tqdm_only: Any,  # leave, dynamic_ncols, ...: drawing options of a redrawn bar
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.disable, self.file = disable, file or sys.stderr
        self.postfix = ""
        self.start = self.last_time = time.monotonic()
        self.last_n = initial
        self.closed = False

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def update(self, n: float = 1) -> None:
        self.n += n
        if self.disable:
            return
        now = time.monotonic()
        step = (self.total or 0) * LINE_EVERY_FRACTION
        crossed = step > 0 and int(self.n / step) > int(self.last_n / step)
        since = now - self.last_time
        if (crossed and since >= LINE_MIN_SECONDS) or since >= LINE_EVERY_SECONDS:
            self._line(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.disable and self.n != self.last_n:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last_n, self.last_time = self.n, now
        elapsed = now - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [
            f"{self.n:g}/{self.total:g} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n:g}"
        ]
        parts.append(
            f"{rate:.2f} {self.unit}/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/{self.unit}"
        )
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(self.postfix)
        print(
            f"{self.desc}: {', '.join(parts)}" if self.desc else ", ".join(parts), file=self.file, flush=True
        )
