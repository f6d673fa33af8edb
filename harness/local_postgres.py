"""A throwaway PostgreSQL server on a loopback port in a temporary folder, for tests and benches (Debian's binaries)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
# initdb and postgres refuse to run as root: as root, the server runs as this (Debian's package creates it)
SERVER_USER = "postgres"


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    db: str

    def dagster_storage(self) -> dict:
        """dagster.yaml's `storage:` block for dagster-postgres."""
        return {
            "postgres": {
                "postgres_db": {
                    "hostname": self.host,
                    "port": self.port,
                    "username": self.user,
                    "password": "",
                    "db_name": self.db,
                    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; dagster-postgres brings psycopg2
                    "scheme": "postgresql+psycopg2",
                }
            }
        }

    def env(self) -> dict[str, str]:
        """The variables dagster_home/dagster-postgres.yaml reads (trust auth: the password is not checked)."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USERNAME": self.user,
            "DAGSTER_PG_PASSWORD": "loopback-trust",
            "DAGSTER_PG_DB": self.db,
        }

    def create_database(self, name: str) -> Server:
        """A new, empty database on this server (one per test: an instance's runs must not carry over)."""
        subprocess.run(
            [str(_bin_dir() / "createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
            check=True,
            capture_output=True,
        )
        return Server(self.host, self.port, self.user, name)


def available() -> str | None:
    """None where PostgreSQL's binaries are installed, else why not (a test's skip reason)."""
    try:
        _bin_dir()
    except RuntimeError as e:
        return str(e)
    return None


def _bin_dir() -> Path:
    for folder in BIN_DIRS:
        if Path(folder, "postgres").exists():
            return Path(folder)
    found = shutil.which("postgres")
    if found:
        return Path(found).parent
    raise RuntimeError(f"no PostgreSQL binaries in {BIN_DIRS} or on PATH: apt-get install postgresql")


def _as_server_user(cmd: list[str]) -> list[str]:
    # setpriv execs the command (no process in between), so the server's pid is the one we signal
    as_user = ["setpriv", f"--reuid={SERVER_USER}", f"--regid={SERVER_USER}", "--init-groups", "--"]
    return [*as_user, *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_postgres(user: str = "dagster", db: str = "dagster") -> Iterator[Server]:
    """initdb into a temporary folder, start postgres on 127.0.0.1 (trust auth), yield it, stop it, delete it."""
    bin_dir = _bin_dir()
    folder = Path(tempfile.mkdtemp(prefix="local-pg-"))
    data, log = folder / "data", folder / "server.log"
    if os.geteuid() == 0:
        shutil.chown(folder, SERVER_USER)
    subprocess.run(
        _as_server_user([str(bin_dir / "initdb"), "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8"]),
        check=True,
        capture_output=True,
    )
    port = _free_port()
    # fsync off: a bench server holds nothing worth keeping; the other settings are the defaults
    server = subprocess.Popen(
        _as_server_user(
            [
                str(bin_dir / "postgres"),
                *("-D", str(data), "-h", "127.0.0.1", "-p", str(port), "-k", str(folder)),
                *("-c", "max_connections=200", "-c", "fsync=off"),
            ]
        ),
        stdout=open(log, "ab"),  # noqa: SIM115 (the child keeps its own descriptor)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True, check=False
            )
            if ready.returncode == 0:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, db],
            check=True,
            capture_output=True,
        )
        yield Server("127.0.0.1", port, user, db)
    finally:
        server.send_signal(signal.SIGINT)  # postgres's "fast" shutdown: a leftover client does not hold it up
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)
