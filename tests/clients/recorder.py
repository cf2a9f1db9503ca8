"""A recording proxy on 127.0.0.1: forwards every request to the real ``serve`` and
keeps what each client sent (method, path, JSON body), so a test can assert the request
shape a client library produced, not only the answer it got back. Answers are passed on
piece by piece as they come (NDJSON and server-sent events stream through)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

#: Request headers passed on (the rest, such as Host, are the proxy's own business).
_FORWARDED = ("content-type", "authorization", "accept", "user-agent")
#: Response headers passed back.
_RETURNED = ("content-type", "retry-after", "cache-control")


@dataclass(frozen=True)
class Seen:
    """One request as a client sent it."""

    method: str
    path: str
    body: Any  # the JSON body, or None


class Recorder:
    """The proxy's listening socket and what it has seen."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(base_url=upstream, timeout=300)
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the connection closes after each answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                data = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(data) if data else None
                except ValueError:
                    body = None
                recorder.keep(Seen(self.command, self.path, body))
                headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED}
                request = recorder._client.build_request(
                    self.command, self.path, content=data, headers=headers
                )
                response = recorder._client.send(request, stream=True)
                try:
                    self.send_response(response.status_code)
                    for key, value in response.headers.items():
                        if key.lower() in _RETURNED:
                            self.send_header(key, value)
                    self.end_headers()
                    if self.command != "HEAD":
                        for piece in response.iter_raw():
                            self.wfile.write(piece)
                            self.wfile.flush()
                finally:
                    response.close()

            do_GET = do_POST = do_HEAD = do_DELETE = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def keep(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def since(self, mark: int) -> list[Seen]:
        """What was seen after ``mark`` (a ``len(recorder.seen)`` taken before)."""
        with self._lock:
            return list(self.seen[mark:])

    def posts(self, mark: int, path: str) -> list[Any]:
        """The JSON bodies POSTed to ``path`` since ``mark``."""
        return [s.body for s in self.since(mark) if s.method == "POST" and s.path == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()
