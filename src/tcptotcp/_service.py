"""Several forwards in one process, as the CLI runs them: start, reload, list, stop.

Each forward is a ``Forwarder`` serving on its own thread. A reload (SIGHUP with ``--config``)
compares the new forwards with the running ones by listen address: new ones start listening,
removed ones stop accepting and are kept until their open bridges have ended on their own, and
changed ones take their new options for clients from then on. Nothing is dropped by a reload,
and a reload that cannot be carried out whole changes nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple, Type

from . import _tls
from ._activation import is_inherited_address, listener_socket, resolve_listen
from ._backend import tls_relay_text, tls_unavailable
from ._bridge import Bridge, BridgeState
from ._config import ForwardSpec
from ._events import Peer
from ._jsonlog import JsonFormatter
from ._options import RESTART_NAMES
from .forwarder import Forwarder

log = logging.getLogger("tcptotcp")

_JSON = JsonFormatter()


def _keys(specs: Sequence[ForwardSpec]) -> List[str]:
    """A key per forward, to match running forwards with a reload's: its listen text, and for a
    second (third...) forward written alike - port 0, which load_config() allows several times,
    each getting a port of its own - that text with "#2" ("#3"...)."""
    seen: Dict[str, int] = {}
    keys = []
    for spec in specs:
        n = seen[spec.listen] = seen.get(spec.listen, 0) + 1
        keys.append(spec.listen if n == 1 else f"{spec.listen}#{n}")
    return keys


class Service:
    """The forwards of one process; `announce` writes the lines that go out at any log level."""

    def __init__(
        self,
        bridge_class: Type[Bridge],
        *,
        inherited: Optional[Mapping[int, str]] = None,
        metrics: Optional[Any] = None,
        json_lines: bool = False,
        stream: TextIO = sys.stderr,
        wake: Optional[threading.Event] = None,
        handed: Optional[Mapping[str, socket.socket]] = None,
    ) -> None:
        self.bridge_class = bridge_class
        self.inherited: Mapping[int, str] = inherited or {}
        self.metrics = metrics
        self.json_lines = json_lines
        self.stream = stream
        self.forwards: Dict[str, Forwarder] = {}  # by _keys(): listen text, as the config writes it
        self.specs: Dict[str, ForwardSpec] = {}
        self.retired: List[Forwarder] = []  # removed by a reload, bridges still running
        self._threads: Dict[Forwarder, threading.Thread] = {}
        self.crashed = False  # a serve thread died of an exception: the process should exit
        self._wake = wake
        # Listening sockets a predecessor handed us, by forward key (see _upgrade): taken by
        # start() instead of binding; what it leaves is closed by take_handed().
        self.handed: Dict[str, socket.socket] = dict(handed or {})

    # -- lines for people and machines ----------------------------------------------------

    def announce(self, event: str, text: str, **fields: Any) -> None:
        """A line that goes out whatever the log level (scripts wait for "listening")."""
        if self.json_lines:
            record = logging.LogRecord("tcptotcp", logging.INFO, __file__, 0, text, None, None)
            record.event = event
            record.fields = fields
            line = _JSON.format(record)
        else:
            line = f"tcptotcp: {text}"
        # One write, as logging's handler makes: print() writes the text and its newline
        # separately, and a log line from another thread could land between them.
        self.stream.write(line + "\n")
        self.stream.flush()

    # -- forwards -------------------------------------------------------------------------

    def _make(self, spec: ForwardSpec, key: str) -> Forwarder:
        listen_socket: Optional[socket.socket] = self.handed.pop(key, None)
        if listen_socket is None and is_inherited_address(spec.listen):
            listen_socket = listener_socket(resolve_listen(spec.listen, self.inherited))
        kwargs = spec.forwarder_kwargs()
        return Forwarder(
            spec.listen_address or spec.listen,
            spec.upstream_addresses or spec.upstreams,
            bridge_class=self.bridge_class,
            listen_socket=listen_socket,
            metrics=self.metrics,
            **kwargs,
        )

    def _serve(self, key: str, spec: ForwardSpec, forwarder: Forwarder) -> None:
        self.forwards[key] = forwarder
        self.specs[key] = spec
        thread = threading.Thread(
            target=self._run, args=(forwarder,), name=f"tcptotcp-serve {forwarder.address_text}", daemon=True
        )
        self._threads[forwarder] = thread
        thread.start()
        backend = getattr(self.bridge_class, "engine_name", "custom")
        upstreams = ", ".join(u.text for u in forwarder.options.upstreams)
        balance = f", balance {forwarder.options.balance}" if len(forwarder.options.upstreams) > 1 else ""
        self.announce(
            "listening",
            f"listening on {forwarder.address_text}, forwarding to {upstreams}{balance} (backend {backend}"
            + (f", {tls_relay_text()})" if forwarder.options.tls and backend == "cython" else ")"),
            listen=forwarder.address_text,
            upstreams=[u.text for u in forwarder.options.upstreams],
            backend=backend,
        )
        shortfall = forwarder.fd_shortfall()
        if shortfall:
            needed, available = shortfall
            log.warning(
                "%s: --max-connections %d may need up to %d file descriptors, but this process can "
                "open only %d more (ulimit -n): clients beyond that are refused until others end",
                forwarder.address_text,
                forwarder.options.max_connections,
                needed,
                available,
            )

    def ready(self) -> Tuple[bool, str]:
        """Ready for clients: every forward listening, each with an upstream not marked down;
        else False and why (for ``/ready``)."""
        forwards = list(self.forwards.values())
        if not forwards:
            return False, "no forward is listening"
        for forwarder in forwards:
            thread = self._threads.get(forwarder)
            if forwarder.listener_kind is None or thread is None or not thread.is_alive():
                return False, f"{forwarder.address_text}: not listening"
            states = forwarder.upstream_states()
            if states and not any(states.values()):
                return False, f"{forwarder.address_text}: every upstream is down ({', '.join(states)})"
        return True, ""

    def _run(self, forwarder: Forwarder) -> None:
        try:
            forwarder.serve_forever()
        except BaseException:
            log.exception("%s: the forwarder failed", forwarder.address_text)
            self.crashed = True
            if self._wake is not None:
                self._wake.set()

    def start(self, specs: Sequence[ForwardSpec]) -> None:
        """Listen on every forward, or on none (OSError/ValueError names the one that failed)."""
        made = self._make_all(specs)
        for key, spec, forwarder in zip(_keys(specs), specs, made):
            self._serve(key, spec, forwarder)
        for sock in self.handed.values():  # forwards the config no longer has
            sock.close()
        self.handed.clear()

    def _make_all(self, specs: Sequence[ForwardSpec], keys: Optional[Sequence[str]] = None) -> List[Forwarder]:
        made: List[Forwarder] = []
        try:
            for spec, key in zip(specs, _keys(specs) if keys is None else keys):
                try:
                    made.append(self._make(spec, key))
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on {spec.listen}: {exc.strerror or exc}") from None
                except ValueError as exc:
                    raise ValueError(f"{spec.listen}: {exc}") from None
        except BaseException:
            for forwarder in made:
                forwarder.close()
            raise
        return made

    def reload(self, specs: Sequence[ForwardSpec]) -> None:
        """Take a new set of forwards; on failure (raised) nothing has changed."""
        wanted = dict(zip(_keys(specs), specs))
        added = [(key, spec) for key, spec in wanted.items() if key not in self.forwards]
        removed = [key for key in self.forwards if key not in wanted]
        changed = [(key, spec) for key, spec in wanted.items() if key in self.specs and spec != self.specs[key]]
        # Certificates are files: a forward whose options did not change reads them again too.
        same_tls = [
            key
            for key, spec in wanted.items()
            if key in self.specs and spec == self.specs[key] and _tls.wants_tls(spec.settings())
        ]
        self._check_tls([(key, spec) for key, spec in wanted.items() if key in self.forwards])
        # Binds first: a port in use fails the reload whole.
        made = self._make_all([spec for _, spec in added], [key for key, _ in added])
        for key, spec in changed:
            old = self.specs[key]
            stuck = old.restart_changes(spec)  # the listening socket's own: a restart's
            if stuck:
                log.warning("%s: %s change only with a restart", spec.listen, " and ".join(stuck))
            kwargs = {k: v for k, v in spec.forwarder_kwargs().items() if k not in RESTART_NAMES}
            self.forwards[key].reconfigure(spec.upstream_addresses or spec.upstreams, **kwargs)
            self.specs[key] = spec
        for key in same_tls:
            self.forwards[key].reload_certificates()
        removed_listens = []
        for key in removed:
            forwarder = self.forwards.pop(key)
            listen = self.specs.pop(key).listen
            removed_listens.append(listen)
            forwarder.stop_accepting()  # its bridges run on to their own end
            self.retired.append(forwarder)
            self.announce(
                "stopped_listening", f"stopped listening on {forwarder.address_text}", listen=forwarder.address_text
            )
        for (key, spec), forwarder in zip(added, made):
            self._serve(key, spec, forwarder)
        self.retired = [f for f in self.retired if f.stats.active]
        self.announce(
            "reload",
            f"reloaded: {len(added)} added, {len(removed)} removed, {len(changed)} changed",
            added=[s.listen for _, s in added],
            removed=removed_listens,
            changed=[s.listen for _, s in changed],
        )

    def _check_tls(self, kept: Sequence[Tuple[str, ForwardSpec]]) -> None:
        """Before a reload changes anything: ValueError if a kept forward's TLS files do not
        load, or it would switch on TLS that the loops serving it cannot do (a restart's)."""
        for key, spec in kept:
            settings = spec.settings()
            if not _tls.wants_tls(settings):
                continue
            try:
                tls = _tls.contexts(settings)
            except ValueError as exc:
                raise ValueError(f"{spec.listen}: {exc}") from None
            lacking = tls.loops_lack or tls_unavailable()
            if self.forwards[key].listener_kind == "loops" and lacking is not None:
                raise ValueError(f"{spec.listen}: the loops serve it, and {lacking}: that TLS needs a restart")

    def reload_certificates(self) -> int:
        """SIGHUP without a config file: every TLS forward reads its certificate files again
        (ValueError, naming the forward, the file and why: the forwards not yet reloaded keep
        their old ones). How many forwards did."""
        forwards = list(self.forwards.items())
        self._check_tls([(key, self.specs[key]) for key, _ in forwards])
        return sum(1 for _, forwarder in forwards if forwarder.reload_certificates())

    def listening_sockets(self) -> List[Tuple[str, socket.socket]]:
        """Every forward's listening socket, by key: what a successor takes over."""
        return [(key, forwarder.listening_socket) for key, forwarder in self.forwards.items()]

    def handed_over(self) -> Dict[str, Forwarder]:
        """A successor accepts from our sockets now: stop accepting; the open bridges run on
        here until they end or are detached. The forwards, by key."""
        handed = {}
        for key in list(self.forwards):
            forwarder = handed[key] = self.forwards.pop(key)
            self.specs.pop(key, None)
            forwarder.stop_accepting(handed_over=True)
            self.retired.append(forwarder)  # (all kept: the summary at exit covers them)
        return handed

    def adopt(
        self, key: str, fd1: int, fd2: int, state: BridgeState, conn_id: int, family: int, sockaddr: Any, upstream: str
    ) -> None:
        """A bridge of forward `key` a predecessor handed over (see _upgrade.Handed.receive_bridges)."""
        forwarder = self.forwards.get(key)
        if forwarder is None:
            os.close(fd1)
            os.close(fd2)
            raise KeyError(f"no forward {key} here")
        forwarder.adopt(fd1, fd2, state, conn_id, Peer(family, sockaddr), upstream)

    def recheck_accepting(self) -> None:
        """A predecessor stopped accepting from our sockets (see Forwarder.recheck_accepting)."""
        for forwarder in list(self.forwards.values()):
            forwarder.recheck_accepting()

    def active(self) -> int:
        """Clients of every forward, retired ones included, not yet gone."""
        return sum(f.stats.active for f in self.all_forwarders())

    def all_forwarders(self) -> List[Forwarder]:
        return list(self.forwards.values()) + self.retired

    def list_open(self) -> None:
        """SIGUSR1: a line per open bridge and the totals, at any log level."""
        count = up = down = 0
        for forwarder in self.all_forwarders():
            for item in forwarder.open_bridges():
                count += 1
                up += item["bytes_up"]
                down += item["bytes_down"]
                self.announce(
                    "bridge",
                    f"{forwarder.address_text} #{item['id']} {item['client']} -> {item['upstream']}: "
                    f"{item['seconds']:.3f} s, {item['bytes_up']} bytes up, {item['bytes_down']} down",
                    listen=forwarder.address_text,
                    **item,
                )
        self.announce(
            "open_bridges",
            f"{count} bridges open, {up} bytes up and {down} down so far",
            bridges=count,
            bytes_up=up,
            bytes_down=down,
        )

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop every forward (open bridges get `drain_seconds`), then the summary lines."""
        forwarders = self.all_forwarders()
        for forwarder in forwarders:
            forwarder.request_stop()
        # One drain for all: close them side by side.
        closers = [
            threading.Thread(target=f.close, kwargs={"drain_seconds": drain_seconds}, daemon=True) for f in forwarders
        ]
        for closer in closers:
            closer.start()
        deadline = time.monotonic() + drain_seconds + 10.0
        for closer in closers:
            closer.join(max(0.0, deadline - time.monotonic()))
        many = len(forwarders) > 1
        for forwarder in forwarders:
            s = forwarder.stats
            self.announce(
                "summary",
                (f"{forwarder.address_text}: " if many else "") + forwarder.summary(),
                listen=forwarder.address_text,
                accepted=s.accepted,
                refused=s.refused,
                upstream_failures=s.upstream_failures,
                bytes_up=s.bytes_up,
                bytes_down=s.bytes_down,
            )
