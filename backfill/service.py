"""The search service: a small Starlette app over a Searcher (search by upload or by image_id, health)."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from backfill.errors import BackfillError, ConfigError, UnknownImageError
from backfill.images import BadImage
from backfill.search import Searcher, SearchResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceConfig:
    max_upload_bytes: int = 8 * 1024 * 1024
    max_k: int = 100
    default_k: int = 10
    poll_s: float = 1.0  # how often CURRENT is checked, so a new build loads before a request needs it

    def __post_init__(self) -> None:
        if not 1 <= self.max_upload_bytes <= 1 << 30:
            raise ConfigError(f"max_upload_bytes must be in 1..{1 << 30}, got {self.max_upload_bytes}")
        if not 1 <= self.default_k <= self.max_k <= 1000:
            raise ConfigError(
                f"need 1 <= default_k <= max_k <= 1000, got default_k={self.default_k} max_k={self.max_k}"
            )
        if not 0.05 <= self.poll_s <= 3600:
            raise ConfigError(f"poll_s must be in 0.05..3600 seconds, got {self.poll_s}")


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(searcher: Searcher, config: ServiceConfig = ServiceConfig()) -> Starlette:
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
            result = await run_in_threadpool(searcher.search_id, image_id, k)
            return reply(result, {"image_id": image_id, "k": k})
        data = await upload(request)
        result = await run_in_threadpool(searcher.search_image, data, k)
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

    async def healthz(request: Request) -> JSONResponse:
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

    app = Starlette(
        routes=[
            Route("/search", _errors(search), methods=["GET", "POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
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
        try:
            return await endpoint(request)
        except HTTPError as exc:
            status, message = exc.status, str(exc)
        except BadImage as exc:
            status, message = 400, f"the uploaded file is not a usable image: {exc}"
        except UnknownImageError as exc:
            status, message = 404, str(exc)
        except BackfillError as exc:  # nothing published, or the published build cannot be loaded
            status, message = 503, str(exc)
        return JSONResponse({"error": message}, status_code=status)

    return wrapped


def _poll(searcher: Searcher, stop: threading.Event, every_s: float) -> None:
    # loads a new build as soon as CURRENT moves; requests keep the old one until it is ready
    while not stop.wait(every_s):
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
