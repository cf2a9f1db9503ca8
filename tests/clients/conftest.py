"""One ``llava-local serve`` subprocess (the bundled demo model) for every client test
of the session, behind a recording proxy (:mod:`.recorder`) that keeps each request's
shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..serve_process import Server, start, stop
from .recorder import Recorder


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-clients") / "server.log"
    running = start(log, "--parallel", "1")
    yield running
    stop(running)


@pytest.fixture(scope="session")
def recorder(served: Server) -> Iterator[Recorder]:
    """The proxy clients are pointed at: it forwards to ``served`` and records."""
    proxy = Recorder(served.url)
    yield proxy
    proxy.close()
