"""conversation controls: message tree (parent_id, active leaf), the agent per
conversation, feedback on replies, chat_turns with regenerated and feedback

Revision ID: 0008
Revises: 0004
Create Date: 2026-11-28 10:00:00.000000

This revision redefines the chat_turns view: its whole definition is here
(CHAT_TURNS), and the downgrade restores 0007's (OLD_CHAT_TURNS, with cost).
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# 0003's columns and 0007's cost, then: whether the reply is a regenerated one (made by
# regenerate: an earlier reply answers the same message), and the user's
# feedback on it. A user
# message has one row per reply (regenerated replies each have theirs).
CHAT_TURNS = """
CREATE VIEW chat_turns AS
SELECT
    q.id AS message_id,
    r.id AS reply_id,
    q.conversation_id AS conversation_id,
    c.client_id AS client_id,
    q.user_id AS user_id,
    u.username AS username,
    q.created_at AS asked_at,
    r.created_at AS answered_at,
    q.content AS question,
    r.content AS answer,
    r.status AS status,
    r.agent AS agent,
    r.model AS model,
    r.tokens_in AS tokens_in,
    r.tokens_out AS tokens_out,
    r.latency_ms AS latency_ms,
    r.ttft_ms AS ttft_ms,
    r.error_kind AS error_kind,
    r.error_ref AS error_ref,
    r.cost AS cost,
    CASE WHEN r.regenerated THEN 1 ELSE 0 END AS regenerated,
    f.rating AS feedback_rating,
    f.comment AS feedback_comment
FROM messages q
JOIN users u ON u.id = q.user_id
JOIN conversations c ON c.id = q.conversation_id
LEFT JOIN messages r ON r.reply_to_id = q.id AND r.role = 'assistant'
LEFT JOIN message_feedback f ON f.message_id = r.id
WHERE q.role = 'user'
"""

OLD_CHAT_TURNS = """
CREATE VIEW chat_turns AS
SELECT
    q.id AS message_id,
    r.id AS reply_id,
    q.conversation_id AS conversation_id,
    c.client_id AS client_id,
    q.user_id AS user_id,
    u.username AS username,
    q.created_at AS asked_at,
    r.created_at AS answered_at,
    q.content AS question,
    r.content AS answer,
    r.status AS status,
    r.agent AS agent,
    r.model AS model,
    r.tokens_in AS tokens_in,
    r.tokens_out AS tokens_out,
    r.latency_ms AS latency_ms,
    r.ttft_ms AS ttft_ms,
    r.error_kind AS error_kind,
    r.error_ref AS error_ref,
    r.cost AS cost
FROM messages q
JOIN users u ON u.id = q.user_id
JOIN conversations c ON c.id = q.conversation_id
LEFT JOIN messages r ON r.reply_to_id = q.id AND r.role = 'assistant'
WHERE q.role = 'user'
"""

# Existing conversations become one straight branch: each message's parent is
# the message before it (by id), the newest message is the active leaf.
SET_PARENTS = """
UPDATE messages SET parent_id = (
    SELECT max(p.id) FROM messages p
    WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id
)
"""
SET_LEAVES = """
UPDATE conversations SET active_leaf_id = (
    SELECT max(m.id) FROM messages m WHERE m.conversation_id = conversations.id
)
"""


def upgrade() -> None:
    # Plain ADD COLUMN, not a batch: SQLite cannot rebuild a table a view reads.
    op.add_column('messages', sa.Column('parent_id', sa.Integer(), nullable=True))
    op.add_column('messages', sa.Column('regenerated', sa.Boolean(), nullable=True))
    op.add_column('analytics_daily', sa.Column('regenerated', sa.Integer(),
                                               server_default='0', nullable=False))
    op.add_column('conversations', sa.Column('active_leaf_id', sa.Integer(), nullable=True))
    op.add_column('conversations', sa.Column('agent', sa.String(length=64), nullable=True))
    op.execute(SET_PARENTS)
    op.execute(SET_LEAVES)
    op.create_index('ix_messages_parent_id', 'messages', ['parent_id'])
    op.create_table('message_feedback',
    sa.Column('message_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('rating', sa.Integer(), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('message_id')
    )
    op.create_index('ix_message_feedback_created', 'message_feedback', ['created_at'])
    op.execute("DROP VIEW chat_turns")
    op.execute(CHAT_TURNS)


def downgrade() -> None:
    op.execute("DROP VIEW chat_turns")
    op.drop_index('ix_message_feedback_created', table_name='message_feedback')
    op.drop_table('message_feedback')
    op.drop_index('ix_messages_parent_id', table_name='messages')
    # SQLite has dropped columns in place since 3.35 (a batch would rebuild the tables).
    op.execute("ALTER TABLE conversations DROP COLUMN agent")
    op.execute("ALTER TABLE conversations DROP COLUMN active_leaf_id")
    op.execute("ALTER TABLE messages DROP COLUMN parent_id")
    op.execute("ALTER TABLE messages DROP COLUMN regenerated")
    op.execute("ALTER TABLE analytics_daily DROP COLUMN regenerated")
    op.execute(OLD_CHAT_TURNS)
