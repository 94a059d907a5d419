"""quotas and cost: users' quota overrides, messages.cost, quota_usage,
quota_reservations, and the chat_turns view with a cost column

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-28 10:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_TURNS_COLUMNS = """
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
    r.error_ref AS error_ref"""
_TURNS_FROM = """
FROM messages q
JOIN users u ON u.id = q.user_id
JOIN conversations c ON c.id = q.conversation_id
LEFT JOIN messages r ON r.reply_to_id = q.id AND r.role = 'assistant'
WHERE q.role = 'user'
"""
# The whole view, as of this revision: 0003's columns, then the reply's cost.
CHAT_TURNS = f"CREATE VIEW chat_turns AS\nSELECT{_TURNS_COLUMNS},\n    r.cost AS cost{_TURNS_FROM}"
CHAT_TURNS_BEFORE = f"CREATE VIEW chat_turns AS\nSELECT{_TURNS_COLUMNS}{_TURNS_FROM}"

# The current month's usage of the replies saved before quotas existed, so
# that a limit applies from the first day of the upgrade (cost 0: unpriced).
DAY = {"sqlite": "date(created_at)", "postgresql": "CAST(created_at AS date)"}
MONTH_START = {"sqlite": "date('now', 'start of month')",
               "postgresql": "CAST(date_trunc('month', now() AT TIME ZONE 'UTC') AS date)"}


def upgrade() -> None:
    # Plain ADD COLUMN (no batch): a batch would rebuild the tables on SQLite,
    # which the chat_turns view and the foreign keys to users do not allow.
    op.add_column('users', sa.Column('quota_tokens_per_day', sa.Integer(), nullable=True))
    op.add_column('users', sa.Column('quota_tokens_per_month', sa.Integer(), nullable=True))
    op.add_column('users', sa.Column('quota_cost_per_month', sa.Float(), nullable=True))
    op.add_column('users', sa.Column('quota_unlimited', sa.Boolean(), nullable=True))
    op.add_column('messages', sa.Column('cost', sa.Float(), nullable=True))

    op.create_table('quota_usage',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('cost', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'day')
    )
    op.create_table('quota_reservations',
    sa.Column('reply_id', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('cost', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('reply_id')
    )
    op.create_index('ix_quota_reservations_user_expires', 'quota_reservations',
                    ['user_id', 'expires_at'])

    dialect = op.get_bind().dialect.name
    op.execute(
        "INSERT INTO quota_usage (user_id, day, tokens, cost) "
        f"SELECT user_id, {DAY[dialect]}, "
        "SUM(COALESCE(tokens_in, 0) + COALESCE(tokens_out, 0)), 0 FROM messages "
        f"WHERE role = 'assistant' AND created_at >= {MONTH_START[dialect]} "
        f"GROUP BY user_id, {DAY[dialect]}")

    op.execute("DROP VIEW chat_turns")
    op.execute(CHAT_TURNS)


def downgrade() -> None:
    op.drop_index('ix_quota_reservations_user_expires', table_name='quota_reservations')
    op.drop_table('quota_reservations')
    op.drop_table('quota_usage')
    # Plain SQL rather than a batch, as in 0004.
    op.execute("DROP VIEW chat_turns")
    op.execute("ALTER TABLE messages DROP COLUMN cost")
    op.execute(CHAT_TURNS_BEFORE)
    for column in ('quota_unlimited', 'quota_cost_per_month', 'quota_tokens_per_month',
                   'quota_tokens_per_day'):
        op.execute(f"ALTER TABLE users DROP COLUMN {column}")
