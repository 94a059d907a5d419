"""scripts/generate_chats.py fills an empty database of each kind with
realistic chats that the analytics reports can read."""

from __future__ import annotations

import sys

import pytest

from tornado_app.analytics import make_filters, run_report

from .servers import ROOT


@pytest.mark.gen_test(timeout=120)
async def test_the_generator_fills_an_empty_database(db_store, any_db_url):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import generate_chats
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    await generate_chats.generate(generate_chats.build_parser().parse_args(
        ["--url", any_db_url, "--messages", "3000", "--users", "20", "--days", "10"]))
    found = (await run_report(db_store.engine, "summary", make_filters())).as_json()["summary"]
    assert found["messages"] == 3000
    assert found["errors"] > 0 and found["latency_p95_ms"] > found["latency_p50_ms"] > 0
    kinds = (await run_report(db_store.engine, "errors", make_filters())).as_json()["by_kind"]
    assert {row["kind"] for row in kinds} <= {"local_model", "timeout", "rate_limited",
                                             "upstream", "connection", "bad_reply", "internal"}
