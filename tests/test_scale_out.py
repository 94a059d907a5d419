"""Several processes and instances on one database: limits hold across all of them.

Real server processes (tests/servers.py) on SQLite and on PostgreSQL.
"""

import asyncio
import signal
import time
import urllib.request

import pytest

from .helpers import connect_ws
from .servers import ServerProcess, add_users, cli, ok, token, write_config

pytestmark = pytest.mark.slow


async def open_clients(server: ServerProcess, tok: str, count: int, prefix: str = "c"):
    clients = []
    for n in range(count):
        client = await connect_ws(server.ws_url(f"{prefix}{n}", tok))
        frame = await client.receive(timeout=15)
        assert frame is not None and frame["type"] == "system", frame
        clients.append(client)
    return clients


def test_rate_limit_is_exact_across_four_processes(tmp_path, any_db_url, servers):
    limit = 25
    config = write_config(
        tmp_path,
        database={"url": any_db_url},
        server={"processes": 4},
        rate_limit={"messages": limit, "per_seconds": 3600, "max_rejections": 1000},
        limits={"connections_per_user": 100},
    )
    add_users(config, "alice")
    server = servers(config)
    tok = token(config, "alice")

    async def burst():
        clients = await open_clients(server, tok, 20)

        async def send_five(client):
            for i in range(5):
                await client.send({"content": f"m{i}"})
            return [(await client.receive(timeout=30))["type"] for _ in range(5)]

        outcomes = await asyncio.gather(*(send_five(c) for c in clients))
        return [kind for outcome in outcomes for kind in outcome]

    kinds = asyncio.run(burst())
    assert kinds.count("ai_response") == limit
    assert kinds.count("error") == 100 - limit
    assert "database is locked" not in server.log()
    # The four workers really served: each logged its own start.
    assert server.log().count("serving on http://") == 4
    # One of them runs the analytics rollups and retention, not all four.
    assert server.log().count("analytics: rollups and retention run in this process") == 1
    # /metrics, from any one worker, sums all four.
    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'chat_messages_total{outcome="ok"} 25.0' in text
    assert f'chat_messages_total{{outcome="rate_limited"}} {100 - limit}.0' in text


def lease_config(tmp_path, db_url, name):
    return write_config(
        tmp_path / name,
        data_dir=str(tmp_path / name / "data"),
        database={"url": db_url},
        auth={"jwt_secret": "scale-out-secret-" + "s" * 40, "recheck_seconds": 0.5},
        limits={"connections_per_user": 2, "lease_seconds": 3},
    )


def test_connection_cap_holds_across_instances_and_frees_after_kill_9(tmp_path, any_db_url, servers):
    config_a = lease_config(tmp_path, any_db_url, "a")
    config_b = lease_config(tmp_path, any_db_url, "b")
    add_users(config_a, "alice")
    a, b = servers(config_a), servers(config_b)
    tok = token(config_a, "alice")

    async def scenario():
        await open_clients(a, tok, 1, "a")
        await open_clients(b, tok, 1, "b")
        third = await connect_ws(a.ws_url("a9", tok))
        assert await third.wait_closed(timeout=15) == 1013
        b.signal(signal.SIGKILL)
        b.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the dead instance's lease must expire
            retry = await connect_ws(a.ws_url("a8", tok))
            frame = await retry.receive(timeout=15)
            if frame is not None:
                return time.monotonic() - (deadline - 15)
            await asyncio.sleep(0.25)
        raise AssertionError("the slot of the killed instance never came back")

    freed_after = asyncio.run(scenario())
    assert freed_after < 3 + 2  # lease_seconds, plus the polling above


def test_disable_closes_sockets_on_every_instance(tmp_path, any_db_url, servers):
    config_a = lease_config(tmp_path, any_db_url, "a")
    config_b = lease_config(tmp_path, any_db_url, "b")
    add_users(config_a, "alice", "bob")
    a, b = servers(config_a), servers(config_b)
    alice, bob = token(config_a, "alice"), token(config_a, "bob")

    async def scenario():
        on_a = (await open_clients(a, alice, 1, "a"))[0]
        on_b = (await open_clients(b, alice, 1, "b"))[0]
        bob_socket = (await open_clients(b, bob, 1, "x"))[0]
        ok(await asyncio.to_thread(cli, config_a, "users", "disable", "alice"))
        codes = [await on_a.wait_closed(timeout=10), await on_b.wait_closed(timeout=10)]
        await bob_socket.send({"content": "still here"})
        return codes, (await bob_socket.receive(timeout=10))["type"]

    codes, bob_frame = asyncio.run(scenario())
    assert codes == [1008, 1008]
    assert bob_frame == "ai_response"
