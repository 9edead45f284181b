"""Listening sockets handed over at start: systemd socket activation (``systemd:NAME``) and
plain inherited descriptors (``fd:N``).

Socket activation lets systemd (or any manager speaking the same protocol) own the port: it
binds before the forwarder runs, so a privileged port needs no privilege in the forwarder,
clients queue in the backlog across restarts, and the forwarder starts on the first client.

The protocol, as ``sd_listen_fds(3)`` describes it: ``LISTEN_PID`` names the process the
descriptors are for, ``LISTEN_FDS`` counts them from fd 3 up, and ``LISTEN_FDNAMES`` (optional)
names them, colon-separated, from the socket units' ``FileDescriptorName=``; a descriptor
without a name is called ``unknown``.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Dict, List, Mapping, MutableMapping

__all__ = [
    "LISTEN_FDS_START",
    "PREFIXES",
    "inherited_listeners",
    "is_inherited_address",
    "listener_socket",
    "resolve_listen",
]

LISTEN_FDS_START = 3
#: The LISTEN forms this module resolves; anything else is an address to bind.
PREFIXES = ("fd:", "systemd:")
_UNNAMED = "unknown"  # systemd's name for a descriptor LISTEN_FDNAMES does not name
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _decimal(text: str) -> bool:
    """ASCII digits only: str.isdigit() also takes digits int() refuses, such as "\u00b2"."""
    return text.isascii() and text.isdigit()


def is_inherited_address(text: str) -> bool:
    """True for ``fd:N`` and ``systemd:NAME``: a socket to adopt, not an address to bind."""
    return text.startswith(PREFIXES)


def inherited_listeners(environ: MutableMapping[str, str] = os.environ, *, unset: bool = True) -> Dict[int, str]:
    """The descriptors systemd passed to this process, in order: {fd: name}.

    Empty unless ``LISTEN_PID`` is this process: a variable inherited from a parent that was
    socket-activated itself is not for us. Like ``sd_listen_fds(unset=1)``, the variables are
    removed (whatever they said) so our own children do not take the descriptors for theirs,
    and the descriptors are marked close-on-exec for the same reason. A dict by fd, not by
    name: several sockets may share a name.

    Call it once, early, before starting threads or children. Raises ``ValueError`` if the
    variables are malformed or name a descriptor that is not open.
    """
    try:
        pid_text = environ.get("LISTEN_PID")
        if pid_text is None:
            return {}
        if not _decimal(pid_text):
            raise ValueError(f"LISTEN_PID={pid_text!r} is not a process id")
        if int(pid_text) != os.getpid():
            return {}
        count_text = environ.get("LISTEN_FDS", "0")
        if not _decimal(count_text):
            raise ValueError(f"LISTEN_FDS={count_text!r} is not a count")
        count = int(count_text)
        names_text = environ.get("LISTEN_FDNAMES")
        names = names_text.split(":") if names_text is not None else [_UNNAMED] * count
        if len(names) != count:
            raise ValueError(f"LISTEN_FDNAMES={names_text!r} has {len(names)} names for LISTEN_FDS={count}")
        fds: Dict[int, str] = {}
        for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names):
            try:
                os.set_inheritable(fd, False)
            except OSError as exc:
                raise ValueError(f"LISTEN_FDS={count}: fd {fd} is not open ({exc.strerror})") from None
            fds[fd] = name or _UNNAMED
        return fds
    finally:
        if unset:
            for name in _VARIABLES:
                environ.pop(name, None)


def resolve_listen(text: str, inherited: Mapping[int, str]) -> int:
    """The listening descriptor that ``fd:N`` or ``systemd:NAME`` names.

    ``fd:N`` may be any open descriptor, not only one systemd passed: other supervisors (and
    shells, ``3<>``) hand sockets over without the protocol. Either way it must be a listening
    stream socket; the error says what it is instead.
    """
    if text.startswith("fd:"):
        number = text[len("fd:") :]
        if not _decimal(number):
            raise ValueError(f"{text!r}: fd: needs a descriptor number, e.g. fd:3")
        fd = int(number)
    elif text.startswith("systemd:"):
        name = text[len("systemd:") :]
        if not name:
            raise ValueError(f"{text!r}: systemd: needs a socket name (the unit's FileDescriptorName=)")
        matches: List[int] = [fd for fd, fd_name in inherited.items() if fd_name == name]
        if not matches:
            if not inherited:
                raise ValueError(f"{text!r}: no sockets were passed (not started by a systemd socket unit?)")
            available = ", ".join(sorted(set(inherited.values())))
            raise ValueError(f"{text!r}: no socket named {name!r} was passed; names passed: {available}")
        if len(matches) > 1:
            fd_list = ", ".join(str(fd) for fd in matches)
            raise ValueError(f"{text!r}: {len(matches)} sockets are named {name!r} (fds {fd_list}); use fd:N")
        fd = matches[0]
    else:
        raise ValueError(f"{text!r}: expected fd:N or systemd:NAME")
    _check_listening(text, fd)
    return fd


def listener_socket(fd: int) -> socket.socket:
    """A non-blocking socket object owning `fd`, once checked to be a listening stream socket.

    Its backlog and options stay as the manager set them (systemd's own copy shares them).
    """
    _check_listening(f"fd:{fd}", fd)
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    sock.setblocking(False)
    return sock


def _check_listening(text: str, fd: int) -> None:
    try:
        # Borrowed, not owned: detach() below leaves the descriptor open.
        sock = socket.socket(fileno=fd)
    except OverflowError:
        raise ValueError(f"{text!r}: fd {fd} is out of range") from None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise ValueError(f"{text!r}: fd {fd} is not open") from None
        raise ValueError(f"{text!r}: fd {fd} is not a socket ({exc.strerror})") from None
    try:
        sock_type = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if sock_type != socket.SOCK_STREAM:
            raise ValueError(f"{text!r}: fd {fd} is not a stream socket (SOCK_STREAM)")
        accept_conn = getattr(socket, "SO_ACCEPTCONN", None)
        if accept_conn is not None and not sock.getsockopt(socket.SOL_SOCKET, accept_conn):
            raise ValueError(f"{text!r}: fd {fd} is a socket but not listening")
    finally:
        sock.detach()
