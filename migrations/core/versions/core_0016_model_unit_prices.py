"""Models: prices per image, per audio second and per million characters, for image and audio models.

Revision ID: core_0016
Revises: core_0015
Create Date: 2027-01-15
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0016"
down_revision = "core_0015"
branch_labels = None
depends_on = None

PRICE = sa.Numeric(18, 6)
COLUMNS = ("price_per_image", "price_per_audio_second", "price_per_mchar")


def upgrade() -> None:
    # Expand only: existing models cost 0 per unit, as they did before the columns existed.
    for name in COLUMNS:
        op.add_column("models", sa.Column(name, PRICE, nullable=False, server_default="0"))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("models", name)
