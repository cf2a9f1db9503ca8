"""Running the app under uvicorn until Ctrl-C (or SIGTERM), with the request log on
stderr."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from ...chat import VisionChat
from ...host_header import is_loopback
from ...memory import human
from .app import create_app, fastapi_module
from .limits import Limits
from .turns import Engine

log = logging.getLogger("llava_local.serve")


def capacity(chat: VisionChat) -> str:
    """What the engine holds for its clients, said up front: conversations answered at
    once, positions each, the memory of their KV cache and of the KV states kept between
    them (empty for other engines)."""
    described = chat.engine.describe()
    parallel, n_ctx, kv_bytes = described.parallel, described.n_ctx, described.kv_bytes
    if kv_bytes is None or not n_ctx:
        return ""
    at_once = "one conversation at a time" if parallel == 1 else f"{parallel} conversations at once"
    kept = described.kept_bytes
    held = f"; {at_once}, {n_ctx} positions each, KV cache {human(kv_bytes)}"
    if kept is None:
        return held
    return held + (f", kept states up to {human(kept)}" if kept else ", no kept states in RAM")


def serve(
    chat: VisionChat,
    bind: str = "127.0.0.1",
    port: int = 8000,
    *,
    name: str | None = None,
    limits: Limits | None = None,
    api_key: str | None = None,
    cors: Sequence[str] = (),
    allow_hosts: Sequence[str] = (),
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve ``chat`` until Ctrl-C (or SIGTERM); the chat is closed on the way out.
    Arguments as :func:`~.app.create_app`'s; serving beyond loopback without an
    ``api_key`` logs a warning."""
    fastapi_module()
    import uvicorn

    app = create_app(
        chat,
        name=name,
        limits=limits,
        api_key=api_key,
        cors=cors,
        bind=bind,
        allow_hosts=allow_hosts,
    )
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if not api_key and not is_loopback(bind):
        log.warning(
            "warning: serving on %s without --api-key: anyone who can reach this machine "
            "on port %d can use the model%s; set --api-key (or LLAVA_LOCAL_API_KEY)",
            bind,
            port,
            " and make it download picture URLs" if limits and limits.picture_urls else "",
        )
    config = uvicorn.Config(
        app,
        host=bind,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
    )
    engine: Engine = app.state.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            engine.stop()  # answers being written end now, so the shutdown need not wait
            super().handle_exit(sig, frame)

    server = Server(config)
    if on_ready is not None:
        startup = server.startup

        async def announced(sockets: Any = None) -> None:
            await startup(sockets=sockets)
            if server.started:
                host = f"[{bind}]" if ":" in bind else bind
                on_ready(f"http://{host}:{port}")

        server.startup = announced  # type: ignore[method-assign]
    server.run()
    if not server.started:
        raise OSError(f"cannot serve on {bind}:{port}")
