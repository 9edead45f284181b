"""JSON log lines: every record one parseable object, whatever its values."""

from __future__ import annotations

import io
import json
import logging
import re
from typing import Any, Dict, Iterator, List

import pytest

from tcptotcp._jsonlog import JsonFormatter


class Capture:
    def __init__(self, logger: logging.Logger, stream: io.StringIO) -> None:
        self.logger = logger
        self.stream = stream

    def lines(self) -> List[Dict[str, Any]]:
        text = self.stream.getvalue()
        assert text.endswith("\n")
        # Strict JSON (no NaN/Infinity), one object per line.
        return [json.loads(line, parse_constant=_refuse) for line in text.splitlines()]


def _refuse(name: str) -> None:
    raise AssertionError(f"non-standard JSON constant {name}")


@pytest.fixture
def capture() -> Iterator[Capture]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tcptotcp.test_jsonlog")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield Capture(logger, stream)
    finally:
        logger.removeHandler(handler)


TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_event_with_fields(capture: Capture) -> None:
    fields = {"id": 3, "client": "127.0.0.1:5000", "bytes_up": 10, "bytes_down": 0, "seconds": 0.25, "ok": True}
    capture.logger.info("#%d close %s", 3, "127.0.0.1:5000", extra={"event": "close", "fields": fields})
    (line,) = capture.lines()
    assert TIME.match(line.pop("time"))
    assert line == {"level": "info", "event": "close", **fields, "message": "#3 close 127.0.0.1:5000"}
    assert list(line)[:2] == ["level", "event"] and list(line)[-1] == "message"


def test_plain_records_and_levels(capture: Capture) -> None:
    capture.logger.debug("d")
    capture.logger.warning("careful: %s", "x")
    capture.logger.error("e")
    capture.logger.critical("c")
    lines = capture.lines()
    assert [(x["level"], x["event"], x["message"]) for x in lines] == [
        ("debug", "log", "d"),
        ("warning", "log", "careful: x"),
        ("error", "log", "e"),
        ("critical", "log", "c"),
    ]
    assert all(set(x) == {"time", "level", "event", "message"} for x in lines)


def test_time_is_utc_with_milliseconds(capture: Capture) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created = 86400.0 * 365 + 1.2345  # 1971-01-01T00:00:01.234 UTC
    record.msecs = 234.5
    capture.logger.handle(record)
    assert capture.lines()[0]["time"] == "1971-01-01T00:00:01.234Z"


class Opaque:
    def __str__(self) -> str:
        return "opaque!"


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_values_always_serialize(capture: Capture) -> None:
    cycle: List[Any] = [1]
    cycle.append(cycle)
    fields = {
        "obj": Opaque(),
        "bad": Unprintable(),
        "nan": float("nan"),
        "inf": float("inf"),
        "bytes": b"\x00\xff",
        "nested": {"when": Opaque(), 7: [1, 2.5, None]},
        "cycle": cycle,
        "set": {1},
        "text": "caf\u00e9 \u2192 \U0001f600",
    }
    capture.logger.info("odd values", extra={"event": "odd", "fields": fields})
    raw = capture.stream.getvalue()
    assert raw.isascii()  # any stream encoding takes it
    (line,) = capture.lines()
    assert line["obj"] == "opaque!"
    assert line["bad"] == "<unprintable Unprintable>"
    assert line["nan"] == "nan" and line["inf"] == "inf"
    assert line["bytes"] == "b'\\x00\\xff'"
    assert line["nested"] == {"when": "opaque!", "7": [1, 2.5, None]}
    assert isinstance(line["cycle"], list) and line["cycle"][0] == 1
    assert line["set"] == "{1}"
    assert line["text"] == "caf\u00e9 \u2192 \U0001f600"
    assert line["message"] == "odd values"


def test_reserved_field_names_do_not_clobber(capture: Capture) -> None:
    fields = {"message": "field", "level": 9, "time": "t", "other": 1}
    capture.logger.warning("real", extra={"event": "clash", "fields": fields})
    (line,) = capture.lines()
    assert line["message"] == "real" and line["level"] == "warning" and TIME.match(line["time"])
    assert line["fields.message"] == "field" and line["fields.level"] == 9 and line["fields.time"] == "t"
    assert line["other"] == 1


def test_non_mapping_fields(capture: Capture) -> None:
    capture.logger.info("m", extra={"fields": [1, 2]})
    assert capture.lines()[0]["fields.value"] == [1, 2]


def test_exception_and_stack(capture: Capture) -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        capture.logger.exception("failed", extra={"event": "error", "fields": {"id": 1}})
    capture.logger.info("where", stack_info=True)
    first, second = capture.lines()
    assert first["event"] == "error" and first["level"] == "error" and first["id"] == 1
    assert first["exception"].startswith("Traceback (most recent call last):")
    assert first["exception"].endswith("ValueError: boom\nsecond line")
    assert first["message"] == "failed"
    assert second["stack"].startswith("Stack (most recent call last):")
    assert "exception" not in second
    assert len(capture.stream.getvalue().splitlines()) == 2  # newlines stay escaped
