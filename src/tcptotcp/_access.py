"""Client access lists (``--allow`` / ``--deny``): which client addresses a forward serves.

Entries are parsed once into (network, mask) integer pairs per family, so the check made
for every accepted client is an ``inet_pton`` and a few integer comparisons, not an
``ipaddress`` object per client.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable, List, Optional, Sequence, Tuple, TypeVar, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
_N = TypeVar("_N", ipaddress.IPv4Network, ipaddress.IPv6Network)

# ::ffff:0:0/96: an IPv4-mapped IPv6 address is the IPv4 host it carries.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_MAPPED_PREFIX = _MAPPED.network_address.packed[:12]

_Masks = Tuple[Tuple[int, int], ...]  # (network address, netmask) as integers


def parse_network(text: str) -> Network:
    """One entry: a CIDR network or a single address (a /32 or /128).

    Host bits set (``10.0.0.1/8``) are an error rather than silently widened: in an access
    list a typo for ``/32`` would otherwise open the whole network.
    """
    if not isinstance(text, str):
        raise TypeError(f"a network must be a string, not {type(text).__name__}")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        try:
            wide = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"invalid network {text!r}") from None
        raise ValueError(f"invalid network {text!r}: host bits set (the network is {wide})") from None
    if isinstance(network, ipaddress.IPv6Network) and network.network_address.scope_id:
        # Matching compares addresses only: a zone in the entry would be silently ignored.
        raise ValueError(f"invalid network {text!r}: zone ids are not supported")
    return network


def _as_ipv4(network: Network) -> Optional[ipaddress.IPv4Network]:
    """An entry as an IPv4 network: itself, or an IPv6 entry written in mapped form.

    A wider IPv6 network (``::/0``) is not taken to cover IPv4: it means IPv6 hosts, and a
    mapped client is an IPv4 host.
    """
    if isinstance(network, ipaddress.IPv4Network):
        return network
    if not network.subnet_of(_MAPPED):
        return None
    low = int(network.network_address) & 0xFFFFFFFF
    return ipaddress.IPv4Network((low, network.prefixlen - _MAPPED.prefixlen))


def _masks(networks: Iterable[_N]) -> _Masks:
    # collapse_addresses merges overlapping and adjacent entries: fewer comparisons per client.
    return tuple((int(n.network_address), int(n.netmask)) for n in ipaddress.collapse_addresses(networks))


def _split(networks: Sequence[Network]) -> Tuple[_Masks, _Masks]:
    """(IPv4 masks, IPv6 masks); entries in mapped form count as IPv4 (see _host_key)."""
    v4: List[ipaddress.IPv4Network] = []
    v6: List[ipaddress.IPv6Network] = []
    for network in networks:
        if isinstance(network, ipaddress.IPv6Network) and not network.subnet_of(_MAPPED):
            v6.append(network)
        as_v4 = _as_ipv4(network)
        if as_v4 is not None:
            v4.append(as_v4)
    return _masks(v4), _masks(v6)


def _host_key(host: str) -> Optional[Tuple[int, bool]]:
    """(address as an integer, is IPv6); a mapped address becomes its IPv4 host; None if
    `host` is not an IP address."""
    try:
        if ":" not in host:
            return int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big"), False
        packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    except (OSError, ValueError, TypeError):
        return None
    if packed[:12] == _MAPPED_PREFIX:
        return int.from_bytes(packed[12:], "big"), False
    return int.from_bytes(packed, "big"), True


def _inside(address: int, masks: _Masks) -> bool:
    for network, mask in masks:
        if address & mask == network:
            return True
    return False


def _as_entries(values: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    # A lone string is one entry, not a sequence of one-character entries.
    return (values,) if isinstance(values, str) else tuple(values)


class AccessList:
    """Allow and deny networks; deny wins, and any allow entry makes the list closed.

    ``permits(host)``: with no entries every host passes; a host inside a deny network is
    refused; if there are allow entries only hosts inside one of them pass. An IPv4-mapped
    IPv6 client (``::ffff:192.0.2.7``) is matched as the IPv4 host it is, against the IPv4
    entries, and an entry written in mapped form (``::ffff:192.0.2.0/120``) is an IPv4 one.
    A host that is not an IP address (e.g. a Unix socket peer) is inside no network.
    """

    __slots__ = ("allow", "deny", "_allow4", "_allow6", "_deny4", "_deny6", "_closed", "_active")

    def __init__(self, allow: Sequence[str] = (), deny: Sequence[str] = ()) -> None:
        self.allow: Tuple[Network, ...] = tuple(parse_network(text) for text in _as_entries(allow))
        self.deny: Tuple[Network, ...] = tuple(parse_network(text) for text in _as_entries(deny))
        self._allow4, self._allow6 = _split(self.allow)
        self._deny4, self._deny6 = _split(self.deny)
        self._closed = bool(self.allow)  # only allowed hosts pass
        self._active = bool(self.allow or self.deny)

    def __bool__(self) -> bool:
        """False when there is nothing to check: callers skip ``permits()`` altogether."""
        return self._active

    def permits(self, host: str) -> bool:
        """Whether a client at `host` (an IPv4/IPv6 address as accept() reports it) may connect."""
        if not self._active:
            return True
        key = _host_key(host)
        if key is None:
            return not self._closed
        address, v6 = key
        if _inside(address, self._deny6 if v6 else self._deny4):
            return False
        return not self._closed or _inside(address, self._allow6 if v6 else self._allow4)

    def tables(self) -> Tuple[bool, bytes, bytes, bytes, bytes]:
        """The lists for the compiled core's loops (see ``t2t_access`` in ``_loop.h``):
        ``(closed, allow4, deny4, allow6, deny6)``, each list its (network, mask) pairs as
        big-endian bytes, 4 + 4 per IPv4 entry (mapped ones included), 16 + 16 per IPv6 one."""

        def packed(masks: _Masks, width: int) -> bytes:
            return b"".join(n.to_bytes(width, "big") + m.to_bytes(width, "big") for n, m in masks)

        return (
            self._closed,
            packed(self._allow4, 4),
            packed(self._deny4, 4),
            packed(self._allow6, 16),
            packed(self._deny6, 16),
        )

    def describe(self) -> str:
        """For the start-up log line: ``allow 10.0.0.0/8, ::1; deny 10.9.0.0/16``."""
        if not self._active:
            return "all clients"
        parts = [
            f"{verb} {', '.join(map(_show, networks))}"
            for verb, networks in (("allow", self.allow), ("deny", self.deny))
            if networks
        ]
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"AccessList(allow={[str(n) for n in self.allow]!r}, deny={[str(n) for n in self.deny]!r})"


def _show(network: Network) -> str:
    """A single host as its bare address, a wider network in CIDR form."""
    return str(network.network_address) if network.prefixlen == network.max_prefixlen else str(network)
