"""HTTP and WebSocket handlers. Each module exports ``routes``; here they are joined."""

from . import admin, chat_socket, health, memories, pages, quota, token
from .base import BaseHandler


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        self.write_json(404, {"error": "not_found", "error_description": "No such resource."})


def all_routes() -> list:
    return [*chat_socket.routes, *token.routes, *health.routes, *admin.routes, *pages.routes,
            *memories.routes, *quota.routes]
