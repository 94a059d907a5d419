"""The signed-in user's own memories, without any model (README, "Memory").

- ``GET /api/memories`` → ``{"memories": [{"key", "value", "updated_at"}]}``, by key;
- ``PUT /api/memories/{key}`` with ``{"value": "..."}`` saves or replaces one;
- ``DELETE /api/memories/{key}`` deletes one (404 if there was none).

As the user the token names (``Authorization: Bearer`` or the cookie), and only
theirs: there is no way to name another user, admins included. A bad key or
value: 422; ``memory.max_items`` reached: 409; no valid token: 401; the
database unreachable: 503. Always a JSON body.
"""

from __future__ import annotations

import contextlib
import json

from ..memory import InvalidMemory, MemoryFull, check_key, iso_utc
from ..store import StoreError
from .base import BaseHandler


class MemoriesHandler(BaseHandler):
    @property
    def memories(self):
        return self.settings["memories"]

    async def prepare(self) -> None:
        self.user = await self.signed_in_user()
        if self.user is None:
            self.set_header("WWW-Authenticate", "Bearer")
            self._error(401, "unauthorized",
                        "Send an access token (Authorization: Bearer, or the cookie).")

    async def get(self, key: str | None = None) -> None:
        if key is not None:
            self._error(405, "method_not_allowed", "GET /api/memories lists them all.")
            return
        with self._answering():
            items = await self.memories.of(self.user.id).list()
            self.write_json(200, {"memories": [
                {"key": name, "value": value, "updated_at": iso_utc(updated)}
                for name, value, updated in items]})

    async def put(self, key: str | None = None) -> None:
        value = self._value()
        if value is None:
            return
        with self._answering():
            await self.memories.of(self.user.id).set(self._key(key), value)
            self.write_json(200, {"key": key, "value": value})

    async def delete(self, key: str | None = None) -> None:
        with self._answering():
            if await self.memories.of(self.user.id).delete(self._key(key)):
                self.write_json(200, {"deleted": key})
            else:
                self._error(404, "not_found", "No memory with that key.")

    @staticmethod
    def _key(key: str | None) -> str:
        if key is None:
            raise InvalidMemory("name the memory: /api/memories/{key}")
        return check_key(key)

    def _value(self) -> str | None:
        """The body's ``value`` (checked when saved); None after a 422."""
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, RecursionError):
            body = None
        if not isinstance(body, dict) or "value" not in body:
            self._error(422, "invalid_request", 'Send a JSON object: {"value": "..."}.')
            return None
        return body["value"]

    @contextlib.contextmanager
    def _answering(self):
        """The memory's refusals and the store's failures as JSON answers."""
        try:
            yield
        except InvalidMemory as exc:
            self._error(422, "invalid_memory", str(exc))
        except MemoryFull as exc:
            self._error(409, "memory_full", str(exc))
        except StoreError:
            self._error(503, "unavailable", "The database is unavailable; try again.")

    def _error(self, status: int, error: str, description: str) -> None:
        self.write_json(status, {"error": error, "error_description": description})


routes = [(r"/api/memories", MemoriesHandler), (r"/api/memories/([^/]+)", MemoriesHandler)]
