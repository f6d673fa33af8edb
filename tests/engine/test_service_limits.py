"""The search service's limits and credential, in-process: a searcher stub that blocks on an Event, counted answers."""

import asyncio
import json
import logging
import threading
from types import SimpleNamespace

import pytest

from backfill.cli import main
from backfill.errors import ConfigError
from backfill.search import Hit, SearchResult
from backfill.service import ServiceConfig, create_app

TOKEN = "s3cr3t-Token_0123456789"
GUARD_S = 30  # only against a hang: no assertion reads a clock


class Blocking:
    """A Searcher stand-in whose searches wait for `release`, counting how many run at once."""

    model_name, load_error = "stub", None

    def __init__(self, released: bool = False) -> None:
        self.release = threading.Event()
        if released:
            self.release.set()
        self.changed = threading.Condition()
        self.running = self.most = self.calls = 0

    def current(self):
        return SimpleNamespace(version="v1", build_id="b1", index=SimpleNamespace(ntotal=3))

    def search_id(self, image_id: int, k: int) -> SearchResult:
        with self.changed:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            self.changed.notify_all()
        try:
            assert self.release.wait(GUARD_S)
        finally:
            with self.changed:
                self.running -= 1
        return SearchResult("stub", "v1", "b1", [Hit(image_id, f"mem://{image_id}", 1.0)])

    def search_image(self, data: bytes, k: int) -> SearchResult:
        return self.search_id(len(data), k)

    def wait_running(self, n: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.running >= n, GUARD_S)


async def call(app, method: str, path: str, query: str = "", headers: dict | None = None, body: bytes = b""):
    """One request straight into the ASGI app: (status, headers, the JSON body or the text)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.get_running_loop().create_future()  # the client stays connected

    messages = []

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    start = messages[0]
    answer = {k.decode(): v.decode() for k, v in start["headers"]}
    data = b"".join(m.get("body", b"") for m in messages[1:])
    is_json = answer.get("content-type") == "application/json"
    return start["status"], answer, json.loads(data) if is_json else data.decode()


def by_id(app, image_id: int = 1, headers: dict | None = None):
    return call(app, "GET", "/search", f"image_id={image_id}&k=1", headers)


async def until_done(tasks, n: int) -> list:
    """Wait until at least n of the tasks have finished (a hang guard, no timing); the answers of all that have."""
    while sum(t.done() for t in tasks) < n:
        done, _ = await asyncio.wait([t for t in tasks if not t.done()], timeout=GUARD_S, return_when="FIRST_COMPLETED")
        assert done, f"fewer than {n} requests ended"
    return [t.result() for t in tasks if t.done()]


def test_overload_is_refused_at_once_with_retry_after_and_the_admitted_all_succeed():
    stub = Blocking()
    config = ServiceConfig(max_in_flight=2, max_queued=3, queue_wait_s=GUARD_S, request_timeout_s=GUARD_S)
    app = create_app(stub, config)

    async def scenario():
        tasks = [asyncio.create_task(by_id(app, i)) for i in range(10)]
        refused = await until_done(tasks, 5)  # 2 running + 3 queued cannot end before the release
        await asyncio.get_running_loop().run_in_executor(None, stub.wait_running, 2)
        admission = app.state.admission
        counters = (admission.in_flight, admission.queued)
        probes = [await call(app, "GET", "/healthz"), await call(app, "GET", "/livez")]
        stub.release.set()
        return refused, counters, probes, await asyncio.gather(*tasks)

    refused, counters, probes, everything = asyncio.run(scenario())
    assert [status for status, _, _ in refused] == [503] * 5
    assert all(h["retry-after"] == "1" and "searches in flight" in body["error"] for _, h, body in refused)
    assert counters == (2, 3)
    assert [status for status, _, _ in probes] == [200, 200] and probes[0][2]["build_id"] == "b1"
    assert sorted(status for status, _, _ in everything) == [200] * 5 + [503] * 5
    assert stub.calls == 5 and stub.most == 2  # never more than max_in_flight searches at once
    assert (app.state.admission.in_flight, app.state.admission.queued) == (0, 0)


def test_a_request_that_waits_past_queue_wait_s_gets_503():
    stub = Blocking()
    app = create_app(stub, ServiceConfig(max_in_flight=1, max_queued=1, queue_wait_s=0.05, request_timeout_s=GUARD_S))

    async def scenario():
        first = asyncio.create_task(by_id(app, 1))
        await asyncio.get_running_loop().run_in_executor(None, stub.wait_running, 1)
        queued = await by_id(app, 2)  # waits its 0.05 s in the queue, then is refused
        stub.release.set()
        return queued, await first

    (status, headers, body), (first_status, _, first_body) = asyncio.run(scenario())
    assert status == 503 and headers["retry-after"] == "1" and "no search slot within 0.05 s" in body["error"]
    assert first_status == 200 and first_body["hits"][0]["image_id"] == 1
    assert stub.calls == 1 and app.state.admission.queued == 0


def test_a_search_past_its_deadline_gets_504_and_keeps_its_slot_until_its_thread_ends():
    stub = Blocking()
    app = create_app(stub, ServiceConfig(max_in_flight=1, max_queued=0, queue_wait_s=0.05, request_timeout_s=0.1))

    async def scenario():
        late = await by_id(app, 1)
        meanwhile = await by_id(app, 2)  # the late search still runs: no slot for this one
        stub.release.set()
        for _ in range(GUARD_S * 100):  # the slot comes back when the thread ends
            if app.state.admission.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        return late, meanwhile, await by_id(app, 3)

    late, meanwhile, after = asyncio.run(scenario())
    assert late[0] == 504 and "longer than its deadline of 0.1 s" in late[2]["error"]
    assert meanwhile[0] == 503 and meanwhile[1]["retry-after"] == "1"
    assert after[0] == 200 and after[2]["hits"][0]["image_id"] == 3
    assert stub.calls == 2 and stub.most == 1


def test_uploads_go_through_the_same_slots():
    stub = Blocking(released=True)
    app = create_app(stub, ServiceConfig(max_in_flight=1))
    status, _, body = asyncio.run(
        call(app, "POST", "/search", "k=1", {"content-type": "image/jpeg", "content-length": "5"}, b"12345")
    )
    assert status == 200 and body["query"] == {"bytes": 5, "k": 1} and stub.calls == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_in_flight": -1}, "max_in_flight must be in 0..1024"),
        ({"max_in_flight": 2000}, "max_in_flight must be in 0..1024"),
        ({"max_queued": -1}, "max_queued must be in 0..100000"),
        ({"request_timeout_s": 0}, "request_timeout_s must be in 0.001..3600"),
        ({"queue_wait_s": 0}, "queue_wait_s must be in 0.001..request_timeout_s"),
        ({"queue_wait_s": 40, "request_timeout_s": 30}, "queue_wait_s must be in 0.001..request_timeout_s (30)"),
        ({"token": "short"}, "BACKFILL_SERVICE_TOKEN must be at least 16 characters"),
        ({"token": "has spaces in it but is long"}, "BACKFILL_SERVICE_TOKEN must be at least 16 characters"),
    ],
)
def test_bad_limits_are_refused_with_the_field_and_the_range(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        ServiceConfig(**fields)
    assert "token" not in fields or fields["token"] not in str(caught.value)  # a secret is never echoed


def authorised(headers: dict | None):
    stub = Blocking(released=True)
    app = create_app(stub, ServiceConfig(token=TOKEN))

    async def requests():
        return [
            await by_id(app, 1, headers),
            await call(app, "GET", "/healthz", headers=headers),
            await call(app, "GET", "/livez", headers=headers),
            await call(app, "GET", "/nowhere", headers=headers),
        ]

    return asyncio.run(requests()), stub


@pytest.mark.parametrize(
    ("headers", "challenge", "message"),
    [
        (None, 'Bearer realm="backfill"', "needs Authorization: Bearer <token>"),
        ({"authorization": "Bearer wrong-token-0123456789"}, 'Bearer realm="backfill", error="invalid_token"', "wrong"),
        ({"authorization": f"Basic {TOKEN}"}, 'Bearer realm="backfill", error="invalid_token"', "wrong"),
        ({"authorization": f"Bearer {TOKEN}x"}, 'Bearer realm="backfill", error="invalid_token"', "wrong"),
    ],
)
def test_without_the_right_token_only_the_probes_answer(headers, challenge, message, caplog):
    caplog.set_level(logging.DEBUG)
    (search, health, live, unknown), stub = authorised(headers)
    for status, answer, body in (search, unknown):
        assert status == 401 and answer["www-authenticate"] == challenge and message in body["error"]
    assert health[0] == 200 and live[0] == 200 and stub.calls == 0
    assert TOKEN not in caplog.text and TOKEN not in search[2]["error"]


def test_the_right_token_is_let_through():
    (search, health, live, unknown), stub = authorised({"authorization": f"bearer {TOKEN}"})
    assert search[0] == 200 and search[2]["hits"][0]["image_id"] == 1 and stub.calls == 1
    assert health[0] == live[0] == 200 and unknown[0] == 404


def test_the_token_is_not_in_the_configs_repr():
    assert TOKEN not in repr(ServiceConfig(token=TOKEN)) and ServiceConfig(token=TOKEN).token == TOKEN


def test_serve_takes_the_token_from_the_environment_and_the_limits_from_flags(tmp_path, monkeypatch):
    from backfill import pipeline, service

    calls = []
    monkeypatch.setattr(pipeline.ThreadBudget, "apply", lambda self: self)
    monkeypatch.setattr(service, "serve", lambda searcher, host, port, config: calls.append(config))
    monkeypatch.setenv("BACKFILL_SERVICE_TOKEN", TOKEN)
    flags = ["--max-in-flight", "3", "--max-queued", "7", "--queue-wait-s", "2", "--request-timeout-s", "9"]
    assert main(["--root", str(tmp_path), "serve", *flags]) == 0
    assert calls == [ServiceConfig(max_in_flight=3, max_queued=7, queue_wait_s=2.0, request_timeout_s=9.0, token=TOKEN)]
    monkeypatch.setenv("BACKFILL_SERVICE_TOKEN", "too-short")
    assert main(["--root", str(tmp_path), "serve"]) == 2  # refused before anything listens
