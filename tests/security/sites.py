"""HTTP servers on 127.0.0.1 that the server under test is asked to download from: a
picture host, and the internal service an attacker would aim at.

:class:`Site` serves:

* ``/digit.png`` (the example digit, a 7) and ``/secret.png`` (the example shape);
* ``/redirect?to=URL``: 302 to ``URL``;
* ``/hang``: reads the request and never answers, until the client closes;
* ``/trickle``: a 200 promising 100 kB, then one byte every 0.2 s;
* ``/endless``: a 200 of no stated length, then a megabyte every 0.2 s;
* ``/not-a-picture``: bytes that are no picture, holding a secret token;
* anything else: 404.

It records each path requested (``requested``), how many ``/hang``, ``/trickle`` and
``/endless`` connections are open (``open``) and how many of them the client closed (``closed``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from ..paths import DIGIT, SHAPE

#: What /not-a-picture sends: an error message echoing it would leak the token.
SECRET = b"\x00\x01SECRET-TOKEN-4242 internal admin credentials"


class Site:
    """A picture host on 127.0.0.1 (a context manager: serving inside the block)."""

    def __init__(self) -> None:
        self.requested: list[str] = []
        self.open = 0
        self.closed = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.note(self.path)
                route = urllib.parse.urlsplit(self.path)
                if route.path == "/digit.png":
                    self._send(200, DIGIT.read_bytes(), "image/png")
                elif route.path == "/secret.png":
                    self._send(200, SHAPE.read_bytes(), "image/png")
                elif route.path == "/not-a-picture":
                    self._send(200, SECRET, "image/png")
                elif route.path == "/redirect":
                    target = urllib.parse.parse_qs(route.query)["to"][0]
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif route.path == "/hang":
                    site.hold(self.connection, lambda: None)
                elif route.path == "/trickle":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.flush()
                    site.hold(self.connection, lambda: self.connection.sendall(b"\x89"))
                elif route.path == "/endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    self.wfile.flush()
                    site.hold(self.connection, lambda: self.connection.sendall(bytes(2**20)))
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status: int, body: bytes, kind: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.port = int(self._httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def note(self, path: str) -> None:
        with self._lock:
            self.requested.append(path)

    def hold(self, connection: socket.socket, each: Any) -> None:
        """Keep ``connection`` open, calling ``each()`` every 0.2 s, until the client
        closes it (counted in ``closed``) or the site stops."""
        with self._lock:
            self.open += 1
        connection.settimeout(0.2)
        try:
            while not self.stopping.is_set():
                try:
                    if connection.recv(1) == b"":
                        break  # the client closed its end
                except TimeoutError:
                    each()
            else:
                return
            with self._lock:
                self.closed += 1
        except OSError:  # reset, broken pipe: the client went away too
            with self._lock:
                self.closed += 1
        finally:
            with self._lock:
                self.open -= 1

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@contextlib.contextmanager
def silent_port() -> Any:
    """A port on 127.0.0.1 that accepts connections and never says anything: a
    service that is slow, or a port behind a firewall that drops what it gets."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield int(listener.getsockname()[1])  # connections wait in the backlog, unread
