"""Requests run as Procrastinate jobs in the same database: its schema (3.10.0, frozen beside
this file), and each request names its job; the hand-written lease goes.

Revision ID: 0002
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PROCRASTINATE = Path(__file__).resolve().parent.parent / "procrastinate-3.10.0.sql"


def upgrade() -> None:
    # The whole file at once on psycopg's own connection, in the migration's transaction: with no
    # parameters psycopg takes several statements, and leaves the SQL's % signs alone.
    connection = op.get_bind().connection.driver_connection
    assert connection is not None
    connection.execute(PROCRASTINATE.read_text(encoding="utf-8"))
    op.add_column("image_requests", sa.Column("job_id", sa.BigInteger))
    op.drop_column("image_requests", "lease_until")


def downgrade() -> None:
    raise NotImplementedError("no downgrade from the job engine: restore the database from a backup")
