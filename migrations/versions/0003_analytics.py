"""analytics: messages.error_kind, report indexes, daily rollups, the chat_turns view

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 10:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# One row per user message, joined to its reply (docs/analytics.md). Plain SQL
# that SQLite and PostgreSQL both accept; status is NULL for a message that
# has no saved reply.
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
    r.error_ref AS error_ref
FROM messages q
JOIN users u ON u.id = q.user_id
JOIN conversations c ON c.id = q.conversation_id
LEFT JOIN messages r ON r.reply_to_id = q.id AND r.role = 'assistant'
WHERE q.role = 'user'
"""

ERROR = "status = 'error'"
OK_REPLY = "role = 'assistant' AND status = 'ok'"
# Successful replies in latency / TTFT order, for exact percentiles by offset.
OK_REPLY_INDEXES = {
    'ix_messages_ok_latency': ['latency_ms', 'created_at', 'agent'],
    'ix_messages_ok_ttft': ['ttft_ms', 'created_at', 'agent'],
    'ix_messages_ok_agent_latency': ['agent', 'model', 'latency_ms', 'created_at'],
    'ix_messages_ok_agent_ttft': ['agent', 'model', 'ttft_ms', 'created_at'],
    # One user's successful replies with everything their percentiles need.
    'ix_messages_ok_user': ['user_id', 'created_at', 'agent', 'model', 'latency_ms', 'ttft_ms'],
}


def upgrade() -> None:
    op.add_column('messages', sa.Column('error_kind', sa.String(length=32), nullable=True))
    op.create_index('ix_messages_reply_to_id', 'messages', ['reply_to_id'])
    op.create_index('ix_messages_error_created', 'messages', ['created_at'],
                    sqlite_where=sa.text(ERROR), postgresql_where=sa.text(ERROR))
    for name, columns in OK_REPLY_INDEXES.items():
        op.create_index(name, 'messages', columns,
                        sqlite_where=sa.text(OK_REPLY), postgresql_where=sa.text(OK_REPLY))
    op.create_table('analytics_daily',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('conversation_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('agent', sa.String(length=64), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('user_messages', sa.Integer(), nullable=False),
    sa.Column('replies', sa.Integer(), nullable=False),
    sa.Column('errors', sa.Integer(), nullable=False),
    sa.Column('cancelled', sa.Integer(), nullable=False),
    sa.Column('tokens_in', sa.Integer(), nullable=False),
    sa.Column('tokens_out', sa.Integer(), nullable=False),
    sa.Column('latency_ms_sum', sa.Float(), nullable=False),
    sa.Column('latency_count', sa.Integer(), nullable=False),
    sa.Column('ttft_ms_sum', sa.Float(), nullable=False),
    sa.Column('ttft_count', sa.Integer(), nullable=False),
    sa.Column('first_at', sa.DateTime(), nullable=False),
    sa.Column('last_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('day', 'conversation_id', 'agent', 'model')
    )
    op.create_index('ix_analytics_daily_user_day', 'analytics_daily', ['user_id', 'day'])
    op.create_table('analytics_daily_percentiles',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('agent', sa.String(length=64), nullable=False),
    sa.Column('latency_count', sa.Integer(), nullable=False),
    sa.Column('latency_p50_ms', sa.Float(), nullable=True),
    sa.Column('latency_p95_ms', sa.Float(), nullable=True),
    sa.Column('ttft_count', sa.Integer(), nullable=False),
    sa.Column('ttft_p50_ms', sa.Float(), nullable=True),
    sa.Column('ttft_p95_ms', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('day', 'agent')
    )
    op.create_table('analytics_rollup_days',
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('rolled_at', sa.DateTime(), nullable=False),
    sa.Column('purged_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('day')
    )
    op.execute(CHAT_TURNS)


def downgrade() -> None:
    op.execute("DROP VIEW chat_turns")
    op.drop_table('analytics_rollup_days')
    op.drop_table('analytics_daily_percentiles')
    op.drop_index('ix_analytics_daily_user_day', table_name='analytics_daily')
    op.drop_table('analytics_daily')
    for name in OK_REPLY_INDEXES:
        op.drop_index(name, table_name='messages')
    op.drop_index('ix_messages_error_created', table_name='messages')
    op.drop_index('ix_messages_reply_to_id', table_name='messages')
    # Not batch mode: rebuilding messages on SQLite would fire its foreign keys;
    # SQLite has dropped columns in place since 3.35.
    op.execute("ALTER TABLE messages DROP COLUMN error_kind")
