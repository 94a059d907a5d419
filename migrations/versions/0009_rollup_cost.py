"""rollup cost: analytics_daily carries the replies' cost and the unpriced
replies, so that cost reports read the rollups like every other report

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 13:00:00.000000

Days rolled up before this revision are rolled up again (their rows and claim
are deleted; the server's periodic task or the next report redoes them from
the messages), so that their cost is exact. Days whose messages were purged
keep their rollups, with cost 0: their replies are gone.
"""

from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

COLUMNS = {
    'cost': sa.Float(),
    'unpriced_replies': sa.Integer(),
    'unpriced_tokens_in': sa.Integer(),
    'unpriced_tokens_out': sa.Integer(),
}
KEPT_DAYS = "SELECT day FROM analytics_rollup_days WHERE purged_at IS NULL"


def upgrade() -> None:
    # Plain ADD COLUMN, not a batch: SQLite cannot rebuild a table a view reads.
    for name, column_type in COLUMNS.items():
        op.add_column('analytics_daily', sa.Column(name, column_type, server_default='0',
                                                   nullable=False))
    op.execute(f"DELETE FROM analytics_daily WHERE day IN ({KEPT_DAYS})")
    op.execute(f"DELETE FROM analytics_daily_percentiles WHERE day IN ({KEPT_DAYS})")
    op.execute("DELETE FROM analytics_rollup_days WHERE purged_at IS NULL")


def downgrade() -> None:
    # SQLite has dropped columns in place since 3.35 (a batch would rebuild the table).
    for name in reversed(COLUMNS):
        op.execute(f"ALTER TABLE analytics_daily DROP COLUMN {name}")
