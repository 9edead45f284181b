"""The PROXY protocol (haproxy's proxy-protocol.txt), v1 text and v2 binary, for a TCP forwarder.

A forwarder can *send* a header to its backend (``encode_v1``/``encode_v2``) so the backend sees
the real client address, and can *accept* one from a trusted front proxy (``parse``). Only what
a TCP relay needs is implemented: TCP over IPv4/IPv6; everything else maps to UNKNOWN/LOCAL on
the way out and to an address-less header (or an error, for datagrams) on the way in.

IPv4-mapped addresses: a dual-stack (AF_INET6) socket reports an IPv4 client as
``::ffff:a.b.c.d``. When both endpoints are IPv4-mapped, the encoders send them as TCP over IPv4
(``TCP4`` / ``0x11``), which is what the connection really is and what backends match their
IPv4 access rules against. A lone mapped address next to a real IPv6 one stays IPv6.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_V2_LENGTH",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "parse",
]

_IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

_V1_PREFIX = b"PROXY "
# The spec's worst case, "PROXY UNKNOWN <v6> <v6> 65535 65535\r\n"; the CRLF must end within it.
_V1_MAX_LENGTH = 107
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, version/command, family/protocol, 2-byte length
# The declared length may cover up to 64 KiB, but a real header is the address block (at most
# 216 bytes, AF_UNIX) plus a few TLVs we skip. haproxy's own TLVs (ALPN, authority <= 255,
# unique id <= 128, SSL, CRC32C) can together pass 512 bytes, so allow 1 KiB of address and
# TLVs: roomy for real senders, and a stray length still fails at once instead of stalling the
# connection while we wait for bytes that will never come.
MAX_V2_LENGTH = _V2_FIXED + 1024
# The most bytes parse() can need before it decides: bounds the caller's reads and buffer.
MAX_HEADER_BYTES = max(_V1_MAX_LENGTH, MAX_V2_LENGTH)

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_UDP4 = 0x12
_FAM_TCP6 = 0x21
_FAM_UDP6 = 0x22
_FAM_UNIX_STREAM = 0x31
_FAM_UNIX_DGRAM = 0x32
# The address block each PROXY family needs; anything the length declares beyond it is TLVs.
_V2_ADDRESS_LENGTH = {_FAM_UNSPEC: 0, _FAM_TCP4: 12, _FAM_TCP6: 36, _FAM_UNIX_STREAM: 216}
_V2_DATAGRAM = (_FAM_UDP4, _FAM_UDP6, _FAM_UNIX_DGRAM)

_V1_TOKENS = (b"TCP4", b"TCP6", b"UNKNOWN")
# Bytes that can appear after TCP4/TCP6 (incomplete-line check): digits, dots, hex, colons.
_V1_TCP4_BYTES = b"0123456789. "
_V1_TCP6_BYTES = b"0123456789abcdefABCDEF.: "
# No heading zeroes (spec: no octal confusion); IPv4Address checks each octet is <= 255.
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}")
# Hex groups, colons and an optional dotted IPv4 tail; no "%scope" (not in the spec).
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:]{2,39}|[0-9A-Fa-f:]{1,29}:[0-9.]{7,15}")
_V1_PORT = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header we accept (malformed, oversized or unsupported)."""


@dataclass(frozen=True)
class ProxyHeader:
    """A parsed header; ``source``/``destination`` are None when it carries no usable address."""

    version: int
    family: int  # AF_INET, AF_INET6, or AF_UNSPEC (UNKNOWN, LOCAL, AF_UNSPEC, AF_UNIX)
    source: Optional[Tuple[str, int]]
    destination: Optional[Tuple[str, int]]
    length: int  # bytes the header took on the wire: relay data[length:]


# --- encoding ---------------------------------------------------------------------------------


def _ip(host: Any, family: int) -> _IPAddress:
    if not isinstance(host, str):
        raise ValueError(f"address {host!r} is not a string")
    # getpeername() reports link-local IPv6 as "fe80::1%eth0"; the scope means nothing remotely.
    ip = ipaddress.ip_address(host.partition("%")[0])
    if ip.version != (4 if family == socket.AF_INET else 6):
        raise ValueError(f"address {host!r} does not match family {family!r}")
    return ip


def _port(port: Any) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port {port!r} is not an integer in 0..65535")
    return port


def _endpoints(
    family: int, source: Optional[Tuple[Any, ...]], destination: Optional[Tuple[Any, ...]]
) -> Optional[Tuple[_IPAddress, _IPAddress, int, int]]:
    """Source/destination IPs and ports to announce, or None for UNKNOWN/LOCAL."""
    if family not in (socket.AF_INET, socket.AF_INET6) or source is None or destination is None:
        return None
    src, dst = _ip(source[0], family), _ip(destination[0], family)
    if isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address):
        src4, dst4 = src.ipv4_mapped, dst.ipv4_mapped
        if src4 is not None and dst4 is not None:
            return src4, dst4, _port(source[1]), _port(destination[1])
    return src, dst, _port(source[1]), _port(destination[1])


def encode_v1(family: int, source: Optional[Tuple[Any, ...]], destination: Optional[Tuple[Any, ...]]) -> bytes:
    """The v1 text line for a connection, from getpeername()/getsockname()-style tuples.

    ``PROXY UNKNOWN\\r\\n`` when the family is not IPv4/IPv6 or an address is missing.
    Raises ValueError when an address or port does not fit the family.
    """
    endpoints = _endpoints(family, source, destination)
    if endpoints is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst, sport, dport = endpoints
    proto = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {proto} {src.compressed} {dst.compressed} {sport} {dport}\r\n".encode("ascii")


def encode_v2(family: int, source: Optional[Tuple[Any, ...]], destination: Optional[Tuple[Any, ...]]) -> bytes:
    """The v2 binary header for a connection (PROXY command, TCP), without TLVs.

    A LOCAL header (no addresses) when the family is not IPv4/IPv6 or an address is missing.
    Raises ValueError when an address or port does not fit the family.
    """
    endpoints = _endpoints(family, source, destination)
    if endpoints is None:
        return _V2_SIGNATURE + bytes((0x20 | _CMD_LOCAL, _FAM_UNSPEC)) + b"\x00\x00"
    src, dst, sport, dport = endpoints
    fam = _FAM_TCP4 if src.version == 4 else _FAM_TCP6
    block = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    return _V2_SIGNATURE + struct.pack("!BBH", 0x20 | _CMD_PROXY, fam, len(block)) + block


# --- parsing ----------------------------------------------------------------------------------


def parse(data: Union[bytes, bytearray]) -> Optional[ProxyHeader]:
    """Parse a PROXY header at the start of ``data`` (everything received so far).

    Returns None while ``data`` is a valid but incomplete prefix of a header (read more and call
    again with the whole buffer), the header once complete (``length`` bytes; the rest is
    payload), and raises ProxyHeaderError as soon as the bytes cannot be a header, so a
    misconfigured or hostile client is dropped without waiting for more input.
    """
    if data.startswith(_V1_PREFIX):
        return _parse_v1(data)
    if data.startswith(_V2_SIGNATURE):
        return _parse_v2(data)
    if _V1_PREFIX.startswith(data) or _V2_SIGNATURE.startswith(data):
        return None
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(data: Union[bytes, bytearray]) -> Optional[ProxyHeader]:
    end = data.find(b"\r\n", 0, _V1_MAX_LENGTH)
    if end < 0:
        _check_v1_prefix(bytes(data[len(_V1_PREFIX) : _V1_MAX_LENGTH]))
        if len(data) >= _V1_MAX_LENGTH:
            raise ProxyHeaderError(f"v1: no CRLF within {_V1_MAX_LENGTH} bytes")
        return None
    line = bytes(data[len(_V1_PREFIX) : end])
    if b"\r" in line or b"\n" in line:
        raise ProxyHeaderError("v1: stray CR or LF")
    token, _, rest = line.partition(b" ")
    length = end + 2
    if token == b"UNKNOWN":
        # The spec: the receiver ignores whatever the sender put before the CRLF.
        return ProxyHeader(1, socket.AF_UNSPEC, None, None, length)
    if token not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"v1: unknown protocol {token[:16]!r}")
    fields = rest.split(b" ")
    if len(fields) != 4:
        raise ProxyHeaderError(f"v1: expected 4 fields after {token.decode()}, got {len(fields)}")
    v6 = token == b"TCP6"
    source = (_v1_address(fields[0], v6, "source"), _v1_port(fields[2], "source"))
    destination = (_v1_address(fields[1], v6, "destination"), _v1_port(fields[3], "destination"))
    return ProxyHeader(1, socket.AF_INET6 if v6 else socket.AF_INET, source, destination, length)


def _check_v1_prefix(rest: bytes) -> None:
    """Reject an incomplete v1 line (after ``PROXY ``) as soon as no completion could be valid."""
    if b"\n" in rest or b"\r" in rest[:-1]:
        raise ProxyHeaderError("v1: stray CR or LF")
    rest = rest.rstrip(b"\r")
    token, space, tail = rest.partition(b" ")
    if not space:
        if not any(t.startswith(token) for t in _V1_TOKENS):
            raise ProxyHeaderError(f"v1: unknown protocol {token[:16]!r}")
        return
    if token not in _V1_TOKENS:
        raise ProxyHeaderError(f"v1: unknown protocol {token[:16]!r}")
    if token == b"UNKNOWN":
        return
    allowed = _V1_TCP4_BYTES if token == b"TCP4" else _V1_TCP6_BYTES
    if tail.translate(None, allowed):
        raise ProxyHeaderError(f"v1: unexpected character in {token.decode()} line")
    if tail.count(b" ") > 3:
        raise ProxyHeaderError(f"v1: too many fields after {token.decode()}")


def _v1_address(text: bytes, v6: bool, which: str) -> str:
    try:
        if v6:
            if not _V1_IPV6.fullmatch(text):
                raise ValueError
            dotted = text.rpartition(b":")[2]
            if b"." in dotted and not _V1_IPV4.fullmatch(dotted):
                raise ValueError
            return ipaddress.IPv6Address(text.decode("ascii")).compressed
        if not _V1_IPV4.fullmatch(text):
            raise ValueError
        return ipaddress.IPv4Address(text.decode("ascii")).compressed
    except ValueError:
        raise ProxyHeaderError(f"v1: bad {which} address {text[:48]!r}") from None


def _v1_port(text: bytes, which: str) -> int:
    if not _V1_PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyHeaderError(f"v1: bad {which} port {text[:16]!r}")
    return int(text)


def _parse_v2(data: Union[bytes, bytearray]) -> Optional[ProxyHeader]:
    # Bytes 12 and 13 (version/command, family/protocol) are checked as soon as they arrive.
    if len(data) <= 12:
        return None
    version, command = data[12] >> 4, data[12] & 0x0F
    if version != 2:
        raise ProxyHeaderError(f"v2: unsupported version {version}")
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyHeaderError(f"v2: unknown command {command}")
    if len(data) <= 13:
        return None
    fam = data[13]
    # LOCAL: the spec says to discard the whole address block, family included.
    if command == _CMD_PROXY:
        if fam in _V2_DATAGRAM:
            raise ProxyHeaderError("v2: datagram (UDP) connections are not supported")
        if fam not in _V2_ADDRESS_LENGTH:
            raise ProxyHeaderError(f"v2: unknown family/protocol 0x{fam:02x}")
    if len(data) < _V2_FIXED:
        return None
    (declared,) = struct.unpack_from("!H", data, 14)
    length = _V2_FIXED + declared
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"v2: header of {length} bytes exceeds {MAX_V2_LENGTH}")
    if command == _CMD_PROXY and declared < _V2_ADDRESS_LENGTH[fam]:
        raise ProxyHeaderError(f"v2: address block of {declared} bytes is too short for 0x{fam:02x}")
    if len(data) < length:
        return None
    # LOCAL, AF_UNSPEC and AF_UNIX: no address a TCP forwarder can use; TLVs are skipped.
    if command == _CMD_LOCAL or fam not in (_FAM_TCP4, _FAM_TCP6):
        return ProxyHeader(2, socket.AF_UNSPEC, None, None, length)
    size = 4 if fam == _FAM_TCP4 else 16
    src, dst, sport, dport = struct.unpack_from(f"!{size}s{size}sHH", data, _V2_FIXED)
    ip_type = ipaddress.IPv4Address if size == 4 else ipaddress.IPv6Address
    family = socket.AF_INET if size == 4 else socket.AF_INET6
    return ProxyHeader(2, family, (ip_type(src).compressed, sport), (ip_type(dst).compressed, dport), length)
