"""Hand-over to a new process (``--upgrade``, SIGUSR2): the listening sockets move, no client
sees a refused port.

The running process (the predecessor) starts its successor, by default the same command line
with this interpreter's ``-m tcptotcp`` (the installed, possibly newer, package), and talks to it
over a private socket pair whose end the successor finds in ``TCPTOTCP_UPGRADE_FD``:

1. predecessor -> successor: ``listeners``, with every forward's listening socket (SCM_RIGHTS)
   by the forward's key, the ``--metrics`` socket, and the metric counters so far;
2. the successor serves those sockets (it binds only forwards it was not given), then answers
   ``serving``, with the keys of its forwards;
3. the predecessor stops accepting (the successor accepts from the same sockets, so the accept
   queue is kept: no SYN is reset) and moves ``MAINPID=`` under systemd;
4. predecessor -> successor: one ``bridge`` message per open bridge of a forward the successor
   serves, with its two fds, its counters, age and idle state: the predecessor detaches it
   (stops reading, delivers what it holds, gives up the fds unclosed), the successor resumes
   it. Then ``done``. A bridge that cannot be detached in time runs to its end in the
   predecessor, which exits once it holds nothing.

Anything short of ``serving`` within ``SERVING_SECONDS`` (the successor exits, crashes, says it
failed, or stays silent) is a failed upgrade: the successor is stopped, and the predecessor,
which never let go of anything, goes on as before.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._bridge import BridgeState
from ._pump import wait_ready

if TYPE_CHECKING:
    from .forwarder import HandedBridge

log = logging.getLogger("tcptotcp")

ENV_FD = "TCPTOTCP_UPGRADE_FD"
#: A successor that has not said ``serving`` by then is stopped, and the upgrade has failed.
SERVING_SECONDS = 10.0
_STOP_SECONDS = 2.0  # a failed successor's SIGTERM, before SIGKILL
_MAX_MESSAGE = 16 * 1024 * 1024
_MAX_FDS = 250  # SCM_RIGHTS carries at most 253 descriptors per message on Linux
_HEADER = struct.Struct("!I")
#: Bridges handed over and not yet adopted, at most: a bridge waits between its detach and its
#: adoption, so the predecessor detaches no faster than the successor adopts (with a successor
#: that does not acknowledge, e.g. an older version, there is no window).
ADOPT_WINDOW = 8
_ACK_SECONDS = 2.0  # the longest wait for an acknowledgement before the window is dropped


class UpgradeFailed(Exception):
    """The successor did not take over; the message says why (the predecessor logs it)."""


class Channel:
    """Length-framed JSON messages with descriptors, over one end of a Unix socket pair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = b""
        self._fds: List[int] = []

    def send(self, message: Dict[str, Any], fds: Sequence[int] = ()) -> None:
        if len(fds) > _MAX_FDS:
            raise ValueError(f"{len(fds)} descriptors in one hand-over message (at most {_MAX_FDS})")
        body = json.dumps(message).encode()
        self.sock.setblocking(True)
        data = _HEADER.pack(len(body)) + body
        sent = socket.send_fds(self.sock, [data], list(fds))  # (the fds ride with the first byte)
        if sent < len(data):  # (no empty sendall: the peer may have read it all and closed)
            self.sock.sendall(data[sent:])

    def receive(self, deadline: float) -> Tuple[Dict[str, Any], List[int]]:
        """The next message and the descriptors that came with it; EOFError when the other end
        closed, TimeoutError at `deadline` (``time.monotonic()``)."""
        while True:
            if len(self._buffer) >= _HEADER.size:
                (size,) = _HEADER.unpack_from(self._buffer)
                if size > _MAX_MESSAGE:
                    raise ValueError(f"hand-over message of {size} bytes")
                if len(self._buffer) >= _HEADER.size + size:
                    body = self._buffer[_HEADER.size : _HEADER.size + size]
                    self._buffer = self._buffer[_HEADER.size + size :]
                    fds, self._fds = self._fds, []
                    return json.loads(body), fds
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not wait_ready(self.sock, False, remaining):
                raise TimeoutError
            data, fds, _, _ = socket.recv_fds(self.sock, 65536, _MAX_FDS)
            for fd in fds:
                os.set_inheritable(fd, False)
            self._fds.extend(fds)
            if not data and not fds:
                raise EOFError
            self._buffer += data

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.sock.close()


# -- the predecessor ---------------------------------------------------------------------


def successor_command(program: Optional[str], argv: Sequence[str]) -> List[str]:
    """The successor's command line: `program` (split as a shell would, e.g. a newer venv's
    ``/opt/t2t/bin/tcptotcp``) or this interpreter's ``-m tcptotcp``, then our own arguments."""
    head = shlex.split(program) if program else [sys.executable, "-m", "tcptotcp"]
    return head + list(argv)


@dataclass
class Successor:
    pid: int
    process: subprocess.Popen  # type: ignore[type-arg]  # (kept: its __del__ would warn while it runs)
    channel: Channel
    keys: List[str] = field(default_factory=list)  # the forwards it serves
    acknowledges: bool = False  # it says when it adopted each bridge
    unacknowledged: int = 0

    def send_bridge(self, key: str, bridge: HandedBridge) -> None:
        """Hand it one detached bridge of forward `key` (our copies of the fds stay ours).
        Waits while `ADOPT_WINDOW` bridges sent are not adopted yet."""
        while self.acknowledges and self.unacknowledged >= ADOPT_WINDOW:
            try:
                message, stray = self.channel.receive(time.monotonic() + _ACK_SECONDS)
            except TimeoutError:
                log.warning("upgrade: pid %d acknowledges no bridge within %g s: sending on", self.pid, _ACK_SECONDS)
                self.acknowledges = False
                break
            except (EOFError, ValueError) as exc:
                raise BrokenPipeError(f"the new process closed the hand-over ({exc or type(exc).__name__})") from None
            for fd in stray:
                os.close(fd)
            if message.get("kind") == "adopted":
                self.unacknowledged -= 1
        self.unacknowledged += 1
        self.channel.send(
            {
                "kind": "bridge",
                "key": key,
                "id": bridge.conn_id,
                "client": [bridge.peer.family, bridge.peer.sockaddr],
                "upstream": bridge.upstream,
                "state": asdict(bridge.state),
                "quiesced_at": bridge.quiesced_at,  # (one monotonic clock for the machine)
            },
            (bridge.fd1, bridge.fd2),
        )

    def finish(self) -> None:
        """Nothing more comes: the successor stops listening to us."""
        try:
            self.channel.send({"kind": "done"})
        except OSError:
            pass
        self.channel.close()


def start_successor(
    command: Sequence[str],
    listeners: Sequence[Tuple[str, socket.socket]],
    status_socket: Optional[socket.socket],
    counters: Sequence[Any],
) -> Successor:
    """Start `command` and hand it `listeners` (key, socket) and the metrics port; return once
    it says it serves them. On any failure the successor is stopped and UpgradeFailed raised;
    nothing of ours was given away (the successor got copies of the descriptors)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = dict(os.environ)
    env[ENV_FD] = str(theirs.fileno())
    try:
        process = subprocess.Popen(list(command), pass_fds=(theirs.fileno(),), env=env)
    except OSError as exc:
        ours.close()
        raise UpgradeFailed(f"cannot start {shlex.join(command)}: {exc.strerror or exc}") from None
    finally:
        theirs.close()
    channel = Channel(ours)
    try:
        fds = [sock.fileno() for _, sock in listeners]
        if status_socket is not None:
            fds.append(status_socket.fileno())
        channel.send(
            {
                "kind": "listeners",
                "from_pid": os.getpid(),
                "keys": [key for key, _ in listeners],
                "status": status_socket is not None,
                "counters": list(counters),
                "window": ADOPT_WINDOW,  # (acknowledge each bridge)
            },
            fds,
        )
        deadline = time.monotonic() + SERVING_SECONDS
        while True:
            try:
                message, stray = channel.receive(min(deadline, time.monotonic() + 0.1))
            except TimeoutError:
                status = process.poll()
                if status is not None:
                    raise UpgradeFailed(f"the new process exited with status {status} before serving") from None
                if time.monotonic() >= deadline:
                    raise UpgradeFailed(
                        f"the new process did not report serving within {SERVING_SECONDS:g} s"
                    ) from None
                continue
            for fd in stray:
                os.close(fd)
            if message.get("kind") == "serving":
                keys = [str(k) for k in message.get("keys", [])]
                return Successor(int(message["pid"]), process, channel, keys, bool(message.get("acknowledges")))
            if message.get("kind") == "failed":
                raise UpgradeFailed(f"the new process failed: {message.get('why', 'no reason given')}")
    except (EOFError, BrokenPipeError, ConnectionResetError):  # it is gone, or going
        status = _wait(process, _STOP_SECONDS)
        text = "closed the hand-over" if status is None else f"exited with status {status}"
        _stop(process, channel)
        raise UpgradeFailed(f"the new process {text} before serving") from None
    except UpgradeFailed:
        _stop(process, channel)
        raise
    except (OSError, ValueError) as exc:
        _stop(process, channel)
        raise UpgradeFailed(f"hand-over: {exc}") from None


def _wait(process: subprocess.Popen, seconds: float) -> Optional[int]:  # type: ignore[type-arg]
    try:
        return process.wait(seconds)
    except subprocess.TimeoutExpired:
        return None


def _stop(process: subprocess.Popen, channel: Channel) -> None:  # type: ignore[type-arg]
    channel.close()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        if _wait(process, _STOP_SECONDS) is None:
            process.kill()
            process.wait()


# -- the successor -----------------------------------------------------------------------


#: Takes one handed bridge: (forward key, fd1, fd2, state, conn id, client family, client
#: address, upstream text); owns the fds, closing them if it raises.
Adopt = Callable[[str, int, int, BridgeState, int, int, Any, str], None]


@dataclass
class Handed:
    """What a predecessor handed this process: listening sockets by forward key, the
    ``--metrics`` socket, its metric counters, and the channel to answer on."""

    from_pid: int
    listeners: Dict[str, socket.socket]
    status_socket: Optional[socket.socket]
    counters: List[Any]
    channel: Channel
    acknowledge: bool = False  # the predecessor waits to hear of each bridge adopted

    def serving(self, keys: Sequence[str]) -> None:
        """Tell the predecessor to stop accepting (we serve the forwards `keys` now) and to send
        their open bridges."""
        try:
            self.channel.send(
                {"kind": "serving", "pid": os.getpid(), "keys": list(keys), "acknowledges": self.acknowledge}
            )
        except OSError as exc:  # it is gone: we serve all the same
            log.warning("upgrade: could not tell pid %d that this process serves: %s", self.from_pid, exc)

    def failed(self, why: str) -> None:
        try:
            self.channel.send({"kind": "failed", "why": why})
        except OSError:
            pass

    def receive_bridges(self, adopt: Adopt, stopped: Callable[[], None] = lambda: None) -> Tuple[int, int, float]:
        """Take the predecessor's bridges until it says ``done`` (or is gone), each given to
        `adopt`, which owns the fds from then on; `stopped` is called once the predecessor no
        longer accepts (its first message comes after that, or its end). (adopted, failed, the
        longest pause of one: seconds from its quiescing in the predecessor to its relaying
        here)."""
        adopted = failed = 0
        longest = 0.0
        told = False
        while True:
            try:
                message, fds = self.channel.receive(time.monotonic() + 3600.0)
            except (EOFError, TimeoutError, OSError, ValueError):
                break
            if not told:
                told = True
                stopped()
            if message.get("kind") != "bridge" or len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                if message.get("kind") == "done":
                    break
                continue
            try:
                family, sockaddr = message["client"]
                adopt(
                    str(message["key"]),
                    fds[0],
                    fds[1],
                    BridgeState(**message["state"]),
                    int(message["id"]),
                    int(family),
                    tuple(sockaddr) if isinstance(sockaddr, list) else sockaddr,
                    str(message["upstream"]),
                )
                adopted += 1
                quiesced_at = float(message.get("quiesced_at") or 0.0)
                if quiesced_at > 0:
                    longest = max(longest, time.monotonic() - quiesced_at)
            except Exception as exc:  # (the fds are closed: the client sees the bridge end)
                failed += 1
                log.error("upgrade: bridge #%s from pid %d not adopted: %s", message.get("id"), self.from_pid, exc)
            if self.acknowledge:
                try:
                    self.channel.send({"kind": "adopted", "id": message.get("id")})
                except OSError:  # (it is gone: the next receive says so)
                    pass
        self.channel.close()
        if not told:
            stopped()
        return adopted, failed, longest

    def unused(self) -> None:
        """Close the sockets no forward took (a config that no longer has them)."""
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()


def handed_over(environ: Dict[str, str] = os.environ) -> Optional[Handed]:  # type: ignore[assignment]
    """The predecessor's hand-over, when this process was started as a successor (and the
    variable removed, so that our own successor does not mistake it for its own)."""
    text = environ.pop(ENV_FD, None)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{ENV_FD}={text!r} is not a descriptor number")
    channel = Channel(socket.socket(fileno=int(text)))
    os.set_inheritable(channel.sock.fileno(), False)
    try:
        message, fds = channel.receive(time.monotonic() + SERVING_SECONDS)
    except (EOFError, TimeoutError, OSError) as exc:
        channel.close()
        raise ValueError(f"no hand-over from the old process ({type(exc).__name__})") from None
    keys = list(message.get("keys", []))
    status = bool(message.get("status"))
    if len(fds) != len(keys) + status:
        for fd in fds:
            os.close(fd)
        channel.close()
        raise ValueError(f"hand-over: {len(fds)} descriptors for {len(keys)} listeners")
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in sockets:
        sock.setblocking(False)
    return Handed(
        from_pid=int(message.get("from_pid", 0)),
        listeners=dict(zip(keys, sockets)),
        status_socket=sockets[-1] if status else None,
        counters=list(message.get("counters", [])),
        channel=channel,
        acknowledge=bool(message.get("window")),
    )


# -- systemd and the pid file ------------------------------------------------------------


def notify(state: str, environ: Dict[str, str] = os.environ) -> bool:  # type: ignore[assignment]
    """``sd_notify(3)``: send `state` (``READY=1``, ``MAINPID=N``) to the service manager, if
    ``NOTIFY_SOCKET`` names one; False if there is none or it could not be reached."""
    path = environ.get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", path, exc.strerror or exc)
            return False
    return True


def write_pid_file(path: str) -> None:
    """Our pid in `path`, replaced whole (a reader never sees half of it)."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(temporary, path)


def read_pid_file(path: str) -> int:
    with open(path) as f:
        text = f.read().strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{path}: {text[:40]!r} is not a process id")
    return int(text)


def remove_pid_file(path: str) -> None:
    """Remove `path` if it still names this process (a successor's is left alone)."""
    try:
        if read_pid_file(path) == os.getpid():
            os.unlink(path)
    except (OSError, ValueError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def request_upgrade(pid_file: str, timeout: float = SERVING_SECONDS + 5.0) -> int:
    """``tcptotcp --upgrade``: SIGUSR2 to the process the pid file names, then wait until the
    file names its successor. The successor's pid; UpgradeFailed (with why) otherwise."""
    try:
        old = read_pid_file(pid_file)
    except (OSError, ValueError) as exc:
        raise UpgradeFailed(f"cannot read the pid file: {exc}") from None
    try:
        os.kill(old, signal.SIGUSR2)
    except OSError as exc:
        raise UpgradeFailed(f"cannot signal process {old}: {exc.strerror or exc}") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            now = read_pid_file(pid_file)
        except (OSError, ValueError):
            now = old  # (between the successor's replace and a reader: try again)
        if now != old and _alive(now):
            return now
        if not _alive(old):
            raise UpgradeFailed(f"process {old} ended without a successor")
        time.sleep(0.05)
    raise UpgradeFailed(f"process {old} did not hand over within {timeout:g} s (its log says why)")
