"""TLS ClientHellos and what an SNI parser must make of them: the one corpus that the pure parser
(``_sni.parse_client_hello``) and its C twin (``_loop_sni.h``, ``t2t_sni_parse``) both answer to.

Each case is a label, the bytes a client sent so far, and one expectation: ``NEED`` (a proper
prefix of a ClientHello: more bytes needed), ``ok(name, length)`` (the host name, lower case, or
None without one; the bytes the hello's records take), or ``error(text)`` (the exact SniError
text). Real hellos come from Python's ``ssl`` module over memory BIOs (no network): their random
and key shares differ from run to run, their structure and expectations do not. Everything
hand-built is deterministic (a seeded Random).
"""

from __future__ import annotations

import random
import ssl
import struct
from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

Expected = Tuple[object, ...]
NEED: Expected = ("need",)


def ok(name: Optional[str], length: int) -> Expected:
    return ("ok", name, length)


def error(text: str) -> Expected:
    return ("error", text)


def _bad_name(what: str) -> Expected:
    return error("malformed server_name extension: " + what)


def _malformed(what: str) -> Expected:
    return error("malformed ClientHello: " + what)


class Case(NamedTuple):
    label: str
    data: bytes
    expected: Expected


RNG = random.Random(20240611)
CCS = bytes.fromhex("140303000101")  # a ChangeCipherSpec record: what may follow a hello
APP_DATA = bytes.fromhex("1703030005") + b"early"

# --- building blocks ------------------------------------------------------------------------------


def record(fragment: bytes, ctype: int = 22, version: int = 0x0301, length: Optional[int] = None) -> bytes:
    return struct.pack("!BHH", ctype, version, len(fragment) if length is None else length) + fragment


def records(message: bytes, sizes: Iterable[int], version: int = 0x0301) -> bytes:
    """message in records of the given sizes, the rest (if any) in one last record."""
    out, pos = [], 0
    for size in sizes:
        out.append(record(message[pos : pos + size], version=version))
        pos += size
    if pos < len(message):
        out.append(record(message[pos:], version=version))
    return b"".join(out)


def handshake(body: bytes, htype: int = 1, length: Optional[int] = None) -> bytes:
    size = len(body) if length is None else length
    return bytes([htype]) + size.to_bytes(3, "big") + body


def ext(kind: int, data: bytes, length: Optional[int] = None) -> bytes:
    return struct.pack("!HH", kind, len(data) if length is None else length) + data


def entry(name: bytes, name_type: int = 0, length: Optional[int] = None) -> bytes:
    return struct.pack("!BH", name_type, len(name) if length is None else length) + name


def sni(*entries: bytes, list_length: Optional[int] = None) -> bytes:
    """A server_name extension (type 0) holding the entries."""
    data = b"".join(entries)
    return ext(0, struct.pack("!H", len(data) if list_length is None else list_length) + data)


RANDOM = bytes(RNG.randrange(256) for _ in range(32))
SUPPORTED_VERSIONS = ext(0x002B, bytes.fromhex("0403040303"))
ALPN = ext(0x0010, bytes.fromhex("000c02683208687474702f312e31"))


def body(
    *extensions: bytes,
    version: int = 0x0303,
    session_id: bytes = b"",
    ciphers: bytes = bytes.fromhex("13011302c02f"),
    compression: bytes = b"\x00",
    no_extensions: bool = False,
    block_length: Optional[int] = None,
) -> bytes:
    """A ClientHello body; extensions are whole ext() bytes, their block length computed unless
    given; no_extensions leaves the block out (a TLS 1.0-1.2 hello may)."""
    out = struct.pack("!H", version) + RANDOM
    out += bytes([len(session_id)]) + session_id
    out += struct.pack("!H", len(ciphers)) + ciphers
    out += bytes([len(compression)]) + compression
    if no_extensions:
        return out
    block = b"".join(extensions)
    return out + struct.pack("!H", len(block) if block_length is None else block_length) + block


def tls(hello_body: bytes, version: int = 0x0301) -> bytes:
    """A ClientHello body in a handshake message in one record."""
    return record(handshake(hello_body), version=version)


def host(name: str) -> bytes:
    return sni(entry(name.encode("ascii")))


# --- real hellos from the ssl module --------------------------------------------------------------


def ssl_hello(
    server_hostname: Optional[str],
    maximum: Optional[ssl.TLSVersion] = None,
    alpn: Optional[Sequence[str]] = None,
) -> bytes:
    """The ClientHello the ssl module sends first, as bytes on the wire."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        tls_object.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def message_of(wire: bytes) -> bytes:
    """The handshake bytes of a run of records (headers dropped)."""
    out, pos = b"", 0
    while pos < len(wire):
        size = int.from_bytes(wire[pos + 3 : pos + 5], "big")
        out += wire[pos + 5 : pos + 5 + size]
        pos += 5 + size
    return out


def extensions_at(hello_body: bytes) -> int:
    """Where a ClientHello body's extension block (its 2-byte length) starts."""
    p = 2 + 32
    p += 1 + hello_body[p]
    p += 2 + int.from_bytes(hello_body[p : p + 2], "big")
    p += 1 + hello_body[p]
    return p


def with_extension(wire: bytes, extension: bytes, first: bool = True) -> bytes:
    """A real hello (one record) with one more extension, every length fixed; first puts it
    at the head of the block (a pre_shared_key must stay last), else at its end."""
    hello_body = message_of(wire)[4:]
    at = extensions_at(hello_body)
    size = int.from_bytes(hello_body[at : at + 2], "big")
    block = hello_body[at + 2 :]
    block = extension + block if first else block + extension
    new_body = hello_body[:at] + struct.pack("!H", size + len(extension)) + block
    return record(handshake(new_body), version=int.from_bytes(wire[1:3], "big"))


def ech_outer(payload_size: int) -> bytes:
    """An encrypted_client_hello extension (0xfe0d) as an outer hello carries it: type outer,
    HPKE suite, config id, enc (a 32-byte X25519 key) and the encrypted inner hello (random)."""
    enc = bytes(RNG.randrange(256) for _ in range(32))
    payload = bytes(RNG.randrange(256) for _ in range(payload_size))
    data = b"\x00" + struct.pack("!HH", 0x0001, 0x0001) + bytes([RNG.randrange(256)])
    data += struct.pack("!H", len(enc)) + enc + struct.pack("!H", len(payload)) + payload
    return ext(0xFE0D, data)


LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
assert len(LONG_NAME) == 253

# (label, server_hostname, maximum version, alpn, the name expected)
REAL = [
    ("sni", "example.com", None, None, "example.com"),
    ("no-sni", None, None, None, None),
    ("upper", "Db.Example.COM", None, None, "db.example.com"),
    ("long-253", LONG_NAME, None, None, LONG_NAME),
    ("tls12-sni", "example.org", ssl.TLSVersion.TLSv1_2, None, "example.org"),
    ("tls12-no-sni", None, ssl.TLSVersion.TLSv1_2, None, None),
    ("alpn", "api.example.net", None, ["h2", "http/1.1"], "api.example.net"),
    ("tls12-alpn", "api.example.net", ssl.TLSVersion.TLSv1_2, ["http/1.1"], "api.example.net"),
    ("trailing-dot", "svc.example.com.", None, None, "svc.example.com"),
    ("single-label", "localhost", None, None, "localhost"),
    ("underscore-hyphen", "_srv.my-host.example", None, None, "_srv.my-host.example"),
    ("ip-literal", "192.0.2.7", None, None, None),  # the ssl module sends no SNI for an address
]


def real_hellos() -> List[Tuple[str, bytes, Optional[str]]]:
    return [(label, ssl_hello(name, maximum, alpn), want) for label, name, maximum, alpn, want in REAL]


# --- the corpus -----------------------------------------------------------------------------------

EXAMPLE = body(host("example.com"), SUPPORTED_VERSIONS)
EXAMPLE_TLS = tls(EXAMPLE)


def _cut_body_cases() -> List[Case]:
    """A body cut at every length, in one whole record (its lengths follow the cut): each cut
    is short in the field it falls in; a cut right after the compression methods is a hello
    without extensions."""
    block = host("example.com") + ext(0x0017, b"")
    fields = [
        (b"\x03\x03", "version"),
        (RANDOM, "random"),
        (b"\x04abcd", "session id"),
        (struct.pack("!H", 4) + bytes.fromhex("13011302"), "cipher suites"),
        (b"\x02\x00\x01", "compression methods"),
        (struct.pack("!H", len(block)) + block, "extensions"),
    ]
    cases, so_far = [], b""
    for part, field in fields:
        for cut in range(len(part)):
            data = so_far + part[:cut]
            if field == "extensions" and cut == 0:
                expected = ok(None, 9 + len(data))
            else:
                expected = _malformed("truncated " + field)
            cases.append(Case("body-cut-%d" % len(data), tls(data), expected))
        so_far += part
    cases.append(Case("body-whole", tls(so_far), ok("example.com", 9 + len(so_far))))
    # Cuts inside one extension with the block length following the cut: the extension's own
    # header and length are then what is short.
    head = so_far[: -len(fields[-1][0])]
    extension = ext(0x0010, b"\x00\x03\x02h2")
    for cut in range(1, len(extension)):
        data = head + struct.pack("!H", cut) + extension[:cut]
        text = "extension header" if cut < 4 else "extension 0x0010"
        cases.append(Case("ext-cut-%d" % cut, tls(data), _malformed("truncated " + text)))
    return cases


def _server_name_cases() -> List[Case]:
    def one(label: str, extension: bytes, expected: Expected) -> Case:
        data = tls(body(extension, SUPPORTED_VERSIONS))
        if expected[0] == "ok":
            expected = ok(expected[1], len(data))
        return Case("sni-" + label, data, expected)

    name63 = ".".join(["x" * 63] * 4)  # 255 bytes
    return [
        one("empty-data", ext(0, b""), _bad_name("truncated list length")),
        one("one-byte-data", ext(0, b"\x00"), _bad_name("truncated list length")),
        one("empty-list", sni(), _bad_name("empty list")),
        one("list-too-long", sni(entry(b"a.com"), list_length=9), _bad_name("list length 9 in 8 bytes")),
        one("list-one-byte", sni(b"", list_length=1), _bad_name("list length 1 in 0 bytes")),
        one("list-in-one-byte", ext(0, b"\x00\x00\x00"), _bad_name("list length 0 in 1 byte")),
        one("list-too-short", sni(entry(b"a.com"), list_length=7), _bad_name("list length 7 in 8 bytes")),
        one("list-zero-with-data", sni(entry(b"a.com"), list_length=0), _bad_name("list length 0 in 8 bytes")),
        one("entry-two-bytes", sni(b"\x00\x00"), _bad_name("truncated entry")),
        one("entry-one-byte", sni(b"\x00"), _bad_name("truncated entry")),
        one("name-overruns", sni(entry(b"a.com", length=6)), _bad_name("truncated entry")),
        one("name-short-length", sni(entry(b"a.com", length=4)), _bad_name("truncated entry")),
        one("two-host-names", sni(entry(b"a.com"), entry(b"b.com")), _bad_name("more than one host name")),
        one("other-type-only", sni(entry(b"whatever", name_type=1)), ok(None, 0)),
        one("other-type-any-bytes", sni(entry(b"\x00\xff ", name_type=7)), ok(None, 0)),
        one("other-type-then-host", sni(entry(b"x", name_type=1), entry(b"b.com")), ok("b.com", 0)),
        one("host-then-other-type", sni(entry(b"B.com"), entry(b"", name_type=255)), ok("b.com", 0)),
        one("empty-name", host(""), _bad_name("empty name")),
        one("name-255", host(name63), ok(name63, 0)),
        one("name-255-upper", host(name63.upper()), ok(name63, 0)),
        one("name-256", host(name63 + "x"), _bad_name("name too long (256 bytes, at most 255)")),
        one("name-256-dot", host(name63 + "."), _bad_name("name too long (256 bytes, at most 255)")),
        one("name-254-dot", host(name63[:-2] + "."), ok(name63[:-2], 0)),
        one("name-300", sni(entry(b"a" * 300)), _bad_name("name too long (300 bytes, at most 255)")),
        one("space", host("exa mple.com"), _bad_name("bad character 0x20 in name")),
        one("nul", sni(entry(b"example.com\x00")), _bad_name("bad character 0x00 in name")),
        one("utf8", sni(entry("b\u00fccher.de".encode())), _bad_name("bad character 0xc3 in name")),
        one("star", host("*.example.com"), _bad_name("bad character 0x2a in name")),
        one("colon-port", host("example.com:443"), _bad_name("bad character 0x3a in name")),
        one("leading-dot", host(".example.com"), _bad_name("empty label in name")),
        one("double-dot", host("a..example.com"), _bad_name("empty label in name")),
        one("dot-only", host("."), _bad_name("empty label in name")),
        one("two-trailing-dots", host("a.."), _bad_name("empty label in name")),
        one("bad-char-before-empty-label", host("a$..b"), _bad_name("bad character 0x24 in name")),
        one("empty-label-before-bad-char", host("a..$b"), _bad_name("empty label in name")),
        one("trailing-dot", host("a.B."), ok("a.b", 0)),
        one("label-63", host("y" * 63 + ".com"), ok("y" * 63 + ".com", 0)),
        one("label-64", host("y" * 64 + ".com"), _bad_name("label longer than 63 bytes in name")),
        one("last-label-64", host("com." + "y" * 64), _bad_name("label longer than 63 bytes in name")),
        one("one-char", host("A"), ok("a", 0)),
        one("ip-literal", host("192.0.2.1"), ok("192.0.2.1", 0)),
        one("hyphens", host("-a-.b_"), ok("-a-.b_", 0)),
        one("digits", host("0123456789.example"), ok("0123456789.example", 0)),
    ]


def _hello_field_cases() -> List[Case]:
    def one(label: str, hello_body: bytes, expected: Expected) -> Case:
        data = tls(hello_body)
        if expected[0] == "ok":
            expected = ok(expected[1], len(data))
        return Case(label, data, expected)

    name = host("example.com")
    return [
        one("version-0300", body(name, version=0x0300), ok("example.com", 0)),
        one("version-0304", body(name, version=0x0304), ok("example.com", 0)),
        one("version-0200", body(name, version=0x0200), error("unsupported ClientHello version 0x0200")),
        one("version-0305", body(name, version=0x0305), error("unsupported ClientHello version 0x0305")),
        one("version-feff", body(name, version=0xFEFF), error("unsupported ClientHello version 0xfeff")),
        one("session-id-32", body(name, session_id=b"s" * 32), ok("example.com", 0)),
        one("session-id-33", body(name, session_id=b"s" * 33), _malformed("session id of 33 bytes (at most 32)")),
        one("session-id-255", body(name, session_id=b"s" * 255), _malformed("session id of 255 bytes (at most 32)")),
        one("ciphers-empty", body(name, ciphers=b""), _malformed("bad cipher suites length 0")),
        one("ciphers-odd", body(name, ciphers=b"\x13\x01\x13"), _malformed("bad cipher suites length 3")),
        one("ciphers-one", body(name, ciphers=b"\x00\xff"), ok("example.com", 0)),
        one("compression-none", body(name, compression=b""), _malformed("no compression methods")),
        one("compression-two", body(name, compression=b"\x01\x00"), ok("example.com", 0)),
        one("no-extensions", body(no_extensions=True), ok(None, 0)),
        one("empty-extensions", body(), ok(None, 0)),
        one("block-length-short", body(name, block_length=len(name) - 3), _malformed("3 bytes after the extensions")),
        one(
            "block-length-one-short", body(name, block_length=len(name) - 1), _malformed("1 byte after the extensions")
        ),
        one("block-length-zero", body(name, block_length=0), _malformed("%d bytes after the extensions" % len(name))),
        one("block-length-long", body(name, block_length=len(name) + 1), _malformed("truncated extensions")),
        one("block-one-byte", body(no_extensions=True) + b"\x00", _malformed("truncated extensions")),
        one(
            "extension-overruns",
            body(ext(0x0010, b"\x00\x03\x02h2", length=6)),
            _malformed("truncated extension 0x0010"),
        ),
        one(
            "extension-short", body(ext(0x0010, b"\x00\x03\x02h2", length=4)), _malformed("truncated extension header")
        ),
        one("extension-unknown", body(ext(0x7A7A, b""), ext(0xFFFF, b"x"), name), ok("example.com", 0)),
        one("sni-last", body(SUPPORTED_VERSIONS, ALPN, name), ok("example.com", 0)),
        one("duplicate-sni", body(name, SUPPORTED_VERSIONS, name), _malformed("duplicate extension 0x0000")),
        one("duplicate-sni-other-name", body(name, host("b.com")), _malformed("duplicate extension 0x0000")),
        one("duplicate-alpn", body(ALPN, name, ALPN), _malformed("duplicate extension 0x0010")),
        one("duplicate-ffff", body(ext(0xFFFF, b""), ext(0xFFFF, b"")), _malformed("duplicate extension 0xffff")),
        one("duplicate-before-bad-sni", body(ALPN, ALPN, host("")), _malformed("duplicate extension 0x0010")),
        one("bad-sni-before-duplicate", body(host(""), ALPN, ALPN), _bad_name("empty name")),
        one("body-empty", b"", _malformed("truncated version")),
    ]


def _record_layer_cases() -> List[Case]:
    hello = handshake(EXAMPLE)
    n = len(hello)
    cases = [
        Case("empty-input", b"", NEED),
        Case("one-byte", b"\x16", NEED),
        Case("record-version-0300", record(hello, version=0x0300), ok("example.com", n + 5)),
        Case("record-version-0304", record(hello, version=0x0304), ok("example.com", n + 5)),
        Case("record-version-0200", record(hello, version=0x0200), error("unsupported TLS record version 0x0200")),
        Case("record-version-0200-prefix", b"\x16\x02\x00", error("unsupported TLS record version 0x0200")),
        Case("record-version-0305", record(hello, version=0x0305), error("unsupported TLS record version 0x0305")),
        Case("record-version-0403", record(hello, version=0x0403), error("unsupported TLS record version 0x0403")),
        Case("record-version-0002", b"\x16\x00\x02", error("unsupported TLS record version 0x0002")),
        Case("record-empty", record(b""), error("empty TLS record")),
        Case("record-empty-then-hello", record(b"") + EXAMPLE_TLS, error("empty TLS record")),
        Case("record-16385", record(hello, length=16385), error("TLS record too long (16385 bytes, at most 16384)")),
        Case("record-65535", record(b"", length=0xFFFF), error("TLS record too long (65535 bytes, at most 16384)")),
        Case(
            "record-longer-than-message",
            record(hello + b"\x16", length=n + 1),
            _malformed("1 byte more in its last record"),
        ),
        Case(
            "record-longer-header-only", record(hello[:4], length=n + 7), _malformed("7 bytes more in its last record")
        ),
        Case(
            "record-16384-short-message",
            record(hello[:4], length=16384),
            _malformed("%d bytes more in its last record" % (16384 - n)),
        ),
        Case("record-shorter-than-message", record(hello[:-3], length=n - 3), NEED),
        Case(
            "record-shorter-then-ccs",
            record(hello[:-3], length=n - 3) + CCS,
            _malformed("record of content type 0x14 inside it"),
        ),
        Case(
            "record-shorter-then-garbage",
            record(hello[:-3]) + hello[-3:],
            _malformed("record of content type 0x%02x inside it" % hello[-3]),
        ),
        Case("handshake-length-long", record(handshake(EXAMPLE, length=len(EXAMPLE) + 1)), NEED),
        Case(
            "handshake-length-long-then-ccs",
            record(handshake(EXAMPLE, length=len(EXAMPLE) + 1)) + CCS,
            _malformed("record of content type 0x14 inside it"),
        ),
        Case(
            "handshake-length-short",
            record(handshake(EXAMPLE, length=len(EXAMPLE) - 2)),
            _malformed("2 bytes more in its last record"),
        ),
        Case("handshake-length-zero", record(handshake(b"")), _malformed("truncated version")),
        Case(
            "handshake-length-zero-with-body",
            record(handshake(EXAMPLE, length=0)),
            _malformed("%d bytes more in its last record" % len(EXAMPLE)),
        ),
        Case("handshake-type-2", record(handshake(EXAMPLE, htype=2)), error("not a ClientHello (handshake type 2)")),
        Case(
            "handshake-type-2-prefix",
            record(handshake(EXAMPLE, htype=2))[:6],
            error("not a ClientHello (handshake type 2)"),
        ),
        Case("handshake-type-0", record(handshake(EXAMPLE, htype=0)), error("not a ClientHello (handshake type 0)")),
        Case("handshake-type-255", record(b"\xff"), error("not a ClientHello (handshake type 255)")),
        Case(
            "hello-16385-declared",
            record(b"\x01\x00\x3f\xfd"),
            error("ClientHello too long (16385 bytes, at most 16384)"),
        ),
        Case(
            "hello-max-declared",
            record(b"\x01\xff\xff\xff"),
            error("ClientHello too long (16777219 bytes, at most 16384)"),
        ),
        Case(
            "hello-16385-split-header",
            records(b"\x01\x00\x3f\xfd", [1, 1, 1]),
            error("ClientHello too long (16385 bytes, at most 16384)"),
        ),
        Case("hello-16384-declared", record(b"\x01\x00\x3f\xfc"), NEED),
        Case("first-byte-alert", b"\x15\x03\x03\x00\x02\x02\x28", error("not TLS (first byte 0x15)")),
        Case("first-byte-appdata", APP_DATA, error("not TLS (first byte 0x17)")),
        Case("first-byte-ccs", CCS + EXAMPLE_TLS, error("not TLS (first byte 0x14)")),
        Case("first-byte-zero", b"\x00", error("not TLS (first byte 0x00)")),
        Case("http-get", b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", error("not TLS (first byte 0x47)")),
        Case("http-g", b"G", error("not TLS (first byte 0x47)")),
        Case("ssh", b"SSH-2.0-OpenSSH_9.6\r\n", error("not TLS (first byte 0x53)")),
        Case("proxy-v1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", error("not TLS (first byte 0x50)")),
        Case("proxy-v2", b"\r\n\r\n\x00\r\nQUIT\n", error("not TLS (first byte 0x0d)")),
        Case(
            "ccs-inside",
            record(hello[:10]) + CCS + record(hello[10:]),
            _malformed("record of content type 0x14 inside it"),
        ),
        Case("ccs-inside-prefix", record(hello[:10]) + b"\x14", _malformed("record of content type 0x14 inside it")),
        Case(
            "second-record-bad-version",
            record(hello[:10]) + record(hello[10:], version=0x0200),
            error("unsupported TLS record version 0x0200"),
        ),
        Case("second-record-empty", record(hello[:10]) + record(b""), error("empty TLS record")),
        Case(
            "second-record-too-long",
            record(hello[:10]) + record(hello[10:], length=16385),
            error("TLS record too long (16385 bytes, at most 16384)"),
        ),
        Case(
            "second-record-past-end",
            record(hello[:10]) + record(hello[10:] + b"\x00\x00"),
            _malformed("2 bytes more in its last record"),
        ),
        Case(
            "second-record-version-differs",
            record(hello[:10], version=0x0301) + record(hello[10:], version=0x0303),
            ok("example.com", n + 10),
        ),
        Case("then-ccs", EXAMPLE_TLS + CCS, ok("example.com", n + 5)),
        Case("then-early-data", EXAMPLE_TLS + CCS + APP_DATA, ok("example.com", n + 5)),
        Case("then-garbage", EXAMPLE_TLS + b"\xff" * 100, ok("example.com", n + 5)),
        Case("then-second-hello", EXAMPLE_TLS + tls(body(host("other.com"))), ok("example.com", n + 5)),
        Case("then-broken-record", EXAMPLE_TLS + record(b"", version=0x0200), ok("example.com", n + 5)),
    ]
    # SSLv2-style (2-byte header, high bit set, CLIENT-HELLO 1, version, lengths, ciphers, challenge)
    v2_hello = b"\x01\x03\x01\x00\x03\x00\x00\x00\x10" + b"\x00\x00\x2f" + bytes(16)
    v2 = struct.pack("!H", 0x8000 | len(v2_hello)) + v2_hello
    cases += [
        Case("sslv2-hello", v2, error("unsupported SSLv2-style ClientHello")),
        Case("sslv2-hello-3", v2[:3], error("unsupported SSLv2-style ClientHello")),
        Case("sslv2-hello-2", v2[:2], NEED),
        Case("sslv2-hello-1", v2[:1], NEED),
        Case("sslv2-pure-v2", b"\x80\x2e\x01\x00\x02" + bytes(44), error("unsupported SSLv2-style ClientHello")),
        Case("high-bit-not-hello", b"\x80\x2e\x02\x00", error("not TLS (first byte 0x80)")),
        Case("high-bit-ff", b"\xff\xff\xff", error("not TLS (first byte 0xff)")),
    ]
    return cases


def _fragment_cases(wire: bytes, name: Optional[str]) -> List[Case]:
    """A real hello's message re-split into records of various sizes."""
    message = message_of(wire)
    cases: List[Case] = []

    def add(label: str, sizes: List[int], version: int = 0x0301) -> None:
        data = records(message, sizes, version)
        cases.append(Case("fragments-" + label, data, ok(name, len(data))))

    add("header-bytes", [1, 1, 1, 1])
    add("1-2-3", [1, 2, 3])
    add("halves", [len(message) // 2])
    add("last-byte-alone", [len(message) - 1])
    add("version-0303", [100, 100], version=0x0303)
    for k in range(8):  # random sizes, at most 64 records
        sizes, left = [], len(message)
        while left > 0 and len(sizes) < 63:
            size = min(left, RNG.randint(1, RNG.choice([3, 16, 64, 200])))
            sizes.append(size)
            left -= size
        add("random-%d" % k, sizes)
    # The most records a hello may span: 63 single bytes and the rest; then one record more.
    add("64-records", [1] * 63)
    too_many = records(message, [1] * 64)
    cases.append(Case("fragments-65-records", too_many, error("ClientHello spans too many records (more than 64)")))
    cut = 64 * 6  # the 64 one-byte records
    cases.append(
        Case(
            "fragments-64-records-incomplete",
            too_many[:cut],
            error("ClientHello spans too many records (more than 64)"),
        )
    )
    cases.append(Case("fragments-64-records-minus-1", too_many[: cut - 1], NEED))
    return cases


def _prefix_cases(label: str, data: bytes) -> List[Case]:
    return [Case("%s-prefix-%d" % (label, k), data[:k], NEED) for k in range(len(data))]


def _size_cases() -> List[Case]:
    """Hellos at the size bound: a padding extension (0x0015) grows a hello to MAX_HELLO."""
    base = body(host("big.example.com"), SUPPORTED_VERSIONS)
    grow = 16384 - 4 - len(base) - 4  # the padding's data: the message is then 16384 bytes
    biggest = handshake(body(host("big.example.com"), SUPPORTED_VERSIONS, ext(0x0015, bytes(grow))))
    assert len(biggest) == 16384
    one_more = handshake(body(host("big.example.com"), SUPPORTED_VERSIONS, ext(0x0015, bytes(grow + 1))))
    return [
        Case("hello-16384", record(biggest), ok("big.example.com", 16389)),
        Case("hello-16384-two-records", records(biggest, [8000]), ok("big.example.com", 16394)),
        Case("hello-16384-64-records", records(biggest, [256] * 63), ok("big.example.com", 16384 + 5 * 64)),
        Case("hello-16384-then-ccs", record(biggest) + CCS, ok("big.example.com", 16389)),
        Case(
            "hello-16385-two-records",
            records(one_more, [16384]),
            error("ClientHello too long (16385 bytes, at most 16384)"),
        ),
        Case("hello-16385-one-record", record(one_more), error("TLS record too long (16385 bytes, at most 16384)")),
    ]


def _garbage_cases() -> List[Case]:
    """Random bytes (seeded): never a handshake record, so the first byte decides."""
    cases = []
    for k in range(40):
        data = bytes(RNG.randrange(256) for _ in range(RNG.randint(1, 300)))
        if data[0] == 22:
            data = b"\x17" + data[1:]
        if data[0] & 0x80 and len(data) < 3:
            expected = NEED
        elif data[0] & 0x80 and data[2] == 1:
            expected = error("unsupported SSLv2-style ClientHello")
        else:
            expected = error("not TLS (first byte 0x%02x)" % data[0])
        cases.append(Case("garbage-%d" % k, data, expected))
    return cases


def _real_cases() -> List[Case]:
    cases: List[Case] = []
    hellos = real_hellos()
    for label, wire, name in hellos:
        cases.append(Case("real-" + label, wire, ok(name, len(wire))))
        cases.append(Case("real-%s-then-ccs" % label, wire + CCS, ok(name, len(wire))))
        ech = with_extension(wire, ech_outer(RNG.randint(100, 300)))
        cases.append(Case("real-%s-ech" % label, ech, ok(name, len(ech))))
    by_label = {label: (wire, name) for label, wire, name in hellos}
    sni_wire, sni_name = by_label["sni"]
    cases += _fragment_cases(sni_wire, sni_name)
    ech_last = with_extension(sni_wire, ech_outer(200), first=False)
    cases.append(Case("real-sni-ech-last", ech_last, ok(sni_name, len(ech_last))))
    dup = with_extension(sni_wire, host("evil.example"))
    cases.append(Case("real-sni-duplicate-sni", dup, _malformed("duplicate extension 0x0000")))
    # Every proper prefix of a few hellos is a wait for more, never an error.
    cases += _prefix_cases("real-sni", sni_wire)
    cases += _prefix_cases("real-tls12-no-sni", by_label["tls12-no-sni"][0])
    cases += _prefix_cases("real-sni-ech", with_extension(sni_wire, ech_outer(64)))
    cases += _prefix_cases("real-sni-fragmented", records(message_of(sni_wire), [1, 1, 2, 5, 30, 100, 7]))
    return cases


def build_cases() -> List[Case]:
    cases = (
        _record_layer_cases()
        + _hello_field_cases()
        + _server_name_cases()
        + _cut_body_cases()
        + _size_cases()
        + _garbage_cases()
        + _real_cases()
        + _prefix_cases("example", EXAMPLE_TLS)
        + _prefix_cases("no-extensions", tls(body(no_extensions=True)))
    )
    labels = [case.label for case in cases]
    assert len(set(labels)) == len(labels), "duplicate labels"
    return cases


CASES = build_cases()
# Whole hellos that parse, for mutation (hypothesis and fuzzing).
VALID = [case.data for case in CASES if case.expected[0] == "ok"]
