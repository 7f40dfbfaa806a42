"""The explorer's HTTP face: a FastAPI app around an :class:`~.session.Explorer` and the static page.

``create_app(explorer)`` builds the app (tests drive it with ``TestClient``); :func:`serve` runs it
with uvicorn on an already bound socket (so ``--port 0`` and tests get a free port without a race).
Every refusal is a JSON ``{"detail": "<one line>"}`` with a 4xx status; the page shows the line.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import CleanDIFTError
from ..version import __version__
from .limits import ExploreRequestError, UnknownImageError, UploadTooLargeError
from .session import DEFAULT_RESIZE, MUTUAL_TEMPERATURE, Explorer

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
_ID = re.compile(r"[0-9]{1,9}")
_MULTIPART_OVERHEAD = 64 * 1024  #: form boundaries and headers around an uploaded file


# ---------------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MethodIn(_Strict):
    name: str
    t: float | None = None
    ensemble: int = 8
    seed: int = 0


class MatcherIn(_Strict):
    method: str = "argmax"
    grid: str = "pixels"
    window: int = 5
    temperature: float = 0.02


class FeaturesIn(_Strict):
    methods: list[MethodIn] = Field(min_length=1)
    tap: str | None = None
    prompt: str = ""
    resize: str = DEFAULT_RESIZE


class MatchIn(FeaturesIn):
    source: int
    points: list[tuple[float, float]] = Field(min_length=1)
    targets: list[int] = Field(min_length=1)
    matcher: MatcherIn = MatcherIn()
    heatmap_point: int | None = -1


class ExportIn(FeaturesIn):
    source: int
    points: list[tuple[float, float]] = Field(min_length=1)
    targets: list[int] = Field(min_length=1)
    matcher: MatcherIn = MatcherIn()


class MutualIn(FeaturesIn):
    source: int
    targets: list[int] = Field(min_length=1)
    k: int = 20
    radius: float = 0.0
    temperature: float = MUTUAL_TEMPERATURE


def _settings(explorer: Explorer, body: FeaturesIn) -> list:
    return [explorer.settings(m.name, tap=body.tap, prompt=body.prompt, resize=body.resize, t=m.t,
                              ensemble=m.ensemble, seed=m.seed) for m in body.methods]


def _matcher(explorer: Explorer, body: MatchIn | ExportIn):
    m = body.matcher
    return explorer.matcher(m.method, m.grid, m.window, m.temperature)


# ---------------------------------------------------------------------------------------------- app
def create_app(explorer: Explorer) -> FastAPI:
    """The app: the page at ``/``, its files under ``/static``, the JSON API under ``/api``."""
    app = FastAPI(title="cleandift explore", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.explorer = explorer
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/config")
    def config() -> dict:
        return {**explorer.config(), "version": __version__, "mutual_temperature": MUTUAL_TEMPERATURE}

    @app.get("/api/images")
    def images() -> dict:
        return {"images": explorer.images.list()}

    @app.get("/api/images/{image_id}")
    def image(image_id: str) -> Response:
        if not _ID.fullmatch(image_id):
            raise UnknownImageError(f"unknown image id {image_id[:40]!r}; GET /api/images lists the ids")
        data, media_type = explorer.images.encoded(int(image_id))
        return Response(data, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.post("/api/images", status_code=201)
    async def upload(request: Request) -> dict:
        data, name = await _read_upload(request, explorer.limits.max_upload_bytes)
        entry = await run_in_threadpool(explorer.images.add_upload, data, name)
        return entry.info()

    @app.post("/api/match")
    def match(body: MatchIn) -> dict:
        return explorer.match(body.source, body.points, body.targets, _settings(explorer, body),
                              _matcher(explorer, body), body.heatmap_point)

    @app.post("/api/mutual")
    def mutual(body: MutualIn) -> dict:
        return explorer.mutual(body.source, body.targets, _settings(explorer, body), k=body.k,
                               radius=body.radius, temperature=body.temperature)

    @app.post("/api/export")
    def export(body: ExportIn) -> dict:
        return explorer.export(body.source, body.points, body.targets, _settings(explorer, body),
                               _matcher(explorer, body))

    @app.get("/api/cache")
    def cache() -> dict:
        return explorer.cache.stats()

    return app


async def _read_upload(request: Request, max_bytes: int) -> tuple[bytes, str | None]:
    """The uploaded bytes and file name: a multipart form field ``file``, or the raw body (``?name=``).

    The declared length is checked before reading; a raw body is read in chunks and abandoned as soon
    as it passes the limit, so an oversized upload never sits in memory.
    """
    limit = f"{max_bytes / 2**20:.1f} MB" if max_bytes >= 2**20 else f"{max_bytes / 1024:.0f} KB"
    too_large = UploadTooLargeError(f"the upload is over the upload limit of {limit}; downscale or compress "
                                    "the image")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD:
        raise too_large
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4)
        file = form.get("file")
        if file is None or isinstance(file, str):
            raise ExploreRequestError("no file in the upload; send the image as form field 'file'")
        data = await file.read(max_bytes + 1)
        name = file.filename
        await form.close()
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
        data, name = b"".join(chunks), request.query_params.get("name")
    if len(data) > max_bytes:
        raise too_large
    return data, name


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ExploreRequestError)
    async def refused(_request: Request, exc: ExploreRequestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(CleanDIFTError)
    async def bad_input(_request: Request, exc: CleanDIFTError) -> JSONResponse:  # e.g. TimestepError
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def crashed(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("explore: request failed")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"},
                            status_code=500)


def _validation_message(exc: RequestValidationError) -> str:
    """One line from pydantic's error list: the first problem, where it is, and how many more."""
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg', 'invalid')}{more}"


# ---------------------------------------------------------------------------------------------- serving
def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); IPv6 hosts work too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
    return f"http://{shown}:{port}/"


def make_server(app: FastAPI, log_level: str = "warning"):
    """A uvicorn server for ``app`` (run it with ``server.run(sockets=[sock])``)."""
    import uvicorn  # noqa: PLC0415

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve until Ctrl+C or SIGTERM, then return (so the caller's clean-up runs).

    uvicorn in the main thread re-raises the signal that stopped it, which kills the process by SIGTERM
    before any ``finally`` (the session's temporary folder of uploads would stay behind); in a worker
    thread it installs no handlers, and the main thread here turns both signals into a clean stop.
    """
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    server = make_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="explore-server",
                              daemon=True)

    def stop(_signum, _frame) -> None:
        server.should_exit = True

    previous = signal.signal(signal.SIGTERM, stop)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        server.should_exit = True
        thread.join(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
