"""`sample`'s side of the ``shards`` pool layout (`engine.pool_store`): which members of the shards already on
disk are current, where new candidates and prompts go, and what the manifest records of each.

`engine.jobs.run_jobs` asks a `ShardedPool` whether a candidate is current and hands it the PNG bytes of new
ones; `engine.pools` asks it for the manifest record of each candidate and for each image's prompt. A rerun
indexes every shard of the pool once (the candidates of every process of any earlier run, whatever the number
of processes then) and trusts a member the last manifest stamped while its size and shard mtime are unchanged;
any other member is decoded and its recorded LR and options hashes checked, newest shard first. New members go
to this process's shards of a new run (`pool_store.ShardWriter`); no shard is written twice.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

from dp2osr.engine.pool_store import (
    SHARDS_DIR,
    ShardWriter,
    list_shards,
    next_run,
    read_bytes,
    ref_sha,
    ref_stat,
    scan,
    shard_ref,
)
from dp2osr.engine.provenance import sample_is_current

PROMPT_FILE = "prompt.txt"


def _index(out: Path) -> dict[str, list[str]]:
    """member name -> its references (relative to the pool), oldest shard first."""
    found: dict[str, list[str]] = {}
    for shard in list_shards(out):
        rel = f"{SHARDS_DIR}/{shard.name}"
        for name in scan(shard)[0]:
            found.setdefault(name, []).append(shard_ref(rel, name))
    return found


class ShardedPool:
    """The pool ``out`` in the shards layout, as one process of a run of ``sample`` sees and extends it."""

    def __init__(self, out: Path, rank: int, stamps: dict[str, tuple]) -> None:
        self.out, self.stamps = Path(out), stamps
        self.found = _index(out)
        self.writer = ShardWriter(out, rank, next_run(out))
        self.chosen: dict[str, tuple] = {}  # member -> (reference, lr_sha, options_sha, sha or None)
        self.prompted: dict[str, str] = {}

    def _trusted(self, ref: str) -> tuple | None:
        known = self.stamps.get(str(self.out / ref))
        if known is not None and tuple(known[:2]) == ref_stat(self.out / ref):
            return tuple(known)
        return None

    def is_current(self, member: str, lr_sha: str | None, opt_sha: str) -> bool:
        """Whether a member ``member`` made from ``lr_sha`` with ``opt_sha`` is in a shard (newest first)."""
        for ref in reversed(self.found.get(member, [])):
            known = self._trusted(ref)
            if known is not None:
                ok = lr_sha is not None and known[2] == lr_sha and known[3] == opt_sha
            else:
                try:
                    ok = sample_is_current(io.BytesIO(read_bytes(self.out / ref)), lr_sha, opt_sha)
                except (OSError, ValueError):
                    ok = False
            if ok:
                self.chosen[member] = (ref, lr_sha, opt_sha, known[4] if known else None)
                return True
        return False

    def save(self, member: str, data: bytes, lr_sha: str, opt_sha: str) -> None:
        """Append a new candidate's PNG bytes."""
        ref = self.writer.put(member, data)
        self.chosen[member] = (ref, lr_sha, opt_sha, hashlib.sha256(data).hexdigest())

    def save_prompt(self, image_id: str, text: str) -> None:
        """Append an image's prompt (once per run: every seed chunk of an image has the same)."""
        if self.prompted.get(image_id) != text:
            self.writer.put(f"{image_id}/{PROMPT_FILE}", text.encode())
            self.prompted[image_id] = text

    def close(self) -> None:
        """End this process's shards (before the manifest records their mtimes)."""
        self.writer.close()

    def record(self, member: str) -> tuple[str, tuple] | None:
        """(reference, (size, mtime_ns, lr_sha, options_sha, sha)) of the current member ``member``, or None
        when there is none."""
        chosen = self.chosen.get(member)
        if chosen is None:
            return None
        ref, lr_sha, opt_sha, sha = chosen
        stat = ref_stat(self.out / ref)
        if stat is None:
            return None
        return ref, (*stat, lr_sha or "", opt_sha, sha or ref_sha(self.out / ref))

    def prompts(self) -> dict[str, str]:
        """image ID -> the prompt its newest shard records, from every shard now on disk (after a barrier:
        the other processes' too)."""
        out = {}
        for member, refs in _index(self.out).items():
            image_id, name = member.split("/")
            if name == PROMPT_FILE:
                out[image_id] = read_bytes(self.out / refs[-1]).decode().strip()
        return out
