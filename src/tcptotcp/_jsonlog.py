"""JSON log lines: one object per record, for log shippers that would otherwise parse text.

The forwarder logs structured events as
``log.info(msg, *args, extra={"event": "close", "fields": {"id": 3, "bytes_up": 10}})``;
this formatter writes them as ``{"time": ..., "level": "info", "event": "close", "id": 3,
"bytes_up": 10, "message": ...}``. Records without an event (any other logger's) get
``"event": "log"``, so every line has the same keys to filter on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Dict, Mapping

__all__ = ["RESERVED", "JsonFormatter"]

#: Keys the formatter owns; a field by one of these names is written as ``fields.<name>``.
RESERVED = frozenset({"time", "level", "event", "message", "exception", "stack"})
_MAX_DEPTH = 16


def _text(value: object) -> str:
    """str(), which must not fail: a log line is never lost to one odd value."""
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _plain(value: Any, depth: int = 0) -> Any:
    """`value` as JSON can hold it: containers recursed (not too deep: cycles), non-finite
    floats and everything else as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else _text(value)
    if depth < _MAX_DEPTH:
        if isinstance(value, Mapping):
            return {_text(k): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_plain(v, depth + 1) for v in value]
    return _text(value)


class JsonFormatter(logging.Formatter):
    """Formats each record as one line of JSON (ASCII, so any stream encoding takes it).

    Keys: ``time`` (UTC, ISO 8601 with milliseconds), ``level`` (lower case), ``event``
    (``record.event`` or ``"log"``), the items of ``record.fields``, ``message``, and
    ``exception`` / ``stack`` when the record carries them. Values that JSON cannot hold
    (objects, NaN, cycles) are written as their ``str()``: strict parsers such as jq read
    every line.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: Dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "event": _text(getattr(record, "event", None) or "log"),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = _text(key)
                entry[f"fields.{name}" if name in RESERVED else name] = value
        elif fields is not None:
            entry["fields.value"] = fields
        entry["message"] = record.getMessage()
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(entry, allow_nan=False)
        except (TypeError, ValueError, RecursionError):
            # Rare: an object, NaN or cycle among the values; convert only on this path.
            return json.dumps({key: _plain(value) for key, value in entry.items()}, allow_nan=False)

    @staticmethod
    def _time(record: logging.LogRecord) -> str:
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return "%s.%03dZ" % (whole, int(record.msecs))
