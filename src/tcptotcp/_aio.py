"""Taking a connection out of asyncio's streams, so that a bridge can relay it.

``aconnect()`` and ``Bridge.wait_async()`` live with the rest of the API in ``_bridge``; this module
holds what only asyncio programs need: the handover of a ``StreamReader``/``StreamWriter`` pair.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Tuple, cast


async def take_socket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Tuple[socket.socket, bytes]:
    """Take the connection behind an asyncio stream pair out of asyncio, for a bridge.

    Returns ``(sock, early)``: a socket on a new fd of the same connection, and the bytes the
    ``StreamReader`` had already read from the connection. Those bytes are no longer in the
    socket: send them on before bridging. What the writer still buffered is sent first. Then
    the transport is closed. That closes only asyncio's fd; the returned socket keeps the
    connection open, and the bridge closes it in the end. Plain TCP/Unix streams only: a TLS
    stream's bytes are not its socket's bytes.
    """
    transport = cast(asyncio.Transport, writer.transport)
    if transport.get_extra_info("sslcontext") is not None:
        raise TypeError("take_socket() needs a plain TCP or Unix stream, not TLS")
    buffer = getattr(reader, "_buffer", None)  # asyncio keeps what it read here
    if not isinstance(buffer, bytearray):
        raise TypeError(f"take_socket() does not know this StreamReader ({type(reader).__name__})")
    raw = transport.get_extra_info("socket")
    if raw is None:
        raise ValueError("the stream's transport has no socket (already closed?)")
    transport.pause_reading()  # from here on, new bytes stay in the kernel for the bridge
    transport.set_write_buffer_limits(high=0)
    await writer.drain()  # returns once the transport's write buffer is empty
    fd = os.dup(raw.fileno())
    try:
        sock = socket.socket(fileno=fd)
    except BaseException:
        os.close(fd)
        raise
    early = bytes(buffer)
    buffer.clear()
    transport.close()
    return sock, early
