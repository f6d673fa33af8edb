"""The loopback PostgreSQL server moved to harness/local_postgres.py (tests use it too); kept for the benches."""

from harness.local_postgres import Server, running_postgres

__all__ = ["Server", "running_postgres"]
