"""Where and how long a command runs: the one device resolver, the process layout under `accelerate launch` /
torchrun, a clock of the time spent per stage over resumed runs, and the lock that keeps one run per output
folder."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import torch

from dp2osr.images import atomic_write


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cpu`` / ``cuda`` / ``cuda:N`` as given, checked."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: not a device (auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
    return dev


DIST_TIMEOUT_ENV = "DP2OSR_DIST_TIMEOUT"
DEFAULT_DIST_TIMEOUT_S = 4 * 3600


def dist_timeout() -> timedelta:
    """How long a process of a multi-process launch waits at a barrier or collective for the others:
    ``DP2OSR_DIST_TIMEOUT`` seconds, default 4 hours (torch's own default, 10 minutes, is shorter than the serial
    phases a large pool still has: the main process merging the tables, saving a checkpoint)."""
    text = os.environ.get(DIST_TIMEOUT_ENV, "").strip()
    if not text:
        return timedelta(seconds=DEFAULT_DIST_TIMEOUT_S)
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{DIST_TIMEOUT_ENV}={text!r}: must be a number of seconds > 0")
    return timedelta(seconds=seconds)


def process_group(cpu: bool):
    """accelerate's ``PartialState``, created with the `dist_timeout` (the first one created in a process sets
    up the process group, so every stage creates it here)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu, timeout=dist_timeout())


def process_state(device: str):
    """(accelerate ``PartialState``, this process's device). One process: ``resolve_device(device)``; under
    `accelerate launch` / torchrun with ``--device auto``: each process's own device."""
    resolved = resolve_device(device)
    state = process_group(resolved.type == "cpu")
    own = state.device if device == "auto" and state.num_processes > 1 else resolved
    return state, own


class RunClock:
    """Seconds per stage and in total, summed over every run into one output folder: a resumed run adds its
    own time to what the earlier runs spent (kept in ``path`` after every stage, so a killed run counts too)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.prior = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.now: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def lap(self, name: str, start: float) -> None:
        """Add the time since ``start`` to stage ``name`` and save the totals."""
        self.now[name] = self.now.get(name, 0.0) + time.perf_counter() - start
        self.now["total"] = time.perf_counter() - self.t0
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.totals(), indent=2)))

    def totals(self) -> dict:
        """``{stage: seconds, "total": seconds, "runs": n}`` over the earlier runs and this one."""
        keys = dict.fromkeys([*self.prior, *self.now])
        out = {k: self.prior.get(k, 0.0) + self.now.get(k, 0.0) for k in keys if k != "runs"}
        return {**out, "runs": int(self.prior.get("runs", 0)) + 1}


# --------------------------------------------------------------------------------- one run per folder
LOCK_NAME = ".dp2osr.lock"  # in an output folder while a run writes to it: {"pid", "host", "command"}


def host_name() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _lock_owner(path: Path) -> dict | None:
    """The lock file's record; None when it is gone or unreadable (a lock cut short: nobody holds it)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _create_lock(path: Path, record: dict) -> bool:
    """Create ``path`` holding ``record`` in one step (written aside, then linked: never seen empty); False
    when it exists."""
    tmp = path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link): created anew below, never written through
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w") as f:
        f.write(json.dumps(record))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links: create, then write
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _check_owner(folder: Path, path: Path, owner: dict | None) -> bool:
    """Whether ``owner``'s lock is stale (taken over, with a note); raises when a live run holds it."""
    if owner is None:
        print(f"note: {path} is unreadable; taking it over", file=sys.stderr)
        return True
    pid, host, what = owner["pid"], owner.get("host", ""), owner.get("command", "run")
    if host != host_name():
        raise ValueError(
            f"{folder} is in use by dp2osr {what} (pid {pid} on {host}); wait for it to end, or delete {path} "
            "if that run is gone"
        )
    if _pid_alive(pid):
        raise ValueError(
            f"{folder} is in use by another dp2osr {what} (pid {pid}); wait for it to end or choose another "
            "output folder"
        )
    print(f"note: {path}: the run that held it (pid {pid}) is gone; taking it over", file=sys.stderr)
    return True


@contextlib.contextmanager
def output_lock(folder: Path, command: str, state=None) -> Iterator[None]:
    """Hold ``folder/.dp2osr.lock`` (this process's id and host) while the block runs: a second run into the
    same folder is refused in one line (ValueError naming the holder's pid); the lock of a process that is
    gone is taken over with a note; a process that holds the lock already takes it again freely.

    ``state`` (accelerate's process state) under a multi-process launch: the main process takes the lock for
    all, and every process learns its outcome, so all of them stop with the same one-line error when it is
    refused (none goes on into a folder another run holds)."""
    if state is None or state.num_processes <= 1:
        with _held(Path(folder), command):
            yield
        return
    with contextlib.ExitStack() as stack:
        error, failure = "", None
        if state.is_main_process:
            try:
                stack.enter_context(_held(Path(folder), command))
            except Exception as exc:  # every process must hear of it, whatever it is, or the others wait
                error, failure = str(exc) or type(exc).__name__, exc
        error = from_main(error)
        if failure is not None:
            raise failure
        if error:
            raise ValueError(error)
        yield


def from_main(value: str) -> str:
    """The main process's ``value``, on every process of a multi-process launch."""
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


@contextlib.contextmanager
def _held(folder: Path, command: str) -> Iterator[None]:
    """`output_lock` in one process. A folder it had to create is removed again when the run leaves it empty
    (refused before it wrote anything)."""
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": host_name(), "command": command}
    mine = False
    for _ in range(3):
        if _create_lock(path, me):
            mine = True
            break
        owner = _lock_owner(path)
        if owner is not None and owner["pid"] == me["pid"] and owner.get("host") == me["host"]:
            break  # held by this process already (a stage run by the quickstart, a second run in one process)
        if _check_owner(folder, path, owner):
            path.unlink(missing_ok=True)
    else:
        raise ValueError(f"{folder}: could not take {path} (another run keeps taking it); try again")
    try:
        yield
    finally:
        owner = _lock_owner(path)
        if mine and owner is not None and owner["pid"] == me["pid"] and owner.get("host") == me["host"]:
            path.unlink(missing_ok=True)
            if made:
                with contextlib.suppress(OSError):  # not empty: the run's results
                    folder.rmdir()
