"""load_config(): TOML forwards, top-level defaults, and one-line errors naming file, forward and key.

Addresses are numeric throughout: no test waits on a name lookup.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Optional

import pytest

from tcptotcp._config import Config, ConfigError, ForwardSpec, load_config

MINIMAL = '[[forward]]\nlisten = "127.0.0.1:8080"\nupstream = "127.0.0.1:80"\n'


def write(tmp_path: Path, text: str, name: str = "tcptotcp.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    return info.value


def assert_where(
    exc: ConfigError, key: Optional[str], forward: Optional[int] = None, listen: Optional[str] = None
) -> None:
    message = str(exc)
    if key is not None:
        assert f"key {key!r}: " in message, message
        assert exc.key == key
    if forward is not None:
        assert f": forward {forward}" in message, message
        assert exc.forward == forward
    if listen is not None:
        assert f"forward {forward} (listen {listen}): " in message, message
        assert exc.listen == listen


FULL = """\
rate_check = 2
idle_timeout = 600
activity = "any"
half_close = true
max_connections = 50
connect_timeout = 3
allow = ["10.0.0.0/8", "::1"]
deny = "10.9.0.0/16"
balance = "roundrobin"
upstream_backoff = 0
max_fails = 3
fail_window = 30
check_interval = 2
check_rise = 4
check_fall = 5
max_per_client = 10
rate_per_client = 100
client_prefix6 = 48
route_sni = ["db.example.com=127.0.0.1:5432", "*.Example.com.=127.0.0.1:443"]
route_sni_strict = true
bandwidth = "10M"
send_proxy = "v1"
accept_proxy = true
proxy_timeout = 2.5
backlog = 128
keepalive = 60
keepalive_interval = 10
keepalive_count = 3
user_timeout = 30
reuse_port = true
backend = "pure"
log_level = "debug"
log_format = "json"
metrics = "127.0.0.1:9100"

[[forward]]
listen = "127.0.0.1:8080"
upstream = "127.0.0.1:80"

[[forward]]
listen = "[::1]:8443"
upstream = ["127.0.0.1:443", "[::1]:443", "unix:/run/app.sock"]
rate_check = 0
idle_timeout = 0
activity = "both"
half_close = false
bandwidth = false
max_connections = 1
connect_timeout = 0.25
allow = "192.0.2.7"
deny = []
balance = "first"
upstream_backoff = 1.5
max_fails = 1
check_interval = false
max_per_client = false
client_prefix6 = 128
send_proxy = false
accept_proxy = false
proxy_timeout = 1
backlog = 1
keepalive = false
keepalive_interval = 1
keepalive_count = 127
user_timeout = 0.5
reuse_port = false
"""


def test_full_file(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    assert config.path == str(tmp_path / "tcptotcp.toml")
    assert (config.backend, config.log_level, config.log_format, config.metrics) == (
        "pure",
        "debug",
        "json",
        "127.0.0.1:9100",
    )
    first, second = config.forwards
    assert first == ForwardSpec(
        listen="127.0.0.1:8080",
        upstreams=("127.0.0.1:80",),
        rate_check=2,
        idle_timeout=600,
        activity="any",
        half_close=True,
        max_connections=50,
        connect_timeout=3.0,
        allow=("10.0.0.0/8", "::1"),
        deny=("10.9.0.0/16",),
        balance="roundrobin",
        upstream_backoff=0.0,
        max_fails=3,
        fail_window=30.0,
        check_interval=2.0,
        check_rise=4,
        check_fall=5,
        max_per_client=10,
        rate_per_client=100,
        client_prefix6=48,
        route_sni=("db.example.com=127.0.0.1:5432", "*.Example.com.=127.0.0.1:443"),
        route_sni_strict=True,
        bandwidth=10_000_000,
        send_proxy="v1",
        accept_proxy=True,
        proxy_timeout=2.5,
        backlog=128,
        keepalive=60,
        keepalive_interval=10,
        keepalive_count=3,
        user_timeout=30.0,
        reuse_port=True,
    )
    assert second == ForwardSpec(
        listen="[::1]:8443",
        upstreams=("127.0.0.1:443", "[::1]:443", "unix:/run/app.sock"),
        rate_check=0,
        idle_timeout=0,
        activity="both",
        half_close=False,
        max_connections=1,
        connect_timeout=0.25,
        allow=("192.0.2.7",),
        deny=(),
        balance="first",
        upstream_backoff=1.5,
        max_fails=1,
        fail_window=30.0,
        check_interval=None,
        check_rise=4,
        check_fall=5,
        max_per_client=None,
        rate_per_client=100,
        client_prefix6=128,
        route_sni=("db.example.com=127.0.0.1:5432", "*.Example.com.=127.0.0.1:443"),
        route_sni_strict=True,
        send_proxy=None,
        accept_proxy=False,
        proxy_timeout=1.0,
        backlog=1,
        keepalive=None,
        keepalive_interval=1,
        keepalive_count=127,
        user_timeout=0.5,
        reuse_port=False,
    )
    # Floats are floats even when written as TOML integers.
    assert isinstance(first.connect_timeout, float) and isinstance(second.proxy_timeout, float)
    # The parsed addresses ride along, so the forwarder need not resolve them again.
    assert first.listen_address is not None and first.listen_address.sockaddr == ("127.0.0.1", 8080)
    assert [a.family for a in second.upstream_addresses] == [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX]


def test_forwarder_kwargs(tmp_path: Path) -> None:
    spec = load(tmp_path, FULL).forwards[0]
    assert spec.forwarder_kwargs() == {
        "rate_check_seconds": 2,
        "idle_timeout": 600,
        "activity": "any",
        "half_close": True,
        "max_connections": 50,
        "connect_timeout": 3.0,
        "allow": ("10.0.0.0/8", "::1"),
        "deny": ("10.9.0.0/16",),
        "balance": "roundrobin",
        "upstream_backoff": 0.0,
        "max_fails": 3,
        "fail_window": 30.0,
        "check_interval": 2.0,
        "check_rise": 4,
        "check_fall": 5,
        "max_per_client": 10,
        "rate_per_client": 100,
        "client_prefix6": 48,
        "route_sni": ("db.example.com=127.0.0.1:5432", "*.Example.com.=127.0.0.1:443"),
        "route_sni_strict": True,
        "bandwidth": 10_000_000,
        "resolve_interval": 30.0,  # (the defaults: FULL leaves them out)
        "resolve_strict": False,
        "send_proxy": "v1",
        "accept_proxy": True,
        "proxy_timeout": 2.5,
        "backlog": 128,
        "keepalive": 60,
        "keepalive_interval": 10,
        "keepalive_count": 3,
        "user_timeout": 30.0,
        "reuse_port": True,
        # (the TLS options' defaults: FULL leaves them out)
        "tls_cert": (),
        "tls_key": (),
        "tls_client_ca": None,
        "tls_min_version": "1.2",
        "tls_ciphers": None,
        "tls_alpn": (),
        "tls_handshake_timeout": 10.0,
        "upstream_tls": False,
        "upstream_ca": None,
        "upstream_sni": None,
        "upstream_cert": None,
        "upstream_key": None,
        "upstream_insecure": False,
    }


def test_defaults_are_the_cli_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, MINIMAL)
    assert (config.backend, config.log_level, config.log_format, config.metrics) == (None, None, None, None)
    (spec,) = config.forwards
    assert spec == ForwardSpec(listen="127.0.0.1:8080", upstreams=("127.0.0.1:80",))
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(ForwardSpec)
        if f.compare and f.name not in ("listen", "upstreams")
    }
    assert {name: getattr(spec, name) for name in defaults} == defaults
    assert (spec.rate_check, spec.idle_timeout, spec.max_connections, spec.backlog) == (5, 7200, 1024, 4096)
    assert (spec.connect_timeout, spec.upstream_backoff, spec.proxy_timeout) == (10.0, 10.0, 5.0)
    assert (spec.activity, spec.balance, spec.send_proxy, spec.keepalive, spec.user_timeout) == (
        "both",
        "first",
        None,
        None,
        None,
    )


def test_upstream_as_string_and_list(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        MINIMAL + '[[forward]]\nlisten = "127.0.0.1:8081"\nupstream = ["127.0.0.1:81", "127.0.0.1:82"]\n',
    )
    assert [spec.upstreams for spec in config.forwards] == [("127.0.0.1:80",), ("127.0.0.1:81", "127.0.0.1:82")]


def test_inline_array_of_tables(tmp_path: Path) -> None:
    config = load(tmp_path, 'forward = [{listen = "127.0.0.1:1", upstream = "127.0.0.1:2"}]\n')
    assert config.forwards[0].listen == "127.0.0.1:1"


def test_socket_activation_listeners_are_taken_as_written(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[[forward]]\nlisten = "fd:3"\nupstream = "127.0.0.1:80"\n'
        '[[forward]]\nlisten = "systemd:web-https"\nupstream = "127.0.0.1:443"\n',
    )
    assert [(spec.listen, spec.listen_address) for spec in config.forwards] == [
        ("fd:3", None),
        ("systemd:web-https", None),
    ]


def test_port_zero_listeners_do_not_clash(tmp_path: Path) -> None:
    body = '[[forward]]\nlisten = "127.0.0.1:0"\nupstream = "127.0.0.1:80"\n'
    assert len(load(tmp_path, body * 2).forwards) == 2


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    assert load(tmp_path, "\ufeff" + MINIMAL).forwards[0].listen == "127.0.0.1:8080"


# -- values: (TOML line, key, words the message must hold) ---------------------------------

BAD_VALUES = [
    ('idle_timeout = "ten"', "idle_timeout", "expected an integer >= 0, got 'ten'"),
    ("rate_check = -1", "rate_check", "expected an integer >= 0, got -1"),
    ("rate_check = 1.5", "rate_check", "got 1.5"),
    ("max_connections = true", "max_connections", "expected an integer from 1 to 2147483647, got true"),
    ("max_connections = 0", "max_connections", "expected an integer from 1 to 2147483647, got 0"),
    ("backlog = 0", "backlog", "got 0"),
    ("connect_timeout = 0", "connect_timeout", "expected a number > 0 and <= 2147483, got 0"),
    ("connect_timeout = inf", "connect_timeout", "got inf"),
    ("connect_timeout = nan", "connect_timeout", "got nan"),
    ('connect_timeout = "10"', "connect_timeout", "got '10'"),
    ("proxy_timeout = -1.0", "proxy_timeout", "expected a number > 0"),
    ("upstream_backoff = -0.5", "upstream_backoff", "expected a number from 0 to 2147483, got -0.5"),
    ("upstream_backoff = false", "upstream_backoff", "got false"),
    ('activity = "all"', "activity", "expected 'both' or 'any', got 'all'"),
    ("half_close = 1", "half_close", "expected true or false, got 1"),
    ('accept_proxy = "yes"', "accept_proxy", "expected true or false"),
    ("reuse_port = 0", "reuse_port", "expected true or false"),
    ('balance = "random"', "balance", "expected 'first' or 'roundrobin' or 'leastconn' or 'source', got 'random'"),
    ('send_proxy = "v3"', "send_proxy", "expected 'v1' or 'v2', or false for none, got 'v3'"),
    ("send_proxy = true", "send_proxy", "got true"),
    ("keepalive = 0", "keepalive", "expected an integer from 1 to 32767, or false for none, got 0"),
    ("keepalive = true", "keepalive", "got true"),
    ("keepalive_interval = 40000", "keepalive_interval", "got 40000"),
    ("keepalive_count = 128", "keepalive_count", "from 1 to 127"),
    ("connect_timeout = 2147484", "connect_timeout", "expected a number > 0 and <= 2147483, got 2147484"),
    ("max_connections = 2147483648", "max_connections", "got 2147483648"),
    ("user_timeout = 0.0005", "user_timeout", "from 0.001 to 2147483"),
    ("user_timeout = 0", "user_timeout", "expected a number from 0.001 to 2147483, or false for none, got 0"),
    ('allow = ["10.0.0.300/8"]', "allow", "invalid network '10.0.0.300/8'"),
    ('allow = "10.0.0.1/8"', "allow", "host bits set"),
    ("allow = [1]", "allow", "expected a string or a list of strings, got [1]"),
    ('deny = ["::1", "nope"]', "deny", "invalid network 'nope'"),
    ("deny = {}", "deny", "got a table"),
]


@pytest.mark.parametrize("line, key, words", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_bad_value_in_a_forward(tmp_path: Path, line: str, key: str, words: str) -> None:
    exc = error(tmp_path, MINIMAL + f'[[forward]]\nlisten = "127.0.0.1:8081"\nupstream = "127.0.0.1:81"\n{line}\n')
    assert_where(exc, key, forward=2, listen="127.0.0.1:8081")
    assert words in str(exc), str(exc)


@pytest.mark.parametrize("line, key, words", BAD_VALUES[:6], ids=[case[0] for case in BAD_VALUES[:6]])
def test_bad_value_at_the_top(tmp_path: Path, line: str, key: str, words: str) -> None:
    exc = error(tmp_path, f"{line}\n" + MINIMAL)
    assert str(exc).startswith(f"{exc.path}: key {key!r}: expected ")
    assert words in str(exc), str(exc)
    assert exc.forward is None


def test_bad_process_wide_values(tmp_path: Path) -> None:
    for line, key, words in [
        ('backend = "fast"', "backend", "expected 'auto' or 'cython' or 'pure', got 'fast'"),
        ('log_level = "loud"', "log_level", "got 'loud'"),
        ('log_format = "xml"', "log_format", "expected 'text' or 'json', got 'xml'"),
        ("metrics = 9100", "metrics", "expected a string, or false for none, got 9100"),
        ('metrics = "unix:/run/m.sock"', "metrics", "expected HOST:PORT"),
        ('metrics = "127.0.0.1:99999"', "metrics", "out of range"),
        ('metrics = "127.0.0.1:8080"', "metrics", "same address as forward 1's listen"),
    ]:
        exc = error(tmp_path, f"{line}\n" + MINIMAL)
        assert_where(exc, key)
        assert words in str(exc), str(exc)


# -- keys -----------------------------------------------------------------------------------


def test_unknown_key_in_a_forward(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + "idle-timeout = 5\n")
    assert_where(exc, "idle-timeout", forward=1, listen="127.0.0.1:8080")
    assert str(exc).endswith("unknown option (did you mean 'idle_timeout'?)")


def test_unknown_key_at_the_top(tmp_path: Path) -> None:
    exc = error(tmp_path, "colour = 'blue'\n" + MINIMAL)
    assert str(exc) == f"{exc.path}: key 'colour': unknown option"


def test_unknown_table_in_a_forward(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + "[forward.tls]\ncert = 'x'\n")
    assert_where(exc, "tls", forward=1, listen="127.0.0.1:8080")


@pytest.mark.parametrize(
    "key, value",
    [("backend", '"pure"'), ("log_level", '"info"'), ("log_format", '"json"'), ("metrics", '"127.0.0.1:1"')],
)
def test_process_wide_key_in_a_forward(tmp_path: Path, key: str, value: str) -> None:
    exc = error(tmp_path, MINIMAL + f"{key} = {value}\n")
    assert_where(exc, key, forward=1, listen="127.0.0.1:8080")
    assert "not allowed in a forward" in str(exc)


@pytest.mark.parametrize("key", ["listen", "upstream"])
def test_forward_only_key_at_the_top(tmp_path: Path, key: str) -> None:
    exc = error(tmp_path, f'{key} = "127.0.0.1:1"\n' + MINIMAL)
    assert_where(exc, key)
    assert "belongs in a [[forward]] table" in str(exc)


def test_missing_listen(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + '[[forward]]\nupstream = "127.0.0.1:80"\n')
    assert_where(exc, "listen", forward=2)
    assert exc.listen is None and "missing" in str(exc)


def test_missing_upstream(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + '[[forward]]\nlisten = "127.0.0.1:8081"\n')
    assert_where(exc, "upstream", forward=2, listen="127.0.0.1:8081")
    assert "missing" in str(exc)


@pytest.mark.parametrize("value", ["[]", "[1]", "80", "['127.0.0.1:1', 2]"])
def test_upstream_of_the_wrong_type(tmp_path: Path, value: str) -> None:
    exc = error(tmp_path, f'[[forward]]\nlisten = "127.0.0.1:8080"\nupstream = {value}\n')
    assert_where(exc, "upstream", forward=1, listen="127.0.0.1:8080")
    assert 'expected a string, a table {address = "HOST:PORT", weight = W}, or a non-empty list of them' in str(exc)


def test_listen_of_the_wrong_type(tmp_path: Path) -> None:
    exc = error(tmp_path, '[[forward]]\nlisten = 8080\nupstream = "127.0.0.1:80"\n')
    assert_where(exc, "listen", forward=1)
    assert str(exc).endswith("expected a string, got 8080")


@pytest.mark.parametrize("text", ["", "# nothing here\n", "forward = []\n"])
def test_no_forward(tmp_path: Path, text: str) -> None:
    exc = error(tmp_path, text)
    assert "no [[forward]] table" in str(exc)


@pytest.mark.parametrize("text", ['[forward]\nlisten = "127.0.0.1:1"\n', "forward = 3\n", "forward = [1]\n"])
def test_forward_not_an_array_of_tables(tmp_path: Path, text: str) -> None:
    exc = error(tmp_path, text)
    assert_where(exc, "forward")
    assert "expected [[forward]] tables" in str(exc)


# -- addresses ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "listen, words",
    [
        ("127.0.0.1:99999", "out of range"),
        ("127.0.0.1", "expected host:port"),
        ("::1:80", "brackets"),
        ("127.0.0.1:http", "is not a number"),
        ("unix:", "needs a path"),
        ("fd:", "expected fd:N"),
        ("fd:-1", "expected fd:N"),
        ("fd: 3", "expected fd:N"),
        ("systemd:", "expected systemd:NAME"),
        ("systemd:a:b", "expected systemd:NAME"),
    ],
)
def test_bad_listen_address(tmp_path: Path, listen: str, words: str) -> None:
    exc = error(tmp_path, MINIMAL + f'[[forward]]\nlisten = "{listen}"\nupstream = "127.0.0.1:80"\n')
    assert_where(exc, "listen", forward=2, listen=listen)
    assert words in str(exc), str(exc)


@pytest.mark.parametrize(
    "upstream, words",
    [
        ("127.0.0.1:70000", "out of range"),
        ("nohostport", "expected host:port"),
        ("fd:3", "fd: and systemd: name listening sockets"),
        ("systemd:web", "fd: and systemd: name listening sockets"),
    ],
)
def test_bad_upstream_address(tmp_path: Path, upstream: str, words: str) -> None:
    exc = error(tmp_path, f'[[forward]]\nlisten = "127.0.0.1:8080"\nupstream = ["127.0.0.1:80", "{upstream}"]\n')
    assert_where(exc, "upstream", forward=1, listen="127.0.0.1:8080")
    assert words in str(exc), str(exc)


@pytest.mark.parametrize(
    "first, second",
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "[0:0::1]:8080"),  # one socket address, written two ways
        ("unix:/tmp/t2t.sock", "unix:/tmp/../tmp/t2t.sock"),
        ("fd:3", "fd:03"),
        ("systemd:web", "systemd:web"),
    ],
)
def test_two_forwards_on_one_listen_address(tmp_path: Path, first: str, second: str) -> None:
    exc = error(
        tmp_path,
        f'[[forward]]\nlisten = "{first}"\nupstream = "127.0.0.1:80"\n'
        '[[forward]]\nlisten = "127.0.0.1:9"\nupstream = "127.0.0.1:80"\n'
        f'[[forward]]\nlisten = "{second}"\nupstream = "127.0.0.1:81"\n',
    )
    assert_where(exc, "listen", forward=3, listen=second)
    assert "same address as forward 1" in str(exc)
    assert (f"({first})" in str(exc)) == (first != second)


# -- the file -------------------------------------------------------------------------------


def test_syntax_error_has_the_line(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + "idle_timeout = = 3\n")
    assert exc.line == 4
    assert str(exc).startswith(f"{exc.path}: line 4")
    assert exc.problem


def test_syntax_error_at_the_end(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + "idle_timeout =")
    assert exc.line == 4
    assert str(exc).startswith(f"{exc.path}: line 4")


def test_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    exc = error(tmp_path, MINIMAL + 'listen = "127.0.0.1:1"\n')
    assert exc.line is not None


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: line 4: not UTF-8 text"


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: cannot read: No such file or directory"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path))


def test_relative_files_are_taken_from_the_config_files_directory(tmp_path: Path, monkeypatch) -> None:
    """Wherever the process runs (systemd's directory is /), as an operator reads the file."""
    etc, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    (etc / "certs").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("certs/a.crt", "certs/a.key", "certs/b.crt", "ca.pem"):
        (etc / name).write_text("(never read by load_config)\n")
    absolute = tmp_path / "absolute.pem"
    absolute.write_text("-\n")
    write(
        etc,
        'pid_file = "run/t2t.pid"\n'
        'upstream_ca = "ca.pem"\n'
        "[[forward]]\n"
        'listen = "127.0.0.1:8443"\n'
        'upstream = "127.0.0.1:80"\n'
        'tls_cert = ["certs/a.crt", "certs/b.crt"]\n'
        'tls_key = "certs/a.key"\n'
        f'tls_client_ca = "{absolute}"\n',
    )
    monkeypatch.chdir(elsewhere)
    config = load_config("../etc/tcptotcp.toml")
    forward = config.forwards[0]
    assert forward.tls_cert == (str(etc / "certs/a.crt"), str(etc / "certs/b.crt"))
    assert forward.tls_key == (str(etc / "certs/a.key"),)
    assert forward.upstream_ca == str(etc / "ca.pem")
    assert forward.tls_client_ca == str(absolute)
    assert config.pid_file == str(etc / "run/t2t.pid")
