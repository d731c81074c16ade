"""The privacy ledger: per round and client (or the server), the DP mechanism, its parameters and epsilon.

Revision ID: 0003
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('privacy_ledger',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('round_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=32), nullable=True),
    sa.Column('mechanism', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('noise_multiplier', sa.Float(), nullable=False),
    sa.Column('clip_norm', sa.Float(), nullable=False),
    sa.Column('sample_rate', sa.Float(), nullable=False),
    sa.Column('steps', sa.Integer(), nullable=False),
    sa.Column('epsilon', sa.Float(), nullable=True),
    sa.Column('delta', sa.Float(), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['round_id'], ['rounds.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_privacy_ledger_round_id'), 'privacy_ledger', ['round_id'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_privacy_ledger_round_id'), table_name='privacy_ledger')
    op.drop_table('privacy_ledger')
