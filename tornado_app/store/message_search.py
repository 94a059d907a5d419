"""Full-text search over one user's messages (the recall tool).

SQLite: the FTS5 table ``messages_fts`` of (user_id, content) (migration
0006), queried for the user's id AND every word (quoted, so that a user's text
is never read as FTS5 syntax), newest first by rowid: FTS5 walks the user's
doclist and the words' together and stops at the limit. Messages are not
indexed as they are saved but in bulk (migration 0011): :func:`fill` before
each search, in its transaction, and on every lease renewal. PostgreSQL:
``to_tsvector('simple', content)`` and the user's lexeme, served by the GIN
index of the same expression, and ``plainto_tsquery``. Both find the
messages holding every word of the query, newest first.
"""

from __future__ import annotations

import re

from sqlalchemy import DateTime, Integer, String, Text, bindparam, text

from .models import ROLE_ASSISTANT, ROLE_USER, STATUS_ERROR

# FTS5's unicode61 tokenizer: letters and digits; everything else separates.
_WORD = re.compile(r"[^\W_]+")

_SELECT = "SELECT c.client_id AS conversation, m.role, m.content, m.created_at "
# Replies that failed hold an error text, not something said.
_SAID = f"m.role IN ('{ROLE_USER}', '{ROLE_ASSISTANT}') AND m.status != '{STATUS_ERROR}' "
_FILTER = "m.user_id = :user_id AND " + _SAID
_ORDER = "ORDER BY m.created_at DESC, m.id DESC LIMIT :limit"
_PARAMS = (bindparam("user_id", type_=Integer), bindparam("query", type_=String),
           bindparam("limit", type_=Integer))
# Typed result columns: SQLite's times come back as datetimes, as elsewhere.
_RESULTS = {"conversation": String, "role": String, "content": Text, "created_at": DateTime}

# Message ids follow time on SQLite (one writer), so rowid order is newest first.
SQLITE = text(
    _SELECT + "FROM messages_fts f JOIN messages m ON m.id = f.rowid "
    "JOIN conversations c ON c.id = m.conversation_id "
    "WHERE messages_fts MATCH :query AND " + _FILTER +
    "ORDER BY f.rowid DESC LIMIT :limit").bindparams(*_PARAMS).columns(**_RESULTS)
# The expression of migration 0006's GIN index, which holds the user's id as
# the lexeme '_u<id>': the index intersects the user's entries with the words'.
# That lexeme is the only test of the user here (the parser never makes a
# lexeme with '_', so it is exact): given "user_id = :user_id" too, PostgreSQL's
# generic plan (a prepared statement's, after five runs) ANDed the GIN bitmap
# with the user's whole btree entry, 36 ms for the most active user even when
# nothing matched.
_GIN_MATCH = (
    "(to_tsvector('simple', m.content) || ('_u' || m.user_id::text)::tsvector) "
    "@@ (plainto_tsquery('simple', :query) && CAST(:user_lexeme AS tsquery)) ")
POSTGRES = text(
    _SELECT + "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
    "WHERE " + _GIN_MATCH + "AND " + _SAID + _ORDER).bindparams(
        *_PARAMS[1:], bindparam("user_lexeme", type_=String)).columns(**_RESULTS)

# First the user's newest RECENT_WINDOW messages, read newest first through
# ix_messages_user_created (user_id, created_at, id: in this order, with no
# sort, so that every plan takes it) and matched one by one: when the limit is found
# there, those are the newest matches of all, and a common word of a busy user
# costs no visit to each of their thousands of messages that hold it (the GIN
# path's cost: it finds them all, then sorts them).
# Each message of the window is first tested for the query's lexemes as plain
# substrings of its lowercased text (lower() and the 'simple' dictionary fold
# case alike, so a message that matches contains them all): to_tsvector, which
# costs far more, then runs only on the few that pass. Without it a query
# that matches nothing parsed all 500 messages (60-110 ms on 1M messages).
_LEXEME_PATTERNS = (
    "ARRAY(SELECT '%' || replace(replace(replace(lexeme, '\\', '\\\\'), '%', '\\%'), "
    "'_', '\\_') || '%' "
    "FROM unnest(tsvector_to_array(to_tsvector('simple', :query))) AS lexeme)")
RECENT_WINDOW = 500
POSTGRES_RECENT = text(
    _SELECT + "FROM (SELECT * FROM messages WHERE user_id = :user_id "
    "ORDER BY created_at DESC, id DESC LIMIT :window) m "
    "JOIN conversations c ON c.id = m.conversation_id "
    "WHERE lower(m.content) LIKE ALL (" + _LEXEME_PATTERNS + ") "
    "AND to_tsvector('simple', m.content) @@ plainto_tsquery('simple', :query) "
    "AND " + _SAID + _ORDER).bindparams(
        *_PARAMS, bindparam("window", type_=Integer)).columns(**_RESULTS)


# Index the messages saved since the last fill (migration 0011): one
# statement costs 2-3 us a message, a trigger per insert 35-40 us.
_INDEXED = "(SELECT indexed_id FROM messages_fts_state)"
_NEWEST = "(SELECT coalesce(max(id), 0) FROM messages)"
FILL = text("INSERT INTO messages_fts(rowid, user_id, content) "
            f"SELECT id, user_id, content FROM messages WHERE id > {_INDEXED} ORDER BY id")
MARK_FILLED = text(f"UPDATE messages_fts_state SET indexed_id = {_NEWEST} "
                   f"WHERE indexed_id < {_NEWEST}")


def words(query: str) -> list[str]:
    return _WORD.findall(query.lower())


def fts5_query(user_id: int, query: str) -> str:
    """The user's id in its column, and every word quoted in the content: FTS5
    reads them as phrases, all required."""
    quoted = " ".join(f'"{word}"' for word in words(query))
    return f'user_id : "{int(user_id)}" AND content : ({quoted})'


# Units of work (store/executor.py)

def fill(db) -> None:
    """Index the messages saved since the last fill (SQLite; a write)."""
    if db.dialect == "sqlite":
        db.execute(FILL)
        db.execute(MARK_FILLED)


def search(db, user_id: int, query: str, limit: int) -> list:
    """(conversation, role, content, created_at) rows, newest first. On
    SQLite a write: it indexes the messages saved since the last fill first."""
    if not words(query):
        return []
    if db.dialect == "sqlite":
        fill(db)
        values = {"user_id": user_id, "query": fts5_query(user_id, query), "limit": limit}
        return db.execute(SQLITE, values).all()
    values = {"user_id": user_id, "query": query, "limit": limit, "window": RECENT_WINDOW,
              "user_lexeme": f"_u{int(user_id)}"}
    recent = db.execute(POSTGRES_RECENT, values).all()
    if len(recent) == limit:  # the newest matches of all
        return recent
    return db.execute(POSTGRES, values).all()
