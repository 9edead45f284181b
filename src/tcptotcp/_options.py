"""Every forward option, declared once: what it is called, its type, default and bounds.

The command line (``cli.py``), the config file (``_config.py``) and ``Forwarder``'s keyword
arguments all take their options from this table, and check values with the one
``check()``: a value that the command line refuses, the config file refuses too, with the
same words. Each record says:

- ``name``: the TOML key, the ``ForwardSpec`` field and the key of a settings dict;
- ``keyword``: ``Forwarder``'s keyword argument (``rate_check_seconds`` for ``rate_check``, as
  ``connect()`` names it);
- ``flags``: the command line's spelling (``--idle-timeout``);
- ``type``, ``default``, bounds (``minimum``/``maximum``, ``min_inclusive``), ``choices``;
- ``optional``: None switches it off (TOML, which has no null, writes ``false``);
- ``repeatable``: a list of items (the flag given several times, a TOML string or list);
- ``restart``: a running forward cannot take a change (the listening socket's own settings):
  a reload warns and keeps the old value;
- ``scope``: ``"forward"`` (per ``[[forward]]``, or a top-level default for all of them) or
  ``"process"`` (top level only; the command line wins over the file).
"""

from __future__ import annotations

import datetime
import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ._access import parse_network
from ._sni import check_route_pattern
from ._tls import MIN_VERSIONS, check_alpn, check_file

# Linux's limits for TCP_KEEPIDLE/TCP_KEEPINTVL and TCP_KEEPCNT: out-of-range values would
# otherwise fail in setsockopt() for every client.
MAX_KEEPALIVE_SECONDS = 32767
MAX_KEEPALIVE_COUNT = 127
MAX_INT = 2**31 - 1  # a C int: listen()'s backlog, the loops' count of bridges
# The longest timeout, in seconds, whose milliseconds fit a C int (TCP_USER_TIMEOUT, a poll's
# timeout): about 24.8 days. The loops keep time in int64 nanoseconds, which holds far more.
MAX_SECONDS = MAX_INT // 1000
# TCP_USER_TIMEOUT is in whole milliseconds, and 0 means "the system's default": a shorter
# timeout would silently be none.
MIN_USER_TIMEOUT = 0.001

LOG_LEVELS = ("debug", "info", "warning", "error")

# A byte rate's text: a number and an SI suffix, powers of 1000 (bytes, not bits). The case of
# the suffix does not matter: a rate in milli-bytes means nothing, so "m" can only be mega.
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_RATE = re.compile(r"([0-9]+)(?:\.([0-9]+))?([kmg]?)", re.IGNORECASE)


def parse_si(text: str) -> int:
    """``"10M"`` as 10000000, ``"1.5k"`` as 1500, ``"500"`` as 500; ValueError if the text is not
    a whole number of bytes that way."""
    match = _RATE.fullmatch(text.strip())
    if not match:
        raise ValueError(text)
    whole: str = match.group(1)
    fraction: str = match.group(2) or ""
    scale = _SI[match.group(3).lower()]
    numerator = int(whole + fraction) * scale
    denominator: int = 10 ** len(fraction)
    if numerator % denominator:
        raise ValueError(text)  # a fraction of a byte
    return numerator // denominator


FORWARD = "forward"
PROCESS = "process"


class OptionError(ValueError):
    """A value an option cannot take. ``problem`` is what is wrong (``expected ..., got ...``),
    ``name`` the option as the caller named it; ``str()`` is ``"name: problem"``."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(f"{name}: {problem}")


def show(value: object) -> str:
    """A value as a message quotes it: TOML's true/false, short, on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number_text(number: float) -> str:
    """2147483, not 2.14748e+06; 0.001, not 1e-03."""
    return str(int(number)) if float(number).is_integer() else repr(float(number))


@dataclass(frozen=True)
class Option:
    """One option; see the module's docstring. Build with ``_option()``, which fills in the
    derived fields (flags, keyword)."""

    name: str
    type: type  # int, float, bool or str (for a repeatable option: its items' type)
    default: Any
    help: str
    keyword: str
    flags: Tuple[str, ...]
    metavar: Optional[str] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None  # always inclusive
    min_inclusive: bool = True
    choices: Tuple[str, ...] = ()
    optional: bool = False
    repeatable: bool = False
    item_check: Optional[Callable[[str], object]] = None  # each item's own check; ValueError if bad
    restart: bool = False
    scope: str = FORWARD
    group: Optional[str] = None  # the command line's help section; None: the first one
    si: bool = False  # an integer also written as text with an SI suffix ("10M"; see parse_si)

    @property
    def names_a_file(self) -> bool:
        """Whether the value is a path (a relative one in a config file is taken from the
        file's directory)."""
        return self.metavar == "FILE"

    @property
    def expected(self) -> str:
        """What the option takes, as a message says it: ``an integer from 1 to 127``."""
        if self.si:
            return (
                f"an integer from {_number_text(self.minimum or 0)} to {_number_text(self.maximum or 0)}, "
                "or a string with an SI suffix k, M or G (such as '10M')"
            )
        if self.repeatable:
            return "a string or a list of strings"
        if self.type is bool:
            return "true or false"
        if self.choices:
            return " or ".join(repr(choice) for choice in self.choices)
        if self.type is str:
            return "a string"
        what = "an integer" if self.type is int else "a number"
        low, high = self.minimum, self.maximum
        if low is not None and high is not None:
            if self.min_inclusive:
                return f"{what} from {_number_text(low)} to {_number_text(high)}"
            return f"{what} > {_number_text(low)} and <= {_number_text(high)}"
        if low is not None:
            return f"{what} {'>=' if self.min_inclusive else '>'} {_number_text(low)}"
        if high is not None:
            return f"{what} <= {_number_text(high)}"
        return what

    def _bad(self, name: str, value: object, off: Optional[str]) -> OptionError:
        what = self.expected
        if self.optional and off:
            what += f", or {off}"
        return OptionError(name, f"expected {what}, got {show(value)}")

    def check(self, value: object, *, name: Optional[str] = None, off: Optional[str] = "None") -> Any:
        """The value checked and normalised (a float for a number, a tuple for a list), or
        OptionError. An optional option takes None, and False (TOML's way to say none), as None.
        `name` is how the message names the option (default ``self.name``); `off` how it
        says that none is allowed (``"false for none"`` in a config file; None: not said)."""
        name = self.name if name is None else name
        if self.optional and (value is None or value is False):
            return None
        if self.repeatable:
            if isinstance(value, str):
                items: Tuple[Any, ...] = (value,)
            elif isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(i, self.type) for i in value):
                items = tuple(value)
            else:
                raise self._bad(name, value, off)
            if self.item_check is not None:
                for item in items:
                    try:
                        self.item_check(item)
                    except ValueError as exc:
                        raise OptionError(name, str(exc)) from None
            return items
        if self.type is bool:
            if not isinstance(value, bool):
                raise self._bad(name, value, off)
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise self._bad(name, value, off)
            return value
        # A number. (TOML's true is a Python int: a bool is never taken for a number.)
        number: float
        if isinstance(value, bool):
            raise self._bad(name, value, off)
        given = value  # (the words of a refusal quote it as given)
        if self.si and isinstance(value, str):
            try:
                value = parse_si(value)
            except ValueError:
                raise self._bad(name, given, off) from None
        if self.type is int and isinstance(value, int):
            number = value
        elif self.type is float and isinstance(value, (int, float)):
            number = float(value)
            if not math.isfinite(number):  # TOML allows inf and nan
                raise self._bad(name, value, off)
        else:
            raise self._bad(name, value, off)
        low, high = self.minimum, self.maximum
        if low is not None and (number < low or (number == low and not self.min_inclusive)):
            raise self._bad(name, given, off)
        if high is not None and number > high:
            raise self._bad(name, given, off)
        return number

    def parse(self, text: str, *, name: Optional[str] = None) -> Any:
        """A command-line word as this option's value (one item, for a repeatable option),
        checked; OptionError if it is not one."""
        name = self.flags[0] if name is None and self.flags else (name or self.name)
        if self.repeatable:
            return self.check(text, name=name, off=None)[0]
        if self.si:  # a plain integer is refused as the number it is, as a file's would be
            return self.check(int(text) if text.strip().isdigit() else text, name=name, off=None)
        if self.type in (int, float) and not self.choices:
            try:
                value: object = self.type(text)
            except ValueError:
                raise self._bad(name, text, None) from None
            return self.check(value, name=name, off=None)
        return self.check(text, name=name, off=None)


def parse_route(text: str) -> Tuple[str, str]:
    """A --route-sni item, ``NAME=UPSTREAM``, as (the pattern, normalised; the upstream's text).
    ValueError if it is not one (the upstream is parsed where the forward is made)."""
    name, sep, upstream = text.partition("=")
    if not sep or not upstream:
        raise ValueError(f"{text!r}: expected NAME=UPSTREAM, e.g. db.example.com=10.0.0.5:5432")
    return check_route_pattern(name), upstream


def _option(
    name: str,
    type: type,
    default: Any,
    help: str,
    *,
    keyword: Optional[str] = None,
    flags: Optional[Tuple[str, ...]] = None,
    **more: Any,
) -> Option:
    """A record; the flag is ``--`` and the name with dashes, the keyword the name, unless given."""
    return Option(
        name=name,
        type=type,
        default=default,
        help=help,
        keyword=name if keyword is None else keyword,
        flags=("--" + name.replace("_", "-"),) if flags is None else flags,
        **more,
    )


ACCESS = "who gets in, where they go"
TLS = "TLS (handshakes in the pure listener; records in the loops on the compiled backend)"
OPERATION = "operation"

#: Per-forward options, in the command line's help order.
FORWARD_OPTIONS: Tuple[Option, ...] = (
    _option(
        "rate_check",
        int,
        5,
        "seconds between idle checks (default 5; 0 means 1)",
        keyword="rate_check_seconds",
        metavar="N",
        minimum=0,
    ),
    _option(
        "idle_timeout",
        int,
        7200,
        "keep-alive seconds; a bridge ends after (N // rate + 1) * rate idle seconds (default 7200; below 2 means 2)",
        metavar="N",
        minimum=0,
    ),
    _option(
        "activity",
        str,
        "both",
        "traffic that keeps a bridge alive: both directions (default) or any",
        choices=("both", "any"),
    ),
    _option("half_close", bool, False, "forward a FIN and keep the other direction open"),
    _option(
        "max_connections",
        int,
        1024,
        f"bridges at once, 1 to {MAX_INT}; further clients wait in the backlog (default 1024)",
        metavar="N",
        minimum=1,
        maximum=MAX_INT,
    ),
    _option(
        "backlog",
        int,
        4096,
        f"listen backlog: clients the kernel queues before they are accepted (1 to {MAX_INT}, "
        "default 4096, capped by net.core.somaxconn; a change needs a restart)",
        metavar="N",
        minimum=1,
        maximum=MAX_INT,
        restart=True,
    ),
    _option(
        "connect_timeout",
        float,
        10.0,
        f"give up on an upstream after this long (more than 0, at most {MAX_SECONDS}; default 10)",
        metavar="SECONDS",
        minimum=0,
        min_inclusive=False,
        maximum=MAX_SECONDS,
    ),
    _option(
        "allow",
        str,
        (),
        "only clients in this network (CIDR or one address; repeatable)",
        metavar="NET",
        repeatable=True,
        item_check=parse_network,
        group=ACCESS,
    ),
    _option(
        "deny",
        str,
        (),
        "refuse clients in this network (repeatable)",
        metavar="NET",
        repeatable=True,
        item_check=parse_network,
        group=ACCESS,
    ),
    _option(
        "balance",
        str,
        "first",
        "first: the first upstream that accepts (failover, default); roundrobin: in turn, by weight; "
        "leastconn: the fewest bridges per weight; source: by the client's address (rendezvous hashing). "
        "An upstream HOST:PORT@W has weight W (1 to 1000, default 1)",
        choices=("first", "roundrobin", "leastconn", "source"),
        group=ACCESS,
    ),
    _option(
        "upstream_backoff",
        float,
        10.0,
        f"an upstream marked down by failed connects is skipped this long, unless all are down "
        f"(0 to {MAX_SECONDS}, default 10; 0: never marked down)",
        metavar="SECONDS",
        minimum=0,
        group=ACCESS,
        maximum=MAX_SECONDS,
    ),
    _option(
        "max_fails",
        int,
        1,
        f"failed connects (refused, unreachable, timed out) within --fail-window that mark an upstream down "
        f"(1 to {MAX_INT}, default 1)",
        metavar="N",
        minimum=1,
        maximum=MAX_INT,
        group=ACCESS,
    ),
    _option(
        "fail_window",
        float,
        10.0,
        f"seconds in which --max-fails failed connects count (more than 0, at most {MAX_SECONDS}; default 10)",
        metavar="SECONDS",
        minimum=0,
        min_inclusive=False,
        maximum=MAX_SECONDS,
        group=ACCESS,
    ),
    _option(
        "check_interval",
        float,
        None,
        "try a TCP connect to each upstream this often (seconds, 0.01 to 86400): "
        "--check-fall failures mark it down, --check-rise successes up again",
        metavar="SECONDS",
        minimum=0.01,
        maximum=86400,
        optional=True,
        group=ACCESS,
    ),
    _option(
        "check_rise",
        int,
        2,
        "with --check-interval: consecutive successful checks that mark a down upstream up (1 to 1000, default 2)",
        metavar="N",
        minimum=1,
        maximum=1000,
        group=ACCESS,
    ),
    _option(
        "check_fall",
        int,
        3,
        "with --check-interval: consecutive failed checks that mark an upstream down (1 to 1000, default 3)",
        metavar="N",
        minimum=1,
        maximum=1000,
        group=ACCESS,
    ),
    _option(
        "resolve_interval",
        float,
        30.0,
        "look an upstream written as a host name up again this often (seconds, 0 to 86400; default 30; "
        "0: only at start and on reloads): every address it has is a candidate, new clients follow a change",
        metavar="SECONDS",
        minimum=0,
        maximum=86400,
        group=ACCESS,
    ),
    _option(
        "resolve_strict",
        bool,
        False,
        "an upstream host name that does not resolve at start is an error (default: the forward starts, "
        "its clients are refused until the name resolves; always an error with --resolve-interval 0)",
        group=ACCESS,
    ),
    _option(
        "max_per_client",
        int,
        None,
        f"bridges one client may have open at once (1 to {MAX_INT}); a client is its address, "
        "an IPv6 client its --client-prefix6",
        metavar="N",
        minimum=1,
        maximum=MAX_INT,
        optional=True,
        group=ACCESS,
    ),
    _option(
        "rate_per_client",
        int,
        None,
        "new connections per second one client may open (1 to 1000000000), with bursts of as many",
        metavar="N",
        minimum=1,
        maximum=1_000_000_000,
        optional=True,
        group=ACCESS,
    ),
    _option(
        "client_prefix6",
        int,
        64,
        "IPv6 clients whose addresses share this many leading bits count as one client (0 to 128, default 64)",
        metavar="BITS",
        minimum=0,
        maximum=128,
        group=ACCESS,
    ),
    _option(
        "bandwidth",
        int,
        None,
        "hold each direction of every bridge to RATE bytes/s, 1000 to 100000000000: an integer, or with an "
        "SI suffix (powers of 1000, any case): 500k, 10M, 1G. Past a burst the bridge stops reading, so "
        "a faster sender waits in its own socket's buffers",
        metavar="RATE",
        minimum=1000,
        maximum=100_000_000_000,
        optional=True,
        si=True,
        group=ACCESS,
    ),
    _option(
        "route_sni",
        str,
        (),
        "a TLS client whose ClientHello names NAME (exact, or *.example.com) goes to UPSTREAM, the most "
        "specific match winning; others go to the forward's own upstreams (repeatable). TLS is not terminated: "
        "the ClientHello must be whole within the PROXY timeout",
        metavar="NAME=UPSTREAM",
        repeatable=True,
        item_check=lambda item: parse_route(item),
        group=ACCESS,
    ),
    _option(
        "route_sni_strict",
        bool,
        False,
        "with --route-sni: refuse clients whose ClientHello no route names (none has SNI, or another name)",
        group=ACCESS,
    ),
    _option(
        "send_proxy",
        str,
        None,
        "send each upstream a PROXY protocol header with the client's address first",
        choices=("v1", "v2"),
        optional=True,
        group=ACCESS,
    ),
    _option(
        "accept_proxy",
        bool,
        False,
        "every client must begin with a PROXY protocol header (v1 or v2)",
        group=ACCESS,
    ),
    _option(
        "proxy_timeout",
        float,
        5.0,
        "with --accept-proxy: the header must be complete within this long "
        f"(more than 0, at most {MAX_SECONDS}; default 5)",
        metavar="SECONDS",
        minimum=0,
        min_inclusive=False,
        group=ACCESS,
        maximum=MAX_SECONDS,
    ),
    _option(
        "tls_cert",
        str,
        (),
        "clients speak TLS to the forwarder with this certificate chain (PEM), the upstream gets plaintext; "
        "repeatable: the first is the default, another is chosen when the client's SNI matches its names",
        metavar="FILE",
        repeatable=True,
        item_check=check_file,
        group=TLS,
    ),
    _option(
        "tls_key",
        str,
        (),
        "the private key of each --tls-cert, in the same order (none: each certificate file holds its key)",
        metavar="FILE",
        repeatable=True,
        item_check=check_file,
        group=TLS,
    ),
    _option(
        "tls_client_ca",
        str,
        None,
        "require a client certificate signed by a CA in FILE (mutual TLS)",
        metavar="FILE",
        optional=True,
        group=TLS,
    ),
    _option(
        "tls_min_version",
        str,
        "1.2",
        "the oldest TLS version spoken, both ways (default 1.2)",
        choices=tuple(MIN_VERSIONS),
        group=TLS,
    ),
    _option(
        "tls_ciphers",
        str,
        None,
        "the TLS 1.2 cipher list offered to clients (OpenSSL's syntax)",
        metavar="LIST",
        optional=True,
        group=TLS,
    ),
    _option(
        "tls_alpn",
        str,
        (),
        "ALPN protocols offered to clients, in order of preference (repeatable, or a comma list: h2,http/1.1)",
        metavar="PROTOCOLS",
        repeatable=True,
        item_check=check_alpn,
        group=TLS,
    ),
    _option(
        "tls_handshake_timeout",
        float,
        10.0,
        f"a TLS handshake, with a client or an upstream, must end within this long "
        f"(more than 0, at most {MAX_SECONDS}; default 10)",
        metavar="SECONDS",
        minimum=0,
        min_inclusive=False,
        maximum=MAX_SECONDS,
        group=TLS,
    ),
    _option(
        "upstream_tls",
        bool,
        False,
        "speak TLS to the upstream, verifying its certificate (the system's CAs, or --upstream-ca) "
        "and its host name (the upstream's, or --upstream-sni)",
        group=TLS,
    ),
    _option(
        "upstream_ca",
        str,
        None,
        "with --upstream-tls: trust the CA certificates in FILE instead of the system's",
        metavar="FILE",
        optional=True,
        group=TLS,
    ),
    _option(
        "upstream_sni",
        str,
        None,
        "with --upstream-tls: the server name sent and checked (default: the upstream's host)",
        metavar="NAME",
        optional=True,
        group=TLS,
    ),
    _option(
        "upstream_cert",
        str,
        None,
        "with --upstream-tls: present this client certificate (mutual TLS)",
        metavar="FILE",
        optional=True,
        group=TLS,
    ),
    _option(
        "upstream_key",
        str,
        None,
        "the private key of --upstream-cert (none: the certificate file holds it)",
        metavar="FILE",
        optional=True,
        group=TLS,
    ),
    _option(
        "upstream_insecure",
        bool,
        False,
        "with --upstream-tls: do not verify the upstream's certificate at all (logged as a warning at start)",
        group=TLS,
    ),
    _option(
        "keepalive",
        int,
        None,
        f"TCP keepalive on both sockets of every bridge after IDLE seconds without traffic "
        f"(1 to {MAX_KEEPALIVE_SECONDS})",
        metavar="IDLE",
        minimum=1,
        maximum=MAX_KEEPALIVE_SECONDS,
        optional=True,
        group=OPERATION,
    ),
    _option(
        "keepalive_interval",
        int,
        None,
        f"between keepalive probes (1 to {MAX_KEEPALIVE_SECONDS})",
        metavar="SECONDS",
        minimum=1,
        maximum=MAX_KEEPALIVE_SECONDS,
        optional=True,
        group=OPERATION,
    ),
    _option(
        "keepalive_count",
        int,
        None,
        f"unanswered probes before giving up (1 to {MAX_KEEPALIVE_COUNT})",
        metavar="N",
        minimum=1,
        maximum=MAX_KEEPALIVE_COUNT,
        optional=True,
        group=OPERATION,
    ),
    _option(
        "user_timeout",
        float,
        None,
        "TCP_USER_TIMEOUT: end a bridge whose peer leaves data unacknowledged this long "
        f"({MIN_USER_TIMEOUT:g} to {MAX_SECONDS})",
        metavar="SECONDS",
        minimum=MIN_USER_TIMEOUT,
        optional=True,
        group=OPERATION,
        maximum=MAX_SECONDS,
    ),
    _option(
        "reuse_port",
        bool,
        False,
        "SO_REUSEPORT: several processes share the port, the kernel spreads (a change needs a restart)",
        restart=True,
        group=OPERATION,
    ),
)

#: Process-wide settings: the top level of a config file, or the command line (which wins).
#: None of them changes on a reload.
PROCESS_OPTIONS: Tuple[Option, ...] = (
    _option(
        "metrics",
        str,
        None,
        "serve Prometheus metrics at http://HOST:PORT/metrics",
        metavar="HOST:PORT",
        optional=True,
        restart=True,
        scope=PROCESS,
        group=OPERATION,
    ),
    _option(
        "backend",
        str,
        "auto",
        "engine: the compiled core where available (auto), or force one",
        choices=("auto", "cython", "pure"),
        restart=True,
        scope=PROCESS,
        group=OPERATION,
    ),
    _option(
        "log_level",
        str,
        "info",
        "default info: a line per connection opened and closed",
        choices=LOG_LEVELS,
        restart=True,
        scope=PROCESS,
        group=OPERATION,
    ),
    _option(
        "log_format",
        str,
        "text",
        "json: one JSON object per line (default text)",
        choices=("text", "json"),
        restart=True,
        scope=PROCESS,
        group=OPERATION,
    ),
    _option(
        "pid_file",
        str,
        None,
        "write the process id to FILE (a successor rewrites it; see --upgrade)",
        metavar="FILE",
        optional=True,
        restart=True,
        scope=PROCESS,
        group=OPERATION,
    ),
    _option(
        "upgrade_program",
        str,
        None,
        "what SIGUSR2 starts to take over, given this command line's arguments (default: this "
        "Python's -m tcptotcp), e.g. a newer install's /opt/t2t/bin/tcptotcp",
        metavar="PROGRAM",
        optional=True,
        restart=True,
        scope=PROCESS,
        group=OPERATION,
    ),
)

#: Every option by name.
OPTIONS: Dict[str, Option] = {option.name: option for option in FORWARD_OPTIONS + PROCESS_OPTIONS}
FORWARD_NAMES: Tuple[str, ...] = tuple(option.name for option in FORWARD_OPTIONS)
PROCESS_NAMES: Tuple[str, ...] = tuple(option.name for option in PROCESS_OPTIONS)
#: Per-forward options a running forward cannot take (a reload warns and keeps the old value).
RESTART_NAMES: Tuple[str, ...] = tuple(option.name for option in FORWARD_OPTIONS if option.restart)
#: Forwarder keywords of earlier releases, still taken (``Forwarder`` warns), by the option's name.
DEPRECATED_KEYWORDS: Dict[str, str] = {"idle_timeout_seconds": "idle_timeout"}
# A forward option by its name, its Forwarder keyword or a deprecated keyword.
_BY_EITHER: Dict[str, Option] = {
    **{option.keyword: option for option in FORWARD_OPTIONS},
    **{option.name: option for option in FORWARD_OPTIONS},
}
_BY_EITHER.update({old: _BY_EITHER[name] for old, name in DEPRECATED_KEYWORDS.items()})


def forward_option(name: str) -> Option:
    """A per-forward option by its name (``rate_check``) or Forwarder keyword
    (``rate_check_seconds``); OptionError if there is none."""
    try:
        return _BY_EITHER[name]
    except KeyError:
        guess = difflib.get_close_matches(name.replace("-", "_"), list(_BY_EITHER), n=1, cutoff=0.7)
        raise OptionError(name, "unknown option" + (f" (did you mean {guess[0]!r}?)" if guess else "")) from None


def check(name: str, value: object) -> Any:
    """One option's value checked and normalised (see ``Option.check``): `name` is an option's
    name (either scope) or a Forwarder keyword; OptionError (a ValueError) names it as given."""
    option = OPTIONS.get(name) or forward_option(name)
    return option.check(value, name=name)


def defaults() -> Dict[str, Any]:
    """Every per-forward option's default, by name."""
    return {option.name: option.default for option in FORWARD_OPTIONS}


def check_forward(settings: Mapping[str, object], *, fill: bool = True) -> Dict[str, Any]:
    """A forward's settings checked: keys are option names or Forwarder keywords (either, not
    both for one option); the result is keyed by option name, with every option (the
    defaults for those not given) unless `fill` is false. OptionError names the first bad
    key, as given."""
    checked: Dict[str, Any] = defaults() if fill else {}
    seen: Dict[str, str] = {}
    for key, value in settings.items():
        option = forward_option(key)
        if option.name in seen:
            raise OptionError(key, f"given twice (also as {seen[option.name]!r})")
        seen[option.name] = key
        checked[option.name] = option.check(value, name=key)
    return checked


def forwarder_kwargs(settings: Mapping[str, object]) -> Dict[str, Any]:
    """Checked settings (by name or keyword) as ``Forwarder`` keyword arguments; values as given."""
    return {forward_option(key).keyword: value for key, value in settings.items()}


def restart_changes(old: Mapping[str, object], new: Mapping[str, object]) -> List[str]:
    """The options, by name, whose change between two forwards' settings (by name) needs a restart."""
    return [name for name in RESTART_NAMES if old.get(name) != new.get(name)]
