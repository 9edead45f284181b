"""Upstreams written as host names, followed in DNS.

An upstream given as a name (``db.internal:5432``, not an IP literal nor ``unix:``) stands for
every address the name has: each one is a candidate, balanced as a separate upstream with the
name's weight. Naming: a name with exactly one address keeps the upstream's own text
(``db.internal:5432``), so health, metrics and logs read as they always did; with several,
each candidate is the text and its address, ``db.internal:5432 (10.0.0.5)`` and
``db.internal:5432 ([fd00::5])``. A name without an address (yet) is one candidate that fails
at once (`NO_ADDRESS`): the forward starts, and its clients are told why.

`Resolver` looks the names of one forward up again every ``resolve_interval`` seconds, from
one daemon thread, and hands each round's results to the forwarder, which applies a change as
a reload does (``configure()``: new clients only).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from ._address import Address, Where, ordered

log = logging.getLogger("tcptotcp")

# A candidate no connect reaches, immediately and on every platform: a Unix socket path under
# the null device (ENOTDIR), or where there is no AF_UNIX, port 0 (refused).
NO_ADDRESS: Where = (
    (socket.AF_UNIX, os.devnull + "/tcptotcp-no-address")
    if hasattr(socket, "AF_UNIX")
    else (socket.AF_INET, ("127.0.0.1", 0))
)
_JOIN_SECONDS = 1.0  # close() waits this long at most: a lookup in flight cannot be interrupted

#: One round's results, by the upstream's text: its addresses, or why the lookup failed (an
#: empty answer is a failure too: the forward keeps the last good set).
Results = Dict[str, Union[Tuple[Where, ...], str]]


def host_of(address: Address) -> Optional[Tuple[str, int]]:
    """(host, port) of an upstream written with a host name; None for an IP literal, a
    ``unix:`` path or a text that is not ``HOST:PORT``."""
    host, sep, port_text = address.text.rpartition(":")
    if address.text.startswith("unix:") or not sep or not host or ":" in host or host.startswith("["):
        return None
    if not (port_text.isascii() and port_text.isdigit()):
        return None
    try:
        # AI_NUMERICHOST: no lookup, only "is this an address" (inet_aton's forms too, 127.1).
        socket.getaddrinfo(host, 0, flags=socket.AI_NUMERICHOST)
        return None
    except socket.gaierror:
        return host, int(port_text)
    except UnicodeError:  # (a label getaddrinfo cannot encode: a name it will never resolve)
        return host, int(port_text)


def lookup(host: str, port: int) -> Tuple[Where, ...]:
    """Every (family, sockaddr) of `host` (A and AAAA), deduplicated, in `ordered()`'s order.
    Blocks (it asks the resolver); raises socket.gaierror (or OSError, UnicodeError)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return ordered([(info[0], info[4]) for info in infos])


def resolve(host: str, port: int) -> Union[Tuple[Where, ...], str]:
    """`lookup()`'s addresses, or why there are none (``Name or service not known``)."""
    try:
        return lookup(host, port) or "no address"
    except socket.gaierror as exc:
        return str(exc.strerror or exc)
    except (OSError, UnicodeError) as exc:
        return str(exc)


def address_text_of(where: Where) -> str:
    """An address as a candidate's name shows it: ``10.0.0.5``, ``[fd00::5]``."""
    family, sockaddr = where
    if family == socket.AF_INET6:
        return f"[{sockaddr[0]}]"
    if family == socket.AF_INET:
        return str(sockaddr[0])
    return str(sockaddr)


def addresses_text(found: Sequence[Where]) -> str:
    """``10.0.0.5, 10.0.0.6`` (``no address`` for none), for log lines."""
    return ", ".join(address_text_of(w) for w in found) or "no address"


def candidates(upstream: Address, found: Sequence[Where]) -> Tuple[Address, ...]:
    """The candidates an upstream name stands for with these addresses (see the module's
    docstring for their texts); one `NO_ADDRESS` candidate for none."""
    if not found:
        family, sockaddr = NO_ADDRESS
        return (Address(family, sockaddr, upstream.text, upstream.weight),)
    if len(found) == 1:
        family, sockaddr = found[0]
        return (Address(family, sockaddr, upstream.text, upstream.weight),)
    return tuple(
        Address(family, sockaddr, f"{upstream.text} ({address_text_of((family, sockaddr))})", upstream.weight)
        for family, sockaddr in found
    )


def expand(configured: Sequence[Address], found: Mapping[str, Sequence[Where]]) -> Tuple[Address, ...]:
    """A forward's candidates: each upstream whose text `found` names stands for its
    `candidates()`, the others for themselves, in the order given."""
    out: List[Address] = []
    for upstream in configured:
        addresses = found.get(upstream.text)
        if addresses is None:
            out.append(upstream)
        else:
            out.extend(candidates(upstream, addresses))
    return tuple(out)


def is_no_address(address: Address) -> bool:
    return (address.family, address.sockaddr) == NO_ADDRESS


class Resolver:
    """Looks a forward's upstream names up again every `interval` seconds, from one daemon
    thread (``start()`` .. ``close()``), and calls ``on_result(self, results)`` after each
    round, from that thread. The first round is one interval after ``start()``: the forward
    was made with fresh addresses."""

    def __init__(
        self,
        names: Dict[str, Tuple[str, int]],
        *,
        interval: float,
        on_result: Callable[[Resolver, Results], None],
        name: str = "",
    ) -> None:
        self._lock = threading.Lock()
        self._names = dict(names)  # the upstream's text -> (host, port)
        self._interval = interval
        self._on_result = on_result
        self._name = name
        self._closed = False
        self._woken = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def closed(self) -> bool:
        return self._closed

    def update(self, names: Dict[str, Tuple[str, int]], interval: float) -> None:
        """New names or interval (a reload): the next round is one new interval from now. The
        same ones again change nothing (frequent reloads do not put the next round off)."""
        with self._lock:
            if names == self._names and interval == self._interval:
                return
            self._names = dict(names)
            self._interval = interval
        self._woken.set()

    def start(self) -> None:
        with self._lock:
            if self._closed or self._thread is not None:
                raise RuntimeError("a Resolver starts once, before close()")
            self._thread = threading.Thread(
                target=self._run, name=f"tcptotcp-resolve {self._name}".rstrip(), daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop: returns once the thread ended, or after about a second if a lookup (which
        cannot be interrupted) holds it; it then ends without reporting that round."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        self._woken.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_SECONDS)

    def _run(self) -> None:
        while True:
            with self._lock:
                interval = self._interval
            # An update() wakes the wait and starts a new interval with the new settings.
            if self._woken.wait(interval):
                self._woken.clear()
                if self._closed:
                    return
                continue
            with self._lock:
                if self._closed:
                    return
                names = dict(self._names)
            results: Results = {}
            for text, (host, port) in names.items():
                results[text] = resolve(host, port)
                if self._closed:
                    return
            try:
                self._on_result(self, results)
            except Exception:
                log.exception("resolving upstreams: on_result failed")
