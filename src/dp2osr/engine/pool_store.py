"""Candidate images in tar shards: the ``shards`` pool layout, and the one reader of candidate images.

A pool sampled with ``--pool-layout shards`` keeps its candidates as members ``ID/seed_XXXX.png`` (the PNG
bytes the ``files`` layout writes) of append-only tar files ``OUT/shards/KKKKK-rR.tar`` (run number K, process
R; a new shard every `SHARD_MEMBERS` members or `SHARD_BYTES` bytes), so a pool of a million candidates is a
few hundred files. A table names a member by a reference ``shards/00000-r0.tar#ID/seed_0001.png``: the shard's
path, ``#``, the member's name; such a reference is a path like any other to the tables (relative to the
table's folder, an image suffix, inside the pool), so score, pair, train, eval and report pass it along
unchanged and read every candidate image through `read_image` (any other path is read as a file).

Reading keeps the last `OPEN_SHARDS` shards open with an index of their members (name -> data offset, size),
so a read is one positional read (``os.pread``: safe in forked data-loader workers). A member name that is not
relative and plain (``../x``, ``/abs``) is refused, in a reference and in a shard. A shard whose last member
was cut short (the writing process was killed) is repaired by `repair_shards` on the next run of ``sample``:
the partial member is dropped and the end-of-archive marker written, so every shard is a tar file ``tar``
lists. A member is never changed in place; its stamp (`ref_stat`) is its size and the shard's mtime.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections import OrderedDict
from pathlib import Path

import torch

from dp2osr.images import ImageReadError, decode_image, load_image

SHARDS_DIR = "shards"
SHARD_MEMBERS = 4096  # a new shard after this many members ...
SHARD_BYTES = 1 << 30  # ... or this many bytes, whichever comes first
OPEN_SHARDS = 64  # shards a process keeps open (with their indexes) for reading
_BLOCK = 512
_END = bytes(2 * _BLOCK)  # tar's end-of-archive marker
_SHARD_NAME = re.compile(r"(?P<run>\d{5})-r(?P<rank>\d+)(?:-(?P<part>\d+))?\.tar")


def shard_ref(shard: Path | str, member: str) -> str:
    """The reference to ``member`` of ``shard`` (``SHARD#MEMBER``)."""
    return f"{shard}#{member}"


def member_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member of a pool shard (not ``ID/FILE``: absolute, ``..``, ...), or None."""
    parts = name.split("/")
    if len(parts) != 2 or "\\" in name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        return "is not a plain ID/FILE name"
    return None


def split_ref(ref: str) -> tuple[str, str] | None:
    """(shard path, member name) of a reference ``SHARD.tar#MEMBER`` whose shard is a file, else None (a plain
    file path). A reference whose member name is not plain (`member_problem`) is a ValueError."""
    ref = str(ref)
    at = ref.find(".tar#")
    while at >= 0:
        shard, member = ref[: at + 4], ref[at + 5 :]
        if os.path.abspath(shard) in _OPEN or os.path.isfile(shard):
            if member_problem(member) is not None:
                raise ValueError(f"{ref}: shard member {member!r} {member_problem(member)}; refused")
            return shard, member
        at = ref.find(".tar#", at + 1)
    return None


class _Shard:
    """An open shard and its index: member name -> (data offset, size); the last member of a name wins."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        try:
            self.index, _ = scan(path)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, member: str) -> bytes:
        offset, size = self.index[member]
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise ImageReadError(f"cannot read {shard_ref(self.path, member)}: the shard is cut short")
        return data


_OPEN: OrderedDict[str, _Shard] = OrderedDict()


def _shard(path: str) -> _Shard:
    path = os.path.abspath(path)
    shard = _OPEN.get(path)
    if shard is None:
        shard = _OPEN[path] = _Shard(path)
        while len(_OPEN) > OPEN_SHARDS:
            os.close(_OPEN.popitem(last=False)[1].fd)
    _OPEN.move_to_end(path)
    return shard


def forget(path: Path | str) -> None:
    """Drop the open copy of the shard ``path`` (it was written to or repaired since)."""
    shard = _OPEN.pop(os.path.abspath(path), None)
    if shard is not None:
        os.close(shard.fd)


def scan(path: str | Path) -> tuple[dict[str, tuple[int, int]], int]:
    """(the complete members of the shard ``path``: name -> (data offset, size); the end of the last one).
    A member cut short at the end of the file is left out; a member whose name is not plain is a ValueError."""
    index: dict[str, tuple[int, int]] = {}
    end = 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError:  # empty, or the first header cut short
            return index, 0
        while True:
            try:
                info = tar.next()
            except tarfile.ReadError:
                break
            if info is None or info.offset_data + info.size > size:
                break
            problem = member_problem(info.name)
            if problem is not None:
                raise ValueError(f"{path}: member {info.name!r} {problem}; refused")
            if info.isfile():
                index[info.name] = (info.offset_data, info.size)
            end = info.offset_data + -(-info.size // _BLOCK) * _BLOCK
    return index, end


def _member(ref: str, path: str, member: str) -> _Shard:
    """The open shard holding ``member`` (indexed again once when it is not there: written since)."""
    shard = _shard(path)
    if member not in shard.index:
        forget(path)
        shard = _shard(path)
    if member not in shard.index:
        raise ImageReadError(f"cannot read {ref}: no member {member!r} in {path}")
    return shard


def read_bytes(ref: str | Path) -> bytes:
    """The bytes of a candidate: a shard member (reference) or a file."""
    found = split_ref(str(ref))
    if found is None:
        return Path(ref).read_bytes()
    return _member(str(ref), *found).read(found[1])


def read_image(ref: str | Path) -> torch.Tensor:
    """`images.load_image` of a candidate: a shard member (reference) or a file."""
    if split_ref(str(ref)) is None:
        return load_image(Path(ref))
    try:
        data = read_bytes(ref)
    except OSError as exc:
        raise ImageReadError(f"cannot read image {ref}: {exc}") from exc
    return decode_image(io.BytesIO(data), str(ref))


def exists(ref: str | Path) -> bool:
    """Whether the candidate ``ref`` (a shard member or a file) can be read."""
    found = split_ref(str(ref))
    if found is None:
        return Path(ref).is_file()
    try:
        read_bytes(ref)
    except (OSError, ValueError):
        return False
    return True


def ref_stat(ref: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file; of a shard member its size and the shard's mtime; None when missing."""
    found = split_ref(str(ref))
    try:
        if found is None:
            st = os.stat(ref)
            return st.st_size, st.st_mtime_ns
        size = _member(str(ref), *found).index[found[1]][1]
        return size, os.stat(found[0]).st_mtime_ns
    except (OSError, ValueError):
        return None


def ref_sha(ref: str | Path) -> str:
    """SHA-256 of a candidate's bytes (a shard member's or a file's)."""
    return hashlib.sha256(read_bytes(ref)).hexdigest()


def shard_order(path: Path) -> tuple[int, int, int]:
    """Sort key of a shard file: (run, part, process), the order in which runs wrote them."""
    match = _SHARD_NAME.fullmatch(Path(path).name)
    if match is None:
        return (-1, 0, 0)
    return int(match["run"]), int(match["part"] or 0), int(match["rank"])


def list_shards(out: Path) -> list[Path]:
    """The shard files of the pool ``out``, oldest run first."""
    folder = Path(out) / SHARDS_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("*.tar") if _SHARD_NAME.fullmatch(p.name)), key=shard_order)


def repair_shards(out: Path) -> list[Path]:
    """Drop the member cut short at the end of each shard of ``out`` (a killed writer) and close the archive;
    returns the shards repaired. One process, before any other reads or writes them."""
    repaired = []
    for path in list_shards(out):
        _, end = scan(path)
        size = path.stat().st_size
        if size == end + len(_END):
            with open(path, "rb") as f:
                f.seek(end)
                if f.read() == _END:
                    continue
        with open(path, "r+b") as f:
            f.truncate(end)
            f.seek(end)
            f.write(_END)
        forget(path)
        repaired.append(path)
    return repaired


class ShardWriter:
    """Appends members to this process's shards of one run: ``OUT/shards/RUN-rRANK[-PART].tar``, a new part
    every `SHARD_MEMBERS` members or `SHARD_BYTES` bytes. Each member is one write of header, data and padding
    (flushed), so a killed process leaves at most its last member cut short."""

    def __init__(self, out: Path, rank: int, run: int) -> None:
        self.out, self.rank, self.run = Path(out), rank, run
        self.part, self.members, self.file, self.path = 0, 0, None, None

    def _roll(self) -> None:
        self.close()
        name = f"{self.run:05d}-r{self.rank}" + (f"-{self.part}" if self.part else "") + ".tar"
        self.part += 1
        self.path = self.out / SHARDS_DIR / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file, self.members = open(self.path, "ab"), 0

    def put(self, member: str, data: bytes) -> str:
        """Append ``data`` as ``member``; returns its reference relative to the pool (``shards/...tar#member``)."""
        if member_problem(member) is not None:
            raise ValueError(f"shard member {member!r} {member_problem(member)}")
        if self.file is None or self.members >= SHARD_MEMBERS or self.file.tell() >= SHARD_BYTES:
            self._roll()
        info = tarfile.TarInfo(member)
        info.size, info.mode = len(data), 0o644
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.file.write(header + data + bytes(-len(data) % _BLOCK))
        self.file.flush()
        self.members += 1
        forget(self.path)
        return shard_ref(f"{SHARDS_DIR}/{self.path.name}", member)

    def close(self) -> None:
        """End the current shard (the end-of-archive marker)."""
        if self.file is not None:
            self.file.write(_END)
            self.file.close()
            forget(self.path)
            self.file = None


def next_run(out: Path) -> int:
    """The run number of shards a new run of ``sample`` writes: one past the newest present."""
    return max((shard_order(p)[0] for p in list_shards(out)), default=-1) + 1
