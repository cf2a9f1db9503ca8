"""A stand-in Hugging Face Hub: real HTTP/1.1 servers on 127.0.0.1, for download tests.

Why: ``huggingface_hub.hf_hub_download`` must be tested through its own HTTP code,
against what the real Hub sends, including a connection that drops half-way. It is
pointed here with ``endpoint=`` (or ``HF_ENDPOINT`` in a subprocess). What it answers,
as the Hub does for a model repository (see ``huggingface_hub/file_download.py``,
``get_hf_file_metadata`` and ``http_get``, and ``utils/_http.py``,
``hf_raise_for_status``):

- ``HEAD|GET /{repo}/resolve/{revision}/{file}`` on the *hub* server:
  for an LFS file (the default, as every GGUF is) ``302 Found`` to the *CDN* server,
  a second server on another port, so another origin, as the real CDN is: the client
  then takes the file's metadata from this redirect: ``X-Repo-Commit`` (the commit),
  ``X-Linked-Etag`` (the sha256, which names the blob in the cache), ``X-Linked-Size``,
  and ``ETag`` (the git oid of the LFS pointer). A small non-LFS file is served
  directly with ``200``, its git blob sha1 as ``ETag``.
- ``GET|HEAD /blobs/{sha256}`` on the CDN: the bytes, ``Accept-Ranges: bytes``;
  ``Range: bytes=N-`` gets ``206 Partial Content`` with ``Content-Range``, which is
  how the client resumes a dropped download.
- Errors with the Hub's ``X-Error-Code``: ``401 RepoNotFound`` (the Hub's answer to
  an unknown repository when not logged in), ``404 RevisionNotFound``, ``404
  EntryNotFound`` (with ``X-Repo-Commit``, which the client caches as "no such file").

No ``X-Xet-*`` headers are sent, so the client downloads over plain HTTP.

Faults: ``hub.drop_after(filename, nbytes)`` makes the next CDN GET of that file
declare the whole length, send ``nbytes`` and close the socket.
``requests`` records every request (server role, method, path, lower-cased headers).
"""

from __future__ import annotations

import contextlib
import hashlib
import http
import json
import re
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest

from llava_local.catalog import CatalogEntry

Role = Literal["hub", "cdn"]
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_BLOB = re.compile(r"^/blobs/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(?P<start>\d+)-(?P<end>\d*)$")


def prefill(cache: Path, entry: CatalogEntry, files: dict[str, bytes]) -> str:
    """Write files into ``cache`` the way huggingface_hub lays them out; returns the commit."""
    org, name = str(entry.hf_repo).split("/")
    repo = cache / f"models--{org}--{name}"
    commit = hashlib.sha1(name.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for filename, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = repo / "snapshots" / commit / filename
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(Path("..", "..", "blobs", sha))
    return commit


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data``: what the Hub sends as a small file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git LFS pointer that stands for ``data`` in the repository."""
    sha = hashlib.sha256(data).hexdigest()
    return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
        sha.encode(),
        len(data),
    )


@dataclass(frozen=True)
class HubFile:
    """One file of a repository as the Hub describes it."""

    data: bytes
    lfs: bool = True

    @property
    def sha256(self) -> str:
        """The LFS object id, which the client uses to name the cached blob."""
        return hashlib.sha256(self.data).hexdigest()

    @property
    def etag(self) -> str:
        """The git oid: of the pointer for LFS files, of the content otherwise."""
        return git_blob_sha1(lfs_pointer(self.data) if self.lfs else self.data)


@dataclass
class HubRepo:
    """A model repository with one branch, ``main``."""

    repo_id: str
    files: dict[str, HubFile] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        """A stable 40-hex commit id that changes with the content."""
        digest = hashlib.sha1(self.repo_id.encode())
        for name in sorted(self.files):
            digest.update(name.encode() + self.files[name].etag.encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class HubRequest:
    """One request as a server received it."""

    role: Role
    method: str
    path: str
    headers: dict[str, str]


class HubServer:
    """The Hub and its CDN; ``url`` is the endpoint to give ``huggingface_hub``."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[HubRequest] = []
        self.errors: list[BaseException] = []
        self._drops: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._servers = {role: _Server(self, role) for role in ("hub", "cdn")}
        self.url = self._servers["hub"].url
        self.cdn_url = self._servers["cdn"].url
        self._threads = [
            threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
            for s in self._servers.values()
        ]
        for thread in self._threads:
            thread.start()

    def add_file(self, repo_id: str, filename: str, data: bytes, *, lfs: bool = True) -> HubFile:
        """Publish ``data`` as ``filename`` on the main branch of ``repo_id``."""
        repo = self.repos.setdefault(repo_id, HubRepo(repo_id))
        repo.files[filename] = HubFile(data, lfs)
        return repo.files[filename]

    def drop_after(self, filename: str, nbytes: int) -> None:
        """The next CDN download of ``filename`` breaks off after ``nbytes`` bytes."""
        with self._lock:
            self._drops.setdefault(filename, []).append(nbytes)

    def take_drop(self, filename: str) -> int | None:
        """The byte count where this download should break off, if one is scripted."""
        with self._lock:
            queue = self._drops.get(filename)
            return queue.pop(0) if queue else None

    def requests_for(self, role: Role, method: str | None = None) -> list[HubRequest]:
        """Recorded requests to one server (and method), oldest first."""
        return [
            r for r in self.requests if r.role == role and (method is None or r.method == method)
        ]

    def blob(self, sha256: str) -> tuple[str, HubFile] | None:
        """The file (and its name) whose content has this sha256."""
        for repo in self.repos.values():
            for name, hub_file in repo.files.items():
                if hub_file.sha256 == sha256:
                    return name, hub_file
        return None

    def stop(self) -> None:
        """Stop both servers and close their sockets."""
        for server in self._servers.values():
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """Binds 127.0.0.1 on a free port without a DNS lookup of the host name."""

    daemon_threads = True

    def __init__(self, hub: HubServer, role: Role) -> None:
        self.hub = hub
        self.role: Role = role
        super().__init__(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]
        self.server_activate()
        self.url = f"http://127.0.0.1:{self.server_port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if error is not None and not isinstance(error, OSError):
            self.hub.errors.append(error)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        headers = {key.lower(): value for key, value in self.headers.items()}
        self.server.hub.requests.append(HubRequest(self.server.role, self.command, path, headers))
        if self.server.role == "hub":
            self._resolve(path)
        else:
            self._cdn(path)

    do_HEAD = do_GET

    # the hub
    def _resolve(self, path: str) -> None:
        match = _RESOLVE.match(path)
        repo = self.server.hub.repos.get(match["repo"]) if match else None
        if match is None or repo is None:
            self._error(401, "RepoNotFound", "Repository not found")
            return
        if match["rev"] not in ("main", repo.commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {match['rev']}")
            return
        hub_file = repo.files.get(match["file"])
        if hub_file is None:
            self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": repo.commit})
            return
        meta = {"X-Repo-Commit": repo.commit, "ETag": f'"{hub_file.etag}"'}
        if not hub_file.lfs:
            self._send(200, {**meta, "Accept-Ranges": "bytes"}, hub_file.data)
            return
        location = f"{self.server.hub.cdn_url}/blobs/{hub_file.sha256}?expires=never"
        meta |= {
            "Location": location,
            "X-Linked-Etag": f'"{hub_file.sha256}"',
            "X-Linked-Size": str(len(hub_file.data)),
        }
        self._send(302, meta, f"Found. Redirecting to {location}".encode(), "text/plain")

    def _error(
        self, status: int, code: str, message: str, extra: dict[str, str] | None = None
    ) -> None:
        body = json.dumps({"error": message}).encode()
        headers = {"X-Error-Code": code, "X-Error-Message": message, **(extra or {})}
        self._send(status, headers, body, "application/json; charset=utf-8")

    # the CDN
    def _cdn(self, path: str) -> None:
        match = _BLOB.match(path)
        found = self.server.hub.blob(match["sha"]) if match else None
        if found is None:
            self._send(404, {}, b"NoSuchKey", "text/plain")
            return
        name, hub_file = found
        data, size = hub_file.data, len(hub_file.data)
        headers = {"ETag": f'"{hub_file.sha256}"', "Accept-Ranges": "bytes"}
        status, start = 200, 0
        wanted = _RANGE.match(self.headers.get("Range", ""))
        if wanted is not None:
            start = int(wanted["start"])
            end = int(wanted["end"]) if wanted["end"] else size - 1
            if start >= size or end < start:
                self._send(416, {"Content-Range": f"bytes */{size}"}, b"", "text/plain")
                return
            data = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{start + len(data) - 1}/{size}"
        drop = self.server.hub.take_drop(name) if self.command == "GET" else None
        if drop is None:
            self._send(status, headers, data, "application/octet-stream")
            return
        self.wfile.write(self._head(status, headers, len(data), "application/octet-stream"))
        self.wfile.write(data[:drop])
        self.wfile.flush()
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    # writing
    def _head(self, status: int, headers: dict[str, str], length: int, content_type: str) -> bytes:
        phrase = http.HTTPStatus(status).phrase
        lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}"]
        lines += [f"{key}: {value}" for key, value in headers.items()]
        lines += [f"Date: {self.date_time_string()}", f"Content-Length: {length}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        content_type: str = "application/octet-stream",
    ) -> None:
        head = self._head(status, headers, len(body), content_type)
        self.wfile.write(head if self.command == "HEAD" else head + body)


@pytest.fixture
def hub_server() -> Iterator[HubServer]:
    """A running stand-in Hub (and CDN), stopped after the test, which fails if the
    servers themselves hit an unexpected error."""
    server = HubServer()
    try:
        yield server
    finally:
        server.stop()
    assert not server.errors, f"the stand-in Hub failed: {server.errors!r}"
