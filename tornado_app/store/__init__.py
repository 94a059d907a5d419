"""Persistence: models, the Store, the rate limiter and schema management."""

from .models import Conversation, Message, RateLimit, User
from .store import Store, StoreError

__all__ = ["Conversation", "Message", "RateLimit", "Store", "StoreError", "User"]
