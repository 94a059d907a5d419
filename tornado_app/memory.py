"""Each user's memory: saved key -> value pairs, encrypted at rest, put into
every prompt; and the search of their earlier messages (recall).

- :class:`MemoryCipher`: AES-GCM with a key derived (HKDF-SHA256) from
  ``memory.key`` or the key file under ``data_dir``. Each value gets a fresh
  nonce and is bound to its user and key (the associated data), so a value
  copied to another row does not decrypt. Keys (the names) stay plain.
- :class:`Memories`: the service's memory, one per process; hands out one
  user's :class:`UserMemoryStore` (tornado_app.tools.UserMemories) and
  :class:`UserMessageSearch` (tornado_app.tools.UserMessages), the only ways
  the API, the tools and the prompt reach memories.
- :func:`memory_section` and :func:`system_prompt`: the section of the system
  prompt that lists a user's memories, within a share of the context.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import datetime, timezone
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .store import Store
from .tools import ToolError

logger = logging.getLogger(__name__)

MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 1000
SNIPPET_CHARS = 300
MAX_RECALL = 20
NONCE_BYTES = 12
# The placeholder agent.system_prompt may hold; without it the section is appended.
PLACEHOLDER = "{memories}"
SECTION_HEADER = "What the user asked you to remember (key: value):"

# Control characters have no place in a name, nor in a value (beyond lines and tabs).
_CONTROL_IN_KEY = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_VALUE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class InvalidMemory(ToolError):
    """A key or value the memory does not take (the text says why)."""


class MemoryFull(ToolError):
    """The user already has ``memory.max_items`` memories."""


def check_key(key: object) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS:
        raise InvalidMemory(f"key: 1 to {MAX_KEY_CHARS} characters")
    if key != key.strip() or _CONTROL_IN_KEY.search(key):
        raise InvalidMemory("key: no control characters, no spaces at either end")
    return key


def check_value(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_VALUE_CHARS:
        raise InvalidMemory(f"value: a text of 1 to {MAX_VALUE_CHARS} characters")
    if _CONTROL_IN_VALUE.search(value):
        raise InvalidMemory("value: no control characters but new lines and tabs")
    return value


class MemoryCipher:
    """AES-256-GCM for memory values; the key derived from a secret string."""

    def __init__(self, secret: str):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"tornado_app memory values v1").derive(secret.encode())
        self._aead = AESGCM(key)

    @staticmethod
    def _bound(user_id: int, key: str) -> bytes:
        return f"{user_id}\x00{key}".encode()

    def encrypt(self, user_id: int, key: str, value: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, value.encode(), self._bound(user_id, key))

    def decrypt(self, user_id: int, key: str, blob: bytes) -> str | None:
        """The value, or None when it cannot be read (another key, a copied row)."""
        try:
            plain = self._aead.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                       self._bound(user_id, key))
        except (InvalidTag, ValueError):
            return None
        return plain.decode()


class Memories:
    """The service's memory: the store, the cipher and ``memory.max_items``."""

    def __init__(self, store: Store, cipher: MemoryCipher, max_items: int):
        self.store = store
        self.cipher = cipher
        self.max_items = max_items

    def readable(self, user_id: int, rows) -> list[tuple[str, str, datetime]]:
        """Rows of the store (key, encrypted value, updated_at) decrypted. A
        value that cannot be (memory.key was replaced) is left out, with a warning."""
        found = []
        for row in rows:
            value = self.cipher.decrypt(user_id, row.key, row.value)
            if value is None:
                logger.warning("memory %r of user %s cannot be decrypted (was memory.key "
                               "changed?); left out", row.key, user_id)
                continue
            found.append((row.key, value, row.updated_at))
        return found

    def of(self, user_id: int) -> "UserMemoryStore":
        return UserMemoryStore(self, user_id)

    def messages_of(self, user_id: int) -> "UserMessageSearch":
        return UserMessageSearch(self.store, user_id)

    async def forget(self, username: str) -> int | None:
        """Delete all of a user's memories (``users forget``); None: no such user."""
        return await self.store.forget_memories(username)


class UserMemoryStore:
    """One user's memories, decrypted (tornado_app.tools.UserMemories)."""

    def __init__(self, memories: Memories, user_id: int):
        self._memories = memories
        self.user_id = user_id

    async def list(self) -> list[tuple[str, str, datetime]]:
        """(key, value, updated_at) by key."""
        rows = await self._memories.store.list_memories(self.user_id)
        return self._memories.readable(self.user_id, rows)

    async def get(self, key: str) -> str | None:
        check_key(key)
        for name, value, _updated in await self.list():
            if name == key:
                return value
        return None

    async def set(self, key: str, value: str) -> None:
        check_key(key), check_value(value)
        memories = self._memories
        blob = memories.cipher.encrypt(self.user_id, key, value)
        if not await memories.store.save_memory(self.user_id, key, blob, memories.max_items):
            raise MemoryFull(f"at most {memories.max_items} memories; delete one first")

    async def delete(self, key: str) -> bool:
        check_key(key)
        return await self._memories.store.delete_memory(self.user_id, key)


class UserMessageSearch:
    """One user's messages, searched (tornado_app.tools.UserMessages)."""

    def __init__(self, store: Store, user_id: int):
        self.store = store
        self.user_id = user_id

    async def search(self, query: str, limit: int) -> list[dict]:
        limit = max(1, min(int(limit), MAX_RECALL))
        rows = await self.store.search_messages(self.user_id, query, limit)
        return [{"conversation": row.conversation, "role": row.role,
                 "content": snippet(row.content, query), "timestamp": iso_utc(row.created_at)}
                for row in rows]


def iso_utc(moment: datetime) -> str:
    """A naive UTC time as ISO 8601 with ``Z``, to the second."""
    return moment.replace(tzinfo=timezone.utc, microsecond=0).isoformat().replace("+00:00", "Z")


def snippet(content: str, query: str, size: int = SNIPPET_CHARS) -> str:
    """``content`` whole if it fits, else ``size`` characters around the first
    word of ``query`` it holds, with an ellipsis where it was cut."""
    if len(content) <= size:
        return content
    lowered = content.lower()
    found = [at for word in re.findall(r"[^\W_]+", query.lower())
             if (at := lowered.find(word)) >= 0]
    centre = min(found) if found else 0
    # At the end, the front's ellipsis takes one character of the room.
    start = max(0, min(centre - size // 3, len(content) - size + 1))
    head = "…" if start > 0 else ""
    room = size - len(head)
    tail = "…" if start + room < len(content) else ""
    return head + content[start:start + room - len(tail)] + tail


# The prompt

def memory_section(items: list[tuple[str, str, datetime]], budget_tokens: int,
                   count_tokens: Callable[[str], int]) -> str:
    """The system prompt's section listing the memories, most recently updated
    first, as many whole lines as fit in ``budget_tokens``; "" when none."""
    if not items:
        return ""  # nothing to count: most users save nothing
    lines = [SECTION_HEADER]
    used = count_tokens(SECTION_HEADER)
    for key, value, _updated in sorted(items, key=lambda item: item[2], reverse=True):
        line = f"- {key}: {value}"
        cost = count_tokens(line) + 1
        if used + cost > budget_tokens:
            continue  # a shorter, older one may still fit
        lines.append(line)
        used += cost
    return "\n".join(lines) if len(lines) > 1 else ""


def system_prompt(template: str, username: str, section: str) -> str:
    """``agent.system_prompt`` with the user's name and the memory section, in
    place of ``{memories}`` or, without it, after the prompt."""
    prompt = template.replace("{username}", username)
    if PLACEHOLDER in prompt:
        return prompt.replace(PLACEHOLDER, section)
    return f"{prompt}\n\n{section}" if section else prompt
