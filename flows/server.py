"""The Prefect API of one `rlhf run` or `rlhf compare`, and what a killed run left behind.

Without `PREFECT_API_URL` Prefect starts an ephemeral API server as a child process, which
outlives its parent when that is killed (kill -9 gives it no chance to stop it). `local_api`
starts that server itself, the same way, but asks the kernel to stop it when its parent dies
(Linux: PR_SET_PDEATHSIG). Then `crash_stale_runs` marks CRASHED the flow runs of the project
that a killed process left RUNNING (call it holding the project lock: none of them is live).
`project_run` is what the pipeline flow holds while it runs, however it was started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import prefect
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings
from prefect.states import Crashed

PR_SET_PDEATHSIG = 1
UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.PAUSED, StateType.CANCELLING]


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _bound_server():
    """Prefect's ephemeral server process, stopped by the kernel when its parent dies. Its module
    (the API's routes) is imported here, when a server starts: it takes seconds to import."""
    from prefect.server.api.server import SubprocessASGIServer

    class BoundServer(SubprocessASGIServer):
        _instances: dict = {}  # not Prefect's own registry of servers by port

        def _run_uvicorn_command(self) -> subprocess.Popen:
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                 "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                 "--log-level", "error", "--lifespan", "on"],
                env={
                    **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                    "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True),
                },
                preexec_fn=_die_with_parent,
            )

    return BoundServer()


@contextlib.contextmanager
def local_api():
    """The configured Prefect API, or a bound ephemeral server for the duration of the block."""
    if PREFECT_API_URL.value():
        yield
        return
    server = _bound_server()
    try:
        server.start()
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        with contextlib.suppress(Exception):  # send the run's last logs while the server is up, not at exit
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)
        server.stop()


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
