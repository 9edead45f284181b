"""Socket activation: real listening sockets handed to a child at fd 3, 4, ... as systemd does
(fork, move the fds, set LISTEN_PID to the child's pid, exec), and the errors users meet."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Optional

import pytest

from tcptotcp._activation import inherited_listeners, is_inherited_address, listener_socket, resolve_listen

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX descriptor passing")

# Runs in the child: moves the passed sockets to 3, 4, ... (via high numbers, so none is
# overwritten), sets the variables the way systemd does, and execs the worker with the same pid.
LAUNCHER = textwrap.dedent(
    """
    import fcntl, os, sys
    worker, pid_mode, names, count = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    fds = [int(fd) for fd in sys.argv[5:]]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)  # inheritable: it survives the exec
        os.close(fd)
    os.environ["LISTEN_PID"] = str(os.getpid()) if pid_mode == "self" else str(os.getppid())
    os.environ["LISTEN_FDS"] = count
    if names != "-":
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(sys.executable, [sys.executable, "-c", worker])
    """
)


def activated(
    worker: str, listeners: List[socket.socket], names: Optional[str], *, pid: str = "self", count: int = -1
) -> Dict[str, Any]:
    """Run `worker` as a socket-activated process; it prints one JSON object, returned here."""
    fds = [s.fileno() for s in listeners]
    argv = [sys.executable, "-c", LAUNCHER, textwrap.dedent(worker), pid, "-" if names is None else names]
    argv += [str(len(fds) if count < 0 else count)] + [str(fd) for fd in fds]
    out = subprocess.run(argv, pass_fds=fds, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    result: Dict[str, Any] = json.loads(out.stdout)
    return result


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


WORKER_PROLOGUE = """
import json, os, selectors, subprocess, sys
from tcptotcp._activation import inherited_listeners, listener_socket, resolve_listen
names = {k: v for k, v in os.environ.items() if k.startswith("LISTEN_")}
fds = inherited_listeners()
result = {"fds": {str(fd): name for fd, name in fds.items()}, "env_before": sorted(names),
          "env_after": sorted(k for k in os.environ if k.startswith("LISTEN_")),
          "inheritable": [os.get_inheritable(fd) for fd in fds]}
def attempt(text):
    try:
        return resolve_listen(text, fds)
    except ValueError as exc:
        return "error: " + str(exc)
"""


def test_systemd_socket_is_adopted_and_accepts() -> None:
    server = listening()
    client = socket.create_connection(server.getsockname(), timeout=5)  # queued in the backlog
    client.sendall(b"hello")
    worker = WORKER_PROLOGUE + textwrap.dedent(
        """
        result["by_name"] = attempt("systemd:web")
        result["by_fd"] = attempt("fd:3")
        sock = listener_socket(result["by_name"])
        result["blocking"] = sock.getblocking()
        with selectors.DefaultSelector() as sel:
            sel.register(sock, selectors.EVENT_READ)
            assert sel.select(5)
        conn, _ = sock.accept()
        conn.setblocking(True)
        conn.sendall(conn.recv(100).upper())
        conn.close()
        child = subprocess.run([sys.executable, "-c", "import os; print(sorted(k for k in os.environ if "
                                "k.startswith('LISTEN_')))"], capture_output=True, text=True)
        result["grandchild_env"] = child.stdout.strip()
        print(json.dumps(result))
        """
    )
    try:
        result = activated(worker, [server], "web")
        assert client.recv(100) == b"HELLO"
    finally:
        client.close()
        server.close()
    assert result["fds"] == {"3": "web"}
    assert result["env_before"] == ["LISTEN_FDNAMES", "LISTEN_FDS", "LISTEN_PID"]
    assert result["env_after"] == [] and result["grandchild_env"] == "[]"
    assert result["inheritable"] == [False]
    assert result["by_name"] == 3 and result["by_fd"] == 3
    assert result["blocking"] is False


def test_names_pick_among_several_sockets() -> None:
    web, admin, also_web = listening(), listening(), listening()
    admin_port = admin.getsockname()[1]
    worker = WORKER_PROLOGUE + textwrap.dedent(
        """
        result["admin"] = attempt("systemd:admin")
        result["admin_port"] = listener_socket(result["admin"]).getsockname()[1]
        result["web"] = attempt("systemd:web")
        result["missing"] = attempt("systemd:metrics")
        result["fd5"] = attempt("fd:5")
        print(json.dumps(result))
        """
    )
    try:
        result = activated(worker, [web, admin, also_web], "web:admin:web")
    finally:
        for s in (web, admin, also_web):
            s.close()
    assert result["fds"] == {"3": "web", "4": "admin", "5": "web"}
    assert result["inheritable"] == [False, False, False]
    assert result["admin"] == 4 and result["admin_port"] == admin_port
    assert result["web"] == "error: 'systemd:web': 2 sockets are named 'web' (fds 3, 5); use fd:N"
    assert (
        result["missing"] == "error: 'systemd:metrics': no socket named 'metrics' was passed; names passed: admin, web"
    )
    assert result["fd5"] == 5


def test_unnamed_sockets_are_called_unknown() -> None:
    server = listening()
    worker = WORKER_PROLOGUE + 'result["unknown"] = attempt("systemd:unknown")\nprint(json.dumps(result))\n'
    try:
        result = activated(worker, [server], None)
    finally:
        server.close()
    assert result["fds"] == {"3": "unknown"} and result["unknown"] == 3


def test_another_process_pid_inherits_nothing() -> None:
    server = listening()
    worker = WORKER_PROLOGUE + textwrap.dedent(
        """
        result["by_name"] = attempt("systemd:web")
        result["by_fd"] = attempt("fd:3")  # the fd is there all the same: fd:N does not need the protocol
        print(json.dumps(result))
        """
    )
    try:
        result = activated(worker, [server], "web", pid="parent")
    finally:
        server.close()
    assert result["fds"] == {} and result["env_after"] == []
    assert result["by_name"] == "error: 'systemd:web': no sockets were passed (not started by a systemd socket unit?)"
    assert result["by_fd"] == 3


def test_a_count_beyond_the_passed_fds_is_an_error() -> None:
    server = listening()
    worker = textwrap.dedent(
        """
        import json, os
        from tcptotcp._activation import inherited_listeners
        try:
            inherited_listeners()
        except ValueError as exc:
            print(json.dumps({"error": str(exc), "env": sorted(k for k in os.environ if k.startswith("LISTEN_"))}))
        """
    )
    try:
        result = activated(worker, [server], None, count=2)
    finally:
        server.close()
    assert result == {"error": "LISTEN_FDS=2: fd 4 is not open (Bad file descriptor)", "env": []}


# In-process: these never reach the descriptors, so the test process's own fds stay untouched.


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"LISTEN_FDS": "1"},
        {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "web"},
    ],
)
def test_nothing_inherited_without_our_pid(environ: Dict[str, str]) -> None:
    if environ.get("LISTEN_PID") == str(os.getpid()):  # pragma: no cover - we are not init
        pytest.skip("running as pid 1")
    env = dict(environ, OTHER="x")
    assert inherited_listeners(env) == {}
    assert env == {"OTHER": "x"}


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"LISTEN_PID": "abc"}, "LISTEN_PID='abc' is not a process id"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS='-1' is not a count"),
        ({"LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}, "LISTEN_FDNAMES='a:b' has 2 names for LISTEN_FDS=1"),
        ({"LISTEN_FDS": "0", "LISTEN_FDNAMES": "a"}, "LISTEN_FDNAMES='a' has 1 names for LISTEN_FDS=0"),
    ],
)
def test_malformed_variables(environ: Dict[str, str], message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), **environ}
    with pytest.raises(ValueError) as info:
        inherited_listeners(env)
    assert str(info.value) == message
    assert env == {}  # unset even so, as sd_listen_fds(1) does


def test_zero_fds_and_keeping_the_variables() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_listeners(env, unset=False) == {}
    assert env == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}


def test_resolve_errors_name_the_value() -> None:
    connected = socket.socket()
    udp = socket.socket(type=socket.SOCK_DGRAM)
    r, w = os.pipe()
    closed = os.dup(r)
    os.close(closed)
    try:
        cases = {
            f"fd:{connected.fileno()}": "is a socket but not listening",
            f"fd:{udp.fileno()}": "is not a stream socket",
            f"fd:{r}": "is not a socket",
            f"fd:{closed}": "is not open",
            "fd:": "needs a descriptor number",
            "fd:three": "needs a descriptor number",
            "fd:-3": "needs a descriptor number",
            "systemd:": "needs a socket name",
            "systemd:web": "no sockets were passed",
            "127.0.0.1:80": "expected fd:N or systemd:NAME",
        }
        for text, message in cases.items():
            with pytest.raises(ValueError, match=message) as info:
                resolve_listen(text, {})
            assert str(info.value).startswith(repr(text) + ": ")
            assert "\n" not in str(info.value)
        os.fstat(r)  # a failed check leaves the descriptor open
        assert connected.fileno() >= 0
    finally:
        connected.close()
        udp.close()
        os.close(r)
        os.close(w)


def test_resolve_checks_the_named_socket() -> None:
    udp = socket.socket(type=socket.SOCK_DGRAM)
    try:
        with pytest.raises(ValueError, match=f"'systemd:dns': fd {udp.fileno()} is not a stream socket"):
            resolve_listen("systemd:dns", {udp.fileno(): "dns"})
    finally:
        udp.close()


def test_listener_socket_accepts() -> None:
    server = listening()
    fd = os.dup(server.fileno())
    sock = listener_socket(fd)
    try:
        assert sock.fileno() == fd and not sock.getblocking() and not os.get_inheritable(fd)
        assert resolve_listen(f"fd:{fd}", {}) == fd
        client = socket.create_connection(server.getsockname(), timeout=5)
        sock.settimeout(5)
        conn, _ = sock.accept()
        conn.close()
        client.close()
    finally:
        sock.close()
        server.close()
    not_listening = socket.socket()
    try:
        with pytest.raises(ValueError, match="not listening"):
            listener_socket(not_listening.fileno())
        assert not_listening.fileno() >= 0  # still ours, not adopted
    finally:
        not_listening.close()


def test_is_inherited_address() -> None:
    assert is_inherited_address("fd:3") and is_inherited_address("systemd:web")
    assert not is_inherited_address("127.0.0.1:8080") and not is_inherited_address("unix:/tmp/x")
