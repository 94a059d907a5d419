"""A minimal, fast WebSocket client on raw asyncio (RFC 6455, text frames only).

A load generator must cost much less CPU than the server it measures; a full
client library spends most of its time in its own machinery. This one builds
the handshake by hand, sends pre-masked frames and reads unfragmented server
frames (Tornado never fragments) straight out of ``data_received``. It
answers pings and close frames, which is all a long idle socket needs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time

_KEY = base64.b64encode(b"benchmark-key-16").decode()


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame (clients must mask; any 4-byte key will do)."""
    key = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes((0x80 | opcode, 0x80 | length))
    elif length < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    if not length:
        return header + key
    repeated = (key * (length // 4 + 1))[:length]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(length, "big")
    return header + key + body


class HandshakeError(Exception):
    pass


class Connection(asyncio.Protocol):
    """One client socket. ``welcomed`` resolves at the first text frame;
    ``reply()`` resolves at the next frame that is not a streaming chunk."""

    def __init__(self, host: str, path: str):
        loop = asyncio.get_running_loop()
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.welcomed: asyncio.Future = loop.create_future()
        self.closed: asyncio.Future = loop.create_future()
        self.waiter: asyncio.Future | None = None
        # Set by a caller that wants the time of the next streaming chunk.
        self.first_chunk: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.upgraded = False
        self.close_code: int | None = None
        self.frames = 0

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status_line = bytes(self.buffer[: self.buffer.find(b"\r\n")])
            if b" 101 " not in status_line + b" ":
                self._fail(HandshakeError(status_line.decode(errors="replace")))
                return
            del self.buffer[: end + 4]
            self.upgraded = True
        self._read_frames()

    def connection_lost(self, exc) -> None:
        error = ConnectionError(f"closed ({self.close_code})")
        self._fail(error)
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    # Frames

    def _read_frames(self) -> None:
        buf = self.buffer
        pos, size = 0, len(buf)
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length, header = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, header = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, header = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if size - pos < header + length:
                break
            payload = bytes(buf[pos + header:pos + header + length])
            pos += header + length
            self._on_frame(first & 0x0F, payload)
        if pos:
            del buf[:pos]

    def _on_frame(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1:
            self.frames += 1
            if not self.welcomed.done():
                self.welcomed.set_result(payload)
            elif b'"ai_response_chunk"' in payload:
                first_chunk = self.first_chunk
                if first_chunk is not None and not first_chunk.done():
                    first_chunk.set_result(time.perf_counter())
            else:
                waiter, self.waiter = self.waiter, None
                if waiter is not None and not waiter.done():
                    waiter.set_result(payload)
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(masked_frame(payload[:2], 0x8))
                self.transport.close()
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(masked_frame(payload, 0xA))

    def _fail(self, exc: Exception) -> None:
        for future in (self.welcomed, self.waiter):
            if future is not None and not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    # API

    def send(self, frame: bytes) -> None:
        self.transport.write(frame)

    def reply(self) -> asyncio.Future:
        self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame((1000).to_bytes(2, "big"), 0x8))
            self.transport.close()


async def connect(host: str, port: int, path: str, timeout: float = 30.0) -> tuple[Connection, float]:
    """Open a socket and wait for its first frame (the welcome).

    Returns the connection and the seconds from the start of the TCP connect
    to the welcome frame."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    _transport, conn = await asyncio.wait_for(
        loop.create_connection(lambda: Connection(host, path), host, port), timeout
    )
    welcome = await asyncio.wait_for(conn.welcomed, timeout)
    if b'"system"' not in welcome:
        conn.close()
        raise HandshakeError(f"unexpected first frame: {welcome[:80]!r}")
    return conn, time.perf_counter() - started
