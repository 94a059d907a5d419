"""memories, and full-text search over messages (recall)

Revision ID: 0006
Revises: 0005 (0004 on the memory branch alone; the integrator re-chains 0005..0008)
Create Date: 2026-11-28 10:00:00.000000

- ``memories``: a user's saved memories, values encrypted (tornado_app/memory.py).
- Full-text search over ``messages.content`` for the recall tool: on SQLite
  an external-content FTS5 table ``messages_fts`` of (user_id, content) kept
  by three triggers (it holds only the index, not a second copy of the text); on PostgreSQL a GIN
  index on ``to_tsvector('simple', content)``. The 'simple' configuration
  (no stemming, no stop words) matches FTS5's unicode61 tokenizer, so both
  databases find the same messages.
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

SQLITE_FTS = [
    # user_id is indexed too: a search ANDs the user's own doclist with the
    # words', so a common word costs what the user's messages cost, not all of them.
    "CREATE VIRTUAL TABLE messages_fts USING fts5("
    "user_id, content, content='messages', content_rowid='id')",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
    "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
    "INSERT INTO messages_fts(rowid, user_id, content) "
    "VALUES (new.id, new.user_id, new.content); END",
    "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, user_id, content) "
    "VALUES ('delete', old.id, old.user_id, old.content); END",
    "CREATE TRIGGER messages_fts_update AFTER UPDATE OF user_id, content ON messages BEGIN "
    "INSERT INTO messages_fts(messages_fts, rowid, user_id, content) "
    "VALUES ('delete', old.id, old.user_id, old.content); "
    "INSERT INTO messages_fts(rowid, user_id, content) "
    "VALUES (new.id, new.user_id, new.content); END",
]
SQLITE_FTS_DROP = [
    "DROP TRIGGER IF EXISTS messages_fts_insert",
    "DROP TRIGGER IF EXISTS messages_fts_delete",
    "DROP TRIGGER IF EXISTS messages_fts_update",
    "DROP TABLE IF EXISTS messages_fts",
]
# The user's id goes into the indexed vector as the lexeme '_u<id>' (the
# parser never makes one with '_'), so that GIN intersects the user's entries
# with the words' (tornado_app/store/message_search.py has the same expression).
POSTGRES_FTS = [
    "CREATE INDEX ix_messages_fts ON messages USING gin "
    "((to_tsvector('simple', content) || ('_u' || user_id::text)::tsvector))",
]
POSTGRES_FTS_DROP = ["DROP INDEX IF EXISTS ix_messages_fts"]


def upgrade() -> None:
    op.create_table('memories',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'key')
    )
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_FTS if sqlite else POSTGRES_FTS:
        op.execute(statement)


def downgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    for statement in SQLITE_FTS_DROP if sqlite else POSTGRES_FTS_DROP:
        op.execute(statement)
    op.drop_table('memories')
