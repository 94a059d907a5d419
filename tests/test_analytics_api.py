"""GET /api/admin/analytics/{report} (both databases) and the ``analytics`` CLI.

The API: anonymous 401, non-admin 403, admin 200, by bearer header or cookie
(never ?token=); filters as query parameters; the export streamed. The CLI:
real subprocesses on a temporary SQLite database, as in test_cli.py.
"""

from __future__ import annotations

import csv
import io
import json

import pytest

from .helpers import get, on_engine
from .servers import Call, cli, ok, one_line_error, run_all, sqlite_url, write_config
from .test_analytics import load_chats


async def analytics(base_url, path, token=None, cookie=None, header=None):
    """GET /api/admin/analytics/{path} with a bearer ``token``, a ``cookie`` or a raw
    Authorization ``header``."""
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if cookie is not None:
        headers["Cookie"] = f"access_token={cookie}"
    if header is not None:
        headers["Authorization"] = header
    return await get(f"{base_url}/api/admin/analytics/{path}", **headers)


@pytest.fixture
def chats(io_loop, service):
    io_loop.run_sync(lambda: load_chats(service.store.engine))


@pytest.mark.gen_test
async def test_anonymous_and_bad_tokens_get_401(base_url, chats):
    for response in (await analytics(base_url, "summary"),
                     await analytics(base_url, "summary", token="not-a-jwt"),
                     await analytics(base_url, "summary", header="Basic YWxpY2U6eA=="),
                     await analytics(base_url, "nonsense")):
        assert response.code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(response.body)["error"] == "unauthorized"


@pytest.mark.gen_test
async def test_a_token_in_the_query_string_is_not_accepted(base_url, make_user, token_for,
                                                           chats):
    await make_user("root", admin=True)
    response = await analytics(base_url, f"summary?token={token_for('root')}")
    assert response.code == 401


@pytest.mark.gen_test
async def test_non_admins_get_403(base_url, make_user, token_for, chats):
    await make_user("mallory")
    for response in (await analytics(base_url, "summary", token=token_for("mallory")),
                     await analytics(base_url, "export", cookie=token_for("mallory"))):
        assert response.code == 403
        assert json.loads(response.body) == {
            "error": "forbidden", "error_description": "Analytics are for administrators."}


@pytest.mark.gen_test
async def test_a_disabled_admin_gets_401(base_url, make_user, token_for, chats):
    await make_user("root", admin=True, disabled=True)
    assert (await analytics(base_url, "summary", token=token_for("root"))).code == 401


@pytest.mark.gen_test
async def test_admins_get_every_report(base_url, make_user, token_for, chats):
    await make_user("root", admin=True)
    token = token_for("root")
    by_header = await analytics(base_url, "summary", token=token)
    by_cookie = await analytics(base_url, "summary", cookie=token)
    assert by_header.code == by_cookie.code == 200
    assert by_header.headers["Content-Type"].startswith("application/json")
    body = json.loads(by_header.body)
    assert body == json.loads(by_cookie.body)
    assert body["report"] == "summary"
    assert (body["summary"]["messages"], body["summary"]["users"]) == (17, 2)
    assert body["summary"]["latency_p95_ms"] == pytest.approx(480.0)
    for name, key in (("users", "users"), ("daily", "daily"), ("agents", "agents"),
                      ("conversations", "longest"), ("errors", "by_kind")):
        response = await analytics(base_url, name, token=token)
        assert response.code == 200, name
        assert json.loads(response.body)[key], name


@pytest.mark.gen_test
async def test_filters_and_their_errors(base_url, make_user, token_for, chats):
    await make_user("root", admin=True)
    token = token_for("root")
    body = json.loads((await analytics(
        base_url, "summary?since=2025-10-08&until=2025-10-09", token=token)).body)
    assert (body["summary"]["user_messages"], body["summary"]["replies"]) == (3, 3)
    assert body["filters"]["since"] == "2025-10-08T00:00:00.000000"
    body = json.loads((await analytics(base_url, "users?user=bob&limit=5", token=token)).body)
    assert [row["username"] for row in body["users"]] == ["bob"]
    body = json.loads((await analytics(base_url, "agents?agent=echo", token=token)).body)
    assert [(row["agent"], row["replies"]) for row in body["agents"]] == [("echo", 2)]
    bad = await analytics(base_url, "summary?since=someday", token=token)
    assert bad.code == 400 and "since" in json.loads(bad.body)["error_description"]
    assert (await analytics(base_url, "users?limit=0", token=token)).code == 400
    unknown_user = await analytics(base_url, "summary?user=nobody", token=token)
    assert unknown_user.code == 404
    assert (await analytics(base_url, "nonsense", token=token)).code == 404
    assert (await analytics(base_url, "export?user=nobody", token=token)).code == 404
    assert (await analytics(base_url, "export?format=xml", token=token)).code == 400


@pytest.mark.gen_test
async def test_export_streams_csv_and_json_lines(base_url, make_user, token_for, chats):
    await make_user("root", admin=True)
    token = token_for("root")
    response = await analytics(base_url, "export", token=token)
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.body.decode())))
    assert len(rows) == 17
    assert rows[0]["created_at"] == "2025-10-07T10:00:00.000000"
    assert (rows[5]["status"], rows[5]["error_kind"], rows[5]["agent"]) == (
        "error", "timeout", "openai")
    response = await analytics(base_url, "export?format=json&user=bob&agent=openai", token=token)
    assert response.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.body.decode().splitlines()]
    # bob's exchanges answered by openai: m11/m12, m14/m15, m16/m17.
    assert [(r["role"], r["status"]) for r in lines] == [
        ("user", "ok"), ("assistant", "cancelled"), ("user", "ok"), ("assistant", "ok"),
        ("user", "ok"), ("assistant", "error")]
    empty = await analytics(base_url, "export?since=2024-01-01&until=2024-01-02", token=token)
    assert empty.body.decode().splitlines() == [
        "id,created_at,username,conversation_id,client_id,role,status,agent,model,tokens_in,"
        "tokens_out,cost,latency_ms,ttft_ms,error_kind,error_ref,reply_to_id,parent_id,feedback_rating,"
        "feedback_comment,content"]


# The command line


@pytest.fixture
def config(tmp_path):
    path = write_config(tmp_path)
    on_engine(sqlite_url(tmp_path), load_chats)
    return path


def test_cli_reports_formats_and_errors(config):
    summary, users_csv, daily, export, bad_since, no_user, promote, promote_nobody = run_all(
        Call(config, ("analytics", "summary", "--format", "json")),
        Call(config, ("analytics", "users", "--format", "csv")),
        Call(config, ("analytics", "daily", "--until", "2025-10-09")),
        Call(config, ("analytics", "export", "--format", "json", "--user", "alice")),
        Call(config, ("analytics", "summary", "--since", "yesterday")),
        Call(config, ("analytics", "users", "--user", "nobody")),
        Call(config, ("users", "promote", "bob")),
        Call(config, ("users", "promote", "nobody")),
    )
    body = json.loads(ok(summary))
    assert (body["summary"]["messages"], body["summary"]["errors"]) == (17, 2)
    rows = list(csv.DictReader(io.StringIO(ok(users_csv))))
    assert [(r["username"], r["user_messages"]) for r in rows] == [("bob", "5"), ("alice", "4")]
    lines = ok(daily).splitlines()
    assert lines[0].split()[:3] == ["DAY", "USERS", "CONVERSATIONS"]
    assert [line.split()[0] for line in lines[1:] if line] == [
        "2025-10-07", "2025-10-08", "2025-10-09"]
    assert len({len(line) for line in lines if line}) == 1  # aligned columns
    assert len(ok(export).splitlines()) == 8
    one_line_error(bad_since, 2, "since", "7d")
    one_line_error(no_user, 1, "nobody")
    assert ok(promote).strip() == "bob is now an admin"
    one_line_error(promote_nobody, 1, "nobody")
    listing = ok(cli(config, "users", "list"))
    assert [line.split()[1] for line in listing.splitlines() if line.startswith("bob")] == ["yes"]


def test_cli_purge_keeps_the_rollups(config):
    one_line_error(cli(config, "analytics", "purge"), 2, "analytics.retention_days")
    result = ok(cli(config, "analytics", "purge", "--days", "1"))
    assert result.startswith("purged 17 messages and 4 conversations from before")
    body = json.loads(ok(cli(config, "analytics", "summary", "--format", "json")))
    assert (body["summary"]["messages"], body["summary"]["latency_p50_ms"]) == (17, None)
    assert ok(cli(config, "analytics", "export")).count("\n") == 1  # just the header
