"""PostgreSQL's LISTEN/NOTIFY for replies (store/notifications.py): a change
committed by one process reaches the others at once, and only when committed."""

from __future__ import annotations

import asyncio

import pytest

from tornado_app.store import Store
from tornado_app.store import streams


@pytest.mark.gen_test(timeout=30)
async def test_a_committed_change_is_notified_and_a_rolled_back_one_is_not(postgres_url):
    store = Store.from_url(postgres_url)
    received: asyncio.Queue = asyncio.Queue()
    listening = asyncio.Event()
    notifications = store.reply_notifications(
        received.put_nowait, lambda on: listening.set() if on else listening.clear())
    notifications.start()
    try:
        await asyncio.wait_for(listening.wait(), 10)

        def notify_then_fail(db):
            streams.notify(db, ["rolled-back"])
            raise RuntimeError("roll the transaction back")

        with pytest.raises(RuntimeError):
            await store.writer.run(notify_then_fail)
        await store.writer.run(streams.notify, ["a" * 32, "b" * 32])
        assert await asyncio.wait_for(received.get(), 10) == ["a" * 32, "b" * 32]
        assert received.empty()
    finally:
        await notifications.stop()
        await store.close()


def test_sqlite_has_no_notifications(tmp_path):
    store = Store.from_url(f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}")
    assert store.reply_notifications(print, print) is None


def test_a_long_list_of_ids_is_split_below_the_payload_limit():
    sent = []

    class Recorder:
        dialect = "postgresql"

        def execute(self, _statement, values):
            sent.append(values["payload"])

    ids = [f"{n:032x}" for n in range(600)]
    streams.notify(Recorder(), ids)
    assert len(sent) > 1 and all(len(payload) <= 8000 for payload in sent)
    assert ",".join(sent).split(",") == ids
