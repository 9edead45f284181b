"""PROXY protocol input and what a parser must make of it: the one corpus that the pure parser
(``_proxy.parse``) and its C twin (``_loop_proxy.h``, as ``_core.proxy_parse``) both answer to.

Each case is bytes in (everything received so far) and one expectation: ``INCOMPLETE`` (a proper
prefix of a header that may still become valid), a ``Header`` (the header at the start, its
length, family and addresses; bytes after it are not part of it), or an ``Error`` with the exact
text of the ProxyHeaderError.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import List, NamedTuple, Optional, Tuple, Union

from tcptotcp._proxy import MAX_HEADER_BYTES, MAX_V2_LENGTH

SIG = b"\r\n\r\n\x00\r\nQUIT\n"  # the v2 signature, from the spec
FULL_V6 = ":".join(["ffff"] * 8)  # the longest IPv6 text without a dotted tail, 39 characters
INET, INET6, UNSPEC = socket.AF_INET, socket.AF_INET6, socket.AF_UNSPEC

Address = Optional[Tuple[str, int]]


class Header(NamedTuple):
    length: int
    family: int
    source: Address
    destination: Address


class Error(NamedTuple):
    message: str


class Case(NamedTuple):
    name: str
    data: bytes
    expected: Union[None, Header, Error]


INCOMPLETE = None
NOT_PROXY = Error("not a PROXY protocol header")
STRAY = Error("v1: stray CR or LF")
NO_CRLF = Error("v1: no CRLF within 107 bytes")


def v6(text: str) -> str:
    """IPv6 as the parsers word it (ipaddress's compressed form: Python 3.13 writes an
    IPv4-mapped address with a dotted tail, earlier versions in hextets)."""
    return ipaddress.IPv6Address(text).compressed


def line(fields: str) -> bytes:
    return b"PROXY " + fields.encode("latin-1") + b"\r\n"


def v2(ver_cmd: int, fam: int, block: bytes = b"", length: Optional[int] = None) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block) if length is None else length) + block


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def _v4_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_pton(INET, src) + socket.inet_pton(INET, dst) + struct.pack("!HH", sport, dport)


def _v6_block(src: str, dst: str, sport: int, dport: int) -> bytes:
    return socket.inet_pton(INET6, src) + socket.inet_pton(INET6, dst) + struct.pack("!HH", sport, dport)


V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 ::1 1111 2222\r\n"
V1_TCP6_LONGEST = line(f"TCP6 {FULL_V6} {FULL_V6} 65535 65535")
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_UNKNOWN_LONGEST = line(f"UNKNOWN {FULL_V6} {FULL_V6} 65535 65535")
V2_TCP4 = v2(0x21, 0x11, _v4_block("192.168.0.1", "192.168.0.11", 56324, 443))
V2_TCP6 = v2(0x21, 0x21, _v6_block("2001:db8::1", "::1", 1111, 2222))
V2_LOCAL = v2(0x20, 0x00)
V2_UNIX = v2(0x21, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0"))
V2_TCP4_TLVS = v2(0x21, 0x11, V2_TCP4[16:] + tlv(0x04, b"abc") + tlv(0x01, b"h2"))
# Addresses plus one NOOP TLV filling the header to MAX_V2_LENGTH (1040 bytes).
V2_LARGEST = v2(0x21, 0x11, V2_TCP4[16:] + tlv(0x04, b"\0" * (MAX_V2_LENGTH - 16 - 12 - 3)))


# --- whole, valid headers -------------------------------------------------------------------------


def ok(name: str, data: bytes, family: int = UNSPEC, source: Address = None, destination: Address = None) -> Case:
    """A whole header: all of `data` (no address: AF_UNSPEC)."""
    return Case(name, data, Header(len(data), family, source, destination))


VALID: List[Case] = [
    # v1, TCP over IPv4
    ok("v1-tcp4", V1_TCP4, INET, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ok(
        "v1-tcp4-extremes",
        line("TCP4 0.0.0.0 255.255.255.255 0 65535"),
        INET,
        ("0.0.0.0", 0),
        ("255.255.255.255", 65535),
    ),
    ok("v1-tcp4-short-octets", line("TCP4 1.0.10.100 9.99.199.249 1 9"), INET, ("1.0.10.100", 1), ("9.99.199.249", 9)),
    # v1, TCP over IPv6, in every spelling ipaddress takes (and the parsers word compressed)
    ok("v1-tcp6", V1_TCP6, INET6, ("2001:db8::1", 1111), ("::1", 2222)),
    ok("v1-tcp6-longest", V1_TCP6_LONGEST, INET6, (FULL_V6, 65535), (FULL_V6, 65535)),
    ok(
        "v1-tcp6-uppercase-exploded",
        line("TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 0000:0000:0000:0000:0000:0000:0000:0000 0 65535"),
        INET6,
        ("2001:db8::1", 0),
        ("::", 65535),
    ),
    ok("v1-tcp6-unspecified", line("TCP6 :: :: 1 2"), INET6, ("::", 1), ("::", 2)),
    ok("v1-tcp6-trailing-gap", line("TCP6 1:: 1:2:3:4:5:6:7:: 1 2"), INET6, ("1::", 1), ("1:2:3:4:5:6:7:0", 2)),
    ok("v1-tcp6-leading-gap", line("TCP6 ::1:2:3:4:5:6:7 ::8 1 2"), INET6, ("0:1:2:3:4:5:6:7", 1), ("::8", 2)),
    ok(
        "v1-tcp6-zero-runs",
        line("TCP6 1:0:0:2:0:0:0:3 1:0:0:2:0:0:3:4 1 2"),
        INET6,
        ("1:0:0:2::3", 1),  # the longest run
        ("1::2:0:0:3:4", 2),  # the first of equals
    ),
    ok(
        "v1-tcp6-single-zero",
        line("TCP6 1:0:2:3:4:5:6:7 0:1:2:3:4:5:6:7 1 2"),
        INET6,
        ("1:0:2:3:4:5:6:7", 1),
        ("0:1:2:3:4:5:6:7", 2),
    ),
    ok(
        "v1-tcp6-mapped",
        line("TCP6 ::ffff:1.2.3.4 ::FFFF:5.6.7.8 1 2"),
        INET6,
        (v6("::ffff:1.2.3.4"), 1),
        (v6("::ffff:5.6.7.8"), 2),
    ),
    ok("v1-tcp6-dotted-compat", line("TCP6 ::1.2.3.4 ::0.0.0.0 1 2"), INET6, ("::102:304", 1), ("::", 2)),
    ok(
        "v1-tcp6-dotted-full",
        line("TCP6 1:2:3:4:5:6:1.2.3.4 1:2:3:4:5::255.255.255.255 1 2"),
        INET6,
        ("1:2:3:4:5:6:102:304", 1),
        ("1:2:3:4:5:0:ffff:ffff", 2),
    ),
    ok(
        "v1-tcp6-dotted-longest",  # 45 characters, as many as ipaddress takes
        line("TCP6 0000:0000:0000:0000:0000:ffff:255.255.255.255 ::1 1 2"),
        INET6,
        (v6("::ffff:255.255.255.255"), 1),
        ("::1", 2),
    ),
    # v1 UNKNOWN: whatever follows it on the line is ignored
    ok("v1-unknown", V1_UNKNOWN),
    ok("v1-unknown-longest", V1_UNKNOWN_LONGEST),
    ok("v1-unknown-junk", b"PROXY UNKNOWN x\x00\xff\t'\" y\r\n"),
    ok("v1-unknown-space", b"PROXY UNKNOWN \r\n"),
    ok("v1-crlf-ends-at-107", b"PROXY UNKNOWN " + b"a" * 91 + b"\r\n"),
    # v2 PROXY over IPv4/IPv6
    ok("v2-tcp4", V2_TCP4, INET, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ok("v2-tcp6", V2_TCP6, INET6, ("2001:db8::1", 1111), ("::1", 2222)),
    ok(
        "v2-tcp4-extremes",
        v2(0x21, 0x11, _v4_block("0.0.0.0", "255.255.255.255", 0, 65535)),
        INET,
        ("0.0.0.0", 0),
        ("255.255.255.255", 65535),
    ),
    ok(
        "v2-tcp6-mapped",
        v2(0x21, 0x21, _v6_block("::ffff:1.2.3.4", "::ffff:5.6.7.8", 1, 2)),
        INET6,
        (v6("::ffff:1.2.3.4"), 1),
        (v6("::ffff:5.6.7.8"), 2),
    ),
    ok("v2-tcp6-all-ones", v2(0x21, 0x21, _v6_block(FULL_V6, "::", 65535, 0)), INET6, (FULL_V6, 65535), ("::", 0)),
    ok("v2-tcp4-tlvs", V2_TCP4_TLVS, INET, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    ok(
        "v2-tcp6-tlvs",
        v2(0x21, 0x21, V2_TCP6[16:] + tlv(0x05, b"id" * 64) + tlv(0x03, b"\0\0\0\0")),
        INET6,
        ("2001:db8::1", 1111),
        ("::1", 2222),
    ),
    ok(
        "v2-tcp4-stray-block-bytes",
        v2(0x21, 0x11, V2_TCP4[16:] + b"\xff"),
        INET,
        ("192.168.0.1", 56324),
        ("192.168.0.11", 443),
    ),
    ok("v2-largest", V2_LARGEST, INET, ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    # v2 without a usable address: LOCAL (any family, any block), AF_UNSPEC, AF_UNIX
    ok("v2-local", V2_LOCAL),
    ok("v2-local-with-block", v2(0x20, 0x11, V2_TCP4[16:])),
    ok("v2-local-tcp4-no-block", v2(0x20, 0x11)),
    ok("v2-local-udp", v2(0x20, 0x12, b"\0" * 12)),
    ok("v2-local-unknown-family", v2(0x20, 0xFF, b"\1\2\3")),
    ok("v2-local-largest", v2(0x20, 0x00, b"\0" * (MAX_V2_LENGTH - 16))),
    ok("v2-unspec", v2(0x21, 0x00)),
    ok("v2-unspec-with-tlvs", v2(0x21, 0x00, tlv(0x04, b"xyz"))),
    ok("v2-unix", V2_UNIX),
    ok("v2-unix-with-tlv", v2(0x21, 0x31, V2_UNIX[16:] + tlv(0x04, b""))),
]

# --- prefixes: every cut of a few headers needs more bytes, never fails -------------------------

_CUT_IN_FULL = {
    "v1-tcp4",
    "v1-tcp6-longest",
    "v1-tcp6-dotted-full",
    "v1-unknown-longest",
    "v2-tcp4",
    "v2-tcp6",
    "v2-local",
    "v2-tcp4-tlvs",
    "v2-unix",
}
PREFIXES: List[Case] = [
    Case(f"{case.name}-cut-{cut}", case.data[:cut], INCOMPLETE)
    for case in VALID
    if case.name in _CUT_IN_FULL
    for cut in range(len(case.data))
]
PREFIXES += [
    Case(f"v2-largest-cut-{cut}", V2_LARGEST[:cut], INCOMPLETE)
    for cut in (*range(0, 30), 31, 500, MAX_V2_LENGTH - 2, MAX_V2_LENGTH - 1)
]
PREFIXES += [
    Case("v1-unknown-then-anything", b"PROXY UNKNOWN \xff\x00 ::1 ' \" junk", INCOMPLETE),
    Case("v1-unknown-cr-last", b"PROXY UNKNOWN\r", INCOMPLETE),
    Case("v1-tcp4-cr-last", b"PROXY TCP4\r", INCOMPLETE),
    Case("v1-tcp4-space", b"PROXY TCP4 ", INCOMPLETE),
    Case("v1-tcp4-three-spaces", b"PROXY TCP4 1 2 3 ", INCOMPLETE),
    Case("v1-tcp6-all-its-bytes", b"PROXY TCP6 0123456789abcdefABCDEF.: ", INCOMPLETE),
    Case("v1-tcp4-106-bytes", b"PROXY TCP4 " + b"1" * 95, INCOMPLETE),
    Case("v1-unknown-106-bytes-cr", b"PROXY UNKNOWN " + b"a" * 91 + b"\r", INCOMPLETE),
    Case("v2-local-any-family", SIG + b"\x20\xff", INCOMPLETE),
    Case("v2-local-long", v2(0x20, 0x00, length=1024), INCOMPLETE),
    Case("v2-unix-partial-block", v2(0x21, 0x31, length=216) + b"\0" * 215, INCOMPLETE),
]

# --- bytes after a header are not part of it ------------------------------------------------------

_PAYLOADS = {
    "x": b"x",
    "crlf": b"\r\n",
    "v1": b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n",
    "sig": SIG,
    "bad": b"\n\r\x00 garbage \xff",
    "long": bytes(range(256)) * 8,
}
_WITH_PAYLOAD = {"v1-tcp4", "v1-tcp6", "v1-unknown", "v1-unknown-longest", "v1-crlf-ends-at-107", "v2-tcp4"}
_WITH_PAYLOAD |= {"v2-tcp6", "v2-local", "v2-unix", "v2-tcp4-tlvs", "v2-largest"}
TRAILING: List[Case] = [
    Case(f"{case.name}-then-{label}", case.data + payload, case.expected)
    for case in VALID
    if case.name in _WITH_PAYLOAD
    for label, payload in _PAYLOADS.items()
]

# --- refused --------------------------------------------------------------------------------------


def _bad(name: str, data: bytes, message: str) -> Case:
    return Case(name, data, Error(message))


MALFORMED: List[Case] = [
    # neither signature
    Case("http", b"GET / HTTP/1.1\r\n", NOT_PROXY),
    Case("one-byte", b"G", NOT_PROXY),
    Case("nul", b"\0", NOT_PROXY),
    Case("tls", b"\x16\x03\x01\x02\x00\x01", NOT_PROXY),
    Case("lowercase", b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", NOT_PROXY),
    Case("v1-no-space", b"PROXYTCP4", NOT_PROXY),
    Case("v1-tab", b"PROXY\t", NOT_PROXY),
    Case("v2-signature-broken", SIG[:6] + b"X", NOT_PROXY),
    Case("v2-signature-last-byte", SIG[:11] + b"\r", NOT_PROXY),
    # v1: the line
    Case("v1-too-long", b"PROXY UNKNOWN " + b"a" * 94, NO_CRLF),
    Case("v1-107-bytes-no-crlf", b"PROXY UNKNOWN " + b"a" * 93, NO_CRLF),
    Case("v1-crlf-ends-at-108", b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n", NO_CRLF),
    Case("v1-lf-past-107", b"PROXY UNKNOWN " + b"a" * 93 + b"\n", NO_CRLF),
    Case("v1-tcp4-digits-no-crlf", b"PROXY TCP4 " + b"1" * 96, NO_CRLF),
    Case("v1-lf-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", STRAY),
    Case("v1-cr-only", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n", STRAY),
    Case("v1-cr-cr-lf", b"PROXY UNKNOWN\r\r\n", STRAY),
    Case("v1-unknown-bare-lf", b"PROXY UNKNOWN x\ny\r\n", STRAY),
    Case("v1-lf-in-prefix", b"PROXY TCP4\n", STRAY),
    Case("v1-cr-then-more", b"PROXY UNKNOWN\r ", STRAY),
    Case("v1-lf-first", b"PROXY \n", STRAY),
    Case("v1-lf-before-crlf-past-107", b"PROXY UNKNOWN \n" + b"a" * 100 + b"\r\n", STRAY),
    # v1: the protocol token, quoted as Python's repr (first 16 bytes)
    _bad("v1-empty", b"PROXY \r\n", "v1: unknown protocol b''"),
    _bad("v1-double-space", b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1: unknown protocol b''"),
    _bad("v1-token-tcp5", line("TCP5 1.2.3.4 5.6.7.8 1 2"), "v1: unknown protocol b'TCP5'"),
    _bad("v1-token-udp4", line("UDP4 1.2.3.4 5.6.7.8 1 2"), "v1: unknown protocol b'UDP4'"),
    _bad("v1-token-lowercase", line("tcp4 1.2.3.4 5.6.7.8 1 2"), "v1: unknown protocol b'tcp4'"),
    _bad("v1-unknownx", line("UNKNOWNX"), "v1: unknown protocol b'UNKNOWNX'"),
    _bad("v1-token-long", line("X" * 40), "v1: unknown protocol b'XXXXXXXXXXXXXXXX'"),
    _bad("v1-token-quote", line("it's"), 'v1: unknown protocol b"it\'s"'),
    _bad("v1-token-both-quotes", line("a'b\"c"), "v1: unknown protocol b'a\\'b\"c'"),
    _bad(
        "v1-token-escapes",
        b"PROXY \\\t\x00\x1f\x7f\x80\xff~\r\n",
        "v1: unknown protocol b'\\\\\\t\\x00\\x1f\\x7f\\x80\\xff~'",
    ),
    _bad("v1-prefix-tcp5", b"PROXY TCP5", "v1: unknown protocol b'TCP5'"),
    _bad("v1-prefix-tcp4x", b"PROXY TCP4x", "v1: unknown protocol b'TCP4x'"),
    _bad("v1-prefix-unknownx", b"PROXY UNKNOWNX", "v1: unknown protocol b'UNKNOWNX'"),
    _bad("v1-prefix-high-byte", b"PROXY \xff", "v1: unknown protocol b'\\xff'"),
    _bad("v1-prefix-token-then-space", b"PROXY TCP ", "v1: unknown protocol b'TCP'"),
    # v1: fields
    _bad("v1-no-fields", line("TCP4"), "v1: expected 4 fields after TCP4, got 1"),
    _bad("v1-tcp6-no-fields", line("TCP6"), "v1: expected 4 fields after TCP6, got 1"),
    _bad("v1-empty-fields", line("TCP4 "), "v1: expected 4 fields after TCP4, got 1"),
    _bad("v1-two-fields", line("TCP6 ::1 ::2"), "v1: expected 4 fields after TCP6, got 2"),
    _bad("v1-three-fields", line("TCP4 1.2.3.4 5.6.7.8 1"), "v1: expected 4 fields after TCP4, got 3"),
    _bad("v1-five-fields", line("TCP4 1.2.3.4 5.6.7.8 1 2 3"), "v1: expected 4 fields after TCP4, got 5"),
    _bad("v1-trailing-space", line("TCP4 1.2.3.4 5.6.7.8 1 2 "), "v1: expected 4 fields after TCP4, got 5"),
    _bad("v1-many-spaces", line("TCP6" + " " * 30), "v1: expected 4 fields after TCP6, got 30"),
    _bad("v1-prefix-v6-in-tcp4", b"PROXY TCP4 1.2.3.4 ::1", "v1: unexpected character in TCP4 line"),
    _bad("v1-prefix-tab", b"PROXY TCP4 1.2.3.4\t", "v1: unexpected character in TCP4 line"),
    _bad("v1-prefix-tcp6-g", b"PROXY TCP6 ::1 g", "v1: unexpected character in TCP6 line"),
    _bad("v1-prefix-tcp6-percent", b"PROXY TCP6 fe80::1%", "v1: unexpected character in TCP6 line"),
    _bad("v1-prefix-char-before-count", b"PROXY TCP4 1 2 3 4 x", "v1: unexpected character in TCP4 line"),
    _bad("v1-prefix-five-fields", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3", "v1: too many fields after TCP4"),
    _bad("v1-prefix-tcp6-five-fields", b"PROXY TCP6 ::1 ::2 1 2 ", "v1: too many fields after TCP6"),
    # v1: ports, in order: source address, source port, destination address, destination port
    _bad("v1-port-65536", line("TCP4 1.2.3.4 5.6.7.8 65536 2"), "v1: bad source port b'65536'"),
    _bad("v1-port-99999", line("TCP4 1.2.3.4 5.6.7.8 1 99999"), "v1: bad destination port b'99999'"),
    _bad("v1-port-six-digits", line("TCP4 1.2.3.4 5.6.7.8 100000 2"), "v1: bad source port b'100000'"),
    _bad("v1-port-leading-zero", line("TCP4 1.2.3.4 5.6.7.8 01 2"), "v1: bad source port b'01'"),
    _bad("v1-port-double-zero", line("TCP4 1.2.3.4 5.6.7.8 1 00"), "v1: bad destination port b'00'"),
    _bad("v1-port-sign", line("TCP4 1.2.3.4 5.6.7.8 +1 2"), "v1: bad source port b'+1'"),
    _bad("v1-port-negative", line("TCP4 1.2.3.4 5.6.7.8 1 -2"), "v1: bad destination port b'-2'"),
    _bad("v1-port-empty", line("TCP4 1.2.3.4 5.6.7.8  2"), "v1: bad source port b''"),
    _bad("v1-port-hex", line("TCP6 ::1 ::2 1a 2"), "v1: bad source port b'1a'"),
    _bad("v1-port-dot", line("TCP4 1.2.3.4 5.6.7.8 1 2.0"), "v1: bad destination port b'2.0'"),
    _bad("v1-port-long", line("TCP4 1.2.3.4 5.6.7.8 " + "1" * 20 + " 2"), "v1: bad source port b'1111111111111111'"),
    _bad("v1-port-unicode-digit", line("TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2"), "v1: bad source port b'\\xd9\\xa1'"),
    _bad("v1-port-letter-complete", line("TCP4 1.2.3.4 5.6.7.8 1 x"), "v1: bad destination port b'x'"),
    _bad("v1-source-port-before-destination", line("TCP4 1.2.3.4 5.6.7 x 2"), "v1: bad source port b'x'"),
    _bad("v1-source-address-first", line("TCP4 1.2.3 5.6.7 x y"), "v1: bad source address b'1.2.3'"),
    _bad("v1-destination-before-its-port", line("TCP4 1.2.3.4 5.6.7 1 y"), "v1: bad destination address b'5.6.7'"),
    # v1: IPv4 addresses
    _bad("v1-v4-octet-256", line("TCP4 256.2.3.4 5.6.7.8 1 2"), "v1: bad source address b'256.2.3.4'"),
    _bad("v1-v4-octet-999", line("TCP4 1.2.3.4 5.6.7.999 1 2"), "v1: bad destination address b'5.6.7.999'"),
    _bad("v1-v4-leading-zero", line("TCP4 01.2.3.4 5.6.7.8 1 2"), "v1: bad source address b'01.2.3.4'"),
    _bad("v1-v4-zero-zero", line("TCP4 1.2.3.00 5.6.7.8 1 2"), "v1: bad source address b'1.2.3.00'"),
    _bad("v1-v4-four-digits", line("TCP4 1.2.3.1000 5.6.7.8 1 2"), "v1: bad source address b'1.2.3.1000'"),
    _bad("v1-v4-short", line("TCP4 1.2.3 5.6.7.8 1 2"), "v1: bad source address b'1.2.3'"),
    _bad("v1-v4-five-octets", line("TCP4 1.2.3.4.5 5.6.7.8 1 2"), "v1: bad source address b'1.2.3.4.5'"),
    _bad("v1-v4-dotted-junk", line("TCP4 1.2.3.4. 5.6.7.8 1 2"), "v1: bad source address b'1.2.3.4.'"),
    _bad("v1-v4-leading-dot", line("TCP4 .1.2.3 5.6.7.8 1 2"), "v1: bad source address b'.1.2.3'"),
    _bad("v1-v4-empty-octet", line("TCP4 1..2.3 5.6.7.8 1 2"), "v1: bad source address b'1..2.3'"),
    _bad("v1-v4-empty", line("TCP4  5.6.7.8 1 2"), "v1: bad source address b''"),
    _bad("v1-v4-integer", line("TCP4 16909060 5.6.7.8 1 2"), "v1: bad source address b'16909060'"),
    _bad("v1-v6-in-tcp4", line("TCP4 ::1 5.6.7.8 1 2"), "v1: bad source address b'::1'"),
    _bad(
        "v1-v4-long",
        line("TCP4 " + "1." * 30 + " 5.6.7.8 1 2"),
        "v1: bad source address b'" + "1." * 24 + "'",
    ),
    # v1: IPv6 addresses
    _bad("v1-v4-in-tcp6", line("TCP6 1.2.3.4 ::1 1 2"), "v1: bad source address b'1.2.3.4'"),
    _bad("v1-v6-scope", line("TCP6 fe80::1%eth0 ::1 1 2"), "v1: bad source address b'fe80::1%eth0'"),
    _bad("v1-v6-bad-hex", line("TCP6 2001:db8::g ::1 1 2"), "v1: bad source address b'2001:db8::g'"),
    _bad("v1-v6-two-gaps", line("TCP6 1::2::3 ::1 1 2"), "v1: bad source address b'1::2::3'"),
    _bad("v1-v6-triple-colon", line("TCP6 ::: ::1 1 2"), "v1: bad source address b':::'"),
    _bad("v1-v6-one-colon", line("TCP6 : ::1 1 2"), "v1: bad source address b':'"),
    _bad("v1-v6-leading-colon", line("TCP6 :1::2 ::1 1 2"), "v1: bad source address b':1::2'"),
    _bad("v1-v6-trailing-colon", line("TCP6 1::2: ::1 1 2"), "v1: bad source address b'1::2:'"),
    _bad("v1-v6-seven-parts", line("TCP6 1:2:3:4:5:6:7 ::1 1 2"), "v1: bad source address b'1:2:3:4:5:6:7'"),
    _bad("v1-v6-nine-parts", line("TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2"), "v1: bad source address b'1:2:3:4:5:6:7:8:9'"),
    _bad("v1-v6-gap-for-nothing", line("TCP6 1:2:3:4::5:6:7:8 ::1 1 2"), "v1: bad source address b'1:2:3:4::5:6:7:8'"),
    _bad(
        "v1-v6-gap-after-eight", line("TCP6 1:2:3:4:5:6:7:8:: ::1 1 2"), "v1: bad source address b'1:2:3:4:5:6:7:8::'"
    ),
    _bad("v1-v6-long-hextet", line("TCP6 12345::1 ::1 1 2"), "v1: bad source address b'12345::1'"),
    _bad("v1-v6-five-zeros", line("TCP6 00000::1 ::1 1 2"), "v1: bad source address b'00000::1'"),
    _bad("v1-v6-no-colon", line("TCP6 abcd ::1 1 2"), "v1: bad source address b'abcd'"),
    _bad(
        "v1-v6-ten-colons",
        line("TCP6 1:2:3:4:5:6:7:8:9:0:1 ::1 1 2"),
        "v1: bad source address b'1:2:3:4:5:6:7:8:9:0:1'",
    ),
    _bad("v1-v6-dotted-two-parts", line("TCP6 a:1.2.3.4 ::1 1 2"), "v1: bad source address b'a:1.2.3.4'"),
    _bad(
        "v1-v6-dotted-too-many",
        line("TCP6 1:2:3:4:5:6:7:1.2.3.4 ::1 1 2"),
        "v1: bad source address b'1:2:3:4:5:6:7:1.2.3.4'",
    ),
    _bad(
        "v1-v6-dotted-gap-for-nothing",
        line("TCP6 1:2:3:4:5:6::1.2.3.4 ::1 1 2"),
        "v1: bad source address b'1:2:3:4:5:6::1.2.3.4'",
    ),
    _bad(
        "v1-v6-dotted-leading-zero", line("TCP6 ::ffff:1.2.3.04 ::1 1 2"), "v1: bad source address b'::ffff:1.2.3.04'"
    ),
    _bad("v1-v6-dotted-256", line("TCP6 ::ffff:1.2.3.256 ::1 1 2"), "v1: bad source address b'::ffff:1.2.3.256'"),
    _bad("v1-v6-dotted-short", line("TCP6 ::1.2.3 ::1 1 2"), "v1: bad source address b'::1.2.3'"),
    _bad("v1-v6-dotted-not-last", line("TCP6 ::1.2.3.4:1 ::1 1 2"), "v1: bad source address b'::1.2.3.4:1'"),
    _bad("v1-v6-dotted-first", line("TCP6 1.2.3.4:: ::1 1 2"), "v1: bad source address b'1.2.3.4::'"),
    _bad("v1-v6-dotted-hex", line("TCP6 ::a.2.3.4 ::1 1 2"), "v1: bad source address b'::a.2.3.4'"),
    _bad("v1-v6-digits-tail", line("TCP6 ::1234567 ::1 1 2"), "v1: bad source address b'::1234567'"),
    _bad("v1-v6-40-characters", line(f"TCP6 0{FULL_V6} ::1 1 2"), f"v1: bad source address b'0{FULL_V6}'"),
    _bad("v1-v6-bad-destination", line("TCP6 ::1 ::g 1 2"), "v1: bad destination address b'::g'"),
    # v2: version/command (byte 13), family/protocol (14), length (15-16), in that order
    _bad("v2-version-0", v2(0x01, 0x11, V2_TCP4[16:]), "v2: unsupported version 0"),
    _bad("v2-version-1", v2(0x11, 0x11, V2_TCP4[16:]), "v2: unsupported version 1"),
    _bad("v2-version-3", v2(0x31, 0x11, V2_TCP4[16:]), "v2: unsupported version 3"),
    _bad("v2-version-15", v2(0xF1, 0x11, V2_TCP4[16:]), "v2: unsupported version 15"),
    _bad("v2-version-before-command", SIG + b"\x32", "v2: unsupported version 3"),
    _bad("v2-command-2", v2(0x22, 0x11, V2_TCP4[16:]), "v2: unknown command 2"),
    _bad("v2-command-15", SIG + b"\x2f", "v2: unknown command 15"),
    _bad("v2-command-before-family", v2(0x22, 0x12), "v2: unknown command 2"),
    _bad("v2-udp4", v2(0x21, 0x12, V2_TCP4[16:]), "v2: datagram (UDP) connections are not supported"),
    _bad("v2-udp6", v2(0x21, 0x22, V2_TCP6[16:]), "v2: datagram (UDP) connections are not supported"),
    _bad("v2-unix-dgram", v2(0x21, 0x32, b"\0" * 216), "v2: datagram (UDP) connections are not supported"),
    _bad("v2-udp-at-14-bytes", SIG + b"\x21\x12", "v2: datagram (UDP) connections are not supported"),
    _bad("v2-family-4", v2(0x21, 0x41, V2_TCP4[16:]), "v2: unknown family/protocol 0x41"),
    _bad("v2-protocol-3", v2(0x21, 0x13, V2_TCP4[16:]), "v2: unknown family/protocol 0x13"),
    _bad("v2-inet-unspec-protocol", v2(0x21, 0x10, V2_TCP4[16:]), "v2: unknown family/protocol 0x10"),
    _bad("v2-unspec-stream", v2(0x21, 0x01), "v2: unknown family/protocol 0x01"),
    _bad("v2-family-ff", SIG + b"\x21\xff", "v2: unknown family/protocol 0xff"),
    _bad("v2-family-before-length", SIG + b"\x21\x41\xff\xff", "v2: unknown family/protocol 0x41"),
    _bad(
        "v2-oversized",
        v2(0x21, 0x11, V2_TCP4[16:], length=MAX_V2_LENGTH - 16 + 1),
        "v2: header of 1041 bytes exceeds 1040",
    ),
    _bad("v2-local-oversized", v2(0x20, 0x00, length=MAX_V2_LENGTH - 16 + 1), "v2: header of 1041 bytes exceeds 1040"),
    _bad("v2-max-length-field", v2(0x21, 0x11, V2_TCP4[16:], length=0xFFFF), "v2: header of 65551 bytes exceeds 1040"),
    _bad("v2-oversized-at-16-bytes", SIG + b"\x21\x11\xff\xff", "v2: header of 65551 bytes exceeds 1040"),
    _bad("v2-oversized-before-short", SIG + b"\x21\x21\x04\x01", "v2: header of 1041 bytes exceeds 1040"),
    _bad("v2-tcp4-block-empty", v2(0x21, 0x11), "v2: address block of 0 bytes is too short for 0x11"),
    _bad("v2-tcp4-block-short", v2(0x21, 0x11, V2_TCP4[16:27]), "v2: address block of 11 bytes is too short for 0x11"),
    _bad("v2-tcp6-block-short", v2(0x21, 0x21, V2_TCP4[16:]), "v2: address block of 12 bytes is too short for 0x21"),
    _bad("v2-tcp6-short-at-16-bytes", SIG + b"\x21\x21\x00\x0c", "v2: address block of 12 bytes is too short for 0x21"),
    _bad("v2-unix-block-short", v2(0x21, 0x31, b"\0" * 215), "v2: address block of 215 bytes is too short for 0x31"),
]

CASES: List[Case] = VALID + PREFIXES + TRAILING + MALFORMED

# The most bytes a decision may take (the caller's read bound): every case decides within it.
assert MAX_HEADER_BYTES == MAX_V2_LENGTH == 1040
assert len({case.name for case in CASES}) == len(CASES), "case names are test ids: keep them unique"
