"""Output paths checked before any work, names that stay inside their folder, and content hashes of files.

Every stage checks where it will write before it loads a model: an output that exists as a file where a folder
is expected (or a folder where a file is expected), or a folder that cannot be written, is a one-line
``ValueError`` naming it. An image ID becomes a file or folder name under the output (``OUT/ID/seed_XXXX.png``),
so it must be a plain name (`check_name`): no separator, not ``.`` or ``..``, not empty; a path a table stores
may be required to lie inside given folders (`is_inside`, by the path's text: no filesystem calls).
Logs a stage appends to (``append_text``) are never written through a symbolic link. ``file_sha`` is the
content hash that pools and scores are keyed by.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def file_sha(path: Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 (hex) of the bytes of ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def text_sha(text: str) -> str:
    """The SHA-256 (hex) of ``text`` (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be one file or folder name inside an output folder, or None when it can."""
    if name in ("", ".", ".."):
        return "is empty, '.' or '..'"
    if "/" in name or "\\" in name:
        return "holds a path separator"
    if "\0" in name:
        return "holds a NUL character"
    return None


def check_name(name: str, what: str = "image ID") -> str:
    """``name`` when it is a plain file name (`name_problem`), else a ValueError naming it and ``what``."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{what} {name!r} {problem}: it must be a plain file name (it names an output file)")
    return name


def is_inside(path: str, roots: list[str]) -> bool:
    """Whether the absolute, normalised ``path`` lies inside (or is) one of the absolute, normalised ``roots``."""
    return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def check_not_link(path: Path, what: str) -> None:
    """Refuse (``ValueError``) an output ``path`` that is a symbolic link: writing there would go elsewhere."""
    if Path(path).is_symlink():
        raise ValueError(
            f"{what} {path} is a symbolic link (to {os.readlink(path)}); dp2osr writes only inside its "
            "output folder: remove the link or choose another --output"
        )


def append_text(path: Path, text: str) -> None:
    """Append ``text`` to the file ``path`` (a log: created when missing); a symbolic link there is refused
    (``ValueError``), never written through."""
    check_not_link(path, "the log file")
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    with os.fdopen(os.open(path, flags, 0o666), "a", encoding="utf-8") as f:
        f.write(text)


def _nearest_existing(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing ancestor."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried: permissions alone miss read-only mounts)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_output_dir(path: Path, flag: str = "--output") -> None:
    """Refuse (``ValueError``) an output folder that is a file, lies under a file, or cannot be written."""
    path = Path(path)
    base = _nearest_existing(path)
    if not base.is_dir():
        what = "is a file" if base == Path(os.path.abspath(path)) else f"lies under the file {base}"
        raise ValueError(f"{flag} {path} {what}, not a folder; choose another {flag}")
    if not _writable(base):
        raise ValueError(f"{flag} {path}: the folder {base} is not writable; choose another {flag}")


def check_output_file(path: Path, flag: str = "--output") -> None:
    """Refuse (``ValueError``) an output file that is a folder, or whose folder is a file or not writable."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder, not a file; choose another {flag}")
    check_output_dir(path.parent, flag=f"{flag} {path}: its folder")


def remove_paths(paths: list[Path]) -> None:
    """Delete ``paths`` (files and folders a stage recorded as its own): a symbolic link is removed without
    touching what it points to, a folder without following the links inside it; missing ones are skipped."""
    for path in paths:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
