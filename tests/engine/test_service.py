"""The search service, started for real (`backfill serve` under uvicorn on a loopback port)."""

import os
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest
import requests

from backfill.config import EmbedConfig, IndexConfig
from backfill.embed import embed_shard
from backfill.incremental import build_or_update
from backfill.manifest import list_shards, read_shard, write_shard
from backfill.publish import publish
from backfill.runtime import load_model
from harness.local_instance import REPO, free_port
from tests.conftest import MODEL, make_layout, register_tiny

LIMIT = 256 * 1024


@pytest.fixture(autouse=True)
def _no_sleep():
    """Overrides the engine's no-sleep rule here: these tests wait on a real server process."""


def start_server(root, tmp) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log_path = tmp / f"serve-{port}.log"
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "backfill.cli",
                "--root",
                str(root),
                "--model",
                MODEL,
                "serve",
                "--port",
                str(port),
                "--poll-s",
                "0.1",
                "--max-upload-bytes",
                str(LIMIT),
            ],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until uvicorn accepts connections
        try:
            requests.get(f"{url}/healthz", timeout=2)
            return proc, url
        except requests.RequestException:  # not listening yet, or slow on a busy host: an escape would leak it
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    stop_server(proc)
    raise AssertionError(f"server did not start: {log_path.read_text()[-2000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """v1 published over shards 0 and 1; shard 2 held back to land later; the server running."""
    tmp = tmp_path_factory.mktemp("service")
    layout = make_layout(tmp / "root", images=60, shards=3)
    card = register_tiny(layout, "v1")
    new = "shard-00002"
    held = pq.read_table(layout.manifest(new))
    layout.store.rm(layout.manifest(new))
    model = load_model(layout, card)
    for shard in list_shards(layout):
        embed_shard(layout, shard, model, EmbedConfig(batch_size=16, chunk_size=16, torch_threads=1))
    build = build_or_update(layout, MODEL, "v1", list_shards(layout), IndexConfig()).build
    publish(layout, MODEL, build.build_id)
    proc, url = start_server(layout.store.root, tmp)
    try:
        yield layout, url, build, (new, held, model)
    finally:
        stop_server(proc)


def image(layout, shard: str, row: int) -> tuple[int, bytes]:
    s = read_shard(layout, shard)
    with open(s.uris[row], "rb") as f:
        return int(s.image_ids[row]), f.read()


def test_health_reports_the_serving_version_and_build(served):
    layout, url, build, _ = served
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health == {
        "status": "ok",
        "model": MODEL,
        "version": "v1",
        "build_id": build.build_id,
        "vectors": 40,
        "load_error": None,
    }


def test_search_by_raw_upload_and_by_multipart_upload(served):
    layout, url, build, _ = served
    image_id, data = image(layout, "shard-00001", 2)
    raw = requests.post(f"{url}/search?k=3", data=data, headers={"Content-Type": "image/jpeg"}, timeout=30)
    form = requests.post(f"{url}/search", params={"k": 3}, files={"image": ("q.jpg", data, "image/jpeg")}, timeout=30)
    for response in (raw, form):
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["model"], body["version"], body["build_id"]) == (MODEL, "v1", build.build_id)
        assert len(body["hits"]) == 3 and body["hits"][0]["image_id"] == image_id
        assert body["hits"][0]["uri"].endswith(f"{image_id:08d}.jpg") and body["hits"][0]["score"] == pytest.approx(
            1.0, abs=1e-2
        )
    assert raw.json()["hits"] == form.json()["hits"]


def test_search_by_image_id(served):
    layout, url, _, _ = served
    image_id, _ = image(layout, "shard-00000", 5)
    body = requests.get(f"{url}/search", params={"image_id": image_id, "k": 4}, timeout=10).json()
    assert (
        body["query"] == {"image_id": image_id, "k": 4}
        and body["hits"][0]["image_id"] == image_id
        and len(body["hits"]) == 4
    )


@pytest.mark.parametrize(
    "method, params, kwargs, status, message",
    [
        ("get", {"image_id": 99_999_999}, {}, 404, "image_id 99999999 is not in index build"),
        ("get", {"image_id": "abc"}, {}, 400, "image_id must be an integer, got 'abc'"),
        ("get", {}, {}, 400, "GET /search needs ?image_id=<int>"),
        ("get", {"image_id": 1, "k": 0}, {}, 400, "k must be in 1..100, got 0"),
        (
            "post",
            {},
            {"data": b"this is not a jpeg", "headers": {"Content-Type": "image/jpeg"}},
            400,
            "not a usable image",
        ),
        ("post", {}, {"data": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty upload"),
        ("post", {}, {"json": {"image": "x"}}, 415, "not 'application/json'"),
        ("post", {}, {"files": {"picture": ("q.jpg", b"x", "image/jpeg")}}, 400, "needs a file field named 'image'"),
        (
            "post",
            {},
            {"data": b"\xff" * (LIMIT + 1), "headers": {"Content-Type": "image/jpeg"}},
            413,
            f"over the limit of {LIMIT} bytes",
        ),
        # no Content-Length (chunked): the limit holds while streaming
        (
            "post",
            {},
            {"data": iter([b"\xff" * 65536] * 5), "headers": {"Content-Type": "image/jpeg"}},
            413,
            f"over the limit of {LIMIT} bytes",
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(served, method, params, kwargs, status, message):
    _, url, _, _ = served
    response = getattr(requests, method)(f"{url}/search", params=params, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_a_new_build_is_picked_up_without_dropping_requests(served):
    layout, url, build, (new, held, model) = served
    old_id, _ = image(layout, "shard-00000", 1)
    answered, failures, stop = [], [], threading.Event()

    def hammer():
        while not stop.is_set():
            r = requests.get(f"{url}/search", params={"image_id": old_id, "k": 2}, timeout=30)
            (answered if r.status_code == 200 else failures).append(r.json().get("build_id") or r.text)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        write_shard(layout, new, held)
        embed_shard(layout, new, model, EmbedConfig(batch_size=16, chunk_size=16, torch_threads=1))
        update = build_or_update(layout, MODEL, "v1", list_shards(layout), IndexConfig())
        assert update.mode == "incremental" and publish(layout, MODEL, update.build.build_id).published
        deadline = time.monotonic() + 30
        while requests.get(f"{url}/healthz", timeout=10).json()["build_id"] != update.build.build_id:
            assert time.monotonic() < deadline, "the service did not load the new build"
        before = len(answered)
        while len(answered) < before + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    assert failures == [] and set(answered) == {build.build_id, update.build.build_id}
    assert answered[-1] == update.build.build_id
    new_id, data = image(layout, new, 3)
    hits = requests.post(f"{url}/search?k=1", data=data, headers={"Content-Type": "image/jpeg"}, timeout=30).json()[
        "hits"
    ]
    assert hits[0]["image_id"] == new_id


def test_nothing_published_is_503_with_the_reason(tmp_path):
    layout = make_layout(tmp_path / "root", images=6, shards=1)
    proc, url = start_server(layout.store.root, tmp_path)
    try:
        health = requests.get(f"{url}/healthz", timeout=10)
        search = requests.get(f"{url}/search", params={"image_id": 1}, timeout=10)
    finally:
        stop_server(proc)
    assert health.status_code == 503 and "no index is published for model 'refcnn' yet" in health.json()["error"]
    assert search.status_code == 503 and "no index is published" in search.json()["error"]
