"""Progress of the long loops (trainers, RL iterations, sampling): a tqdm bar in the terminal, and
the same counts for whoever listens, so the UI can show them too.

The library knows nothing of Prefect: the pipeline layer installs a `Listener` around a stage
(`reporting`, tasks/stages.py), which turns each bar into a Prefect progress artifact. A listener
is told when a bar starts (its description and total) and returns the callable that receives the
count done, at most every `INTERVAL` seconds and once at the end; a disabled terminal bar (not a
terminal, a process other than the main one) still counts for the listener.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextvars import ContextVar
from typing import Callable, Iterator

from tqdm.auto import tqdm

INTERVAL = 2.0  # seconds between two reports of the same bar
log = logging.getLogger(__name__)

# (description, total or None) -> what to call with the count done, or None to ignore this bar
Listener = Callable[[str, float | None], Callable[[float], None] | None]
_listener: ContextVar[Listener | None] = ContextVar("rlhf_progress_listener", default=None)


@contextlib.contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Bars started inside this block (in this thread or context) are reported to `listener`."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


class Bar(tqdm):
    """tqdm's bar (rate and ETA in the terminal), whose counts also reach the installed listener."""

    def __init__(self, iterable=None, *args, **kwargs):
        super().__init__(iterable, *args, **kwargs)
        self._done = float(kwargs.get("initial") or 0)
        self._told_at = 0.0
        self._told = None
        listener = _listener.get()
        if listener is not None:
            self._told = self._safely(listener, kwargs.get("desc") or "progress", self.total)
        self._tell(final=False, force=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n=1):
        self._done += n
        shown = super().update(n)
        self._tell(final=self.total is not None and self._done >= self.total)
        return shown

    def close(self):
        self._tell(final=True)
        super().close()

    def _tell(self, final: bool, force: bool = False) -> None:
        if self._told is None or not (final or force or time.monotonic() - self._told_at >= INTERVAL):
            return
        if final and self._told_at < 0:  # the end was reported already
            return
        self._told_at = -1.0 if final else time.monotonic()
        self._safely(self._told, self._done)

    @staticmethod
    def _safely(call, *args):
        """A listener that fails (the UI's server is away) never stops the training."""
        try:
            return call(*args)
        except Exception as error:  # noqa: BLE001
            log.warning("progress listener failed: %s", error)
            return None
