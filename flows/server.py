"""The Prefect API of one `rlhf run` or `rlhf compare`, and what a killed run left behind.

Without `PREFECT_API_URL` Prefect would start its ephemeral API server as a child process, which
outlives its parent when that is killed (kill -9 gives it no chance to stop it), and only when the
flow starts. `LocalServer` starts the same server, the same way, as soon as a command knows it
needs one, so that it boots (10-15 s) while the command imports its stages and checks its project,
and asks the kernel to stop it when its parent dies (Linux: PR_SET_PDEATHSIG); `local_api` waits
for it and points Prefect at it. Then `crash_stale_runs` marks CRASHED the flow runs of the project
that a killed process left RUNNING (call it holding the project lock: none of them is live).
`project_run` is what the pipeline flow holds while it runs, however it was started.

A new project's SQLite database starts as a copy of an empty one that an earlier project's server
migrated (kept per Prefect version in the user's cache, components/files.py `cache_root`): Prefect
runs its 150-odd migrations on a new database, 12 of the 19 s its server took to boot here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import prefect
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.settings import (
    PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings, temporary_settings,
)
from prefect.states import Crashed

from components.files import cache_root

PR_SET_PDEATHSIG = 1
UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.PAUSED, StateType.CANCELLING]
PORT_IN_USE = 3  # uvicorn's exit code when another process took the port first


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _database_file() -> Path | None:
    """The file of the server's database where that is SQLite (Prefect's default, in PREFECT_HOME)."""
    url = get_current_settings().server.database.connection_url
    scheme, _, file = (url.get_secret_value() if url else "").partition(":///")
    return Path(file) if scheme.startswith("sqlite") and file and file != ":memory:" else None


def _migrated_database() -> Path:
    return cache_root() / "prefect" / f"{prefect.__version__}.db"


def _copy_database(source: Path, target: Path) -> None:
    """`source` copied through SQLite's backup API (a consistent copy while a server uses it) to a
    temporary name renamed once complete, so that no process reads half a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    with contextlib.closing(sqlite3.connect(source)) as original, contextlib.closing(sqlite3.connect(partial)) as copy:
        original.backup(copy)
    os.replace(partial, target)


class LocalServer:
    """Prefect's ephemeral API server as Prefect's SubprocessASGIServer runs it (uvicorn on the
    API's app factory, UI off, this process's settings), started at construction without waiting;
    `wait` returns once it answers. Its module is not imported here: it takes seconds. A new
    SQLite database starts as the migrated copy, or, where there is none yet, becomes it once the
    server has migrated it and before any flow runs."""

    def __init__(self):
        self.database = _database_file()
        self.new_database = self.database is not None and not self.database.exists()
        if self.new_database and _migrated_database().exists():
            _copy_database(_migrated_database(), self.database)
        self._launch()

    def _launch(self) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env={
                **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True),
            },
            preexec_fn=_die_with_parent,
        )

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self) -> None:
        timeout = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                exit_code = self.process.poll()
                if exit_code == PORT_IN_USE:
                    self._launch()
                elif exit_code is not None:
                    raise RuntimeError(f"the Prefect API server exited with code {exit_code}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        if self.new_database and not _migrated_database().exists():
                            _copy_database(self.database, _migrated_database())
                        return
                time.sleep(0.1)
        raise RuntimeError(f"the Prefect API server did not answer within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server() -> LocalServer | None:
    """A LocalServer for a command that runs flows, unless a Prefect API is configured."""
    return None if PREFECT_API_URL.value() else LocalServer()


@contextlib.contextmanager
def local_api(server: LocalServer | None):
    """The configured Prefect API, or `server` once it answers, for the duration of the block."""
    if server is None:
        yield
        return
    server.wait()
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        with contextlib.suppress(Exception):  # send the run's last logs while the server is up, not at exit
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)


def crash_stale_runs(root: str | Path, keep: set[str] = frozenset()) -> int:
    """Mark CRASHED the unfinished flow runs whose `root` parameter is this project's (all but the
    flow runs in `keep`: the caller's own and those it is nested in)."""
    root = str(Path(root).resolve())
    states = FlowRunFilterState(type=FlowRunFilterStateType(any_=UNFINISHED))
    with get_client(sync_client=True) as client:
        stale = [run for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=states))
                 if str(Path(run.parameters.get("root") or "/nonexistent").resolve()) == root and str(run.id) not in keep]
        for run in stale:
            client.set_flow_run_state(run.id, Crashed(message="its process died (found unfinished by the next run)"),
                                      force=True)
    return len(stale)


def _own_flow_runs() -> set[str]:
    """The flow run this code runs in and every flow run it is nested in (a subflow's parents)."""
    from prefect import runtime

    own, run_id = set(), runtime.flow_run.id
    with get_client(sync_client=True) as client:
        while run_id:
            own.add(str(run_id))
            parent_task = client.read_flow_run(run_id).parent_task_run_id
            run_id = client.read_task_run(parent_task).flow_run_id if parent_task else None
    return own


@contextlib.contextmanager
def project_run(root: str | Path, experiment: str, command: str = "rlhf-pipeline flow"):
    """Hold the project lock of `root` for a flow run (components/pipeline/lock.py): one run per
    project folder however it was started. Under `rlhf run`, which holds it already, this is a
    no-op; a flow run started by a Prefect worker takes it here (ProjectBusy, naming the holder,
    when another run holds it) and, like the CLI, first marks FAILED the project's MLflow runs and
    CRASHED its other flow runs that a killed run left RUNNING."""
    from components.pipeline import lock, tracking

    held = lock.acquire(root, command)
    try:
        if not held.reentered:
            tracking.configure(root, experiment)
            tracking.fail_stale_runs(root, experiment)
            crash_stale_runs(root, keep=_own_flow_runs())
        yield
    finally:
        held.release()
