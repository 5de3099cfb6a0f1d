"""The web page's lists (newest first, a user's own or by state, a page at a time) read an index
each instead of sorting every request.

Revision ID: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_image_requests_owner_created", "image_requests", ["owner_id", "created"])
    op.create_index("ix_image_requests_state_created", "image_requests", ["state", "created"])
    op.create_index("ix_image_requests_created", "image_requests", ["created"])


def downgrade() -> None:
    op.drop_index("ix_image_requests_created", "image_requests")
    op.drop_index("ix_image_requests_state_created", "image_requests")
    op.drop_index("ix_image_requests_owner_created", "image_requests")
