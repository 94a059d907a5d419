"""Tokens per RFC 8725: pinned algorithms, required claims, leeway, nbf, aud and
iss, size cap, and another issuer's public keys (PEM and JWKS) without key confusion."""

import base64
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tornado_app.auth import AuthError, TokenVerifier, load_external_keys
from tornado_app.config import ConfigError, load_settings

from .helpers import connect_ws

SECRET = "s" * 40


def claims(**overrides):
    now = int(time.time())
    base = {"sub": "alice", "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", ""])
def test_alg_none_in_every_spelling_is_refused(alg):
    token = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims())}."
    with pytest.raises(AuthError):
        TokenVerifier(SECRET).decode(token)


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "jti"])
def test_each_required_claim_is_required(claim):
    token = jwt.encode(claims(**{claim: None}), SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        TokenVerifier(SECRET).decode(token)


def test_a_good_token_passes():
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    assert TokenVerifier(SECRET).decode(token).username == "alice"


def test_exp_just_inside_and_just_outside_the_leeway():
    verifier = TokenVerifier(SECRET, leeway=30)
    now = int(time.time())
    inside = jwt.encode(claims(iat=now - 600, exp=now - 25), SECRET, algorithm="HS256")
    outside = jwt.encode(claims(iat=now - 600, exp=now - 35), SECRET, algorithm="HS256")
    assert verifier.decode(inside).username == "alice"
    with pytest.raises(AuthError, match="expired"):
        verifier.decode(outside)


def test_future_nbf_is_refused():
    token = jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256")
    with pytest.raises(AuthError):
        TokenVerifier(SECRET).decode(token)


def test_audience_and_issuer_are_enforced_when_set():
    verifier = TokenVerifier(SECRET, audience="chat", issuer="https://app.example")
    mine = verifier.issue("alice", 5)
    assert verifier.decode(mine).username == "alice"
    for wrong in (
        claims(aud="other", iss="https://app.example"),
        claims(aud="chat", iss="https://evil.example"),
        claims(iss="https://app.example"),  # no aud at all
        claims(aud="chat"),  # no iss
    ):
        with pytest.raises(AuthError):
            verifier.decode(jwt.encode(wrong, SECRET, algorithm="HS256"))


def test_oversized_token_is_refused_before_decoding():
    huge = jwt.encode(claims(padding="x" * 60_000), SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="oversized"):
        TokenVerifier(SECRET).decode(huge)


def test_other_hmac_algorithms_are_refused():
    token = jwt.encode(claims(), SECRET + SECRET, algorithm="HS512")
    with pytest.raises(AuthError):
        TokenVerifier(SECRET + SECRET).decode(token)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def pem(private_key) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def rsa_pem_file(tmp_path, rsa_key):
    path = tmp_path / "issuer.pem"
    path.write_bytes(pem(rsa_key))
    return path


def test_external_rs256_token_with_a_pem_key(rsa_key, rsa_pem_file):
    verifier = TokenVerifier(SECRET, external_keys=load_external_keys(str(rsa_pem_file), None))
    token = jwt.encode(claims(sub="external-bob"), rsa_key, algorithm="RS256")
    decoded = verifier.decode(token)
    assert (decoded.username, decoded.external) == ("external-bob", True)
    assert verifier.decode(verifier.issue("alice", 5)).external is False


def test_hs256_signed_with_the_public_key_is_refused(rsa_pem_file):
    """Key confusion: the attacker knows the public key and uses it as an HMAC secret."""
    verifier = TokenVerifier(SECRET, external_keys=load_external_keys(str(rsa_pem_file), None))
    public_pem = rsa_pem_file.read_bytes()
    header = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64(claims())
    import hashlib
    import hmac

    signature = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"
    with pytest.raises(AuthError):
        verifier.decode(forged)


def test_external_key_only_for_its_own_algorithm(rsa_key, ec_key, rsa_pem_file):
    verifier = TokenVerifier(SECRET, external_keys=load_external_keys(str(rsa_pem_file), None))
    with pytest.raises(AuthError):  # ES256 with no EC key configured
        verifier.decode(jwt.encode(claims(), ec_key, algorithm="ES256"))
    with pytest.raises(AuthError):  # RS256 without any external key
        TokenVerifier(SECRET).decode(jwt.encode(claims(), rsa_key, algorithm="RS256"))


def test_jwks_file_selects_the_key_by_kid(tmp_path, rsa_key, ec_key):
    keys = []
    for kid, key, alg in (("r1", rsa_key, "RS256"), ("e1", ec_key, "ES256")):
        algorithm = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
        jwk = json.loads(algorithm.to_jwk(key.public_key()))
        keys.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    verifier = TokenVerifier(SECRET, external_keys=load_external_keys(None, str(path)))
    es = jwt.encode(claims(sub="eve"), ec_key, algorithm="ES256", headers={"kid": "e1"})
    rs = jwt.encode(claims(sub="ron"), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    assert verifier.decode(es).username == "eve"
    assert verifier.decode(rs).username == "ron"
    wrong_kid = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "e1"})
    with pytest.raises(AuthError):
        verifier.decode(wrong_kid)


def settings_with(tmp_path, **auth):
    environ = {"TORNADO_APP_DATA_DIR": str(tmp_path), "TORNADO_APP_AUTH__JWT_SECRET": SECRET}
    environ.update({f"TORNADO_APP_AUTH__{k.upper()}": str(v) for k, v in auth.items()})
    return load_settings(None, environ)


def test_config_refuses_a_bad_key_file_and_a_big_leeway(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match=r"^auth.public_key_file: cannot use"):
        settings_with(tmp_path, public_key_file=bad)
    with pytest.raises(ConfigError, match=r"^auth.leeway_seconds: "):
        settings_with(tmp_path, leeway_seconds=120)
    with pytest.raises(ConfigError, match=r"^auth.auto_create_users: "):
        settings_with(tmp_path, auto_create_users="true")


class TestExternalUsersOnTheSocket:
    @pytest.fixture
    def settings(self, settings, rsa_pem_file):
        settings.auth.public_key_file = str(rsa_pem_file)
        settings.auth.auto_create_users = True
        return settings

    @pytest.mark.gen_test
    async def test_a_user_named_by_an_external_token_is_created(self, ws_url, rsa_key, store):
        token = jwt.encode(claims(sub="from-main-app"), rsa_key, algorithm="RS256")
        client = await connect_ws(ws_url("c1", token))
        frame = await client.receive()
        assert frame["message"].startswith("Welcome to AI Chat, from-main-app!")
        user = await store.get_user("from-main-app")
        assert user.password_hash is None and not user.is_admin
        again = await connect_ws(ws_url("c2", token))  # a second sight finds the user
        assert (await again.receive())["type"] == "system"

    @pytest.mark.gen_test
    async def test_our_own_tokens_never_create_users(self, ws_url, token_for, store):
        client = await connect_ws(ws_url("c1", token_for("ghost")))
        assert await client.wait_closed() == 1008
        assert await store.get_user("ghost") is None


@pytest.mark.gen_test
async def test_a_60_kb_token_on_the_socket_is_closed_with_1008(ws_url, make_user):
    await make_user("alice")
    huge = jwt.encode(claims(padding="x" * 45_000), SECRET, algorithm="HS256")
    assert 59_000 < len(huge) < 61_000  # ~60 KB: under Tornado's 64 KiB header limit
    client = await connect_ws(ws_url("c1", huge))
    assert await client.wait_closed() == 1008
