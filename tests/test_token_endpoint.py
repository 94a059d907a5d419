"""POST /token: form or JSON in; a bearer token and an HttpOnly cookie out."""

import json
from urllib.parse import urlencode

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient

from tornado_app.auth import TokenVerifier


async def post(base_url, body, content_type):
    client = AsyncHTTPClient()
    return await client.fetch(
        f"{base_url}/token", method="POST", body=body,
        headers={"Content-Type": content_type}, raise_error=False,
    )


def form(**fields):
    return urlencode(fields), "application/x-www-form-urlencoded"


def as_json(**fields):
    return json.dumps(fields), "application/json"


@pytest.mark.gen_test
@pytest.mark.parametrize("encode", [form, as_json], ids=["form", "json"])
async def test_login_returns_token_and_cookie(encode, base_url, make_user, settings):
    await make_user("alice", password="correct horse")
    response = await post(base_url, *encode(username="alice", password="correct horse"))
    assert response.code == 200
    body = json.loads(response.body)
    assert set(body) == {"access_token", "token_type"}
    assert body["token_type"] == "bearer"
    claims = TokenVerifier.from_settings(settings).decode(body["access_token"])
    assert claims.username == "alice"
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "HS256"
    payload = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert {"sub", "iat", "exp", "jti"} <= set(payload)
    assert payload["exp"] - payload["iat"] == settings.auth.token_ttl_minutes * 60
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith(f"access_token={body['access_token']}")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/" in cookie


@pytest.mark.gen_test
async def test_each_login_gets_a_distinct_jti(base_url, make_user):
    await make_user("alice", password="correct horse")
    tokens = []
    for _ in range(2):
        response = await post(base_url, *form(username="alice", password="correct horse"))
        tokens.append(json.loads(response.body)["access_token"])
    jtis = {jwt.decode(t, options={"verify_signature": False})["jti"] for t in tokens}
    assert len(jtis) == 2


@pytest.mark.gen_test
async def test_wrong_password_and_unknown_user_look_the_same(base_url, make_user):
    await make_user("alice", password="correct horse")
    wrong = await post(base_url, *form(username="alice", password="wrong horse"))
    unknown = await post(base_url, *form(username="nobody", password="wrong horse"))
    assert wrong.code == unknown.code == 401
    assert wrong.body == unknown.body
    assert json.loads(wrong.body)["error"] == "invalid_grant"
    assert wrong.headers["Content-Type"].startswith("application/json")
    assert "Set-Cookie" not in wrong.headers


@pytest.mark.gen_test
async def test_disabled_user_cannot_log_in(base_url, make_user):
    await make_user("bob", password="correct horse", disabled=True)
    response = await post(base_url, *form(username="bob", password="correct horse"))
    assert response.code == 401


@pytest.mark.gen_test
@pytest.mark.parametrize("body,content_type", [
    ("", "application/x-www-form-urlencoded"),
    ("username=alice", "application/x-www-form-urlencoded"),
    ("not json", "application/json"),
    ("[1,2]", "application/json"),
    ('{"username": "alice", "password": 5}', "application/json"),
])
async def test_malformed_login_is_a_json_400(body, content_type, base_url):
    response = await post(base_url, body, content_type)
    assert response.code == 400
    assert json.loads(response.body)["error"] == "invalid_request"


@pytest.mark.gen_test
async def test_token_from_login_opens_the_websocket(base_url, make_user, connect):
    await make_user("alice", password="correct horse")
    response = await post(base_url, *form(username="alice", password="correct horse"))
    token = json.loads(response.body)["access_token"]
    client = await connect(token=token)
    await client.send({"content": "hi"})
    assert (await client.receive())["type"] == "ai_response"


@pytest.mark.gen_test
async def test_unknown_path_and_wrong_method_answer_json(base_url):
    client = AsyncHTTPClient()
    missing = await client.fetch(f"{base_url}/nope", raise_error=False)
    assert missing.code == 404
    assert json.loads(missing.body)["error"] == "not_found"
    wrong = await client.fetch(f"{base_url}/token", raise_error=False)
    assert wrong.code == 405
    assert "error" in json.loads(wrong.body)
