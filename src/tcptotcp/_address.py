"""Addresses as the forwarder's command line writes them: ``host:port``, ``[v6addr]:port``,
``unix:/path``; parsed once, and formatted back for logs."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, Tuple, Union

SockAddr = Union[Tuple[str, int], Tuple[str, int, int, int], Tuple[int, bytes], str]


@dataclass(frozen=True)
class Address:
    """A parsed ``host:port``, ``[v6addr]:port`` or ``unix:/path``."""

    family: int
    sockaddr: SockAddr
    text: str
    weight: int = 1  # an upstream's, for balancing (see parse_upstream)

    @classmethod
    def parse_upstream(cls, text: str) -> Address:
        """An upstream: an address with an optional weight, ``HOST:PORT@W``."""
        address, weight = split_weight(text)
        parsed = cls.parse(address)
        return parsed if weight == 1 else cls(parsed.family, parsed.sockaddr, parsed.text, weight)

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
            family, _, _, _, sockaddr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE if passive else 0
            )[0]
        except socket.gaierror as exc:
            raise ValueError(f"{text!r}: cannot resolve {host!r} ({exc.strerror})") from None
        return cls(family, sockaddr, text)


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
