"""One pipeline run per project folder at a time.

Two runs in one folder would share checkpoints, outputs and a freshly created MLflow database,
and break each other. `acquire` takes an exclusive `flock` on ROOT/.rlhf.lock, which names its
holder; the kernel releases it when the holder exits or is killed, so a crash never leaves the
folder locked. A second run finds it held and stops with `ProjectBusy` naming the holder.

Within one process the lock is re-entrant: `rlhf run` takes it, and the flow it starts takes it
again (a no-op, `reentered` is True); a flow run that a Prefect worker starts takes it itself.
"""

from __future__ import annotations

import fcntl
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

LOCK_FILE = ".rlhf.lock"
_HELD: dict[tuple[int, str], "ProjectLock"] = {}  # (pid, resolved root) -> the lock this process holds
_GUARD = threading.Lock()


class ProjectBusy(RuntimeError):
    """Another process holds the project's lock."""


class ProjectLock:
    def __init__(self, handle, key: tuple[int, str]):
        self.handle, self.key, self.depth = handle, key, 1
        self.reentered = False  # True in the handle `acquire` returns when this process held the lock already

    def release(self) -> None:
        with _GUARD:
            self.depth -= 1
            if self.depth:
                return
            _HELD.pop(self.key, None)
        self.handle.truncate(0)
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class _Reentered:
    """What `acquire` returns to a process that already holds the lock: releasing it only undoes
    that acquisition."""

    reentered = True

    def __init__(self, held: ProjectLock):
        self.held = held

    def release(self) -> None:
        self.held.release()


def acquire(root: str | Path, command: str) -> ProjectLock | _Reentered:
    """Lock `root` for `command` (e.g. "rlhf run"); raises ProjectBusy when another process holds
    it. Re-entrant within a process: each acquisition is undone by one `release`."""
    key = (os.getpid(), str(Path(root).resolve()))
    with _GUARD:
        if key in _HELD:
            _HELD[key].depth += 1
            return _Reentered(_HELD[key])
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
    held = ProjectLock(handle, key)
    with _GUARD:
        _HELD[key] = held
    return held
