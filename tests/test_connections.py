"""Connection slots (per user, across instances; per process) and revocation."""

import asyncio
import json
import time

import pytest

from sqlalchemy import func, select, text

from tornado_app.store.models import ConnectionLease

from .helpers import connect_ws, logout


@pytest.fixture
def settings(settings):
    settings.limits.connections_per_user = 2
    settings.limits.lease_seconds = 3
    settings.auth.recheck_seconds = 0.2
    return settings


@pytest.mark.gen_test
async def test_a_user_over_the_connection_cap_gets_1013(connect):
    first = await connect("a")
    await connect("b")
    third = await connect("c", welcome=False)
    assert await third.wait_closed() == 1013
    assert third.close_reason == "Too many connections for this user"
    other_user = await connect("c", user="bob")  # the cap is per user
    await other_user.send({"content": "hi"})
    assert (await other_user.receive())["type"] == "ai_response"
    first.close()
    for _ in range(50):  # the slot is given back in the background
        retry = await connect("c", welcome=False)
        frame = await retry.receive()
        if frame is not None:
            assert frame["type"] == "system"
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the slot of a closed socket was never given back")


@pytest.mark.gen_test
async def test_slots_held_by_other_instances_count_until_they_expire(
    connect, service, make_user, token_for
):
    user = await make_user("alice")
    store = service.store
    now = time.time()
    # Another instance holds one live slot; a killed one left an expired slot.
    assert await store.acquire_lease(user.id, "other:1", now, 60, 5)
    assert await store.acquire_lease(user.id, "killed:2", now - 100, 10, 5)
    await connect("a", token=token_for("alice"))
    extra = await connect("b", token=token_for("alice"), welcome=False)
    assert await extra.wait_closed() == 1013


@pytest.mark.gen_test
async def test_concurrent_slot_takers_never_exceed_the_cap(service, make_user):
    user = await make_user("alice")
    taken = await asyncio.gather(*(
        service.store.acquire_lease(user.id, f"i{n}", time.time(), 30, 3)
        for n in range(20)
    ))
    assert sum(lease is not None for lease in taken) == 3


@pytest.mark.gen_test
async def test_renew_extends_only_this_instances_leases(service, make_user):
    user = await make_user("alice")
    store = service.store
    now = time.time()
    await store.acquire_lease(user.id, "mine", now, 5, 9)
    await store.acquire_lease(user.id, "theirs", now, 5, 9)
    await store.renew_leases("mine", now + 4, 5)
    assert await live_leases(store, user.id, now + 6) == 1


async def live_leases(store, user_id: int, now: float) -> int:
    leases = ConnectionLease.__table__
    async with store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(leases).where(
            leases.c.user_id == user_id, leases.c.expires_at > now))).scalar_one()


class TestPerProcessCap:
    @pytest.fixture
    def settings(self, settings):
        settings.limits.connections_per_process = 2
        settings.limits.connections_per_user = 10
        return settings

    @pytest.mark.gen_test
    async def test_a_full_process_answers_1013(self, connect):
        await connect("a", user="alice")
        await connect("b", user="bob")
        third = await connect("c", user="carol", welcome=False)
        assert await third.wait_closed() == 1013
        assert third.close_reason == "Too many connections"


@pytest.mark.gen_test
async def test_logout_revokes_that_token_everywhere(base_url, ws_url, make_user, token_for):
    await make_user("alice")
    token, other_token = token_for("alice"), token_for("alice")
    open_socket = await connect_ws(ws_url("a", token))
    await open_socket.receive()
    response = await logout(base_url, token)
    assert response.code == 200
    assert response.headers["Set-Cookie"].startswith("access_token=\"\"; expires=")  # cleared
    assert await open_socket.wait_closed() == 1008  # within auth.recheck_seconds
    assert open_socket.close_reason == "Token revoked"
    refused = await connect_ws(ws_url("b", token))
    assert await refused.wait_closed() == 1008
    still_fine = await connect_ws(ws_url("c", other_token))  # another login of alice
    assert (await still_fine.receive())["type"] == "system"


@pytest.mark.gen_test
async def test_logout_needs_a_valid_token(base_url):
    response = await logout(base_url, "nonsense")
    assert response.code == 401
    assert json.loads(response.body)["error"] == "invalid_token"


@pytest.mark.gen_test
async def test_revoke_all_closes_sockets_and_refuses_older_tokens(
    service, ws_url, make_user, token_for
):
    await make_user("alice")
    old_token = token_for("alice")
    sock = await connect_ws(ws_url("a", old_token))
    await sock.receive()
    await asyncio.sleep(1.01)  # iat has a resolution of one second
    assert await service.store.revoke_all_tokens("alice")
    assert await sock.wait_closed() == 1008
    refused = await connect_ws(ws_url("b", old_token))
    assert await refused.wait_closed() == 1008
    await asyncio.sleep(1.01)
    fresh = await connect_ws(ws_url("c", token_for("alice")))
    assert (await fresh.receive())["type"] == "system"


@pytest.mark.gen_test
async def test_disabling_a_user_closes_their_sockets(service, connect):
    alice = await connect("a", user="alice")
    bob = await connect("a", user="bob")
    await service.store.set_disabled("alice")
    assert await alice.wait_closed() == 1008
    assert alice.close_reason == "Account disabled"
    await bob.send({"content": "still here"})
    assert (await bob.receive())["type"] == "ai_response"


@pytest.mark.gen_test
async def test_expired_revocations_are_purged(service, make_user):
    from datetime import datetime, timedelta

    user = await make_user("alice")
    store = service.store
    past = datetime.utcnow() - timedelta(minutes=1)
    future = datetime.utcnow() + timedelta(minutes=5)
    await store.revoke_token("old", user.id, past)
    await store.revoke_token("new", user.id, future)
    await store.revoke_token("new", user.id, future)  # twice is fine
    assert await store.purge_revocations() == 1
    assert (await store.token_states({user.id}, {"old", "new"}))[1] == {"new"}


@pytest.mark.gen_test
async def test_the_recheck_purges_expired_revocations_now_and_then(service, make_user):
    from datetime import datetime, timedelta

    user = await make_user("alice")
    store = service.store
    await store.revoke_token("old", user.id, datetime.utcnow() - timedelta(minutes=1))
    await service.connections.recheck()  # not due yet
    assert (await store.token_states({user.id}, {"old"}))[1] == {"old"}
    service.connections.purge_every_seconds = 0
    await service.connections.recheck()
    assert (await store.token_states({user.id}, {"old"}))[1] == set()


@pytest.mark.gen_test
async def test_an_idle_socket_holds_no_worker_task(connect, service):
    # Idle sockets are most sockets: a task and a queue each would cost
    # about 4 KiB per socket (docs/benchmarks.md, figure 2).
    client = await connect()
    (sock,) = service.connections.sockets
    assert sock.worker is None
    await client.send({"content": "one"})
    await client.send({"content": "two"})
    assert [(await client.receive())["type"] for _ in range(2)] == ["ai_response"] * 2
    await asyncio.sleep(0)
    assert sock.worker.done() and not sock.pending
    await client.send({"content": "three"})
    assert (await client.receive())["message"] == "fake reply to: three"


@pytest.mark.gen_test
async def test_the_lease_renewal_fills_the_search_index(service, make_user):
    from .helpers import add_user_message

    store = service.store
    if not store.sqlite_file:
        pytest.skip("PostgreSQL's full-text index is kept by the database")
    user = await make_user("alice")
    conversation = await store.open_conversation(user.id, "c")
    message_id = await add_user_message(store, conversation, user.id, "zebra crossing")
    await service.connections.renew()  # the FTS5 index fills in bulk (migration 0011)
    async with store.engine.connect() as conn:
        found = await conn.execute(text(
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'zebra'"))
    assert found.scalars().all() == [message_id]
