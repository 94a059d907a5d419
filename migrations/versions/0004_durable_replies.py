"""durable replies: messages.public_id, reply_streams, reply_chunks

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 09:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# Existing messages get random public ids of the same shape as new ones
# (32 hex digits).
RANDOM_ID = {
    "sqlite": "lower(hex(randomblob(16)))",
    "postgresql": "replace(gen_random_uuid()::text, '-', '')",
}


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('public_id', sa.String(length=32), nullable=True))
    op.execute(f"UPDATE messages SET public_id = {RANDOM_ID[op.get_bind().dialect.name]}")
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_public_id', ['public_id'], unique=True)

    op.create_table('reply_streams',
    sa.Column('reply_id', sa.String(length=32), nullable=False),
    sa.Column('conversation_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('message_id', sa.Integer(), nullable=False),
    sa.Column('instance', sa.String(length=128), nullable=False),
    sa.Column('lease_until', sa.Float(), nullable=False),
    sa.Column('last_seq', sa.Integer(), nullable=False),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('chunk_lengths', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('reply_id')
    )
    # The predicates as SQLAlchemy writes the queries' (SQLite uses a partial
    # index only when the query's WHERE has its terms).
    live = sa.text('finished_at IS NULL')
    op.create_index('ix_reply_streams_live_conversation', 'reply_streams', ['conversation_id'],
                    sqlite_where=live, postgresql_where=live)
    op.create_index('ix_reply_streams_live_lease', 'reply_streams', ['lease_until'],
                    sqlite_where=live, postgresql_where=live)
    op.create_index('ix_reply_streams_cancel_requested', 'reply_streams', ['instance'],
                    sqlite_where=sa.text('finished_at IS NULL AND cancel_requested IS 1'),
                    postgresql_where=sa.text('finished_at IS NULL AND cancel_requested IS true'))
    op.create_index('ix_reply_streams_created', 'reply_streams', ['created_at'])

    op.create_table('reply_chunks',
    sa.Column('reply_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['reply_id'], ['reply_streams.reply_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('reply_id', 'seq')
    )


def downgrade() -> None:
    op.drop_table('reply_chunks')
    for name in ('ix_reply_streams_created', 'ix_reply_streams_cancel_requested',
                 'ix_reply_streams_live_lease', 'ix_reply_streams_live_conversation'):
        op.drop_index(name, table_name='reply_streams')
    op.drop_table('reply_streams')
    op.drop_index('ix_messages_public_id', table_name='messages')
    # Plain SQL rather than a batch: a batch would rebuild the table on SQLite,
    # which the chat_turns view over it does not allow.
    op.execute("ALTER TABLE messages DROP COLUMN public_id")
