"""The global test set: each round's global adapter evaluated on a held-out slice no node trains on.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("test_loss", sa.Float(), nullable=True))
        batch.add_column(sa.Column("test_accuracy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("test_macro_f1", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("test_macro_f1")
        batch.drop_column("test_accuracy")
        batch.drop_column("test_loss")
