"""cheaper message inserts: recall's index on SQLite filled in bulk; no parent_id index

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-28 16:10:00.000000

Both for the exchange's cost (docs/benchmarks.md, "Figure 1: the exchange's
cost on the SQLite path").

- ``ix_messages_parent_id`` goes (both databases): only a switch walked down
  through it, and it now reads the conversation's later messages instead
  (store/branches.py, newest_descendant); every insert paid 5 us for it.
- Migration 0006's insert trigger indexed each message in the exchange's
  own transaction: 35-40 us of the batcher thread's CPU per message (a fifth
  of the exchange's write cost), where one INSERT .. SELECT of the new
  messages costs 2-3 us each. So on SQLite the trigger goes, and
  ``messages_fts_state.indexed_id`` says up to which message id the index
  is filled: the Store fills it up before every search, in the same
  transaction (a search sees every message saved before it), and on every
  lease renewal (store/message_search.py), so a search never waits for a
  long backlog. The delete and update triggers act only on indexed
  messages (the others are not in the index). Deleting the newest messages
  lowers ``indexed_id`` to the newest left: SQLite gives a new message the
  next id after the largest, and that id must be indexed again.
  PostgreSQL's GIN index is unchanged (the database keeps it).
"""

from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_INDEXED = "(SELECT indexed_id FROM messages_fts_state)"
_NEWEST = "(SELECT coalesce(max(id), 0) FROM messages)"
_FORGET_OLD = ("INSERT INTO messages_fts(messages_fts, rowid, user_id, content) "
               "VALUES ('delete', old.id, old.user_id, old.content); ")
_INDEX_NEW = ("INSERT INTO messages_fts(rowid, user_id, content) "
              "VALUES (new.id, new.user_id, new.content); ")
# The same statement as store/message_search.py's FILL (a migration keeps its own copy).
_FILL = ("INSERT INTO messages_fts(rowid, user_id, content) "
         f"SELECT id, user_id, content FROM messages WHERE id > {_INDEXED} ORDER BY id")

UPGRADE = [
    "CREATE TABLE messages_fts_state (indexed_id INTEGER NOT NULL)",
    f"INSERT INTO messages_fts_state (indexed_id) VALUES ({_NEWEST})",
    "DROP TRIGGER messages_fts_insert",
    "DROP TRIGGER messages_fts_delete",
    "DROP TRIGGER messages_fts_update",
    # On every delete (one trigger: the order of two on one event is not
    # defined): a statement that deletes the newest messages may delete the
    # indexed ones before those above them.
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, user_id, content) "
    f"SELECT 'delete', old.id, old.user_id, old.content WHERE old.id <= {_INDEXED}; "
    f"UPDATE messages_fts_state SET indexed_id = {_NEWEST} WHERE indexed_id > {_NEWEST}; END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF user_id, content ON messages "
    f"WHEN old.id <= {_INDEXED} BEGIN " + _FORGET_OLD + _INDEX_NEW + "END",
]
DOWNGRADE = [
    _FILL,
    "DROP TRIGGER messages_fts_delete",
    "DROP TRIGGER messages_fts_update",
    "DROP TABLE messages_fts_state",
    # Migration 0006's triggers.
    "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN " + _INDEX_NEW + "END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN " + _FORGET_OLD + "END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF user_id, content ON messages BEGIN "
    + _FORGET_OLD + _INDEX_NEW + "END",
]


def upgrade() -> None:
    op.drop_index('ix_messages_parent_id', table_name='messages')
    if op.get_bind().dialect.name == "sqlite":
        for statement in UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for statement in DOWNGRADE:
            op.execute(statement)
    op.create_index('ix_messages_parent_id', 'messages', ['parent_id'])
