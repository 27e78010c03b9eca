"""Which stack runs on a data directory: its lock (``stack.lock``, held by the supervisor for its lifetime)
and ``stack.json`` (written once the stack is ready). Light: every CLI command reads it."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

from driftloop.core.settings import Settings


class StackRunning(RuntimeError):
    """A stack already runs on this data directory."""


def hold_stack_lock(settings: Settings) -> Any:
    """Take ``<data_dir>/stack.lock`` for this process's lifetime, or raise :class:`StackRunning`."""
    settings.root.mkdir(parents=True, exist_ok=True)
    f = open(settings.root / "stack.lock", "a+")  # noqa: SIM115 - held open while the stack runs
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StackRunning(running_message(settings)) from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def running_message(settings: Settings) -> str:
    info = running_stack(settings)
    pid = info["supervisor_pid"] if info else (settings.root / "stack.lock").read_text().strip() or "?"
    return (f"a stack is already running on {settings.root} (supervisor pid {pid}); use it, or stop it with "
            "`driftloop down`")


def running_stack(settings: Settings) -> dict[str, Any] | None:
    """The running stack's stack.json, or None (no file, or its supervisor is gone)."""
    try:
        info = json.loads(settings.stack_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return info if alive(int(info.get("supervisor_pid", 0))) else None


def stack_locked(settings: Settings) -> bool:
    """Whether a supervisor holds the data directory's stack lock (starting or running)."""
    lock = settings.root / "stack.lock"
    if not lock.exists():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (exited, not reaped yet by its parent)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: existing is all we know
    return state not in ("Z", "X")
