"""Which names a web server on this machine answers to in a request's ``Host`` header:
the check against DNS rebinding that both of the package's servers make, ``serve``'s
API (``apps/serve/middleware.py``) and the ``ui`` page (``apps/ui_access.py``).

DNS rebinding: a web page whose name its owner points at 127.0.0.1 reaches a server on
the visitor's machine as its own origin, so the browser lets it read the answers. The
request still names the page's host in ``Host``, which is what this refuses. Each
server answers a refusal in its own shape; the names and the words are shared here.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

__all__ = ["LOCAL_NAMES", "HostNames", "host_of", "is_loopback", "refusal", "shown"]

#: Names that always mean this machine, whatever the bind: ``*.localhost`` resolves to
#: loopback by RFC 6761, and ``host.docker.internal`` is how a container (Open WebUI in
#: Docker) names its host; ``.internal`` names are never in public DNS, so no web page
#: can point one at this server.
LOCAL_NAMES = frozenset({"localhost", "host.docker.internal"})


def is_loopback(bind: str) -> bool:
    """Whether serving on ``bind`` reaches only this machine."""
    name = bind.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostNames:
    """The names a server answers to in a request's ``Host`` header.

    For a loopback bind: ``localhost`` (and ``*.localhost``), loopback addresses and
    ``host.docker.internal``; beyond loopback also any IP address, this machine's host
    names and the name it was bound on. Plus the ``allowed`` names (``--allow-host``):
    exact names, ``*.example.com`` for any name under it, or ``*`` for any name at all."""

    def __init__(self, bind: str, allowed: Sequence[str] = ()) -> None:
        wanted = [name.strip().lower().rstrip(".") for name in allowed if name.strip()]
        self.anything = "*" in wanted
        self.suffixes = tuple(name[1:] for name in wanted if name.startswith("*."))
        self.names = {host_of(name) for name in wanted if not name.startswith("*")}
        self.names |= LOCAL_NAMES
        self.loopback = is_loopback(bind)
        if not self.loopback:
            mine = (socket.gethostname(), socket.getfqdn(), bind.strip().strip("[]"))
            self.names |= {host_of(name) for name in mine}

    def allows(self, header: str) -> bool:
        """Whether a request with this ``Host`` header is answered (one without a
        ``Host``, which no browser sends, is)."""
        if self.anything or not header:
            return True
        name = host_of(header)
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return name in self.names or name.endswith(".localhost") or name.endswith(self.suffixes)
        if _loopback_address(address):
            return True
        return not self.loopback or str(address) in self.names

    def known(self, header: str) -> bool:
        """Whether ``header`` names this server by a name it was given or has: as
        :meth:`allows`, less what admits a name unseen (``*``, and any IP address
        beyond loopback), and never an empty one. What a web page's ``Origin`` is held
        to: a ``Host`` header says which name a request was sent to, an ``Origin``
        where it was sent from, and an address that is not this machine's may be
        anyone's."""
        name = host_of(header)
        if not name:
            return False
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            return name in self.names or name.endswith(".localhost") or name.endswith(self.suffixes)
        return _loopback_address(address) or str(address) in self.names


def _loopback_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def host_of(header: str) -> str:
    """The host of a ``Host`` header (or a name), without port, brackets or final dot."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    try:
        return str(ipaddress.ip_address(text))  # a bare IPv6 address: no port to split
    except ValueError:
        pass
    name = text.rpartition(":")[0] if ":" in text else text
    return name.rstrip(".")


def shown(header: str) -> str:
    """The host of a refused ``Host`` header as a message may repeat it: printable
    characters only, at most 100 of them."""
    return "".join(c for c in host_of(header) if c.isprintable())[:100]


def refusal(header: str, *, server: str, command: str) -> str:
    """What a request refused for its ``Host`` header is told: the name it used, why,
    and the option that admits the name (``server`` says what refuses, ``command``
    what to start with that option)."""
    name = shown(header)
    return (
        f"{server} does not answer to the name {name!r} (the request's Host header), so "
        "that a web page cannot reach it by pointing its own name at this machine (DNS "
        f"rebinding); to use that name, start {command} with --allow-host {name}"
    )
