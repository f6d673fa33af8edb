"""Which storage failures are retried and which are answers: HTTP statuses, refused writes."""

import uuid

import pytest
from aiohttp import ClientConnectionError, ClientResponseError, RequestInfo, ServerTimeoutError
from fsspec import register_implementation
from fsspec.spec import AbstractFileSystem
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from backfill.errors import ConfigError, RetryableError
from backfill.images import BadImage, make_fetcher
from backfill.storage import Store, transient_errors


def http_error(uri: str, status: int) -> ClientResponseError:
    info = RequestInfo(URL(uri), "GET", CIMultiDictProxy(CIMultiDict()), URL(uri))
    return ClientResponseError(info, (), status=status, message="Forbidden" if status == 403 else "Error")


class FaultyFileSystem(AbstractFileSystem):
    """cat_file raises what the URI names: faulty://403/a.jpg answers HTTP 403."""

    protocol = "faulty"

    def cat_file(self, path, start=None, end=None, **kwargs):
        what = path.split("://", 1)[-1].split("/", 1)[0]
        if what == "refused":
            raise ClientConnectionError("connection refused")
        if what == "timeout":
            raise ServerTimeoutError("read timed out")
        raise http_error(path, int(what))


register_implementation("faulty", FaultyFileSystem, clobber=True)


@pytest.mark.parametrize("status", [400, 403, 410])
def test_an_http_4xx_rejects_that_image_only(status):
    uri = f"faulty://{status}/a.jpg"
    with pytest.raises(BadImage, match=f"^http {status}: {uri}"):
        make_fetcher()(uri)


@pytest.mark.parametrize("what", ["429", "500", "503", "refused", "timeout"])
def test_server_errors_throttling_and_dropped_connections_are_retryable(what):
    with pytest.raises(RetryableError, match=f"faulty://{what}/a.jpg"):
        make_fetcher()(f"faulty://{what}/a.jpg")


def test_an_http_answer_is_not_a_transient_store_error():
    assert not isinstance(http_error("https://x/a.jpg", 403), transient_errors())
    assert isinstance(ClientConnectionError("refused"), transient_errors())


def test_a_refused_write_is_permanent_and_says_what_to_check(monkeypatch):
    store = Store.open(f"memory://denied-{uuid.uuid4().hex[:8]}/root")

    def access_denied(path, value, **kwargs):
        raise PermissionError("AccessDenied: Access Denied")

    monkeypatch.setattr(store.fs, "pipe_file", access_denied)
    with pytest.raises(
        ConfigError, match="no permission to write memory://.*/root/x.json: check the credentials/bucket policy"
    ):
        store.write_json(store.url("x.json"), {})


def test_a_dropped_connection_on_write_stays_retryable(monkeypatch):
    store = Store.open(f"memory://dropped-{uuid.uuid4().hex[:8]}/root")

    def dropped(path, value, **kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(store.fs, "pipe_file", dropped)
    with pytest.raises(RetryableError, match="could not write"):
        store.write_bytes(store.url("x.bin"), b"x")
