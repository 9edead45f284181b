"""The server name (SNI) of a TLS ClientHello, read without terminating TLS, for routing by name.

A forwarder peeks at a client's first bytes and asks ``parse_client_hello``: None (the bytes so
far are a proper prefix of a ClientHello: wait for more), a ``ClientHello`` (the name, and how
many bytes its records take), or ``SniError`` (refuse; ``str(exc)`` is a one-line reason). The
bytes are then relayed untouched. ``_loop_sni.h`` is its C twin: the same answers and the same
error texts for any input (tests/test_sni.py holds the two to one corpus and to random input).

What is accepted:

* TLS records of content type 22 (handshake), record version 0x0300-0x0304, 1 to 2^14 bytes
  each (RFC 8446 5.1: plaintext records are at most 2^14 bytes; no empty handshake fragments).
* One handshake message, a ClientHello (type 1) of at most ``MAX_HELLO`` bytes including its
  4-byte header, over at most ``MAX_RECORDS`` records; its last record ends where it ends.
  Bytes after that record (ChangeCipherSpec, early data...) are not looked at.
* The ClientHello's legacy_version 0x0300-0x0304, session id of at most 32 bytes, an even,
  non-empty cipher suite list, at least one compression method, and either no extensions
  (TLS 1.0-1.2: no SNI) or an extension block that fills the rest of the message, each
  extension in bounds and no extension type twice.
* At most one server_name extension (type 0): its list fills it; each entry is a name type
  and a 2-byte length (RFC 6066: future name types keep that length); at most one host_name
  (type 0), which is the server name. Only entries of other types: no server name.
* A host name is 1 to 255 bytes of dot-separated labels, each 1 to 63 bytes of ASCII letters,
  digits, hyphen and underscore; one trailing dot is allowed (and dropped). IP literals
  pass this rule (RFC 6066 forbids them; routing on one is harmless).

ECH (Encrypted Client Hello): the outer ClientHello's server_name is its public name; that is
the name returned, the 0xfe0d extension is skipped like any other. SSLv2-style hellos
(a 2-byte length with the high bit set, message type 1) are refused.

Bound: input of ``MAX_INPUT`` bytes always gets an answer (never None): the hello's records
take at most ``MAX_HELLO`` bytes of message plus ``MAX_RECORDS`` 5-byte record headers, and a
record that would run past that is refused as soon as its header shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Set

__all__ = [
    "MAX_HELLO",
    "MAX_INPUT",
    "MAX_NAME",
    "MAX_RECORDS",
    "MAX_RECORD_LENGTH",
    "ClientHello",
    "SniError",
    "check_route_pattern",
    "match_route",
    "parse_client_hello",
]

MAX_HELLO = 16384  # the handshake message, its 4-byte header included
MAX_RECORD_LENGTH = 16384  # RFC 8446 5.1: a plaintext record's fragment is at most 2^14 bytes
# Records one ClientHello may span. Real clients send one (a hello of at most MAX_HELLO bytes
# fits one record), but DPI-evading clients split it on purpose, some into many small records.
MAX_RECORDS = 64
_RECORD_HEADER = 5
MAX_INPUT = MAX_HELLO + _RECORD_HEADER * MAX_RECORDS  # 16704: parse decides within it
MAX_NAME = 255  # a host name's bytes, a trailing dot included
_MAX_LABEL = 63
_MAX_SESSION_ID = 32

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_HOST_NAME = 0

# Name bytes besides the dot: letters, digits, hyphen, underscore.
_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
# ASCII-only lower-casing (str.lower() also folds non-ASCII letters, which C does not).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class SniError(ValueError):
    """The bytes are not a TLS ClientHello we accept; ``str(exc)`` is the reason, one line."""


@dataclass(frozen=True)
class ClientHello:
    """A parsed ClientHello: its host name (lower case, no trailing dot; None without one) and
    ``length``, the bytes its records take at the start of the input."""

    server_name: Optional[str]
    length: int


def _supported_version(major: int, minor: int) -> bool:
    return major == 3 and minor <= 4


def parse_client_hello(data: bytes) -> Optional[ClientHello]:
    """What a client sent so far (from its first byte): None if more bytes are needed, the
    ClientHello once its records are whole, SniError if the bytes cannot become one we accept."""
    n = len(data)
    if n == 0:
        return None
    first = data[0]
    if first != _HANDSHAKE:
        if first & 0x80:  # maybe SSLv2's 2-byte record length; its message type follows
            if n < 3:
                return None
            if data[2] == _CLIENT_HELLO:
                raise SniError("unsupported SSLv2-style ClientHello")
        raise SniError("not TLS (first byte 0x%02x)" % first)
    message = bytearray()
    total = -1  # the message's length with its header, once known
    records = 0
    pos = 0
    while True:
        if pos == n:
            return None
        if data[pos] != _HANDSHAKE:
            raise SniError("malformed ClientHello: record of content type 0x%02x inside it" % data[pos])
        if n - pos < 3:
            return None
        if not _supported_version(data[pos + 1], data[pos + 2]):
            raise SniError("unsupported TLS record version 0x%02x%02x" % (data[pos + 1], data[pos + 2]))
        if n - pos < _RECORD_HEADER:
            return None
        length = data[pos + 3] << 8 | data[pos + 4]
        if length == 0:
            raise SniError("empty TLS record")
        if length > MAX_RECORD_LENGTH:
            raise SniError("TLS record too long (%d bytes, at most %d)" % (length, MAX_RECORD_LENGTH))
        records += 1
        start = len(message)
        if total >= 0 and start + length > total:
            raise _malformed("%s more in its last record" % _bytes(start + length - total))
        body = pos + _RECORD_HEADER
        message += data[body : body + length]
        if total < 0:
            if not message:
                return None
            if message[0] != _CLIENT_HELLO:
                raise SniError("not a ClientHello (handshake type %d)" % message[0])
            if len(message) >= 4:
                total = 4 + (message[1] << 16 | message[2] << 8 | message[3])
                if total > MAX_HELLO:
                    raise SniError("ClientHello too long (%d bytes, at most %d)" % (total, MAX_HELLO))
                if start + length > total:
                    raise _malformed("%s more in its last record" % _bytes(start + length - total))
        if n < body + length:
            return None
        pos = body + length
        if len(message) == total:
            return ClientHello(_parse_body(bytes(message), 4), pos)
        if records == MAX_RECORDS:
            raise SniError("ClientHello spans too many records (more than %d)" % MAX_RECORDS)


def _bytes(count: int) -> str:
    return "1 byte" if count == 1 else "%d bytes" % count


def _malformed(what: str) -> SniError:
    return SniError("malformed ClientHello: " + what)


def _bad_name(what: str) -> SniError:
    return SniError("malformed server_name extension: " + what)


def _parse_body(m: bytes, p: int) -> Optional[str]:
    """The ClientHello's fields from m[p:] (m is the whole message); its host name or None."""
    end = len(m)
    if end - p < 2:
        raise _malformed("truncated version")
    if not _supported_version(m[p], m[p + 1]):
        raise SniError("unsupported ClientHello version 0x%02x%02x" % (m[p], m[p + 1]))
    p += 2
    if end - p < 32:
        raise _malformed("truncated random")
    p += 32
    if end - p < 1:
        raise _malformed("truncated session id")
    size = m[p]
    if size > _MAX_SESSION_ID:
        raise _malformed("session id of %d bytes (at most %d)" % (size, _MAX_SESSION_ID))
    if end - p - 1 < size:
        raise _malformed("truncated session id")
    p += 1 + size
    if end - p < 2:
        raise _malformed("truncated cipher suites")
    size = m[p] << 8 | m[p + 1]
    if size == 0 or size % 2:
        raise _malformed("bad cipher suites length %d" % size)
    if end - p - 2 < size:
        raise _malformed("truncated cipher suites")
    p += 2 + size
    if end - p < 1:
        raise _malformed("truncated compression methods")
    size = m[p]
    if size == 0:
        raise _malformed("no compression methods")
    if end - p - 1 < size:
        raise _malformed("truncated compression methods")
    p += 1 + size
    if p == end:
        return None  # no extensions (TLS 1.0-1.2)
    if end - p < 2:
        raise _malformed("truncated extensions")
    size = m[p] << 8 | m[p + 1]
    p += 2
    if end - p < size:
        raise _malformed("truncated extensions")
    if end - p > size:
        raise _malformed("%s after the extensions" % _bytes(end - p - size))
    seen: Set[int] = set()
    name: Optional[str] = None
    while p < end:
        if end - p < 4:
            raise _malformed("truncated extension header")
        kind = m[p] << 8 | m[p + 1]
        size = m[p + 2] << 8 | m[p + 3]
        p += 4
        if end - p < size:
            raise _malformed("truncated extension 0x%04x" % kind)
        if kind in seen:
            raise _malformed("duplicate extension 0x%04x" % kind)
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            name = _parse_server_name(m, p, p + size)
        p += size
    return name


def _parse_server_name(m: bytes, p: int, end: int) -> Optional[str]:
    """The server_name extension's data m[p:end]: its host name, or None without one."""
    if end - p < 2:
        raise _bad_name("truncated list length")
    size = m[p] << 8 | m[p + 1]
    p += 2
    if size != end - p:
        raise _bad_name("list length %d in %s" % (size, _bytes(end - p)))
    if size == 0:
        raise _bad_name("empty list")
    name: Optional[str] = None
    while p < end:
        if end - p < 3:
            raise _bad_name("truncated entry")
        kind = m[p]
        size = m[p + 1] << 8 | m[p + 2]
        p += 3
        if end - p < size:
            raise _bad_name("truncated entry")
        if kind == _HOST_NAME:
            if name is not None:
                raise _bad_name("more than one host name")
            name = _check_name(m[p : p + size])
        p += size
    return name


def _check_name(raw: bytes) -> str:
    """A host name as the module doc describes it, lower-cased, without a trailing dot."""
    if not raw:
        raise _bad_name("empty name")
    if len(raw) > MAX_NAME:
        raise _bad_name("name too long (%d bytes, at most %d)" % (len(raw), MAX_NAME))
    label = 0
    for c in raw:
        if c == 0x2E:  # '.'
            if label == 0:
                raise _bad_name("empty label in name")
            label = 0
        elif c in _NAME_BYTES:
            label += 1
            if label > _MAX_LABEL:
                raise _bad_name("label longer than %d bytes in name" % _MAX_LABEL)
        else:
            raise _bad_name("bad character 0x%02x in name" % c)
    if label == 0:  # a trailing dot
        raw = raw[:-1]
    return raw.decode("ascii").translate(_ASCII_LOWER)


# --- routing by name ---------------------------------------------------------------------------


def _normal(text: str) -> str:
    """ASCII lower case, one trailing dot dropped."""
    text = text.translate(_ASCII_LOWER)
    return text[:-1] if text.endswith(".") else text


def match_route(name: Optional[str], patterns: Sequence[str]) -> int:
    """The index of the most specific pattern matching ``name``, -1 if none (or no name).

    A pattern is a name (``db.example.com``: that name) or ``*.`` and a name (``*.example.com``:
    any name ending in ``.example.com`` with at least one label before it, not ``example.com``).
    Case-insensitive (ASCII); a trailing dot on the name or a pattern is ignored. An exact match
    beats any wildcard; among wildcards the longest suffix wins; ties go to the earliest pattern.
    """
    if name is None:
        return -1
    name = _normal(name)
    if not name:
        return -1
    best = -1
    best_suffix = -1
    for index, pattern in enumerate(patterns):
        pattern = _normal(pattern)
        if pattern.startswith("*."):
            suffix = pattern[1:]  # ".example.com"
            if len(name) > len(suffix) and name.endswith(suffix) and len(suffix) > best_suffix:
                best, best_suffix = index, len(suffix)
        elif pattern == name:
            return index
    return best


def check_route_pattern(text: str) -> str:
    """``text`` as a route pattern (see match_route), normalised: lower case, no trailing dot.
    ValueError says what is wrong with it."""
    pattern = _normal(text)
    rest = pattern[2:] if pattern.startswith("*.") else pattern
    problem = _pattern_problem(rest)
    if problem:
        raise ValueError("bad route pattern %r: %s" % (text, problem))
    return pattern


def _pattern_problem(rest: str) -> str:
    if not rest:
        return "empty name"
    if len(rest) > MAX_NAME:
        return "longer than %d characters" % MAX_NAME
    for label in rest.split("."):
        if not label:
            return "empty label"
        if len(label) > _MAX_LABEL:
            return "label longer than %d characters" % _MAX_LABEL
        for c in label:
            if c == "*":
                return "'*' only as a whole first label, as in *.example.com"
            if not (c.isascii() and ord(c) in _NAME_BYTES):
                return "bad character %r" % c
    return ""
