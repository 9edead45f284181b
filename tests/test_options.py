"""The one option table: it covers Forwarder's options, and the command line and the config file
take it whole, with the same defaults and the same bounds, refused in the same words.

Both sides run for real: the CLI's argparse parser (and its step from arguments to a
ForwardSpec), and load_config() on a file. Addresses are numeric: no name lookups.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from tcptotcp import _options
from tcptotcp._config import ConfigError, ForwardSpec, load_config
from tcptotcp._options import FORWARD_OPTIONS, OPTIONS, PROCESS_OPTIONS, Option, OptionError
from tcptotcp.cli import _specs_from_args, forward_parser
from tcptotcp.forwarder import Forwarder

MINIMAL = '[[forward]]\nlisten = "127.0.0.1:8080"\nupstream = "127.0.0.1:80"\n'
CLI_ADDRESSES = ["127.0.0.1:8080", "127.0.0.1:80"]
# Forwarder keyword-only parameters that are not forward options.
# (a caller's own SSLContexts: objects, not options of a file or a flag)
NOT_OPTIONS = {
    "bridge_class",
    "listen_socket",
    "metrics",
    "tls_context",
    "upstream_tls_context",
    *_options.DEPRECATED_KEYWORDS,
}


# -- the two front doors ---------------------------------------------------------------------


def cli_spec(*args: str) -> ForwardSpec:
    parser = forward_parser()
    (spec,) = _specs_from_args(parser, parser.parse_args([*CLI_ADDRESSES, *args]))
    return spec


def cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one line the CLI exits 2 with."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli_spec(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tcptotcp: error: "), err
    return err.strip()


def config_spec(tmp_path: Path, line: str) -> ForwardSpec:
    path = tmp_path / "tcptotcp.toml"
    path.write_text(MINIMAL + line + "\n", encoding="utf-8")
    (spec,) = load_config(str(path)).forwards
    return spec


def config_error(tmp_path: Path, line: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_spec(tmp_path, line)
    return info.value


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)  # an int, or a float as Python and TOML both read it back exactly


def flag_arg(option: Option, value: Any) -> str:
    # --flag=VALUE: a value such as -5e-324 is not taken for an option.
    return f"{option.flags[0]}={value if isinstance(value, str) else repr(value)}"


# -- the table covers what Forwarder takes ------------------------------------------------------


def forwarder_options() -> List[inspect.Parameter]:
    parameters = inspect.signature(Forwarder.__init__).parameters.values()
    return [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in NOT_OPTIONS]


def test_table_is_exactly_forwarders_keyword_options() -> None:
    assert sorted(o.keyword for o in FORWARD_OPTIONS) == sorted(p.name for p in forwarder_options())
    assert len({o.name for o in FORWARD_OPTIONS}) == len(FORWARD_OPTIONS)


def test_forwarder_defaults_are_the_tables() -> None:
    table = {o.keyword: o.default for o in FORWARD_OPTIONS}
    assert {p.name: p.default for p in forwarder_options()} == table


def test_forward_spec_fields_are_the_tables() -> None:
    fields = [f for f in dataclasses.fields(ForwardSpec) if f.compare and f.name not in ("listen", "upstreams")]
    assert sorted(f.name for f in fields) == sorted(_options.FORWARD_NAMES)
    assert {f.name: f.default for f in fields} == _options.defaults()


def test_cli_and_config_defaults_are_the_tables(tmp_path: Path) -> None:
    from_cli = cli_spec()
    from_file = config_spec(tmp_path, "")
    assert from_cli == from_file == ForwardSpec(listen="127.0.0.1:8080", upstreams=("127.0.0.1:80",))
    assert from_cli.settings() == _options.defaults()


def test_every_record_is_complete() -> None:
    for option in FORWARD_OPTIONS + PROCESS_OPTIONS:
        assert option.flags and all(flag.startswith("--") for flag in option.flags), option
        assert option.help and option.scope in (_options.FORWARD, _options.PROCESS), option
        assert option.type in (int, float, bool, str), option
        if option.default is not None and not option.repeatable:
            assert option.check(option.default) == option.default, option
        if option.type in (int, float):
            assert option.minimum is not None, f"{option.name}: a number needs a lower bound"


def test_restart_options_are_the_services() -> None:
    # _service keeps its own list today: the table must say the same.
    assert set(_options.RESTART_NAMES) == {"backlog", "reuse_port"}
    assert all(o.restart for o in PROCESS_OPTIONS)  # read once, at start-up


def test_restart_changes() -> None:
    old = ForwardSpec(listen="127.0.0.1:1", upstreams=("127.0.0.1:2",))
    assert old.restart_changes(dataclasses.replace(old, idle_timeout=5, keepalive=9)) == []
    assert old.restart_changes(dataclasses.replace(old, backlog=5, reuse_port=True)) == ["backlog", "reuse_port"]


# -- bounds: the CLI and the file agree ----------------------------------------------------------


def bound_cases() -> List[Tuple[Option, Any, bool]]:
    """(option, value, accepted) at each bound and just outside it."""
    cases: List[Tuple[Option, Any, bool]] = []
    for option in FORWARD_OPTIONS:
        low, high = option.minimum, option.maximum
        if option.type is int:
            if low is not None:
                cases += [(option, int(low), True), (option, int(low) - 1, False)]
            if high is not None:
                cases += [(option, int(high), True), (option, int(high) + 1, False)]
        elif option.type is float:
            if low is not None:
                below, above = math.nextafter(low, -math.inf), math.nextafter(low, math.inf)
                if option.min_inclusive:
                    cases += [(option, float(low), True), (option, below, False)]
                else:
                    cases += [(option, above, True), (option, float(low), False)]
            if high is not None:
                cases += [(option, float(high), True), (option, math.nextafter(high, math.inf), False)]
    return cases


BOUNDS = bound_cases()


@pytest.mark.parametrize(
    "option, value, accepted",
    BOUNDS,
    ids=[f"{o.name}={v!r}-{'ok' if ok else 'refused'}" for o, v, ok in BOUNDS],
)
def test_bounds_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: Option, value: Any, accepted: bool
) -> None:
    line = f"{option.name} = {toml_literal(value)}"
    if accepted:
        from_cli = getattr(cli_spec(flag_arg(option, value)), option.name)
        from_file = getattr(config_spec(tmp_path, line), option.name)
        assert from_cli == from_file == value
        assert type(from_cli) is type(from_file) is option.type
        assert _options.check(option.name, value) == value
        assert _options.check(option.keyword, value) == value
        return
    exc = config_error(tmp_path, line)
    assert exc.key == option.name and exc.forward == 1
    assert f"forward 1 (listen 127.0.0.1:8080): key {option.name!r}: expected " in str(exc)
    assert exc.problem.endswith(f", got {value!r}"), exc.problem
    # The command line refuses it in the file's words (less TOML's "or false for none").
    problem = exc.problem.replace(", or false for none", "")
    assert (
        cli_error(capsys, flag_arg(option, value))
        == f"tcptotcp: error: argument {option.flags[0]}: {problem} (see --help)"
    )
    # And Forwarder's keyword, checked in Python, in the same words.
    with pytest.raises(OptionError) as info:
        _options.check(option.keyword, value)
    none = ", or None" if option.optional else ""
    assert str(info.value) == f"{option.keyword}: expected {option.expected}{none}, got {value!r}"


def test_keepalive_is_bounded_on_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The issue's example: the command line took any --keepalive, the file capped it."""
    assert "expected an integer from 1 to 32767, got 32768" in cli_error(capsys, "--keepalive", "32768")
    assert "expected an integer from 1 to 32767, or false for none, got 32768" in str(
        config_error(tmp_path, "keepalive = 32768")
    )


def test_backlog_below_one_is_refused_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    """The command line used to make --backlog 0 (or -5) a 1 silently; the file refused it."""
    assert "argument --backlog: expected an integer from 1 to 2147483647, got 0" in cli_error(capsys, "--backlog", "0")


@pytest.mark.parametrize("option", [o for o in FORWARD_OPTIONS if o.type in (int, float)], ids=lambda o: o.name)
def test_not_a_number_is_refused_alike(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: Option) -> None:
    exc = config_error(tmp_path, f'{option.name} = "ten"')
    assert exc.problem.endswith(", got 'ten'")
    problem = exc.problem.replace(", or false for none", "")
    assert cli_error(capsys, flag_arg(option, "ten")).endswith(f"argument {option.flags[0]}: {problem} (see --help)")
    for bad in ("inf", "nan"):
        assert f"got {bad}" in str(config_error(tmp_path, f"{option.name} = {bad}"))
        # (an integer option's command line does not read "inf" as a number at all)
        assert cli_error(capsys, flag_arg(option, bad)).endswith(
            (f"got {bad} (see --help)", f"got '{bad}' (see --help)")
        )


@pytest.mark.parametrize("option", [o for o in FORWARD_OPTIONS if o.type is int], ids=lambda o: o.name)
def test_an_integer_option_takes_no_fraction(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: Option
) -> None:
    value = int(option.minimum or 0) + 1.5
    assert f"got {value!r}" in str(config_error(tmp_path, f"{option.name} = {value!r}"))
    assert f"got '{value!r}'" in cli_error(capsys, flag_arg(option, repr(value)))


def test_numbers_are_floats_for_float_options(tmp_path: Path) -> None:
    for option in FORWARD_OPTIONS:
        if option.type is float:
            value = 2
            assert type(getattr(config_spec(tmp_path, f"{option.name} = {value}"), option.name)) is float
            assert type(getattr(cli_spec(flag_arg(option, "2")), option.name)) is float


# -- choices, switches, lists ------------------------------------------------------------------


@pytest.mark.parametrize("option", [o for o in FORWARD_OPTIONS if o.choices], ids=lambda o: o.name)
def test_choices_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: Option) -> None:
    for choice in option.choices:
        assert getattr(cli_spec(flag_arg(option, choice)), option.name) == choice
        assert getattr(config_spec(tmp_path, f'{option.name} = "{choice}"'), option.name) == choice
    exc = config_error(tmp_path, f'{option.name} = "other"')
    problem = exc.problem.replace(", or false for none", "")
    assert problem == f"expected {' or '.join(repr(c) for c in option.choices)}, got 'other'"
    assert cli_error(capsys, flag_arg(option, "other")).endswith(f"argument {option.flags[0]}: {problem} (see --help)")


@pytest.mark.parametrize("option", [o for o in FORWARD_OPTIONS if o.type is bool], ids=lambda o: o.name)
def test_switches_agree(tmp_path: Path, option: Option) -> None:
    assert getattr(cli_spec(option.flags[0]), option.name) is True
    assert getattr(config_spec(tmp_path, f"{option.name} = true"), option.name) is True
    assert getattr(cli_spec(), option.name) is getattr(config_spec(tmp_path, ""), option.name) is option.default
    assert "expected true or false, got 1" in str(config_error(tmp_path, f"{option.name} = 1"))


@pytest.mark.parametrize("option", [o for o in FORWARD_OPTIONS if o.optional], ids=lambda o: o.name)
def test_optional_options_are_off_by_default_and_with_false(tmp_path: Path, option: Option) -> None:
    assert option.default is None
    assert getattr(cli_spec(), option.name) is None
    assert getattr(config_spec(tmp_path, f"{option.name} = false"), option.name) is None
    assert _options.check(option.name, None) is None


# Per repeatable option: two good items, a bad one, and words of its refusal.
LIST_ITEMS = {
    "allow": ("10.0.0.0/8", "::1", "10.0.0.1/8", "host bits set"),
    "deny": ("10.0.0.0/8", "::1", "10.0.0.1/8", "host bits set"),
    "route_sni": ("db.example.com=127.0.0.1:1", "*.example.com=[::1]:2", "db..example.com=127.0.0.1:3", "empty label"),
    "tls_cert": ("a.pem", "/etc/b.pem", "", "expected a file name"),
    "tls_key": ("a.key", "/etc/b.key", "", "expected a file name"),
    "tls_alpn": ("h2", "http/1.1,h2c", "h2,,x", "expected protocol names"),
}


@pytest.mark.parametrize("option", [o for o in FORWARD_OPTIONS if o.repeatable], ids=lambda o: o.name)
def test_lists_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str], option: Option) -> None:
    flag = option.flags[0]
    one, two, bad, words = LIST_ITEMS[option.name]
    assert getattr(cli_spec(flag, one, flag, two), option.name) == (one, two)
    # (a relative file in a config file is its directory's; on the command line, as given)
    beside = str(tmp_path / one) if option.names_a_file and not one.startswith("/") else one
    assert getattr(config_spec(tmp_path, f'{option.name} = ["{one}", "{two}"]'), option.name) == (beside, two)
    assert getattr(config_spec(tmp_path, f'{option.name} = "{one}"'), option.name) == (beside,)
    exc = config_error(tmp_path, f'{option.name} = ["{bad}"]')
    assert words in exc.problem
    assert cli_error(capsys, flag, bad).endswith(f"argument {flag}: {exc.problem} (see --help)")


# -- help -----------------------------------------------------------------------------------


def _words(text: str) -> str:
    return " ".join(text.split())


def test_help_lists_every_option() -> None:
    helptext = _words(forward_parser().format_help())
    for option in FORWARD_OPTIONS + PROCESS_OPTIONS:
        for flag in option.flags:
            assert flag in helptext, flag
        assert _words(option.help) in helptext, option.name
    for flag in ("--config", "--drain", "--version", "--help"):
        assert flag in helptext


def test_help_states_the_bounds() -> None:
    for option in FORWARD_OPTIONS:
        if option.maximum is not None:
            assert str(int(option.maximum)) in option.help, option.name
        if option.restart:
            assert "restart" in option.help, option.name
    assert "0.001" in OPTIONS["user_timeout"].help


def test_tcptotcp_help_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tcptotcp", "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    for option in FORWARD_OPTIONS + PROCESS_OPTIONS:
        assert option.flags[0] in out, option.name


# -- the API Forwarder will check through -------------------------------------------------------


def test_check_forward_takes_names_and_forwarder_keywords() -> None:
    by_keyword = _options.check_forward({"idle_timeout": 60, "rate_check_seconds": 2, "allow": ["10.0.0.0/8"]})
    by_name = _options.check_forward({"idle_timeout": 60, "rate_check": 2, "allow": "10.0.0.0/8"})
    assert (
        by_keyword == by_name == {**_options.defaults(), "idle_timeout": 60, "rate_check": 2, "allow": ("10.0.0.0/8",)}
    )
    assert _options.check_forward({"connect_timeout": 3}, fill=False) == {"connect_timeout": 3.0}


def test_check_forward_refuses() -> None:
    with pytest.raises(OptionError, match=r"^idle_timeout_seconds: expected an integer >= 0, got -1$"):
        _options.check_forward({"idle_timeout_seconds": -1})
    with pytest.raises(ValueError, match=r"^idle_timout: unknown option \(did you mean 'idle_timeout'\?\)$"):
        _options.check_forward({"idle_timout": 1})
    with pytest.raises(OptionError, match="given twice"):
        _options.check_forward({"idle_timeout": 1, "idle_timeout_seconds": 1})
    with pytest.raises(OptionError, match=r"^keepalive: expected an integer from 1 to 32767, or None, got 0$"):
        _options.check("keepalive", 0)
    with pytest.raises(OptionError, match="got true"):
        _options.check("max_connections", True)


def test_forwarder_kwargs_from_settings(tmp_path: Path) -> None:
    spec = config_spec(tmp_path, "idle_timeout = 60\nbacklog = 9")
    kwargs = _options.forwarder_kwargs(spec.settings())
    assert kwargs == spec.forwarder_kwargs()
    assert set(kwargs) == {p.name for p in forwarder_options()}
    assert (kwargs["idle_timeout"], kwargs["rate_check_seconds"], kwargs["backlog"]) == (60, 5, 9)
    # and back: Forwarder's keywords check as they are
    assert _options.check_forward(kwargs) == spec.settings()


def test_process_wide_options_in_a_file_and_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('backend = "pure"\nlog_level = "debug"\nmetrics = false\n' + MINIMAL, encoding="utf-8")
    config = load_config(str(path))
    assert (config.backend, config.log_level, config.log_format, config.metrics) == ("pure", "debug", None, None)
    args = forward_parser().parse_args([*CLI_ADDRESSES, "--backend", "pure", "--log-format", "json"])
    assert (args.backend, args.log_level, args.log_format, args.metrics) == ("pure", None, "json", None)
