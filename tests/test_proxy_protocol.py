"""The PROXY protocol module: byte-exact encodings from the spec, incremental parsing, strict rejection."""

import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcptotcp._proxy import (
    MAX_HEADER_BYTES,
    MAX_V2_LENGTH,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"  # the v2 signature, written out from the spec
V4 = (socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443))
V6 = (socket.AF_INET6, ("2001:db8:0:0:0:0:0:1", 1111, 0, 0), ("::1", 2222, 0, 0))
FULL_V6 = ":".join(["ffff"] * 8)  # the longest IPv6 text, 39 characters

# Hand-written v2 headers: 0x21 = version 2, PROXY; 0x11 = TCP over IPv4; 0x21 = TCP over IPv6.
V2_TCP4 = SIG + b"\x21\x11\x00\x0c" + b"\xc0\xa8\x00\x01" + b"\xc0\xa8\x00\x0b" + b"\xdc\x04\x01\xbb"
V2_TCP6 = (
    SIG
    + b"\x21\x21\x00\x24"
    + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"
    + b"\x00" * 15 + b"\x01"
    + b"\x04\x57\x08\xae"
)  # fmt: skip
V2_LOCAL = SIG + b"\x20\x00\x00\x00"


def v2(ver_cmd: int, fam: int, block: bytes = b"", length=None) -> bytes:
    return SIG + struct.pack("!BBH", ver_cmd, fam, len(block) if length is None else length) + block


# Valid headers of every kind, for the prefix and payload tests.
VALID = {
    "v1-tcp4": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    "v1-tcp6": b"PROXY TCP6 2001:db8::1 ::1 1111 2222\r\n",
    "v1-tcp6-longest": b"PROXY TCP6 %s %s 65535 65535\r\n" % (FULL_V6.encode(), FULL_V6.encode()),
    "v1-unknown": b"PROXY UNKNOWN\r\n",
    "v1-unknown-longest": b"PROXY UNKNOWN %s %s 65535 65535\r\n" % (FULL_V6.encode(), FULL_V6.encode()),
    "v2-tcp4": V2_TCP4,
    "v2-tcp6": V2_TCP6,
    "v2-local": V2_LOCAL,
    "v2-tcp4-tlvs": v2(0x21, 0x11, V2_TCP4[16:] + b"\x04\x00\x03abc" + b"\x01\x00\x02h2"),
    "v2-local-with-block": v2(0x20, 0x11, V2_TCP4[16:]),
    "v2-unspec": v2(0x21, 0x00),
    "v2-unix": v2(0x21, 0x31, b"/a".ljust(108, b"\0") + b"/b".ljust(108, b"\0")),
    # Addresses plus one NOOP TLV filling the header to MAX_V2_LENGTH.
    "v2-largest": v2(
        0x21, 0x11, V2_TCP4[16:] + b"\x04" + struct.pack("!H", MAX_V2_LENGTH - 31) + b"\0" * (MAX_V2_LENGTH - 31)
    ),
}


# --- encoding ---------------------------------------------------------------------------------


def test_encode_v1_exact():
    assert encode_v1(*V4) == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(*V6) == b"PROXY TCP6 2001:db8::1 ::1 1111 2222\r\n"


def test_encode_v2_exact():
    assert encode_v2(*V4) == V2_TCP4
    assert encode_v2(*V6) == V2_TCP6


@pytest.mark.parametrize(
    "family, source, destination",
    [
        (socket.AF_UNIX, "/tmp/a", "/tmp/b"),
        (socket.AF_UNSPEC, None, None),
        (socket.AF_INET, None, ("1.2.3.4", 80)),
        (socket.AF_INET6, ("::1", 80, 0, 0), None),
    ],
)
def test_encode_without_addresses_is_unknown_or_local(family, source, destination):
    assert encode_v1(family, source, destination) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(family, source, destination) == V2_LOCAL


def test_encode_ipv4_mapped_as_ipv4():
    """A dual-stack socket's IPv4 client goes out as TCP over IPv4 when both ends are mapped."""
    src, dst = ("::ffff:1.2.3.4", 1111, 0, 0), ("::ffff:5.6.7.8", 2222, 0, 0)
    assert encode_v1(socket.AF_INET6, src, dst) == b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n"
    assert encode_v2(socket.AF_INET6, src, dst) == v2(0x21, 0x11, bytes([1, 2, 3, 4, 5, 6, 7, 8]) + b"\x04\x57\x08\xae")
    # Next to a real IPv6 address it stays IPv6.
    header = parse(encode_v1(socket.AF_INET6, src, ("2001:db8::1", 2222, 0, 0)))
    assert header is not None and header.family == socket.AF_INET6
    assert header.source == (ipaddress.IPv6Address("::ffff:1.2.3.4").compressed, 1111)


def test_encode_drops_ipv6_scope():
    src, dst = ("fe80::1%lo", 1, 0, 1), ("fe80::2%lo", 2, 0, 1)
    assert encode_v1(socket.AF_INET6, src, dst) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"
    assert parse(encode_v2(socket.AF_INET6, src, dst)) == ProxyHeader(
        2, socket.AF_INET6, ("fe80::1", 1), ("fe80::2", 2), 52
    )


@pytest.mark.parametrize(
    "family, source, destination",
    [
        (socket.AF_INET, ("::1", 1), ("::1", 2)),
        (socket.AF_INET6, ("1.2.3.4", 1), ("5.6.7.8", 2)),
        (socket.AF_INET, ("1.2.3.4", 65536), ("5.6.7.8", 2)),
        (socket.AF_INET, ("1.2.3.4", -1), ("5.6.7.8", 2)),
        (socket.AF_INET, ("1.2.3.4", "80"), ("5.6.7.8", 2)),
        (socket.AF_INET, ("localhost", 1), ("5.6.7.8", 2)),
    ],
)
def test_encode_rejects_bad_addresses(family, source, destination):
    for encode in (encode_v1, encode_v2):
        with pytest.raises(ValueError):
            encode(family, source, destination)


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    "family, source, destination, expected_family",
    [
        (*V4, socket.AF_INET),
        (*V6, socket.AF_INET6),
        (socket.AF_UNIX, "/tmp/a", "/tmp/b", socket.AF_UNSPEC),
    ],
)
def test_round_trip(encode, family, source, destination, expected_family):
    wire = encode(family, source, destination)
    header = parse(wire)
    assert header is not None
    assert header.version == (1 if encode is encode_v1 else 2)
    assert header.family == expected_family
    assert header.length == len(wire)
    if expected_family == socket.AF_UNSPEC:
        assert header.source is None and header.destination is None
    else:
        canonical = ipaddress.ip_address(source[0]).compressed, ipaddress.ip_address(destination[0]).compressed
        assert header.source == (canonical[0], source[1])
        assert header.destination == (canonical[1], destination[1])


@pytest.mark.parametrize("name", sorted(VALID))
def test_every_prefix_needs_more_then_complete(name):
    wire = VALID[name]
    for cut in range(len(wire)):
        assert parse(wire[:cut]) is None, cut
    header = parse(wire)
    assert header is not None and header.length == len(wire)
    # Payload after the header is not part of it, whatever it looks like; bytearray works too.
    for payload in (b"x", b"\r\n", b"PROXY TCP4 1.1.1.1 2.2.2.2 1 2\r\n", SIG, bytes(range(256)) * 8):
        assert parse(wire + payload) == header
        assert parse(bytearray(wire + payload)) == header


def test_parsed_fields():
    assert parse(VALID["v1-tcp6-longest"]) == ProxyHeader(1, socket.AF_INET6, (FULL_V6, 65535), (FULL_V6, 65535), 104)
    assert parse(VALID["v1-unknown-longest"]) == ProxyHeader(1, socket.AF_UNSPEC, None, None, 107)
    assert parse(VALID["v2-tcp4-tlvs"]) == ProxyHeader(
        2, socket.AF_INET, ("192.168.0.1", 56324), ("192.168.0.11", 443), 16 + 12 + 6 + 5
    )
    for name in ("v2-local", "v2-local-with-block", "v2-unspec", "v2-unix"):
        assert parse(VALID[name]) == ProxyHeader(2, socket.AF_UNSPEC, None, None, len(VALID[name]))
    assert len(VALID["v2-largest"]) == MAX_V2_LENGTH
    assert MAX_HEADER_BYTES >= max(107, MAX_V2_LENGTH)
    # IPv6 text in any valid spelling comes back compressed.
    header = parse(b"PROXY TCP6 2001:0DB8:0000:0000:0000:0000:0000:0001 ::ffff:1.2.3.4 0 65535\r\n")
    assert header is not None
    assert header.source == ("2001:db8::1", 0)
    assert header.destination == (ipaddress.IPv6Address("::ffff:1.2.3.4").compressed, 65535)


def _line(fields: bytes) -> bytes:
    return b"PROXY " + fields + b"\r\n"


BAD = {
    "http": b"GET / HTTP/1.1\r\n",
    "one-byte": b"G",
    "tls": b"\x16\x03\x01\x02\x00\x01",
    "lowercase": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v2-signature-broken": SIG[:6] + b"X",
    "v1-no-space": b"PROXYTCP4",
    "v1-too-long": b"PROXY UNKNOWN " + b"a" * 94,  # 108 bytes, no CRLF
    "v1-crlf-at-108": b"PROXY UNKNOWN " + b"a" * 92 + b"\r\n",
    "v1-lf-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1-cr-only": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n",
    "v1-unknown-bare-lf": b"PROXY UNKNOWN x\ny\r\n",
    "v1-empty": b"PROXY \r\n",
    "v1-double-space": b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-token-tcp5": _line(b"TCP5 1.2.3.4 5.6.7.8 1 2"),
    "v1-token-udp4": _line(b"UDP4 1.2.3.4 5.6.7.8 1 2"),
    "v1-token-lowercase": _line(b"tcp4 1.2.3.4 5.6.7.8 1 2"),
    "v1-unknownx": _line(b"UNKNOWNX"),
    "v1-no-fields": _line(b"TCP4"),
    "v1-three-fields": _line(b"TCP4 1.2.3.4 5.6.7.8 1"),
    "v1-five-fields": _line(b"TCP4 1.2.3.4 5.6.7.8 1 2 3"),
    "v1-trailing-space": _line(b"TCP4 1.2.3.4 5.6.7.8 1 2 "),
    "v1-port-65536": _line(b"TCP4 1.2.3.4 5.6.7.8 65536 2"),
    "v1-port-leading-zero": _line(b"TCP4 1.2.3.4 5.6.7.8 01 2"),
    "v1-port-sign": _line(b"TCP4 1.2.3.4 5.6.7.8 +1 2"),
    "v1-port-negative": _line(b"TCP4 1.2.3.4 5.6.7.8 1 -2"),
    "v1-port-empty": _line(b"TCP4 1.2.3.4 5.6.7.8  2"),
    "v1-port-hex": _line(b"TCP6 ::1 ::2 1a 2"),
    "v1-port-unicode-digit": _line("TCP4 1.2.3.4 5.6.7.8 \u0661 2".encode()),
    "v1-v4-octet-256": _line(b"TCP4 256.2.3.4 5.6.7.8 1 2"),
    "v1-v4-leading-zero": _line(b"TCP4 01.2.3.4 5.6.7.8 1 2"),
    "v1-v4-short": _line(b"TCP4 1.2.3 5.6.7.8 1 2"),
    "v1-v4-in-tcp6": _line(b"TCP6 1.2.3.4 ::1 1 2"),
    "v1-v6-in-tcp4": _line(b"TCP4 ::1 5.6.7.8 1 2"),
    "v1-v6-scope": _line(b"TCP6 fe80::1%eth0 ::1 1 2"),
    "v1-v6-bad-hex": _line(b"TCP6 2001:db8::g ::1 1 2"),
    "v1-v6-two-gaps": _line(b"TCP6 1::2::3 ::1 1 2"),
    "v1-v6-dotted-leading-zero": _line(b"TCP6 ::ffff:1.2.3.04 ::1 1 2"),
    "v1-v4-dotted-junk": _line(b"TCP4 1.2.3.4. 5.6.7.8 1 2"),
    "v2-version-1": v2(0x11, 0x11, V2_TCP4[16:]),
    "v2-version-3": v2(0x31, 0x11, V2_TCP4[16:]),
    "v2-command-2": v2(0x22, 0x11, V2_TCP4[16:]),
    "v2-udp4": v2(0x21, 0x12, V2_TCP4[16:]),
    "v2-udp6": v2(0x21, 0x22, V2_TCP6[16:]),
    "v2-unix-dgram": v2(0x21, 0x32, b"\0" * 216),
    "v2-family-4": v2(0x21, 0x41, V2_TCP4[16:]),
    "v2-protocol-3": v2(0x21, 0x13, V2_TCP4[16:]),
    "v2-inet-unspec-protocol": v2(0x21, 0x10, V2_TCP4[16:]),
    "v2-oversized": v2(0x21, 0x11, V2_TCP4[16:], length=MAX_V2_LENGTH - 16 + 1),
    "v2-max-length-field": v2(0x21, 0x11, V2_TCP4[16:], length=0xFFFF),
    "v2-tcp4-block-short": v2(0x21, 0x11, V2_TCP4[16:27]),
    "v2-tcp6-block-short": v2(0x21, 0x21, V2_TCP4[16:]),
    "v2-unix-block-short": v2(0x21, 0x31, b"\0" * 215),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_rejects(name):
    with pytest.raises(ProxyHeaderError):
        parse(BAD[name])


@pytest.mark.parametrize(
    "prefix",
    [
        b"X",
        b"PROXY TCP5",
        b"PROXY TCP4 1.2.3.4 ::1",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3",
        b"PROXY TCP4\n",
        b"PROXY UNKNOWN\r ",
        SIG + b"\x31",  # version, from the 13th byte
        SIG + b"\x21\x12",  # UDP, from the 14th byte
        SIG + b"\x21\x11\xff\xff",  # oversized, from the 16th byte
        SIG + b"\x21\x21\x00\x0c",  # address block too short for IPv6
    ],
)
def test_rejects_before_the_header_is_complete(prefix):
    """A client that cannot be speaking the protocol is refused without waiting for more bytes."""
    with pytest.raises(ProxyHeaderError):
        parse(prefix)


def test_error_is_a_value_error_with_a_reason():
    with pytest.raises(ValueError, match="version 3"):
        parse(BAD["v2-version-3"])
    with pytest.raises(ProxyHeaderError, match="port"):
        parse(BAD["v1-port-65536"])


# --- properties -------------------------------------------------------------------------------

ports = st.integers(0, 65535)


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([encode_v1, encode_v2]),
    st.one_of(
        st.tuples(st.just(4), st.ip_addresses(v=4), st.ip_addresses(v=4)),
        st.tuples(st.just(6), st.ip_addresses(v=6), st.ip_addresses(v=6)),
    ),
    ports,
    ports,
)
def test_round_trip_property(encode, addresses, sport, dport):
    version, src, dst = addresses
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    wire = encode(family, (str(src), sport), (str(dst), dport))
    if version == 6 and src.ipv4_mapped and dst.ipv4_mapped:
        family, src, dst = socket.AF_INET, src.ipv4_mapped, dst.ipv4_mapped
    version = 1 if encode is encode_v1 else 2
    expected = ProxyHeader(version, family, (src.compressed, sport), (dst.compressed, dport), len(wire))
    assert parse(wire + b"payload") == expected


@st.composite
def mangled(draw):
    """A valid header cut somewhere, with random bytes after the cut (or a byte flipped)."""
    wire = draw(st.sampled_from(sorted(VALID.values(), key=len)[:-1]))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(wire) - 1))
        return wire[:at] + bytes([draw(st.integers(0, 255))]) + wire[at + 1 :]
    return wire[: draw(st.integers(0, len(wire)))] + draw(st.binary(max_size=24))


@settings(max_examples=300, deadline=None)
@given(st.one_of(mangled(), st.binary(max_size=64)))
def test_parse_decides_once_and_for_all(data):
    """Over growing prefixes: None until decided, then the same header or an error for good."""
    outcomes = []
    for cut in range(len(data) + 1):
        try:
            outcomes.append(parse(data[:cut]))
        except ProxyHeaderError:
            outcomes.append("error")
    decided = [o for o in outcomes if o is not None]
    assert outcomes[: len(outcomes) - len(decided)] == [None] * (len(outcomes) - len(decided))
    assert all(o == decided[0] for o in decided)
    if decided and isinstance(decided[0], ProxyHeader):
        assert decided[0].length <= len(data)
        assert len(data) - len(decided) + 1 == decided[0].length  # decided exactly when complete


# --- over a real connection -------------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
def test_header_split_over_loopback(encode):
    """A front proxy sends the header in three pieces: the receiver waits, then relays the rest."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client.settimeout(2)
        client.connect(listener.getsockname())
        listener.settimeout(2)
        server, _ = listener.accept()
        server.settimeout(2)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        wire = encode(socket.AF_INET, client.getsockname(), client.getpeername())
        payload = b"hello after the header\r\n" * 40
        pieces = [wire[:7], wire[7:14], wire[14:] + payload]
        buffer = b""
        sent = 0
        header = None
        for piece in pieces:
            client.sendall(piece)
            sent += len(piece)
            for _ in range(1000):  # until this piece has arrived, or the header is complete
                buffer += server.recv(65536)
                header = parse(buffer)
                if header is not None or len(buffer) == sent:
                    break
            if piece is not pieces[-1]:
                assert header is None  # the first two pieces are only a prefix
        assert header is not None
        assert header.source == server.getpeername()
        assert header.destination == server.getsockname()
        assert header.length == len(wire)
        rest = buffer[header.length :]
        for _ in range(1000):
            if len(rest) >= len(payload):
                break
            rest += server.recv(65536)
        assert rest == payload
    finally:
        for s in (client, server, listener):
            if s is not None:
                s.close()
