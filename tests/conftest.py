"""Shared fixtures: a tiny corpus and a tiny registered model in a temporary root."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from backfill.models import Architecture, torchscript_bytes
from backfill.registry import register_version
from backfill.sample import SampleSpec, make_sample_corpus
from backfill.settings import DEFAULT_MODEL
from backfill.storage import Layout, Store

MODEL = DEFAULT_MODEL
TINY = {
    "v1": Architecture(widths=(4, 8, 8, 16), dim=16, input_size=32, seed=1),
    "v2": Architecture(widths=(4, 8, 16, 16), dim=24, input_size=32, seed=2),
}

_ARTIFACTS: dict[str, bytes] = {}


def register_tiny(layout: Layout, version: str = "v1", arch: Architecture | None = None):
    arch = arch or TINY[version]
    key = repr(arch)
    if key not in _ARTIFACTS:
        _ARTIFACTS[key] = torchscript_bytes(arch, calibration=64)
    return register_version(layout, MODEL, version, _ARTIFACTS[key], dim=arch.dim, input_size=arch.input_size)


def make_layout(root: Path | str, images: int = 60, shards: int = 3) -> Layout:
    layout = Layout(Store.open(str(root)))
    make_sample_corpus(layout, SampleSpec(images=images, shards=shards, seed=3))
    return layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    """60 images in 3 shards, no model registered."""
    return make_layout(tmp_path / "root")


@pytest.fixture
def registered(layout: Layout):
    """The corpus plus tiny v1 registered: (layout, card)."""
    return layout, register_tiny(layout, "v1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (SeaweedFS) on loopback for the whole session."""
    from harness.local_s3 import LocalS3

    server = LocalS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_root(s3_server, monkeypatch) -> str:
    """s3://<fresh bucket>/root, with this process (and its children) pointed at the server."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:12]}") + "/root"


# first: xdist's own hook turns the xdist_group marks into its groups, and must see these
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `-n 2 --dist loadgroup` (the README's test command) every end-to-end test runs on one worker, one
    after another, while the other tests run beside them: two end-to-end tests at once, each starting a daemon,
    code servers and run workers, slowed each other 2-3x on 2 cores (and timed out), while one beside the fast
    tests is slowed far less."""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.xdist_group("e2e"))
