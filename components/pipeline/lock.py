"""One pipeline run per project folder at a time.

Two runs in one folder would share checkpoints, outputs and a freshly created MLflow database,
and break each other. `acquire` takes an exclusive `flock` on ROOT/.rlhf.lock, which names its
holder; the kernel releases it when the holder exits or is killed, so a crash never leaves the
folder locked. A second run finds it held and stops with `ProjectBusy` naming the holder.
"""

from __future__ import annotations

import fcntl
import os
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".rlhf.lock"


class ProjectBusy(RuntimeError):
    """Another process holds the project's lock."""


class ProjectLock:
    def __init__(self, handle):
        self.handle = handle

    def release(self) -> None:
        self.handle.truncate(0)
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


def acquire(root: str | Path, command: str) -> ProjectLock:
    """Lock `root` for `command` (e.g. "rlhf run"); raises ProjectBusy when another process holds it."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ProjectBusy(f"{root} is in use by {holder}; try again when it has finished") from None
    handle.truncate(0)
    handle.write(f"{command} (pid {os.getpid()}, since {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC)\n")
    handle.flush()
    return ProjectLock(handle)
