"""Model-version kinds and releases: a Fisher is not a model, a release names its source.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 14:40:00

Written by hand like 0001. ``kind`` is ``model`` for every existing row except the summed Fishers
of consolidated tasks (format ``fisher-*``, how they were told apart before), so a database that
had promoted a Fisher keeps it visible and the new rule (only models are promoted) applies from
here on. ``released_from`` is the encrypted model version a site decrypted (``fedcl site
release``); NULL for everything else.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="model"))
        batch.add_column(sa.Column("released_from", sa.Integer(), nullable=True))
    op.execute("UPDATE model_versions SET kind = 'fisher' WHERE format LIKE 'fisher-%'")


def downgrade() -> None:
    op.execute("DELETE FROM model_versions WHERE kind = 'release'")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("released_from")
        batch.drop_column("kind")
