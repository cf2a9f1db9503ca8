"""A stand-in Ollama daemon: a real HTTP/1.1 server on 127.0.0.1, for tests.

Why: the Ollama engine must be tested through the official client over real
sockets, against what the real Go server sends -- chunked NDJSON, Go-style
compact JSON, its status codes and error texts -- and against the ways a real
daemon fails half-way through an answer. Patching the client would test none of
that. Shapes follow ollama/ollama ``server/routes.go`` and ``api/types.go``.

Use the fixture (it starts with one vision model, ``llava:latest``)::

    def test_caption(ollama_server):
        ollama_server.add_model("moondream")                      # vision by default
        ollama_server.add_model("gemma3", family="gemma3")        # vision, no clip family
        ollama_server.add_model("llama3.2", capabilities=["completion"])
        ollama_server.add_model("bakllava", pullable=True)        # only via /api/pull
        ollama_server.add_model("qwen2.5vl", pullable=True, pull_error=PULL_EOF)  # fails
        ollama_server.script(pieces=["A ", "cat."], eval_count=2)  # every chat from now on
        ollama_server.script(Script(fault="drop", after=1), Script())  # one fault, then normal
        ollama_server.script(lambda request: Script(pieces=[request.json["model"]]))
        ...
        body = ollama_server.requests_to("/api/chat")[-1].json    # what the client sent

What a test can read: ``url`` / ``host`` / ``port``; ``requests`` (every
:class:`RecordedRequest`: method, path, lower-cased headers, raw body, parsed JSON);
``models`` (installed, by canonical name), ``registry`` (pullable), ``loaded`` (for
``/api/ps``); ``client_gone`` (an Event set when the client hung up mid-answer);
``errors`` (the server's own failures; the fixture fails the test on any).

Models as the real daemon keeps them: ``families`` is what was recorded when the model
was made (``clip`` for a separate projector file, as llava's), independent of
``capabilities``, which the daemon works out from the files (a gemma3 reports
``vision`` with families ``["gemma3"]``). Pictures sent to a model that cannot see are
ignored by a plain text model, and refused with the runner's 500 by one whose
architecture has a vision tower it lacks (gemma3:1b); more than one picture in a
message to an ``mllama`` model is refused, as Ollama's chat prompt does. An invalid
``format`` gets the 500 the runner's completion gives (after the model was looked up),
as does a schema llama.cpp's grammar converter refuses (an unanchored ``pattern``).
``RecordedRequest.pictures()`` gives the decoded pictures of each message, in order.

Fault modes (``Script.fault``): ``http_error`` (``status`` + ``{"error": ...}`` body),
``error_line`` (an ``{"error": ...}`` line after ``after`` pieces), ``bad_line`` (a
non-JSON line after ``after`` pieces), ``drop`` (socket closed after ``after``
pieces, no terminating chunk), ``stall`` (nothing sent for ``stall_s`` seconds,
capped at 5 s and cut short when the server stops), ``model_gone`` (the model
vanishes: 404 on this chat). ``piece_delay_s`` makes an answer trickle;
``final_content`` puts text into the final chunk, as the daemon does when a parser
held the answer's tail back. A pullable model with ``pull_error`` streams its first
blob's progress, then that error line, and is not installed.

Endpoints: ``GET|HEAD /``, ``GET|HEAD /api/version``, ``GET|HEAD /api/tags``,
``GET /api/ps``, ``POST /api/show``, ``POST /api/chat``, ``POST /api/pull``; anything
else gets gin's ``404 page not found`` / ``405 method not allowed``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http
import json
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import pytest

Fault = Literal["http_error", "error_line", "bad_line", "drop", "stall", "model_gone"]

#: The longest a scripted stall may last, so a forgotten stall never hangs a test run.
MAX_STALL_S = 5.0
#: Families that mean a separate projector file (llava-style models).
VISION_FAMILIES = ("clip",)
#: Architectures whose vision tower sits in the model file itself (Ollama's own engine):
#: a vision model of these reports ``vision`` without a ``clip`` family, and a text-only
#: one (gemma3:1b) makes the runner refuse pictures.
BUILT_IN_VISION = frozenset({"gemma3", "mistral3", "llama4", "qwen25vl", "mllama"})

# The typed fields of Go's api.Options; FromMap refuses a value of the wrong type.
_INT_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed"}
    | {"num_predict", "top_k", "repeat_last_n", "mirostat"}
)
_FLOAT_OPTIONS = frozenset(
    {"top_p", "min_p", "tfs_z", "typical_p", "temperature", "repeat_penalty"}
    | {"presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"}
)
_BOOL_OPTIONS = frozenset(
    {"numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mmap", "use_mlock"}
    | {"penalize_newline"}
)
_JSON = "application/json; charset=utf-8"
_NO_MANIFEST = "pull model manifest: file does not exist"
#: server/download.go when a blob's download keeps failing.
PULL_EOF = "max retries exceeded: unexpected EOF"
#: runner/ollamarunner: a picture for a model of a vision architecture without the tower.
NO_VISION_RUNNER = (
    "Failed to create new sequence: failed to process inputs: "
    "this model is missing data required for image input"
)
#: server/prompt.go: mllama takes one picture per message.
MLLAMA_ONE_IMAGE = "this model only supports one image while more than one image requested"


# --- what the Go server writes -------------------------------------------------------


def go_json(value: Any) -> bytes:
    """JSON as Go's ``encoding/json`` writes it: compact, UTF-8, HTML characters escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").encode()


def rfc3339_nano(ns: int | None = None) -> str:
    """A UTC time as Go's ``time.RFC3339Nano``: nanoseconds, trailing zeros dropped."""
    ns = time.time_ns() if ns is None else ns
    seconds, fraction = divmod(ns, 1_000_000_000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    digits = f"{fraction:09d}".rstrip("0")
    return f"{stamp}.{digits}Z" if digits else f"{stamp}Z"


def canonical_name(name: str) -> str:
    """The name Ollama stores a model under: lower case, ``:latest`` when untagged."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _base64_error(text: str) -> str | None:
    """Go's error for a string that is not standard, padded base64, else None."""
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    for index, char in enumerate(text):
        if char not in alphabet:
            return f"illegal base64 data at input byte {index}"
    try:
        base64.b64decode(text, validate=True)
    except ValueError:
        return f"illegal base64 data at input byte {len(text)}"
    return None


def _go_quote(text: str) -> str:
    """Go's ``%q`` of a short ASCII-ish text: double quotes, backslash escapes."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t") + '"'


def _format_error(fmt: Any) -> str | None:
    """The error the runner's completion gives for ``format``, else None: anything but
    ``"json"`` or an object, and an object llama.cpp cannot turn into a grammar."""
    if fmt in (None, "", "json"):  # a tuple: fmt may be an (unhashable) dict
        return None
    if not isinstance(fmt, dict):
        raw = json.dumps(fmt, ensure_ascii=False, separators=(",", ":"))
        return f'invalid format: {_go_quote(raw)}; expected "json" or a valid JSON Schema object'
    if _unanchored_pattern(fmt):
        return "invalid JSON schema in format"
    return None


def _unanchored_pattern(node: Any) -> bool:
    """Whether a string schema somewhere has a ``pattern`` without ``^`` and ``$`` (llama.cpp's
    json-schema-to-grammar refuses it, and Ollama then has no grammar)."""
    if isinstance(node, list):
        return any(_unanchored_pattern(item) for item in node)
    if not isinstance(node, dict):
        return False
    pattern = node.get("pattern")
    if isinstance(pattern, str) and node.get("type") in (None, "string"):
        return not (pattern.startswith("^") and pattern.endswith("$")) or any(
            _unanchored_pattern(value) for value in node.values()
        )
    return any(_unanchored_pattern(value) for value in node.values())


def _option_error(options: dict[str, Any]) -> str | None:
    """The error ``api.Options.FromMap`` gives for a wrongly typed option, else None."""
    for key, value in options.items():
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if key in _INT_OPTIONS and not number:
            return f'option "{key}" must be of type integer'
        if key in _FLOAT_OPTIONS and not number:
            return f'option "{key}" must be of type float32'
        if key in _BOOL_OPTIONS and not isinstance(value, bool):
            return f'option "{key}" must be of type boolean'
        if key == "stop" and not isinstance(value, list):
            return 'option "stop" must be of type array'
        if key == "stop" and not all(isinstance(item, str) for item in value):
            return 'option "stop" must be of an array of strings'
    return None


# --- what the tests script -----------------------------------------------------------


@dataclass
class ModelSpec:
    """One model the daemon has (or can pull). ``capabilities=None`` mimics an old server.

    ``capabilities`` is what ``/api/show`` reports; ``families`` what the model was
    recorded with (default: ``family``, plus ``clip`` when it has a ``projector`` file);
    ``projector`` defaults to "a vision model of an architecture without a built-in
    vision tower" (llava, moondream), so ``family="gemma3"`` gives families ``["gemma3"]``.
    """

    name: str
    capabilities: list[str] | None = field(default_factory=lambda: ["completion", "vision"])
    family: str = "llama"
    families: list[str] | None = None
    projector: bool | None = None
    parameter_size: str = "7B"
    quantization_level: str = "Q4_0"
    size: int = 4_733_363_377
    context_length: int = 4096
    modified_at: str = field(default_factory=rfc3339_nano)
    #: A pull of this model fails with this error after its first blob started.
    pull_error: str | None = None

    def __post_init__(self) -> None:
        self.name = canonical_name(self.name)
        if self.projector is None:
            sees = self.capabilities is None or "vision" in self.capabilities
            self.projector = sees and self.family not in BUILT_IN_VISION
        if self.families is None:
            self.families = [self.family, *VISION_FAMILIES] if self.projector else [self.family]

    @property
    def vision(self) -> bool:
        """Whether this model has an image encoder: a projector file, or the vision tower
        of its own architecture (which the daemon then reports as a capability)."""
        if self.projector:
            return True
        caps = self.capabilities
        return self.family in BUILT_IN_VISION and caps is not None and "vision" in caps

    @property
    def digest(self) -> str:
        """The manifest digest, stable per name."""
        return _digest(self.name)[7:]

    def details(self) -> dict[str, Any]:
        """``api.ModelDetails``: every field present, no omitempty."""
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": self.families,
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def tags_entry(self) -> dict[str, Any]:
        """One model of ``GET /api/tags``."""
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def show_body(self) -> dict[str, Any]:
        """``POST /api/show``: modelfile, details, model_info, projector_info, capabilities."""
        body: dict[str, Any] = {
            "license": "LLAMA 2 COMMUNITY LICENSE AGREEMENT",
            "modelfile": f'# Modelfile generated by "ollama show"\nFROM {self.name}\n',
            "parameters": 'stop                           "USER:"',
            "template": "{{ .System }}\nUSER: {{ .Prompt }}\nASSISTANT: ",
            "details": self.details(),
            "model_info": {
                "general.architecture": self.family,
                "general.parameter_count": 6_738_415_616,
                f"{self.family}.context_length": self.context_length,
                f"{self.family}.embedding_length": 4096,
            },
        }
        if self.projector:
            body["projector_info"] = {
                "clip.has_llava_projector": True,
                "clip.vision.image_size": 336,
                "general.architecture": "clip",
            }
        if self.capabilities is not None:
            body["capabilities"] = self.capabilities
        body["modified_at"] = self.modified_at
        return body

    def layers(self) -> list[tuple[str, int]]:
        """(digest, size) of the blobs a pull downloads."""
        layers = [(_digest(self.name + "/model"), self.size)]
        if self.projector:
            layers.append((_digest(self.name + "/projector"), 624_434_336))
        return layers


@dataclass(frozen=True)
class Script:
    """How the daemon answers one ``/api/chat``: the pieces, the final metrics, a fault.

    Metrics left at 0 are omitted from the final chunk, as Go's ``omitempty`` does.
    ``eval_count=None`` means one token per piece; ``total_duration=None`` the sum.
    """

    pieces: Sequence[str] = ("A", " cat", " on", " a", " mat", ".")
    done_reason: str = "stop"
    prompt_eval_count: int = 26
    eval_count: int | None = None
    load_duration: int = 1_334_875
    prompt_eval_duration: int = 342_546_000
    eval_duration: int = 4_535_599_000
    total_duration: int | None = None
    fault: Fault | None = None
    after: int = 1
    error: str = "an error was encountered while running the model: unexpected EOF"
    status: int = 500
    bad_line: bytes = b"this is not json\n"
    stall_s: float = MAX_STALL_S
    piece_delay_s: float = 0.0
    final_content: str = ""

    def metrics(self) -> dict[str, int]:
        """The metric fields of the final chunk, zero ones left out."""
        total = self.total_duration
        if total is None:
            total = self.load_duration + self.prompt_eval_duration + self.eval_duration + 1_000
        values = {
            "total_duration": total,
            "load_duration": self.load_duration,
            "prompt_eval_count": self.prompt_eval_count,
            "prompt_eval_duration": self.prompt_eval_duration,
            "eval_count": len(self.pieces) if self.eval_count is None else self.eval_count,
            "eval_duration": self.eval_duration,
        }
        return {key: value for key, value in values.items() if value}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server received it. ``json`` is None when the body is not JSON."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None

    def pictures(self) -> list[list[bytes]]:
        """The pictures of each message of a chat, decoded from base64, in order."""
        messages = (self.json or {}).get("messages") or []
        return [[base64.b64decode(image) for image in m.get("images") or []] for m in messages]


# --- the server ----------------------------------------------------------------------


class OllamaServer:
    """The stand-in daemon. ``url`` is ``http://127.0.0.1:<port>``; see the module doc."""

    def __init__(self, *, listen: bool = True, version: str = "0.12.6") -> None:
        self.version = version
        self.models: dict[str, ModelSpec] = {}
        self.registry: dict[str, ModelSpec] = {}
        self.loaded: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self.errors: list[BaseException] = []
        self.stopping = threading.Event()
        self.client_gone = threading.Event()
        self._scripts: list[Script | Callable[[RecordedRequest], Script]] = [Script()]
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self._httpd = _HTTPServer(self)
        self.port: int = self._httpd.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        if listen:
            self.start()

    # scripting
    def add_model(
        self,
        name: str,
        capabilities: Sequence[str] | None = ("completion", "vision"),
        *,
        pullable: bool = False,
        **details: Any,
    ) -> ModelSpec:
        """Install a model (or, with ``pullable=True``, only offer it to ``/api/pull``)."""
        caps = None if capabilities is None else list(capabilities)
        spec = ModelSpec(name, capabilities=caps, **details)
        (self.registry if pullable else self.models)[spec.name] = spec
        return spec

    def remove_model(self, name: str) -> None:
        """Forget an installed model, as ``ollama rm`` would."""
        self.models.pop(canonical_name(name), None)
        self.loaded.discard(canonical_name(name))

    def find_model(self, name: str) -> ModelSpec | None:
        """The installed model a request names, matched as Ollama matches names."""
        return self.models.get(canonical_name(name))

    def script(self, *scripts: Script | Callable[[RecordedRequest], Script], **fields: Any) -> None:
        """Set the answers to the next chats: each script serves one chat, the last one
        every chat after. ``script(pieces=[...])`` is ``script(Script(pieces=[...]))``;
        a callable gets the :class:`RecordedRequest` and returns the Script to play."""
        if fields:
            if scripts:
                raise TypeError("pass Script objects or Script fields, not both")
            scripts = (Script(**fields),)
        if not scripts:
            raise TypeError("script() needs at least one Script")
        with self._lock:
            self._scripts = list(scripts)

    def next_script(self, request: RecordedRequest) -> Script:
        """The script for this chat (the queue's head; the last one stays)."""
        with self._lock:
            source = self._scripts.pop(0) if len(self._scripts) > 1 else self._scripts[0]
        return source(request) if callable(source) else source

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests for one path, oldest first."""
        return [request for request in self.requests if request.path == path]

    # life cycle
    def start(self) -> None:
        """Start listening and serving (a socket bound but not listening refuses connections)."""
        if self._thread is not None:
            return
        self._httpd.server_activate()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, cut open connections and stalls short, and join every thread."""
        self.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()

    def track(self, connection: socket.socket, *, open_: bool) -> None:
        """Remember open connections so :meth:`stop` can close idle keep-alive ones."""
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def __enter__(self) -> OllamaServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _HTTPServer(ThreadingHTTPServer):
    """Binds 127.0.0.1 on a free port at once, listens only when started."""

    block_on_close = True
    daemon_threads = False

    def __init__(self, fake: OllamaServer) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        # TCPServer's bind, not HTTPServer's: that one looks the host name up in DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, OSError):
            self.fake.errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    """Routes requests as Ollama's gin router does, writes bytes as Go's net/http does."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.fake.track(self.connection, open_=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake.track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: pytest shows failures well enough."""

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    @property
    def fake(self) -> OllamaServer:
        return self.server.fake

    # routing
    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        if "://" in path:  # absolute form, as a client sends it to a proxy; Go routes on the path
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        body = self._read_body()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers = {key.lower(): value for key, value in self.headers.items()}
        request = RecordedRequest(self.command, path, headers, body, parsed)
        self.fake.requests.append(request)
        routes = _ROUTES.get(path)
        if routes is None:
            self._send_text(404, "404 page not found", "text/plain")
            return
        handler = routes.get(self.command)
        if handler is None:
            self._send_text(405, "405 method not allowed", "text/plain")
            return
        try:
            handler(self, request)
        except OSError:
            self.close_connection = True  # the client went away; nothing to tell it
            self.fake.client_gone.set()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # writing
    def _head(self, status: int, content_type: str, length: int | None) -> bytes:
        """Status line and headers in Go's order: handler headers, Date, then framing."""
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = f"status code {status}"
        lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}"]
        lines.append(f"Date: {self.date_time_string()}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        if self.close_connection:
            lines.append("Connection: close")
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send_bytes(self, status: int, content_type: str, data: bytes) -> None:
        head = self._head(status, content_type, len(data))
        self.wfile.write(head if self.command == "HEAD" else head + data)

    def _send_text(self, status: int, text: str, content_type: str) -> None:
        self._send_bytes(status, content_type, text.encode())

    def _send_json(self, status: int, value: Any, content_type: str = _JSON) -> None:
        self._send_bytes(status, content_type, go_json(value))

    def _send_error(self, status: int, message: str, content_type: str | None = None) -> None:
        self._send_json(status, {"error": message}, content_type or _JSON)

    def _chunk(self, data: bytes, *, first: bool = False) -> None:
        head = self._head(200, "application/x-ndjson", None) if first else b""
        self.wfile.write(head + b"%x\r\n%s\r\n" % (len(data), data))

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")

    def _drop(self) -> None:
        """Close the socket in the middle of the body: no terminating chunk."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _bind(self, request: RecordedRequest) -> dict[str, Any] | None:
        """The JSON body, or None after answering 400 as gin's ShouldBindJSON does."""
        if not request.body.strip():
            self._send_error(400, "missing request body")
            return None
        if request.json is None:
            text = request.body.decode(errors="replace").lstrip()
            self._send_error(400, f"invalid character '{text[:1]}' looking for beginning of value")
            return None
        if not isinstance(request.json, dict):
            kind = "array" if isinstance(request.json, list) else "string"
            message = f"json: cannot unmarshal {kind} into Go value of type api.Request"
            self._send_error(400, message)
            return None
        return request.json

    # endpoints
    def _root(self, request: RecordedRequest) -> None:
        self._send_text(200, "Ollama is running", "text/plain; charset=utf-8")

    def _version(self, request: RecordedRequest) -> None:
        self._send_json(200, {"version": self.fake.version})

    def _tags(self, request: RecordedRequest) -> None:
        models = sorted(self.fake.models.values(), key=lambda m: m.modified_at, reverse=True)
        self._send_json(200, {"models": [model.tags_entry() for model in models]})

    def _ps(self, request: RecordedRequest) -> None:
        expires = rfc3339_nano(time.time_ns() + 300 * 1_000_000_000)
        entries = []
        for name in sorted(self.fake.loaded):
            if (model := self.fake.models.get(name)) is None:
                continue
            entry = model.tags_entry()
            del entry["modified_at"]
            entry |= {"expires_at": expires, "size_vram": 0, "context_length": model.context_length}
            entries.append(entry)
        self._send_json(200, {"models": entries})

    def _show(self, request: RecordedRequest) -> None:
        body = self._bind(request)
        if body is None:
            return
        name = body.get("model") or body.get("name") or ""
        if not name:
            self._send_error(400, "model is required")
            return
        model = self.fake.find_model(name)
        if model is None:
            self._send_error(404, f"model '{name}' not found")
            return
        self._send_json(200, model.show_body())

    def _chat(self, request: RecordedRequest) -> None:
        body = self._bind(request)
        if body is None or not self._chat_request_ok(body):
            return
        name = body["model"]
        model = self.fake.find_model(name)
        script = self.fake.next_script(request) if model is not None else None
        if script is not None and script.fault == "model_gone":
            self.fake.remove_model(name)
            model = None
        if model is None or script is None:
            self._send_error(404, f"model '{name}' not found")
            return
        if error := _option_error(body.get("options") or {}):
            self._send_error(500, error)
            return
        if not body.get("messages"):
            self._send_json(200, self._chat_chunk(name, "", done=True) | {"done_reason": "load"})
            return
        if script.fault == "stall" and self.fake.stopping.wait(min(script.stall_s, MAX_STALL_S)):
            self.close_connection = True
            return
        if script.fault == "http_error":
            self._send_error(script.status, script.error)
            return
        self.fake.loaded.add(model.name)
        stream = body.get("stream", True) is not False
        if error := self._prompt_error(model, body["messages"]):
            self._send_error(500, error)
            return
        if error := self._runner_error(model, body):
            # The runner's completion fails before any chunk: streamResponse answers the
            # status with a bare application/json; a whole answer goes through c.JSON.
            self._send_error(500, error, "application/json" if stream else None)
            return
        if stream:
            self._chat_stream(name, script)
        else:
            self._chat_whole(name, script)

    def _prompt_error(self, model: ModelSpec, messages: list[dict[str, Any]]) -> str | None:
        """What server/prompt.go refuses while it builds the prompt."""
        for message in messages:
            if "mllama" in (model.families or []) and len(message.get("images") or []) > 1:
                return MLLAMA_ONE_IMAGE
        return None

    def _runner_error(self, model: ModelSpec, body: dict[str, Any]) -> str | None:
        """What the runner's completion refuses: the format, then the pictures."""
        if error := _format_error(body.get("format")):
            return error
        pictures = any(message.get("images") for message in body["messages"])
        if pictures and not model.vision and model.family in BUILT_IN_VISION:
            return NO_VISION_RUNNER
        return None  # a plain text model just ignores the pictures

    def _chat_request_ok(self, body: dict[str, Any]) -> bool:
        """Refuse what the real server refuses before it looks at the model."""
        if not body.get("model"):
            self._send_error(400, "model is required")
            return False
        for message in body.get("messages") or []:
            for image in message.get("images") or []:
                if error := _base64_error(str(image)):
                    self._send_error(400, error)
                    return False
        return True

    def _chat_chunk(self, name: str, content: str, *, done: bool) -> dict[str, Any]:
        return {
            "model": name,
            "created_at": rfc3339_nano(),
            "message": {"role": "assistant", "content": content},
            "done": done,
        }

    def _final_chunk(self, name: str, script: Script, content: str = "") -> dict[str, Any]:
        chunk = self._chat_chunk(name, content, done=True)
        del chunk["done"]
        return chunk | {"done_reason": script.done_reason, "done": True} | script.metrics()

    def _chat_stream(self, name: str, script: Script) -> None:
        midstream = script.fault in ("error_line", "bad_line", "drop")
        if script.fault == "error_line" and script.after == 0:
            self._send_error(script.status, script.error, "application/json")
            return
        sent = 0
        for piece in script.pieces:
            if midstream and sent == script.after:
                break
            if sent and script.piece_delay_s and self.fake.stopping.wait(script.piece_delay_s):
                self._drop()
                return
            self._chunk(go_json(self._chat_chunk(name, piece, done=False)) + b"\n", first=not sent)
            sent += 1
        if midstream:
            self._midstream_fault(script, first=not sent)
            return
        final = self._final_chunk(name, script, script.final_content)
        self._chunk(go_json(final) + b"\n", first=not sent)
        self._end_chunks()

    def _midstream_fault(self, script: Script, *, first: bool) -> None:
        if script.fault == "drop":
            if first:
                self.wfile.write(self._head(200, "application/x-ndjson", None))
            self._drop()
            return
        line = go_json({"error": script.error}) + b"\n"
        if script.fault == "bad_line":
            line = script.bad_line
        self._chunk(line, first=first)
        self._end_chunks()

    def _chat_whole(self, name: str, script: Script) -> None:
        if script.fault == "error_line":
            self._send_error(script.status, script.error)
            return
        if script.fault == "bad_line":
            self._send_bytes(200, _JSON, script.bad_line)
            return
        content = "".join(script.pieces) + script.final_content
        data = go_json(self._final_chunk(name, script, content))
        if script.fault == "drop":
            self.wfile.write(self._head(200, _JSON, len(data)))
            self.wfile.write(data[: len(data) // 2])
            self._drop()
            return
        self._send_bytes(200, _JSON, data)

    def _pull(self, request: RecordedRequest) -> None:
        body = self._bind(request)
        if body is None:
            return
        name = body.get("model") or body.get("name") or ""
        if not name:
            self._send_error(400, "invalid model name")
            return
        spec = self.fake.registry.get(canonical_name(name)) or self.fake.find_model(name)
        updates: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        error = _NO_MANIFEST if spec is None else spec.pull_error
        if spec is not None:
            progress = list(_pull_progress(spec))
            # A failing download stops after its first blob's first two lines.
            updates += progress[:2] if spec.pull_error else progress
        if body.get("stream", True) is False:
            if error is not None:
                self._send_error(500, error, "application/json")
            else:
                assert spec is not None
                self.fake.models[spec.name] = spec
                self._send_json(200, updates[-1], "application/json")
            return
        for index, update in enumerate(updates):
            self._chunk(go_json(update) + b"\n", first=index == 0)
        if error is not None:
            self._chunk(go_json({"error": error}) + b"\n")
        elif spec is not None:
            self.fake.models[spec.name] = spec
        self._end_chunks()


def _pull_progress(spec: ModelSpec) -> Iterator[dict[str, Any]]:
    """The progress lines of a pull: per blob a first line without ``completed``, then
    partial and full; then verification and success."""
    for digest, total in spec.layers():
        status = f"pulling {digest[7:19]}"
        yield {"status": status, "digest": digest, "total": total}
        for completed in (total // 3, total):
            yield {"status": status, "digest": digest, "total": total, "completed": completed}
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    yield {"status": "success"}


_Endpoint = Callable[[_Handler, RecordedRequest], None]
_ROUTES: dict[str, dict[str, _Endpoint]] = {
    "/": {"GET": _Handler._root, "HEAD": _Handler._root},
    "/api/version": {"GET": _Handler._version, "HEAD": _Handler._version},
    "/api/tags": {"GET": _Handler._tags, "HEAD": _Handler._tags},
    "/api/ps": {"GET": _Handler._ps},
    "/api/show": {"POST": _Handler._show},
    "/api/chat": {"POST": _Handler._chat},
    "/api/pull": {"POST": _Handler._pull},
}


# --- fixtures ------------------------------------------------------------------------


def free_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, read, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _running_daemon() -> Iterator[OllamaServer]:
    """A stand-in daemon with one vision model, ``llava:latest``, until it is closed;
    then an AssertionError if the server itself hit an unexpected error."""
    server = OllamaServer()
    server.add_model("llava")
    try:
        yield server
    finally:
        server.stop()
    assert not server.errors, f"the stand-in daemon failed: {server.errors!r}"


@pytest.fixture
def ollama_server() -> Iterator[OllamaServer]:
    """A running stand-in daemon with ``llava:latest``, the test's own."""
    yield from _running_daemon()


@pytest.fixture(scope="module")
def ollama_daemon() -> Iterator[OllamaServer]:
    """A running stand-in daemon with ``llava:latest`` shared by a module's tests, for a
    server or page started once per module in front of it."""
    yield from _running_daemon()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens: connecting to it is refused."""
    return free_port()
