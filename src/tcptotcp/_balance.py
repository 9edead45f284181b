"""Who a client is, what it may open, and which upstream it gets: the pure twin of
``_loop_balance.h`` (the same keys, hashes, bucket arithmetic and choices), for the pure listener.

A client is its address: an IPv4 host (an IPv4-mapped IPv6 client included), an IPv6 client's
first ``client_prefix6`` bits, or, for a client without an IP address, one key for all.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from typing import Any, Dict, List, Optional, Sequence

#: The most entries a forward's client table holds: past it a new client is refused.
CLIENTS_MAX = 1 << 18
_MIN_SWEEP = 1024
_MASK64 = (1 << 64) - 1


def client_key(family: int, sockaddr: Any, prefix6: int) -> bytes:
    """The bytes that name a client for the limits and for ``balance="source"``."""
    if family == socket.AF_INET:
        return b"\x04" + socket.inet_pton(socket.AF_INET, sockaddr[0])
    if family == socket.AF_INET6:
        packed = ipaddress.IPv6Address(sockaddr[0].partition("%")[0]).packed
        if packed[:12] == b"\0" * 10 + b"\xff\xff":
            return b"\x04" + packed[12:]
        value = int.from_bytes(packed, "big")
        if prefix6 < 128:
            value &= ~((1 << (128 - prefix6)) - 1) & ((1 << 128) - 1)
        return b"\x06" + value.to_bytes(16, "big")
    return b"\x00"


def mix64(h: int) -> int:
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _MASK64
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _MASK64
    return h ^ (h >> 31)


def hash_bytes(data: bytes) -> int:
    """FNV-1a, then a finalizer that spreads every input bit over the whole word."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return mix64(h)


def rendezvous_score(client_hash: int, upstream_hash: int, weight: int) -> float:
    """Weighted rendezvous hashing: the highest score serves the client; removing an upstream
    moves only its own clients."""
    h = mix64(client_hash ^ upstream_hash)
    u = ((h >> 11) + 0.5) / 9007199254740992.0
    return weight / -math.log(u)


def bucket_take(tat: int, now: int, spacing_ns: int, burst: int) -> Optional[int]:
    """The rate bucket (GCRA): the bucket's new state if the client may open one more now, else
    None. `tat` is when the bucket is next full (0: full)."""
    start = max(tat, now)
    if start + spacing_ns - now > burst * spacing_ns:
        return None
    return start + spacing_ns


class ClientEntry:
    __slots__ = ("open", "tat")

    def __init__(self) -> None:
        self.open = 0  # bridges counted against max_per_client
        self.tat = 0  # the rate bucket (see bucket_take)


class ClientTable:
    """Open bridges and a rate bucket per client; entries that hold nothing (nothing open, a
    full bucket) are dropped by a sweep whenever the table doubled since the last one."""

    def __init__(self) -> None:
        self._entries: Dict[bytes, ClientEntry] = {}
        self._sweep_at = _MIN_SWEEP

    def get(self, key: bytes, now: int) -> Optional[ClientEntry]:
        """The client's entry, made if new; None when the table is full."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        if len(self._entries) + 1 > self._sweep_at:
            self._sweep(now)
            if len(self._entries) + 1 > CLIENTS_MAX:
                return None
        entry = self._entries[key] = ClientEntry()
        return entry

    def release(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.open > 0:
            entry.open -= 1

    def held(self, now: int) -> int:
        """Entries still held, after a sweep."""
        self._sweep(now)
        return len(self._entries)

    def _sweep(self, now: int) -> None:
        self._entries = {k: e for k, e in self._entries.items() if e.open > 0 or e.tat > now}
        self._sweep_at = max(_MIN_SWEEP, 2 * len(self._entries))


class UpstreamState:
    """One upstream address's state, kept across reloads that still name it."""

    __slots__ = ("down_until", "checked_down", "open", "fails", "fails_since", "current")

    def __init__(self) -> None:
        self.down_until = 0.0  # marked down by failed connects until then (monotonic seconds)
        self.checked_down = False  # marked down by the active checks
        self.open = 0  # bridges open to it (leastconn)
        self.fails = 0  # failed connects in this window
        self.fails_since = 0.0
        self.current = 0  # smooth weighted round robin

    def is_down(self, now: float) -> bool:
        return self.checked_down or self.down_until > now


def pick(
    balance: str,
    states: Sequence[UpstreamState],
    weights: Sequence[int],
    hashes: Sequence[int],
    left: List[int],
    last: Optional[int],
    turn: int,
    client_hash: int,
) -> int:
    """The index of the upstream to try next among `left` (indices, ascending, not empty): a
    first try (`last` None) by the balance, a failover in that balance's order (see
    t2t_pick_upstream). `turn` breaks leastconn's ties in turn."""
    n = len(states)
    if balance == "leastconn":
        best = -1
        for k in range(n):
            i = (turn + k) % n
            if i in left and (best < 0 or states[i].open * weights[best] < states[best].open * weights[i]):
                best = i
        return best
    if balance == "source":
        return max(left, key=lambda i: (rendezvous_score(client_hash, hashes[i], weights[i]), -i))
    if balance == "roundrobin" and last is None:
        total = 0
        best = -1
        for i in left:
            states[i].current += weights[i]
            total += weights[i]
            if best < 0 or states[i].current > states[best].current:
                best = i
        states[best].current -= total
        return best
    start = 0 if last is None else last + 1
    return min(left, key=lambda i: (i - start) % n)
