"""Output paths checked before any work, and content hashes of files.

Every stage checks where it will write before it loads a model: an output that exists as a file where a folder
is expected (or a folder where a file is expected), or a folder that cannot be written, is a one-line
``ValueError`` naming it. ``file_sha`` is the content hash that pools and scores are keyed by.
"""

from __future__ import annotations

import hashlib
import os
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
