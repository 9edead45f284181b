"""Addresses as the forwarder's command line writes them: ``host:port``, ``[v6addr]:port``,
``unix:/path``; parsed once, and formatted back for logs."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, List, Sequence, Tuple, Union

SockAddr = Union[Tuple[str, int], Tuple[str, int, int, int], Tuple[int, bytes], str]
#: Where a socket connects: (family, sockaddr).
Where = Tuple[int, Any]


@dataclass(frozen=True)
class Address:
    """A parsed ``host:port``, ``[v6addr]:port`` or ``unix:/path``."""

    family: int
    sockaddr: SockAddr
    text: str
    weight: int = 1  # an upstream's, for balancing (see parse_upstream)
    # Every address the host resolved to when parsed, deduplicated, in `ordered()`'s order: the
    # candidates of an upstream written as a name (see _resolve). Empty for an Address made
    # by hand, and for a name that did not resolve (family AF_UNSPEC, see parse_upstream).
    resolved: Tuple[Where, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def parse_upstream(cls, text: str, *, strict: bool = True) -> Address:
        """An upstream: an address with an optional weight, ``HOST:PORT@W``.

        Not `strict`: a host name that does not resolve (yet) is no error but an Address of
        family AF_UNSPEC, its sockaddr ``(host, port)``, for a forward that looks it up again."""
        address, weight = split_weight(text)
        try:
            parsed = cls.parse(address)
        except UnresolvedName as exc:
            if strict:
                raise
            parsed = cls(socket.AF_UNSPEC, (exc.host, exc.port), address)
        if weight == 1:
            return parsed
        return cls(parsed.family, parsed.sockaddr, parsed.text, weight, parsed.resolved)

    @property
    def unresolved(self) -> bool:
        """A host name without an address (yet): see parse_upstream(strict=False)."""
        return self.family == socket.AF_UNSPEC

    @classmethod
    def parse(cls, text: str, *, passive: bool = False) -> Address:
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ValueError(f"{text!r}: unix: needs a path")
            return cls(socket.AF_UNIX, path, text)
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{text!r}: expected host:port, [v6addr]:port or unix:/path")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8080")
        try:
            port = int(port_text, 10)
        except ValueError:
            raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"{text!r}: port {port} is out of range")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0)
        except socket.gaierror as exc:
            raise UnresolvedName(text, host, port, exc.strerror or str(exc)) from None
        if not infos:  # (not seen from a libc, but then it is no address either)
            raise UnresolvedName(text, host, port, "no address")
        family, _, _, _, sockaddr = infos[0]
        return cls(family, sockaddr, text, 1, ordered([(info[0], info[4]) for info in infos]))


class UnresolvedName(ValueError):
    """A host name that getaddrinfo() could not resolve: ``str()`` is the message."""

    def __init__(self, text: str, host: str, port: int, why: str) -> None:
        self.host = host
        self.port = port
        super().__init__(f"{text!r}: cannot resolve {host!r} ({why})")


def ordered(found: Sequence[Where]) -> Tuple[Where, ...]:
    """getaddrinfo()'s (family, sockaddr) results without duplicates, in an order that does not
    depend on the order of the answer (DNS servers rotate it): the family getaddrinfo put first
    (the system's preference, RFC 6724) before the other, then by address. Unix paths and
    other families keep their place after those."""
    unique: List[Where] = []
    for where in found:
        if where not in unique:
            unique.append(where)
    ip = [w for w in unique if w[0] in (socket.AF_INET, socket.AF_INET6)]
    if not ip:
        return tuple(unique)
    preferred = ip[0][0]

    def key(where: Where) -> Tuple[bool, bytes, Any]:
        family, sockaddr = where
        return (family != preferred, socket.inet_pton(family, sockaddr[0].partition("%")[0]), sockaddr[1:])

    return tuple(sorted(ip, key=key)) + tuple(w for w in unique if w not in ip)


MAX_WEIGHT = 1000  # an upstream's weight: 1 to this (the loops' T2T_MAX_WEIGHT)


def split_weight(text: str) -> Tuple[str, int]:
    """An upstream's ``HOST:PORT@W`` as its address and weight W (1 to 1000); 1 without ``@W``."""
    address, sep, weight_text = text.rpartition("@")
    if not sep or not weight_text.isdigit() or not address:
        return text, 1
    weight = int(weight_text)
    if not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f"{text!r}: weight {weight} is out of range (1 to {MAX_WEIGHT})")
    return address, weight


def format_sockaddr(family: int, sockaddr: Any) -> str:
    if family == socket.AF_UNIX:
        return f"unix:{sockaddr}" if sockaddr else "unix:(unnamed)"
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]:{sockaddr[1]}"
    return f"{sockaddr[0]}:{sockaddr[1]}"
