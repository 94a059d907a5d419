"""The chat page's server side: ``/``, ``/static/...`` and
``GET /api/conversations/{client_id}/messages`` (the browser tests are in
test_browser.py)."""

import json
import re

import pytest

from tornado_app.handlers.pages import STATIC_DIR

from .helpers import add_reply, add_user_message, get, logout, saved_messages


async def messages(base_url, client_id="chat-1", **headers):
    """GET /api/conversations/{client_id}/messages with these headers."""
    return await get(f"{base_url}/api/conversations/{client_id}/messages", **headers)


async def seed(store, user, client_id="chat-1"):
    """A conversation: an answered message, a stopped reply, a failed one."""
    conversation = await store.open_conversation(user.id, client_id)
    first = await add_user_message(store, conversation, user.id, "hello")
    await add_reply(store, conversation, user.id, first, content="Hi <b>there</b>", status="ok")
    second = await add_user_message(store, conversation, user.id, "a long story")
    await add_reply(store, conversation, user.id, second, content="Once upon", status="cancelled")
    third = await add_user_message(store, conversation, user.id, "and again")
    await add_reply(store, conversation, user.id, third, content="agent failed (reference x)",
                          status="error", error_ref="x")


@pytest.mark.gen_test
async def test_messages_with_bearer_token(base_url, make_user, token_for, store):
    await seed(store, await make_user("alice"))
    response = await messages(base_url, Authorization=f"Bearer {token_for('alice')}")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    body = json.loads(response.body)
    assert body["client_id"] == "chat-1"
    rows = body["messages"]
    # The failed reply is left out; the user messages all stay.
    assert [(r["role"], r["content"], r["status"]) for r in rows] == [
        ("user", "hello", "ok"),
        ("assistant", "Hi <b>there</b>", "ok"),
        ("user", "a long story", "ok"),
        ("assistant", "Once upon", "cancelled"),
        ("user", "and again", "ok"),
    ]
    saved = await saved_messages(store, await store.open_conversation(1, "chat-1"))
    ids = {row.content: row.public_id for row in saved}
    for row in rows:
        assert set(row) == {"id", "parent_id", "role", "content", "status", "created_at",
                            "siblings", "feedback"} | (
                                {"tool_steps"} if row["role"] == "assistant" else set())
        assert row["id"] == ids[row["content"]]  # the ids frames carry (protocol v2)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", row["created_at"])


@pytest.mark.gen_test
async def test_messages_with_cookie(base_url, make_user, token_for, store):
    await seed(store, await make_user("alice"))
    response = await messages(base_url, Cookie=f"access_token={token_for('alice')}")
    assert response.code == 200
    assert len(json.loads(response.body)["messages"]) == 5


@pytest.mark.gen_test
async def test_only_the_signed_in_users_conversation(base_url, make_user, token_for, store):
    await seed(store, await make_user("alice"))
    await make_user("bob")
    response = await messages(base_url, Authorization=f"Bearer {token_for('bob')}")
    assert response.code == 200
    assert json.loads(response.body)["messages"] == []


@pytest.mark.gen_test
@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer not-a-token"},
    {"Cookie": "access_token=not-a-token"},
], ids=["none", "bad-bearer", "bad-cookie"])
async def test_no_valid_token_is_401_json(base_url, make_user, headers):
    await make_user("alice")
    response = await messages(base_url, **headers)
    assert response.code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(response.body)["error"] == "invalid_token"


@pytest.mark.gen_test
async def test_token_in_query_is_not_accepted(base_url, make_user, token_for):
    await make_user("alice")
    response = await get(f"{base_url}/api/conversations/chat-1/messages?token={token_for('alice')}")
    assert response.code == 401


@pytest.mark.gen_test
async def test_disabled_user_and_revoked_token_are_401(base_url, make_user, token_for, store):
    await make_user("alice")
    token = token_for("alice")
    assert (await logout(base_url, token)).code == 200
    response = await messages(base_url, Authorization=f"Bearer {token}")
    assert response.code == 401
    await make_user("carol", disabled=True)
    response = await messages(base_url, Authorization=f"Bearer {token_for('carol')}")
    assert response.code == 401


@pytest.mark.gen_test
async def test_invalid_client_id_is_400(base_url, make_user, token_for):
    await make_user("alice")
    response = await messages(base_url, "x" * 129, Authorization=f"Bearer {token_for('alice')}")
    assert response.code == 400
    assert json.loads(response.body)["error"] == "invalid_request"


@pytest.mark.gen_test
async def test_page_and_static_files(base_url):
    page = await get(f"{base_url}/")
    assert page.code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    html = page.body.decode()
    # Nothing from elsewhere: every script and style is this server's.
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    for name in ("chat.js", "chat.css", "vendor/axe-core/axe.min.js"):
        response = await get(f"{base_url}/static/{name}")
        assert response.code == 200, name
    missing = await get(f"{base_url}/static/nope.js")
    assert missing.code == 404
    assert json.loads(missing.body)["error"] == "not_found"
    outside = await get(f"{base_url}/static/../handlers/pages.py")
    assert outside.code in (403, 404)


def test_vendored_files_carry_their_license():
    vendor = STATIC_DIR / "vendor"
    for library in vendor.iterdir():
        assert (library / "LICENSE").is_file(), library


def test_page_script_never_uses_inner_html_or_reads_the_token():
    script = (STATIC_DIR / "chat.js").read_text()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "access_token" not in script and "document.cookie" not in script
