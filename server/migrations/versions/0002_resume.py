"""Resume and liveness: round status/reason, the state each round started from, the round loop's full state
per round, and every coordinator attempt (Flower run) of a run.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("status", sa.String(length=16), nullable=False, server_default="completed"))
        batch.add_column(sa.Column("reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("parent_sha256", sa.String(length=64), nullable=True))
    op.create_table("round_states",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("round_id", sa.Integer(), nullable=False),
    sa.Column("sha256", sa.String(length=64), nullable=False),
    sa.Column("nbytes", sa.BigInteger(), nullable=False),
    sa.Column("data", sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(["round_id"], ["rounds.id"], ),
    sa.PrimaryKeyConstraint("id"),
    sa.UniqueConstraint("round_id")
    )
    op.create_table("run_attempts",
    sa.Column("id", sa.Integer(), nullable=False),
    sa.Column("run_id", sa.Integer(), nullable=False),
    sa.Column("flower_run_id", sa.String(length=32), nullable=False),
    sa.Column("first_round", sa.Integer(), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ),
    sa.PrimaryKeyConstraint("id")
    )
    op.create_index(op.f("ix_run_attempts_run_id"), "run_attempts", ["run_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_run_attempts_run_id"), table_name="run_attempts")
    op.drop_table("run_attempts")
    op.drop_table("round_states")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("parent_sha256")
        batch.drop_column("reason")
        batch.drop_column("status")
