"""`make up` / `make down`: the local stack, started once and stopped by PID.

    python -m flows.stack up   [--root DIR] [--port 4200] [--mlflow-port 5000] [--state DIR]
    python -m flows.stack down [--root DIR] [--state DIR]

`up` starts a Prefect server on 127.0.0.1, the MLflow UI (`mlflow server`) over the project's
store, the work pools `rlhf-cpu` and `rlhf-gpu` (type process) with one worker each, and deploys
prefect.yaml (`prefect --no-prompt deploy --all`; the schedule comes from params.yaml's
`orchestration.schedule`). Whatever is already up is left alone: a service whose PID file names a
live process is not started again, a pool that exists is not created, and the deployments are
deployed again only when prefect.yaml or the schedule changed. `down` stops what `up` started:
each PID in the state folder (default ROOT/.stack) and the processes it spawned (flow runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

import components  # noqa: F401  (telemetry off in this process and the services it starts)

BIN = Path(sys.executable).parent
POOLS = {"rlhf-cpu": "worker-cpu", "rlhf-gpu": "worker-gpu"}


class StackError(RuntimeError):
    """The stack could not be brought up; the message names the service and its log."""


def environment(state: Path, port: int, mlflow_port: int) -> dict[str, str]:
    """What every process of the stack runs with: the server's API, Prefect's home (result storage
    the pipeline and its GPU subflows share) and the MLflow UI's address for log lines."""
    from components.pipeline.tracking import child_environment

    return {
        **child_environment(),  # not the MLflow store this process last wrote to (tests run several)
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "RLHF_MLFLOW_URL": f"http://127.0.0.1:{mlflow_port}",
    }


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE else None


def _start(state: Path, name: str, command: list[str], env: dict, cwd: Path) -> str:
    pid_file = state / f"{name}.pid"
    if pid := _alive(pid_file):
        return f"{name}: already running (pid {pid})"
    log = open(state / f"{name}.log", "ab")
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pid_file.write_text(str(process.pid))
    return f"{name}: started (pid {process.pid}, log {state / (name + '.log')})"


def _wait(url: str, name: str, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise StackError(f"{name} did not answer at {url} within {seconds:.0f} s; see {log}")


def _prefect(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True)


def deploy(repo: Path, state: Path, env: dict) -> str:
    """`prefect --no-prompt deploy --all` of prefect.yaml, unless it and the schedule are unchanged."""
    from components.config import project_config  # imports torch: only when bringing the stack up

    schedule = project_config(repo).orchestration.schedule
    stamp = hashlib.md5(((repo / "prefect.yaml").read_text() + schedule + env["PREFECT_API_URL"]).encode()).hexdigest()
    stamp_file = state / "deployed"
    try:
        urllib.request.urlopen(f"{env['PREFECT_API_URL']}/deployments/name/rlhf-pipeline/scheduled", timeout=10)
        deployed = stamp_file.is_file() and stamp_file.read_text() == stamp
    except OSError:  # 404: not deployed on this server
        deployed = False
    if deployed:
        return "deployments: up to date"
    done = _prefect(["--no-prompt", "deploy", "--all"], {**env, "RLHF_SCHEDULE": schedule}, repo)
    if done.returncode:
        raise StackError(f"prefect deploy --all failed: {(done.stderr or done.stdout).strip().splitlines()[-1]}")
    stamp_file.write_text(stamp)
    return f"deployments: deployed prefect.yaml (schedule '{schedule}' UTC)"


def process_pool(pool: str, api_url: str) -> str:
    """Create the work pool `pool` of type process unless it exists, as `prefect work-pool create
    POOL --type process` does (the process worker's default job template), in this process: each
    `prefect` command spends seconds importing Prefect."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(api_url) as client:
        try:
            client.read_work_pool(pool)
            return f"work pool {pool}: exists"
        except ObjectNotFound:
            pass
        template = ProcessWorker.get_default_base_job_template()
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process", base_job_template=template))
        except PrefectHTTPStatusError as error:
            raise StackError(f"work pool {pool}: {error}") from error
    return f"work pool {pool}: created (process)"


def up(root: Path, repo: Path, state: Path, port: int = 4200, mlflow_port: int = 5000, worker_seconds: int = 10) -> list[str]:
    """Bring the stack up (idempotent); returns one line per service."""
    state.mkdir(parents=True, exist_ok=True)
    env = environment(state, port, mlflow_port)
    store = root.resolve() / "mlflow"
    store.mkdir(parents=True, exist_ok=True)
    lines = [
        _start(state, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                         str(port)], env, repo),
        _start(state, "mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
                                 "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                                 "--default-artifact-root", (store / "artifacts").as_uri()], env, root),
    ]
    _wait(f"http://127.0.0.1:{port}/api/health", "prefect server", state / "prefect-server.log")
    for pool, worker in POOLS.items():
        lines.append(process_pool(pool, env["PREFECT_API_URL"]))
        worker_env = {**env, "PREFECT_WORKER_QUERY_SECONDS": str(worker_seconds)}
        lines.append(_start(state, worker, [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name",
                                            f"{pool}-local"], worker_env, repo))
    lines.append(deploy(repo, state, env))
    _wait(f"http://127.0.0.1:{mlflow_port}/health", "mlflow server", state / "mlflow.log")
    lines.append(f"Prefect UI: http://127.0.0.1:{port}   MLflow UI: http://127.0.0.1:{mlflow_port}")
    return lines


def down(state: Path) -> list[str]:
    """Stop every process `up` started (and its children), by the PIDs in `state`."""
    lines = []
    for pid_file in sorted(state.glob("*.pid")):
        name = pid_file.stem
        if pid := _alive(pid_file):
            process = psutil.Process(pid)
            family = [process, *process.children(recursive=True)]
            for member in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.send_signal(signal.SIGTERM)
            _, left = psutil.wait_procs(family, timeout=5)
            for member in left:
                with contextlib.suppress(psutil.NoSuchProcess):
                    member.kill()
            lines.append(f"{name}: stopped (pid {pid})")
        else:
            lines.append(f"{name}: not running")
        pid_file.unlink()
    return lines or ["nothing to stop"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.stack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--root", default=".", help="project root (its params.yaml, mlflow/ store)")
    parser.add_argument("--state", help="folder for PID files and logs (default ROOT/.stack)")
    parser.add_argument("--port", type=int, default=4200, help="Prefect server port")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow UI port")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    state = Path(args.state).resolve() if args.state else root / ".stack"
    repo = Path(__file__).resolve().parents[1]
    try:
        lines = up(root, repo, state, args.port, args.mlflow_port) if args.action == "up" else down(state)
    except StackError as error:
        print(f"stack error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
