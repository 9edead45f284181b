"""``tcptotcp --config FILE``: several forwards from one TOML file.

Top-level option keys are defaults for every ``[[forward]]``; a forward's own keys override
them. Process-wide keys (``backend``, ``log_level``, ``log_format``, ``metrics``, ``pid_file``,
``upgrade_program``) live only at the top level. Everything is checked before anything
listens, and a mistake is reported on one line naming the file, the forward and the key, so a
bad edit fails at start-up, not at the first client. The options, their types and bounds are
``_options``' table, the command line's too: the file and the command line refuse the same
values with the same words.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import re
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Type

from . import _options
from ._address import MAX_WEIGHT, Address, UnresolvedName, split_weight
from ._options import FORWARD_NAMES, MAX_INT, PROCESS_NAMES, Option, OptionError, show

PROCESS_KEYS = PROCESS_NAMES
_FORWARD = {name: _options.OPTIONS[name] for name in FORWARD_NAMES}
_PROCESS = {name: _options.OPTIONS[name] for name in PROCESS_NAMES}
_DEFAULT = _options.defaults()


@dataclass(frozen=True)
class ForwardSpec:
    """One ``[[forward]]``: a listen address, its upstreams and its options. The fields after
    ``upstreams`` are ``_options.FORWARD_OPTIONS``, by name, with its defaults (the CLI's)."""

    listen: str
    upstreams: Tuple[str, ...]
    rate_check: int = _DEFAULT["rate_check"]
    idle_timeout: int = _DEFAULT["idle_timeout"]
    activity: str = _DEFAULT["activity"]
    half_close: bool = _DEFAULT["half_close"]
    max_connections: int = _DEFAULT["max_connections"]
    connect_timeout: float = _DEFAULT["connect_timeout"]
    allow: Tuple[str, ...] = _DEFAULT["allow"]
    deny: Tuple[str, ...] = _DEFAULT["deny"]
    balance: str = _DEFAULT["balance"]
    upstream_backoff: float = _DEFAULT["upstream_backoff"]
    max_fails: int = _DEFAULT["max_fails"]
    fail_window: float = _DEFAULT["fail_window"]
    check_interval: Optional[float] = _DEFAULT["check_interval"]
    check_rise: int = _DEFAULT["check_rise"]
    check_fall: int = _DEFAULT["check_fall"]
    resolve_interval: float = _DEFAULT["resolve_interval"]
    resolve_strict: bool = _DEFAULT["resolve_strict"]
    max_per_client: Optional[int] = _DEFAULT["max_per_client"]
    rate_per_client: Optional[int] = _DEFAULT["rate_per_client"]
    client_prefix6: int = _DEFAULT["client_prefix6"]
    route_sni: Tuple[str, ...] = _DEFAULT["route_sni"]
    route_sni_strict: bool = _DEFAULT["route_sni_strict"]
    bandwidth: Optional[int] = _DEFAULT["bandwidth"]
    send_proxy: Optional[str] = _DEFAULT["send_proxy"]
    accept_proxy: bool = _DEFAULT["accept_proxy"]
    proxy_timeout: float = _DEFAULT["proxy_timeout"]
    tls_cert: Tuple[str, ...] = _DEFAULT["tls_cert"]
    tls_key: Tuple[str, ...] = _DEFAULT["tls_key"]
    tls_client_ca: Optional[str] = _DEFAULT["tls_client_ca"]
    tls_min_version: str = _DEFAULT["tls_min_version"]
    tls_ciphers: Optional[str] = _DEFAULT["tls_ciphers"]
    tls_alpn: Tuple[str, ...] = _DEFAULT["tls_alpn"]
    tls_handshake_timeout: float = _DEFAULT["tls_handshake_timeout"]
    upstream_tls: bool = _DEFAULT["upstream_tls"]
    upstream_ca: Optional[str] = _DEFAULT["upstream_ca"]
    upstream_sni: Optional[str] = _DEFAULT["upstream_sni"]
    upstream_cert: Optional[str] = _DEFAULT["upstream_cert"]
    upstream_key: Optional[str] = _DEFAULT["upstream_key"]
    upstream_insecure: bool = _DEFAULT["upstream_insecure"]
    backlog: int = _DEFAULT["backlog"]
    keepalive: Optional[int] = _DEFAULT["keepalive"]
    keepalive_interval: Optional[int] = _DEFAULT["keepalive_interval"]
    keepalive_count: Optional[int] = _DEFAULT["keepalive_count"]
    user_timeout: Optional[float] = _DEFAULT["user_timeout"]
    reuse_port: bool = _DEFAULT["reuse_port"]
    # The addresses as load_config() parsed (and resolved) them while validating: passing these
    # to the Forwarder instead of the text avoids resolving every name a second time.
    # listen_address is None for fd:N and systemd:NAME listeners.
    listen_address: Optional[Address] = field(default=None, compare=False, repr=False)
    upstream_addresses: Tuple[Address, ...] = field(default=(), compare=False, repr=False)

    def settings(self) -> Dict[str, Any]:
        """The options by name (``_options.FORWARD_NAMES``)."""
        return {name: getattr(self, name) for name in FORWARD_NAMES}

    def forwarder_kwargs(self) -> Dict[str, Any]:
        """The options as ``Forwarder`` keyword arguments (listen and upstreams are positional)."""
        return _options.forwarder_kwargs(self.settings())

    def restart_changes(self, new: ForwardSpec) -> List[str]:
        """The options (by name) whose change to `new` a running forward cannot take."""
        return _options.restart_changes(self.settings(), new.settings())


@dataclass(frozen=True)
class Config:
    """A loaded file: its forwards and the process-wide settings it made (None: not set)."""

    forwards: Tuple[ForwardSpec, ...]
    backend: Optional[str]
    log_level: Optional[str]
    log_format: Optional[str]
    metrics: Optional[str]
    path: str
    pid_file: Optional[str] = None
    upgrade_program: Optional[str] = None


class ConfigError(Exception):
    """A config file that cannot be used; ``str()`` is one line for the CLI's error message:
    ``FILE: forward 2 (listen 127.0.0.1:8080): key 'idle_timeout': expected ..., got 'ten'``."""

    def __init__(
        self,
        path: str,
        problem: str,
        *,
        forward: Optional[int] = None,
        listen: Optional[str] = None,
        key: Optional[str] = None,
        line: Optional[int] = None,
        column: Optional[int] = None,
    ) -> None:
        self.path = path
        self.problem = problem
        self.forward = forward  # 1-based index of the [[forward]] table
        self.listen = listen
        self.key = key
        self.line = line
        self.column = column
        parts = [path]
        if line is not None:
            parts.append(f"line {line}" + (f", column {column}" if column is not None else ""))
        if forward is not None:
            where = f"forward {forward}"
            if listen is not None:
                where += f" (listen {listen if listen.isprintable() else repr(listen)})"
            parts.append(where)
        if key is not None:
            parts.append(f"key {key!r}")
        parts.append(problem)
        super().__init__(": ".join(parts))


class _Bad(Exception):
    """A value's problem, raised by a check; load_config() adds where it was."""


def _expected(what: str, value: object) -> _Bad:
    return _Bad(f"expected {what}, got {show(value)}")


_Check = Callable[[object], object]


def _of(option: Option) -> _Check:
    """The table's check of `option`, as a config file's values are checked: TOML has no null,
    so ``false`` switches an optional setting off (e.g. a top-level default)."""

    def check(value: object) -> object:
        try:
            return option.check(value, off="false for none")
        except OptionError as exc:
            raise _Bad(exc.problem) from None

    return check


def _strings(value: object, *, empty: bool) -> Tuple[str, ...]:
    """A string or a list of strings, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value) and (value or empty):
        return tuple(value)
    raise _expected("a string or a list of strings" if empty else "a string or a non-empty list of strings", value)


def _upstreams(value: object) -> Tuple[str, ...]:
    """An upstream or a list of them: each a string (``HOST:PORT``, ``HOST:PORT@W``) or a table
    ``{address = "HOST:PORT", weight = W}``, as strings."""
    items = value if isinstance(value, list) else [value]
    texts: List[str] = []
    for item in items:
        if isinstance(item, dict) and set(item) <= {"address", "weight"} and isinstance(item.get("address"), str):
            weight = item.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
                raise _expected(f"a weight from 1 to {MAX_WEIGHT}", weight)
            texts.append(item["address"] if weight == 1 else f"{item['address']}@{weight}")
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise _expected('a string, a table {address = "HOST:PORT", weight = W}, or a non-empty list of them', value)
    if not texts:
        raise _expected('a string, a table {address = "HOST:PORT", weight = W}, or a non-empty list of them', value)
    return tuple(texts)


def _string(value: object) -> object:
    if not isinstance(value, str):
        raise _expected("a string", value)
    return value


# The checks of the per-forward options (by the ForwardSpec field each sets) and of the
# process-wide settings, from the one table.
OPTIONS: Dict[str, _Check] = {name: _of(option) for name, option in _FORWARD.items()}
_PROCESS_CHECKS: Dict[str, _Check] = {name: _of(option) for name, option in _PROCESS.items()}

_FD = re.compile(r"fd:([0-9]+)\Z")
# systemd's rule for socket names (FileDescriptorName=): printable ASCII without ':'.
_SYSTEMD_NAME = re.compile(r"systemd:([\x20-\x39\x3b-\x7e]{1,255})\Z")


def _unknown(key: str, known: Tuple[str, ...]) -> str:
    guess = difflib.get_close_matches(key.replace("-", "_"), known, n=1, cutoff=0.7)
    return "unknown option" + (f" (did you mean {guess[0]!r}?)" if guess else "")


def _toml_parser(path: str) -> Tuple[Callable[[str], Dict[str, Any]], Type[Exception]]:
    """tomllib from 3.11, tomli before: imported only when a config file is used."""
    name = "tomllib" if sys.version_info >= (3, 11) else "tomli"
    try:
        module = importlib.import_module(name)
    except ImportError:
        raise ConfigError(
            path, f"reading TOML on Python {sys.version_info[0]}.{sys.version_info[1]} needs tomli (pip install tomli)"
        ) from None
    return module.loads, module.TOMLDecodeError


def _read(path: str) -> Dict[str, Any]:
    loads, decode_error = _toml_parser(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "not UTF-8 text", line=data.count(b"\n", 0, exc.start) + 1) from None
    try:
        return loads(text.lstrip("\ufeff"))  # (an editor's byte-order mark is not content)
    except decode_error as exc:
        raise _syntax_error(path, exc, text) from None


def _syntax_error(path: str, exc: Exception, text: str) -> ConfigError:
    # Python 3.14's tomllib (and recent tomli) carry msg/lineno/colno; older ones only the text.
    message, line, column = getattr(exc, "msg", None), getattr(exc, "lineno", None), getattr(exc, "colno", None)
    if isinstance(message, str) and isinstance(line, int):
        return ConfigError(path, message, line=line, column=column if isinstance(column, int) else None)
    at = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", str(exc), re.DOTALL)
    if at:
        return ConfigError(path, at.group(1), line=int(at.group(2)), column=int(at.group(3)))
    message = str(exc).replace("\n", " ")
    if message.endswith(" (at end of document)"):
        last_line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return ConfigError(path, message[: -len(" (at end of document)")] + " at the end of the file", line=last_line)
    return ConfigError(path, message)


@dataclass
class _Table:
    """One [[forward]] while it is checked."""

    index: int
    listen: Optional[str]  # for messages, once known to be a string
    options: Dict[str, Any]  # checked values by key, top-level defaults included


class _Loader:
    def __init__(self, path: str) -> None:
        self.path = path
        self._resolved: Dict[Tuple[str, bool], Address] = {}

    def error(self, problem: str, table: Optional[_Table] = None, key: Optional[str] = None) -> ConfigError:
        if table is None:
            return ConfigError(self.path, problem, key=key)
        return ConfigError(self.path, problem, forward=table.index, listen=table.listen, key=key)

    def check(self, key: str, value: object, check: _Check, table: Optional[_Table] = None) -> object:
        option = _options.OPTIONS.get(key)
        if option is not None and option.names_a_file:
            value = self.beside_the_file(value)
        try:
            return check(value)
        except _Bad as exc:
            raise self.error(str(exc), table, key) from None

    def beside_the_file(self, value: object) -> object:
        """A relative path (or each of a list's) from the config file's directory, as an
        operator reads it and whatever directory the process runs in (systemd's is /)."""
        if isinstance(value, str) and value and not os.path.isabs(value):
            return os.path.join(os.path.dirname(os.path.abspath(self.path)), value)
        if isinstance(value, list):
            return [self.beside_the_file(item) for item in value]
        return value

    def load(self) -> Config:
        document = _read(self.path)
        defaults: Dict[str, object] = {}
        process: Dict[str, Optional[str]] = dict.fromkeys(PROCESS_KEYS)
        raw_forwards: object = None
        for key, value in document.items():
            if key == "forward":
                raw_forwards = value
            elif key in OPTIONS:
                defaults[key] = self.check(key, value, OPTIONS[key])
            elif key in _PROCESS_CHECKS:
                checked = self.check(key, value, _PROCESS_CHECKS[key])
                process[key] = None if checked is None else str(checked)
            elif key in ("listen", "upstream"):
                raise self.error("belongs in a [[forward]] table", key=key)
            else:
                raise self.error(_unknown(key, (*OPTIONS, *PROCESS_KEYS, "forward")), key=key)
        # Every value's type first, then addresses: a typo is reported before any name lookup.
        tables = [self.forward_table(index, raw, defaults) for index, raw in enumerate(self.forward_list(raw_forwards))]
        forwards = self.resolve(tables)
        if process["metrics"] is not None:
            self.check_metrics(process["metrics"], tables, forwards)
        return Config(
            forwards=tuple(forwards),
            backend=process["backend"],
            log_level=process["log_level"],
            log_format=process["log_format"],
            metrics=process["metrics"],
            path=self.path,
            pid_file=process["pid_file"],
            upgrade_program=process["upgrade_program"],
        )

    def forward_list(self, raw: object) -> List[Dict[str, Any]]:
        if raw is None or raw == []:
            raise self.error("no [[forward]] table: nothing to forward")
        if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
            raise self.error(f"expected [[forward]] tables (double brackets), got {show(raw)}", key="forward")
        return raw

    def forward_table(self, index: int, raw: Dict[str, Any], defaults: Dict[str, object]) -> _Table:
        listen = raw.get("listen")
        table = _Table(index + 1, listen if isinstance(listen, str) else None, dict(defaults))
        for key, value in raw.items():
            if key == "listen":
                table.options[key] = self.check(key, value, _string, table)
            elif key == "upstream":
                table.options[key] = self.check(key, value, _upstreams, table)
            elif key in OPTIONS:
                table.options[key] = self.check(key, value, OPTIONS[key], table)
            elif key in PROCESS_KEYS:
                raise self.error("not allowed in a forward (it is process-wide: set it at the top level)", table, key)
            else:
                raise self.error(_unknown(key, (*OPTIONS, "listen", "upstream")), table, key)
        for key in ("listen", "upstream"):
            if key not in raw:
                raise self.error("missing (every [[forward]] needs listen and upstream)", table, key)
        return table

    def address(self, text: str, passive: bool) -> Address:
        """Address.parse, once per text: it resolves host names (as the CLI does), and a name
        shared by several forwards is looked up once."""
        address = self._resolved.get((text, passive))
        if address is None:
            address = self._resolved[text, passive] = Address.parse(text, passive=passive)
        return address

    def resolve(self, tables: List[_Table]) -> List[ForwardSpec]:
        forwards: List[ForwardSpec] = []
        seen: Dict[object, _Table] = {}
        for table in tables:
            options = dict(table.options)
            listen: str = options.pop("listen")
            upstreams: Tuple[str, ...] = options.pop("upstream")
            listen_address, identity = self.listen_identity(listen, table)
            if identity is not None:
                if identity in seen:
                    first = seen[identity]
                    raise self.error(
                        f"same address as forward {first.index}{_as(first.listen, listen)}", table, "listen"
                    )
                seen[identity] = table
            addresses = tuple(self.upstream_address(text, table) for text in upstreams)
            forwards.append(
                ForwardSpec(
                    listen=listen,
                    upstreams=upstreams,
                    listen_address=listen_address,
                    upstream_addresses=addresses,
                    **options,
                )
            )
        return forwards

    def listen_identity(self, listen: str, table: _Table) -> Tuple[Optional[Address], object]:
        """The parsed address and what makes two listeners the same socket (None: never clashes)."""
        if listen.startswith("fd:"):
            fd = _FD.match(listen)
            if not fd or int(fd.group(1)) > MAX_INT:
                raise self.error(
                    f"{listen!r}: expected fd:N with N an inherited file descriptor number", table, "listen"
                )
            return None, ("fd", int(fd.group(1)))
        if listen.startswith("systemd:"):
            if not _SYSTEMD_NAME.match(listen):
                raise self.error(
                    f"{listen!r}: expected systemd:NAME, NAME a socket's FileDescriptorName (printable ASCII, no ':')",
                    table,
                    "listen",
                )
            return None, ("systemd", listen[len("systemd:") :])
        try:
            address = self.address(listen, passive=True)
        except ValueError as exc:
            raise self.error(str(exc), table, "listen") from None
        return address, _identity(address)

    def upstream_address(self, text: str, table: _Table) -> Address:
        if text.startswith(("fd:", "systemd:")):
            raise self.error(
                f"{text!r}: fd: and systemd: name listening sockets; an upstream is host:port, [v6addr]:port "
                "or unix:/path",
                table,
                "upstream",
            )
        # A name that does not resolve is an error only where the forward could not follow it
        # (see _resolve): resolve_strict, or resolve_interval 0.
        options = table.options
        strict = options.get("resolve_strict", _DEFAULT["resolve_strict"]) or not options.get(
            "resolve_interval", _DEFAULT["resolve_interval"]
        )
        try:
            address, weight = split_weight(text)
            parsed = self.address(address, passive=False)
        except UnresolvedName as exc:
            if strict:
                raise self.error(str(exc), table, "upstream") from None
            parsed = Address(socket.AF_UNSPEC, (exc.host, exc.port), address)
        except ValueError as exc:
            raise self.error(str(exc), table, "upstream") from None
        return parsed if weight == 1 else dataclasses.replace(parsed, weight=weight)

    def check_metrics(self, text: str, tables: List[_Table], forwards: List[ForwardSpec]) -> None:
        if text.startswith(("unix:", "fd:", "systemd:")):
            raise self.error(f"expected HOST:PORT, got {text!r}", key="metrics")
        try:
            identity = _identity(self.address(text, passive=True))
        except ValueError as exc:
            raise self.error(str(exc), key="metrics") from None
        for table, forward in zip(tables, forwards):
            if identity is not None and forward.listen_address and _identity(forward.listen_address) == identity:
                raise self.error(
                    f"same address as forward {table.index}'s listen{_as(table.listen, text)}", key="metrics"
                )


def _as(text: Optional[str], other: str) -> str:
    """How the clashing address was written, when not as `other` (``localhost`` vs ``127.0.0.1``)."""
    return "" if text is None or text == other else f" ({text})"


def _identity(address: Address) -> object:
    """What two listeners on the same socket share; None for port 0 (each gets its own port)."""
    if address.family == socket.AF_UNIX:
        path = str(address.sockaddr)
        return ("unix", path if path.startswith("\0") else os.path.abspath(path))
    if isinstance(address.sockaddr, tuple) and address.sockaddr[1] == 0:
        return None
    return (address.family, address.sockaddr)


def load_config(path: str) -> Config:
    """Read and check the TOML file at `path`; raises ConfigError naming what is wrong and where."""
    return _Loader(path).load()
