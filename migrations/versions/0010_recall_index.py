"""tool events of replies in flight (resume); recall's index on PostgreSQL

Revision ID: 0010
Revises: 0008 (the integrator re-chains it after 0009)
Create Date: 2026-11-28 13:00:00.000000

- ``reply_streams.tool_events``: the tool_call / tool_result events of a reply
  in flight or just ended, JSON, so that a resume replays them among the
  chunks (tornado_app/replies.py, ToolMark).
- ``ix_messages_user_created`` gains ``id``: (user_id, created_at, id), the
  order recall's window reads a user's newest messages in
  (store/message_search.py). With (user_id, created_at) alone PostgreSQL
  had to sort them again, so its generic plans preferred to walk every
  user's newest messages by time, or to AND the user's whole index entry
  with the full-text index: 40-110 ms on 1M messages for a query that
  matches nothing (docs/benchmarks.md).
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('reply_streams') as batch:
        batch.add_column(sa.Column('tool_events', sa.Text(), nullable=True))
    op.drop_index('ix_messages_user_created', table_name='messages')
    op.create_index('ix_messages_user_created', 'messages', ['user_id', 'created_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_messages_user_created', table_name='messages')
    op.create_index('ix_messages_user_created', 'messages', ['user_id', 'created_at'])
    with op.batch_alter_table('reply_streams') as batch:
        batch.drop_column('tool_events')
