"""quota reservations on the reply's stream row

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-28 16:00:00.000000

A reply's quota reservation was a row of its own (``quota_reservations``),
inserted at admit, deleted when the reply was saved and renewed with the
reply's lease, beside the ``reply_streams`` row that is written at the same
three moments. It is now two columns of that row (store/quotas.py):
``reserved_tokens`` and ``reserved_cost``, live while the stream is (not
finished, lease not run out). ``ix_reply_streams_live_reserved`` holds the
live reservations only, by user and lease: a user's sum reads the few rows
it finds; replies without a quota have no entry.

Reservations held at the upgrade move to their streams (and back at the
downgrade), so that none is lost.
"""

from alembic import op
import sqlalchemy as sa


revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

_RESERVED = 'finished_at IS NULL AND reserved_tokens IS NOT NULL'


def upgrade() -> None:
    with op.batch_alter_table('reply_streams') as batch:
        batch.add_column(sa.Column('reserved_tokens', sa.Integer(), nullable=True))
        batch.add_column(sa.Column('reserved_cost', sa.Float(), nullable=True))
    op.execute(
        "UPDATE reply_streams SET "
        "reserved_tokens = (SELECT tokens FROM quota_reservations r "
        "WHERE r.reply_id = reply_streams.reply_id), "
        "reserved_cost = (SELECT cost FROM quota_reservations r "
        "WHERE r.reply_id = reply_streams.reply_id) "
        "WHERE reply_id IN (SELECT reply_id FROM quota_reservations)")
    op.create_index('ix_reply_streams_live_reserved', 'reply_streams',
                    ['user_id', 'lease_until'],
                    sqlite_where=sa.text(_RESERVED), postgresql_where=sa.text(_RESERVED))
    op.drop_index('ix_quota_reservations_user_expires', table_name='quota_reservations')
    op.drop_table('quota_reservations')


def downgrade() -> None:
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
    op.execute(
        "INSERT INTO quota_reservations (reply_id, user_id, tokens, cost, expires_at) "
        "SELECT reply_id, user_id, reserved_tokens, COALESCE(reserved_cost, 0), lease_until "
        f"FROM reply_streams WHERE {_RESERVED}")
    op.drop_index('ix_reply_streams_live_reserved', table_name='reply_streams')
    with op.batch_alter_table('reply_streams') as batch:
        batch.drop_column('reserved_cost')
        batch.drop_column('reserved_tokens')
