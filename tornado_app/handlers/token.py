"""POST /token: a user name and password for an access token (and cookie)."""

from __future__ import annotations

import json

from tornado.ioloop import IOLoop

from .. import auth
from .base import COOKIE_NAME, BaseHandler

INVALID_LOGIN = "Incorrect username or password."


class TokenHandler(BaseHandler):
    async def post(self) -> None:
        credentials = self._credentials()
        if credentials is None:
            self.write_json(400, {
                "error": "invalid_request",
                "error_description": "Send username and password as a form or a JSON object.",
            })
            return
        username, password = credentials
        # A name no user can have is looked up by nobody, and refused alike.
        user = await self.store.get_user(username) if auth.valid_username(username) else None
        password_hash = user.password_hash if user is not None else None
        # argon2 takes tens of milliseconds of CPU: keep it off the event loop.
        valid = await IOLoop.current().run_in_executor(
            None, auth.verify_password, password_hash, password
        )
        if not valid or user is None or user.disabled:
            self.set_header("WWW-Authenticate", "Bearer")
            self.write_json(401, {"error": "invalid_grant", "error_description": INVALID_LOGIN})
            return
        ttl = self.config.auth.token_ttl_minutes
        token = self.verifier.issue(user.username, ttl)
        self.set_cookie(
            COOKIE_NAME,
            token,
            httponly=True,
            samesite="Strict",
            secure=self.config.auth.cookie_secure,
            max_age=ttl * 60,
            path="/",
        )
        self.write_json(200, {"access_token": token, "token_type": "bearer"})

    def _credentials(self) -> tuple[str, str] | None:
        content_type = self.request.headers.get("Content-Type", "")
        if content_type.split(";")[0].strip().lower() == "application/json":
            try:
                body = json.loads(self.request.body or b"")
            except (ValueError, RecursionError):
                return None
            if not isinstance(body, dict):
                return None
            username, password = body.get("username"), body.get("password")
        else:
            username = self.get_body_argument("username", None)
            password = self.get_body_argument("password", None)
        if not isinstance(username, str) or not isinstance(password, str):
            return None
        if not username or not password:
            return None
        return username, password


class LogoutHandler(BaseHandler):
    """POST /logout: revoke the token that authenticates the request (by its
    ``jti``) and clear the cookie. Sockets opened with it close within
    ``auth.recheck_seconds``."""

    async def post(self) -> None:
        try:
            claims = self.verifier.decode(self.request_token() or "")
        except auth.AuthError:
            self.set_header("WWW-Authenticate", "Bearer")
            self.write_json(401, {"error": "invalid_token",
                                  "error_description": "A valid token is required."})
            return
        user = await self.store.get_user(claims.username)
        if user is not None:
            await self.store.revoke_token(claims.jti, user.id, claims.expires_at_naive)
        self.clear_cookie(COOKIE_NAME, path="/")
        self.write_json(200, {"status": "logged_out"})


routes = [(r"/token", TokenHandler), (r"/logout", LogoutHandler)]
