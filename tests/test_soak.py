"""Soak (issue 5, item 12): a bounded load test on loopback that stops by itself.

500 WebSocket connections, each sending 20 messages one after the other
(10,000 exchanges), through the echo agent, against a real server process on
its default database (a SQLite file). The server's open file descriptors
and resident memory are read from /proc before, at the peak, and after the
clients have closed.

Asserted: every message gets its exact reply, nothing uncaught is logged,
and the descriptors return to where they were (small slack): no socket,
database connection or file is leaked. Not asserted: anything about time
(throughput and memory are printed, and recorded in docs/reliability.md).
``SOAK_CONNECTIONS`` and ``SOAK_MESSAGES`` override the sizes.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time

import pytest

from .helpers import Client, connect_ws
from .servers import ServerProcess, add_users, write_config
from .servers import tokens as cli_tokens

CONNECTIONS = int(os.environ.get("SOAK_CONNECTIONS", "500"))
MESSAGES = int(os.environ.get("SOAK_MESSAGES", "20"))
USERS = 10
FD_SLACK = 10  # a pooled connection or a log file opened lazily, not one per socket
CONNECTING_AT_ONCE = 100  # the listen backlog is 128: do not overflow it


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def sample(server: ServerProcess) -> dict:
    return {"fds": server.fd_count(), "rss_mib": round(server.rss_kib() / 1024, 1)}


async def settle_fds(server: ServerProcess, at_most: int | None = None, timeout: float = 60) -> int:
    """The server closes sockets as their close handshakes end; /proc is all
    there is to watch. Poll until the count is at most ``at_most`` or, without
    one, until it has not changed for a second."""
    deadline = time.monotonic() + timeout
    last, since = server.fd_count(), time.monotonic()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        count = server.fd_count()
        if at_most is not None and count <= at_most:
            return count
        if count != last:
            last, since = count, time.monotonic()
        elif at_most is None and time.monotonic() - since >= 1:
            return count
    return server.fd_count()


async def open_all(server: ServerProcess, tokens: list[str], count: int, prefix: str) -> list[Client]:
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)

    async def one(number: int) -> Client:
        async with gate:
            client = await connect_ws(server.ws_url(f"{prefix}-{number}", tokens[number % len(tokens)]))
            welcome = await client.receive(60)
            assert welcome is not None and welcome["type"] == "system", welcome
            return client

    return list(await asyncio.gather(*(one(n) for n in range(count))))


async def chat(client: Client, number: int, messages: int) -> int:
    for index in range(messages):
        content = f"connection {number} message {index}"
        await client.send({"content": content})
        frame = await client.receive(120)
        assert frame is not None, f"connection {number} closed ({client.close_code})"
        assert (frame["type"], frame["message"]) == ("ai_response", f"Echo: {content}"), frame
    return messages


async def close_all(clients: list[Client]) -> list[int | None]:
    for client in clients:
        client.close()
    return list(await asyncio.gather(*(client.wait_closed(60) for client in clients)))


@pytest.mark.slow
def test_soak_500_connections_20_messages_each_leaks_no_descriptors(tmp_path, servers):
    raise_fd_limit(CONNECTIONS * 2 + 256)
    config = write_config(
        tmp_path, limits={"connections_per_user": CONNECTIONS},
        logging={"level": "WARNING"},  # no access-log line per socket
    )
    names = [f"soak{n}" for n in range(USERS)]
    add_users(config, *names)
    tokens = list(cli_tokens(config, *names).values())
    server = servers(config)
    figures = {"connections": CONNECTIONS, "messages_per_connection": MESSAGES}

    async def soak():
        # Warm up at full concurrency: what opens lazily and then stays (the
        # database pool at its size, the batcher thread, SQLite's deferred
        # closes) is open before the "before" sample.
        figures["idle"] = sample(server)
        warm = await open_all(server, tokens, CONNECTIONS, "warm")
        await asyncio.gather(*(chat(c, n, 2) for n, c in enumerate(warm)))
        await close_all(warm)
        await settle_fds(server)  # what stays is the baseline: pooled connections and such
        figures["before"] = sample(server)

        started = time.monotonic()
        clients = await open_all(server, tokens, CONNECTIONS, "soak")
        figures["connected"] = sample(server)
        sent = await asyncio.gather(*(chat(c, n, MESSAGES) for n, c in enumerate(clients)))
        elapsed = time.monotonic() - started
        figures["peak"] = sample(server)
        assert sum(sent) == CONNECTIONS * MESSAGES
        codes = await close_all(clients)
        assert set(codes) <= {1000, 1005, None}, set(codes)
        await settle_fds(server, figures["before"]["fds"] + FD_SLACK)
        await settle_fds(server)  # and then until it stops moving
        figures["after"] = sample(server)
        figures["seconds"] = round(elapsed, 1)
        figures["exchanges_per_second"] = round(CONNECTIONS * MESSAGES / elapsed)

    asyncio.run(asyncio.wait_for(soak(), 900))
    print("soak figures:", json.dumps(figures))
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
    assert figures["connected"]["fds"] >= figures["before"]["fds"] + CONNECTIONS  # they were open
    assert figures["after"]["fds"] <= figures["before"]["fds"] + FD_SLACK, figures
    log = server.log()
    for marker in ("Traceback", "Uncaught exception", "Task exception was never retrieved"):
        assert marker not in log, log[-5000:]
    assert server.terminate() == 0
