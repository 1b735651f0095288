"""The Prefect server of `rlhf run` (flows/server.py): a new project's database starts as the copy
of an empty database an earlier project's server migrated, kept per Prefect version in the cache."""

from __future__ import annotations

import contextlib
import sqlite3

import prefect
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_API_URL, PREFECT_HOME, temporary_settings

from flows.server import LocalServer


def _served(home):
    """A LocalServer on Prefect's default database in `home` (named: a test harness may have set
    another), answering: (server, whether the file was there before, and when it launched)."""
    database = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_API_DATABASE_CONNECTION_URL: database}):
        existed = (home / "prefect.db").exists()
        server = LocalServer()
        seeded = (home / "prefect.db").exists()
    server.wait()
    return server, existed, seeded


def _migration(database) -> str:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        return connection.execute("select version_num from alembic_version").fetchone()[0]


def test_a_new_projects_database_starts_as_the_migrated_copy_and_old_ones_are_never_copied(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE_DIR", str(tmp_path / "cache"))
    migrated = tmp_path / "cache" / "prefect" / f"{prefect.__version__}.db"

    server, existed, seeded = _served(tmp_path / "first")
    try:  # the first project migrates its new database, which is then copied, before any flow runs
        assert not existed and not seeded and migrated.exists()
        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            client.create_flow_run(prefect.flow(lambda: None, name="left-in-the-first-project"))
    finally:
        server.stop()
    assert _migration(migrated) == _migration(tmp_path / "first" / "prefect.db")

    server, existed, seeded = _served(tmp_path / "second")
    try:  # the second starts from the copy: migrated, and without the first project's flow run
        assert not existed and seeded
        with temporary_settings({PREFECT_API_URL: server.api_url}), get_client(sync_client=True) as client:
            assert client.read_flow_runs() == []
    finally:
        server.stop()

    migrated.unlink()
    server, existed, _ = _served(tmp_path / "first")
    server.stop()
    assert existed and not migrated.exists()  # a database that held runs never becomes the copy
