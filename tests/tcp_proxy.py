"""A small TCP proxy on loopback that a test can cut and restore.

It stands between the service and a server it depends on (PostgreSQL, an
upstream API) to simulate that server failing, without touching the real one
(which other tests share):

- ``cut()``: the server is down. Every open connection is reset and the
  listening socket is closed, so new connections are refused at once, as
  they are by a stopped PostgreSQL.
- ``partition()``: the network is gone. Connections stay open and new ones
  are accepted, but no byte moves in either direction, so the other side
  waits (like a frozen host or a dropped route); ``restore()`` delivers
  what was held back, as TCP would once the route is back.
- ``restore()``: back to forwarding; the port stays the same throughout.

The proxy runs its own event loop in a daemon thread, so its methods are
plain synchronous calls usable from any test, sync or async, and from any
thread::

    with TcpProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{proxy.port}/db"
        ...
        proxy.cut()
        ...
        proxy.restore()
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading

FORWARDING, DOWN, PARTITIONED = "forwarding", "down", "partitioned"
CALL_TIMEOUT = 10.0


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.state = FORWARDING
        self.accepted = 0  # connections accepted so far, for assertions
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._flowing: asyncio.Event | None = None
        # (client side, server side or None while connecting)
        self._connections: set[tuple] = set()

    # Life cycle (synchronous, thread-safe)

    def start(self) -> "TcpProxy":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._flowing = asyncio.Event()
            self._flowing.set()
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        ready.wait(CALL_TIMEOUT)
        self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self._loop = None

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # Faults

    def cut(self) -> None:
        """The target is down: reset every connection, refuse new ones."""
        self._call(self._cut())

    def partition(self) -> None:
        """The route is gone: hold every byte, accept but never answer."""
        self._call(self._partition())

    def restore(self) -> None:
        """Forward again (on the same port)."""
        self._call(self._restore())

    @property
    def active(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._connections)

    # Inside the proxy's loop

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_TIMEOUT)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        self.state = DOWN
        self._flowing.set()  # let held pumps run into the reset below
        if self._server is not None:
            self._server.close()
            self._server = None
        for pair in list(self._connections):
            for writer in pair:
                if writer is not None:
                    _reset(writer)
        self._connections.clear()

    async def _partition(self) -> None:
        self.state = PARTITIONED
        self._flowing.clear()

    async def _restore(self) -> None:
        self.state = FORWARDING
        self._flowing.set()
        if self._server is None:
            await self._listen()

    async def _shutdown(self) -> None:
        await self._cut()
        self.state = FORWARDING

    async def _handle(self, client_reader, client_writer) -> None:
        if self.state == DOWN:
            _reset(client_writer)
            return
        self.accepted += 1
        entry = (client_writer, None)
        self._connections.add(entry)
        try:
            await self._flowing.wait()  # a partitioned route never reaches the target
            if self.state == DOWN:
                raise ConnectionError("proxy cut")
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_writer)
            return
        finally:
            self._connections.discard(entry)
        entry = (client_writer, server_writer)
        self._connections.add(entry)
        try:
            await asyncio.gather(
                self._pump(client_reader, server_writer),
                self._pump(server_reader, client_writer),
            )
        finally:
            self._connections.discard(entry)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                await self._flowing.wait()  # a partition holds bytes back, not drops them
                if not data or self.state == DOWN:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if self.state == DOWN:
                _reset(writer)
            else:
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed peer's kernel would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
