"""The search service: a small Starlette app over a Searcher (search by upload or by image_id, health)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import threading
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from backfill.admission import Admission, DeadlineExceeded, Overloaded
from backfill.errors import BackfillError, ConfigError, UnknownImageError
from backfill.images import BadImage
from backfill.pipeline import cpu_budget
from backfill.search import Searcher, SearchResult

log = logging.getLogger(__name__)
PROBES = ("/healthz", "/livez")  # never behind the token or the queue: the kubelet must get an answer under load
RETRY_AFTER_S = 1  # what a refused client is told to wait: slots free as fast as searches end
TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]{16,}=*")  # RFC 6750 b64token, at least 16 characters


@dataclass(frozen=True)
class ServiceConfig:
    max_upload_bytes: int = 8 * 1024 * 1024
    max_k: int = 100
    default_k: int = 10
    poll_s: float = 1.0  # how often CURRENT is checked, so a new build loads before a request needs it
    max_in_flight: int = 0  # searches running at once (0: one per CPU of the process's budget)
    max_queued: int = 64  # requests waiting for a search slot; one more gets 503 at once
    queue_wait_s: float = 5.0  # the longest a request waits for a slot before it gets 503
    request_timeout_s: float = 30.0  # the longest an upload may take to arrive (408) or a search to run (504)
    token: str = field(default="", repr=False)  # BACKFILL_SERVICE_TOKEN: empty = no credential asked

    def __post_init__(self) -> None:
        if not 1 <= self.max_upload_bytes <= 1 << 30:
            raise ConfigError(f"max_upload_bytes must be in 1..{1 << 30}, got {self.max_upload_bytes}")
        if not 1 <= self.default_k <= self.max_k <= 1000:
            raise ConfigError(
                f"need 1 <= default_k <= max_k <= 1000, got default_k={self.default_k} max_k={self.max_k}"
            )
        if not 0.05 <= self.poll_s <= 3600:
            raise ConfigError(f"poll_s must be in 0.05..3600 seconds, got {self.poll_s}")
        if not 0 <= self.max_in_flight <= 1024:
            raise ConfigError(f"max_in_flight must be in 0..1024 (0: one per CPU), got {self.max_in_flight}")
        if not 0 <= self.max_queued <= 100_000:
            raise ConfigError(
                f"max_queued must be in 0..100000 (0: refuse when every slot is busy), got {self.max_queued}"
            )
        if not 0.001 <= self.request_timeout_s <= 3600:
            raise ConfigError(f"request_timeout_s must be in 0.001..3600 seconds, got {self.request_timeout_s}")
        if not 0.001 <= self.queue_wait_s <= self.request_timeout_s:
            raise ConfigError(
                f"queue_wait_s must be in 0.001..request_timeout_s ({self.request_timeout_s:g}) seconds, "
                f"got {self.queue_wait_s}"
            )
        if self.token and not TOKEN.fullmatch(self.token):
            # the value itself is not repeated: it is a secret
            raise ConfigError(
                f"BACKFILL_SERVICE_TOKEN must be at least 16 characters of A-Z a-z 0-9 - . _ ~ + / "
                f"(optionally ending in =), got {len(self.token)} characters that are not: "
                "generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BearerToken:
    """Every route but the probes needs `Authorization: Bearer <token>`, compared in constant time."""

    def __init__(self, app, token: str) -> None:
        self.app, self._token = app, token.encode("ascii")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBES:
            return await self.app(scope, receive, send)
        scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
        # latin-1 is how the header arrived; compare_digest's time depends on lengths only
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1"), self._token):
            return await self.app(scope, receive, send)
        challenge = 'Bearer realm="backfill"' + (', error="invalid_token"' if given.strip() else "")
        message = "wrong bearer token" if given.strip() else "this service needs Authorization: Bearer <token>"
        response = JSONResponse({"error": message}, status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)


def create_app(searcher: Searcher, config: ServiceConfig = ServiceConfig()) -> Starlette:
    admission = Admission(config.max_in_flight or cpu_budget(), config.max_queued, config.queue_wait_s)

    def reply(result: SearchResult, query: dict) -> JSONResponse:
        return JSONResponse(
            {
                "model": result.model,
                "version": result.version,
                "build_id": result.build_id,
                "query": query,
                "hits": [{"image_id": h.image_id, "uri": h.uri, "score": h.score} for h in result.hits],
            }
        )

    def k_of(request: Request) -> int:
        raw = request.query_params.get("k", str(config.default_k))
        try:
            k = int(raw)
        except ValueError:
            raise HTTPError(400, f"k must be an integer, got {raw!r}") from None
        if not 1 <= k <= config.max_k:
            raise HTTPError(400, f"k must be in 1..{config.max_k}, got {k}")
        return k

    async def search(request: Request) -> JSONResponse:
        k = k_of(request)
        if request.method == "GET":
            raw = request.query_params.get("image_id")
            if raw is None:
                raise HTTPError(400, "GET /search needs ?image_id=<int>; to search by image, POST the image")
            try:
                image_id = int(raw)
            except ValueError:
                raise HTTPError(400, f"image_id must be an integer, got {raw!r}") from None
            result = await admission.run(config.request_timeout_s, searcher.search_id, image_id, k)
            return reply(result, {"image_id": image_id, "k": k})
        try:  # a slow upload holds a connection and its bytes, never a search slot
            data = await asyncio.wait_for(upload(request), config.request_timeout_s)
        except TimeoutError:
            raise HTTPError(408, f"the upload took longer than {config.request_timeout_s:g} s to arrive") from None
        result = await admission.run(config.request_timeout_s, searcher.search_image, data, k)
        return reply(result, {"bytes": len(data), "k": k})

    async def upload(request: Request) -> bytes:
        body = await read_bounded(request, config.max_upload_bytes)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            replay = _replay(body)
            async with Request(request.scope, receive=replay).form(max_files=1, max_fields=4) as form:
                image = form.get("image")
                if not isinstance(image, UploadFile):
                    raise HTTPError(400, "multipart upload needs a file field named 'image'")
                body = await image.read()
        elif kind and not kind.startswith(("image/", "application/octet-stream")):
            raise HTTPError(
                415,
                "send the image as the body (image/* or application/octet-stream) "
                f"or as multipart field 'image', not {kind!r}",
            )
        if not body:
            raise HTTPError(400, "empty upload: send the query image's bytes")
        return body

    async def livez(request: Request) -> JSONResponse:
        return JSONResponse({"status": "alive"})  # the event loop answers: nothing else is asked of liveness

    async def healthz(request: Request) -> JSONResponse:
        # on Starlette's own thread pool, not the searches' workers: probes answer while every slot is busy
        try:
            served = await run_in_threadpool(searcher.current)
        except BackfillError as exc:
            return JSONResponse(
                {"status": "unavailable", "model": searcher.model_name, "error": str(exc)}, status_code=503
            )
        return JSONResponse(
            {
                "status": "ok",
                "model": searcher.model_name,
                "version": served.version,
                "build_id": served.build_id,
                "vectors": int(served.index.ntotal),
                "load_error": searcher.load_error,  # a newer build that failed to load, while this one serves
            }
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        # the published build loads before uvicorn opens the port: the first probe or query never pays for it
        await run_in_threadpool(_check, searcher)
        stop = threading.Event()
        poller = threading.Thread(
            target=_poll, args=(searcher, stop, config.poll_s), name="current-poller", daemon=True
        )
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join(timeout=5)
            admission.close()

    app = Starlette(
        routes=[
            Route("/search", _errors(search), methods=["GET", "POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/livez", livez, methods=["GET"]),
        ],
        middleware=[Middleware(BearerToken, token=config.token)] if config.token else [],
        lifespan=lifespan,
    )
    app.state.admission = admission  # its counters, for tests and the load benchmark
    return app


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise HTTPError(400, f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise HTTPError(413, f"upload of {size} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPError(413, f"upload is over the limit of {limit} bytes")
    return bytes(body)


def _replay(body: bytes):
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _errors(endpoint):
    """Map engine errors to HTTP statuses with a JSON body that says what is wrong."""

    async def wrapped(request: Request) -> JSONResponse:
        headers = None
        try:
            return await endpoint(request)
        except Overloaded as exc:
            status, message, headers = 503, str(exc), {"Retry-After": str(RETRY_AFTER_S)}
        except DeadlineExceeded as exc:
            status, message = 504, str(exc)
        except HTTPError as exc:
            status, message = exc.status, str(exc)
        except BadImage as exc:
            status, message = 400, f"the uploaded file is not a usable image: {exc}"
        except UnknownImageError as exc:
            status, message = 404, str(exc)
        except BackfillError as exc:  # nothing published, or the published build cannot be loaded
            status, message = 503, str(exc)
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    return wrapped


def _poll(searcher: Searcher, stop: threading.Event, every_s: float) -> None:
    # loads a new build as soon as CURRENT moves; requests keep the old one until it is ready
    while not stop.wait(every_s):
        _check(searcher)


def _check(searcher: Searcher) -> None:
    try:
        searcher.current()
    except BackfillError:
        pass  # nothing published yet, a broken build or storage down: /healthz and /search report it
    except Exception:
        # anything else is a bug, but the poller must outlive it or no new build ever loads
        log.exception("polling CURRENT of %s failed", searcher.model_name)


def serve(searcher: Searcher, host: str, port: int, config: ServiceConfig = ServiceConfig()) -> None:
    import uvicorn

    uvicorn.run(create_app(searcher, config), host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
