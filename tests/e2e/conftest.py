"""The real Dagster processes for end-to-end tests: webserver and daemon on loopback."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from harness.local_instance import free_port, new_instance, start_daemon, start_webserver, stop, wait_for
from harness.local_postgres import Server, available, running_postgres

SMALL_BATCHES = {"BACKFILL_BATCH_SIZE": "16", "BACKFILL_CHUNK_SIZE": "16"}
# steps inside their run's process: one Python start less per run (~5-10 s on 2 cores). The tests that kill
# step processes (test_chaos.py, tests/dagster/test_preemption_process.py) and the demo keep `local`.
IN_PROCESS = {"BACKFILL_DEPLOYMENT": "local-in-process"}


@contextlib.contextmanager
def running_dagster(
    tmp_path: Path, root: Path | str, postgres: Server | None = None, **env_overrides: str
) -> Iterator[Callable[[str], dict]]:
    """Start dagster-webserver and dagster-daemon over `root`; yields a GraphQL query function.

    Logs go to tmp_path (webserver.log, daemon.log); the instance lives in tmp_path/dagster_home,
    its runs and events in SQLite there or, with `postgres`, in that database.
    """
    env = new_instance(
        tmp_path / "dagster_home", root, postgres=postgres, **{**SMALL_BATCHES, **IN_PROCESS, **env_overrides}
    )
    port = free_port()
    web = start_webserver(env, tmp_path / "webserver.log", port)
    daemon = start_daemon(env, tmp_path / "daemon.log")
    url = f"http://127.0.0.1:{port}/graphql"

    def graphql(query: str) -> dict:
        response = requests.post(url, json={"query": query}, timeout=30)
        response.raise_for_status()
        body = response.json()
        assert "errors" not in body, body
        return body["data"]

    def server_up() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/server_info", timeout=5).ok
        except requests.ConnectionError:
            return False

    try:
        wait_for(server_up, timeout=120, what="dagster-webserver")
        yield graphql
    finally:
        stop(daemon)
        stop(web)


_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Server]:
    """One real PostgreSQL server on loopback for the session (harness/local_postgres.py)."""
    missing = available()
    if missing:
        pytest.skip(f"PostgreSQL is not installed: {missing}")
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres(postgres_server: Server) -> Server:
    """An empty database of its own for one test's instance."""
    return postgres_server.create_database(f"test_{next(_databases)}")
