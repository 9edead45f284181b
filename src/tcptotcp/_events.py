"""What a listener reports (docs/contract.md, "The listener"): one record type per event.

Both listener implementations (the loops' ``_core.Listener`` and the pure ``_listener``) give
these from ``take()``; the forwarder's recorder turns each into stats, metrics and a log line.
A client is accepted once and ends in exactly one of `Ended`, `Refused`, `Unserved` and `Dropped`;
`Opened` comes before its `Ended` unless the two happened between the same two takes, in which
case `Ended.announced` is False and the `Opened` is not given. `UpstreamFailed` is one failed
connect attempt (a client may fail over several upstreams before it is served).
"""

from __future__ import annotations

import socket
from typing import Any, NamedTuple, Optional, Tuple

from ._address import format_sockaddr

#: Why a client was refused, in the words of the log and the ``refused`` event.
NOT_ALLOWED = "not allowed by --allow/--deny"
PROXY_TOO_LONG = "PROXY header too long"
PROXY_LATE = "no complete PROXY header in time"
PROXY_CLOSED = "closed before its PROXY header ended"
PROXY_BAD = "bad PROXY header: {}"
PROXY_NOT_READ = "PROXY header not read: {}"
PER_CLIENT = "per-client limit"
RATE_LIMITED = "rate limit"
CLIENTS_FULL = "client table full"
BRIDGE_NOT_STARTED = "bridge not started: {}"
HELLO_BAD = "bad ClientHello: {}"
HELLO_LATE = "no complete ClientHello in time"
HELLO_CLOSED = "closed before its ClientHello ended"
HELLO_NOT_READ = "ClientHello not read: {}"
NO_ROUTE = "no route for server name {}"
TLS_FAILED = "TLS handshake failed: {}"


def no_route(name: Optional[str]) -> str:
    """The refusal of a --route-sni-strict forward's client whose server name no route takes."""
    return NO_ROUTE.format(repr(name) if name else "(none)")


# A refusal's kind, for the metrics' reason label: a few fixed values, whatever the details.
_KINDS = {NOT_ALLOWED: "access", PER_CLIENT: PER_CLIENT, RATE_LIMITED: RATE_LIMITED, CLIENTS_FULL: CLIENTS_FULL}
_KIND_PREFIXES = (
    (PROXY_BAD.partition("{")[0], "proxy header"),
    (PROXY_NOT_READ.partition("{")[0], "proxy header"),
    (BRIDGE_NOT_STARTED.partition("{")[0], "bridge not started"),
    (HELLO_BAD.partition("{")[0], "client hello"),
    (HELLO_NOT_READ.partition("{")[0], "client hello"),
    (NO_ROUTE.partition("{")[0], "no route"),
    (TLS_FAILED.partition("{")[0], "tls handshake"),
)


class Peer:
    """A client's address (the PROXY header's source once one was read), formatted only if a
    log line is written."""

    __slots__ = ("family", "sockaddr")

    def __init__(self, family: int, sockaddr: Any) -> None:
        self.family = family
        self.sockaddr = sockaddr

    def __str__(self) -> str:
        return format_sockaddr(self.family, self.sockaddr)

    @property
    def host(self) -> Any:
        """The host part, for access lists (None for a client without an IP address)."""
        if self.family in (socket.AF_INET, socket.AF_INET6):
            return self.sockaddr[0]
        return None


class Opened(NamedTuple):
    """A client's bridge started relaying. `relay` has ``stop()`` and ``counts()``; `tls`
    what its TLS sides negotiated (``_tls.TlsInfo``), None for a plaintext bridge."""

    conn_id: int
    peer: Peer
    upstream: str
    relay: Any
    tls: Any = None


class Ended(NamedTuple):
    """An opened bridge ended; `announced` is False when its `Opened` was never given."""

    conn_id: int
    peer: Peer
    upstream: str
    bytes_up: int
    bytes_down: int
    reason: str
    seconds: float
    announced: bool
    tls: Any = None  # its Opened's, when that was not given (announced False)


class Refused(NamedTuple):
    """Closed before anything was connected upstream: `why` is one of the texts above."""

    conn_id: int
    peer: Peer
    why: str

    @property
    def kind(self) -> str:
        """What kind of refusal: access, per-client limit, rate limit, client table full, proxy
        header, bridge not started."""
        kind = _KINDS.get(self.why)
        if kind is not None:
            return kind
        if self.why in (PROXY_TOO_LONG, PROXY_LATE, PROXY_CLOSED):
            return "proxy header"
        if self.why in (HELLO_LATE, HELLO_CLOSED):
            return "client hello"
        for prefix, kind in _KIND_PREFIXES:
            if self.why.startswith(prefix):
                return kind
        return "other"


class TlsFailed(NamedTuple):
    """A TLS handshake failed: with the client (`side` "client": it is then refused) or with
    the upstream ("upstream": an `UpstreamFailed` follows). `reason` is the metrics' label
    (``_tls.FAILURE_REASONS`` or "other"), `error` the words of the log."""

    conn_id: int
    peer: Peer
    side: str
    reason: str
    error: str


class UpstreamFailed(NamedTuple):
    """One connect attempt to `upstream` failed; the client goes on to the next one, if any.
    `marked_down`: this failure was the forward's ``max_fails``-th within ``fail_window``, and
    the upstream is skipped for ``upstream_backoff`` seconds (unless every upstream is)."""

    conn_id: int
    peer: Peer
    upstream: str
    error: OSError
    marked_down: bool = False


class Unserved(NamedTuple):
    """Every upstream failed the client (each one reported as `UpstreamFailed`); it was closed."""

    conn_id: int
    peer: Peer
    upstreams: int  # how many the forward had


class Dropped(NamedTuple):
    """Given up on by a cancelling stop while its header was read or its upstream connected."""

    conn_id: int
    peer: Peer


class AcceptPaused(NamedTuple):
    """accept() ran out of a resource (EMFILE, ENFILE, ENOBUFS, ENOMEM): the listener accepts
    again after `seconds` instead of spinning on a ready socket. Not about one client."""

    error: OSError
    seconds: float


class Gone(NamedTuple):
    """With ``take(brief=True)``: bridges that opened and ended between two takes, summed up."""

    bridges: int
    bytes_up: int
    bytes_down: int


Counts = Tuple[int, int]
