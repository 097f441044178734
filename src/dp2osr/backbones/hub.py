"""Model references that name a Hugging Face Hub model instead of a local path, resolved in the local cache.

``--base`` and ``--controlnet`` take a local path, or

    org/name                              a model repository (the whole snapshot: a diffusers folder)
    org/name@revision                     the same at a branch, tag or commit
    org/name:path/in/repo/model.safetensors   one file of it (a release checkpoint); ``@revision`` may precede

They are looked up only in huggingface_hub's local cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``), never downloaded: dp2osr does not touch the network at run time. A local path
that exists always wins over a Hub id of the same spelling.
"""

from __future__ import annotations

import re
from pathlib import Path

# owner/name as the Hub spells repository ids (one slash), an optional @revision and :file in the repo.
_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[^:@]+))?(?::(?P<file>[^:]+))?$"
)


def parse_hub_ref(ref: str) -> tuple[str, str | None, str | None] | None:
    """``(repo_id, revision, file)`` of a Hub reference, or None when ``ref`` cannot be one."""
    match = _HUB_ID.match(str(ref))
    if match is None or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"], match["file"]


def cache_folder() -> str:
    """The Hub cache folder huggingface_hub reads (after HF_HOME / HF_HUB_CACHE)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fetch_command(repo: str, revision: str | None, file: str | None) -> str:
    """The command that puts ``repo`` (or one file of it) in the cache, on a machine with network."""
    parts = [
        "hf download",
        repo,
        *([file] if file else []),
        *([f"--revision {revision}"] if revision else []),
    ]
    return " ".join(parts)


def resolve_model_ref(ref: str | Path | None, what: str) -> Path | None:
    """The local path for ``ref``: the path itself when it exists (or cannot be a Hub id), else the cached
    snapshot folder or file of the Hub reference. A Hub model missing from the cache is a FileNotFoundError
    naming the id, the cache folder and how to fetch it."""
    if ref is None:
        return None
    path = Path(ref)
    parsed = None if path.exists() else parse_hub_ref(str(ref))
    if parsed is None:
        return path
    repo, revision, file = parsed
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        if file:
            found = hf_hub_download(repo, file, revision=revision, local_files_only=True)
        else:
            found = snapshot_download(repo, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        at = f"@{revision}" if revision else ""
        item = f"{file} of " if file else ""
        raise FileNotFoundError(
            f"{what} {ref}: no such local path, and {item}Hugging Face model {repo}{at} is not in the local cache "
            f"{cache_folder()} (set HF_HOME or HF_HUB_CACHE to another cache); fetch it on a machine with "
            f"network with `{fetch_command(repo, revision, file)}` (older huggingface_hub: `huggingface-cli "
            "download`) and copy the cache here, or pass a local path"
        ) from None
    return Path(found)
