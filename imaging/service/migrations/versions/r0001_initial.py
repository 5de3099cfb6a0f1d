"""The store as it was before migrations (SQLAlchemy's create_all of the first service): a
database made then is adopted by stamping it with this revision, then upgraded.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(80), nullable=False, unique=True),
        sa.Column("email", sa.String(254)),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created", sa.DateTime, nullable=False),
    )
    op.create_table(
        "image_requests",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id"), nullable=False, index=True),
        sa.Column("instance", sa.String(80), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("vis", sa.String(16)),
        sa.Column("shared_with", sa.JSON, nullable=False),
        sa.Column("disk_format", sa.String(16), nullable=False),
        sa.Column("target", sa.String(40), nullable=False),
        sa.Column("options", sa.JSON, nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("stage", sa.String(80)),
        sa.Column("error", sa.Text),
        sa.Column("result", sa.JSON),
        sa.Column("worker", sa.String(120)),
        sa.Column("lease_until", sa.DateTime),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created", sa.DateTime, nullable=False),
        sa.Column("updated", sa.DateTime, nullable=False, index=True),
    )
    op.create_table(
        "transitions",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "request_id", sa.String(32), sa.ForeignKey("image_requests.id"), nullable=False, index=True
        ),
        sa.Column("time", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(120), nullable=False),
        sa.Column("from_state", sa.String(16)),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(80)),
        sa.Column("reason", sa.Text, nullable=False),
    )
    op.create_table(
        "used_approvals",
        sa.Column("nonce", sa.String(64), primary_key=True),
        sa.Column("request_id", sa.String(32), nullable=False),
        sa.Column("used", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    for table in ("used_approvals", "transitions", "image_requests", "users"):
        op.drop_table(table)
