"""The FastAPI app: the routes of both protocols over one shared engine, the health
routes, each error in its protocol's shape, and the middleware (request log, Host check,
CORS, API key, a 500 for bugs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...chat import VisionChat
from ...errors import MissingDependencyError
from ...host_header import HostNames
from .errors import ApiError
from .limits import Limits
from .middleware import CatchErrors, CheckHost, LogRequests, RequireKey
from .model_info import default_name, model_facts
from .ollama_api import OllamaRoutes
from .openai_api import OpenAIRoutes
from .turns import Engine

if TYPE_CHECKING:
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response


def check_installed() -> None:
    """Raise :class:`MissingDependencyError` unless the ``[serve]`` extra is installed."""
    fastapi_module()


def fastapi_module() -> ModuleType:
    """The ``fastapi`` module, or the error that names the extra to install."""
    try:
        import fastapi
        import uvicorn  # noqa: F401 - checked here so the error names the extra once
    except ImportError as exc:
        raise MissingDependencyError(
            "llava-local serve needs FastAPI and uvicorn: pip install 'llava-local[serve]'"
        ) from exc
    return fastapi


def create_app(
    chat: VisionChat,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
    cors: Sequence[str] = (),
    close_chat: bool = True,
    bind: str = "127.0.0.1",
    allow_hosts: Sequence[str] = (),
) -> FastAPI:
    """The HTTP app answering with ``chat``'s engine (shared by every request).

    ``name`` is the model name clients use (default: the engine's catalogue name, or
    its file name without ``.gguf``); ``limits`` what a request may bring (sizes, the
    queue, which picture URLs are downloaded: none by default); ``api_key`` a bearer
    token every route but ``/health`` and ``/`` requires; ``cors`` the origins allowed
    to call it from a browser (none by default). ``bind`` is the address it is served
    on and, with ``allow_hosts``, decides which ``Host`` headers it answers (see
    :class:`~llava_local.host_header.HostNames`). The chat is closed when the app shuts down,
    unless ``close_chat`` is False."""
    fastapi = fastapi_module()
    from starlette.exceptions import HTTPException

    chat.allow_text_only = True  # a text-only question is the client's choice
    parallel = max(1, chat.engine.describe().parallel)  # the engine's slots
    engine = Engine(chat, name or default_name(chat), limits or Limits(), parallel=parallel)
    openai = OpenAIRoutes(engine)
    ollama = OllamaRoutes(engine, model_facts(chat))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        engine.stop()
        await engine.downloads.aclose()
        if close_chat:
            await asyncio.to_thread(chat.close)

    app: FastAPI = fastapi.FastAPI(
        title="llava-local",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.engine = engine
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(HTTPException, _on_http_error)
    routes: list[tuple[str, Callable[..., Any], list[str]]] = [
        ("/", _root, ["GET", "HEAD"]),  # HEAD: Ollama's liveness check, as clients send it
        ("/health", _Health(engine).answer, ["GET"]),
        ("/v1/models", openai.models, ["GET"]),
        ("/v1/models/{model_id:path}", openai.model, ["GET"]),
        ("/v1/chat/completions", openai.chat_completions, ["POST"]),
        ("/api/version", ollama.version, ["GET"]),
        ("/api/tags", ollama.tags, ["GET"]),
        ("/api/ps", ollama.ps, ["GET"]),
        ("/api/show", ollama.show, ["POST"]),
        ("/api/chat", ollama.chat, ["POST"]),
        ("/api/generate", ollama.generate, ["POST"]),
    ]
    for path, endpoint, methods in routes:
        app.add_api_route(path, endpoint, methods=methods, response_model=None)
    # The last one added is the outermost (see the order in .middleware).
    app.add_middleware(CatchErrors)
    if api_key:
        app.add_middleware(RequireKey, api_key=api_key)
    if cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],
        )
    app.add_middleware(CheckHost, names=HostNames(bind, allow_hosts))
    app.add_middleware(LogRequests)
    return app


class _Health:
    """``GET /health``: up, and what the engine is doing (never behind the API key)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def answer(self) -> dict[str, Any]:
        engine = self.engine
        return {
            "status": "ok",
            "model": engine.name,
            "busy": engine.busy,
            "running": engine.running,
            "parallel": engine.parallel,
            "waiting": max(0, engine.admitted - engine.running),
            "served": engine.served,
            "cancelled": engine.cancelled,
            "downloading": engine.downloads.active,
        }


async def _root() -> Response:
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("llava-local is running")


async def _on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    request.state.note = f"error: {exc.message[:120]}"
    return exc.response(request.url.path)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    status = int(getattr(exc, "status_code", 500))
    if status == 404:
        text = f"no route {request.method} {request.url.path} on this server"
    elif status == 405:
        text = f"{request.url.path} does not take {request.method}"
    else:
        text = str(getattr(exc, "detail", exc))
    return ApiError(status, text).response(request.url.path)
