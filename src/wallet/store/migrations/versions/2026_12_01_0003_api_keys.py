"""api keys, transactions.created_by, and refusals kept under their idempotency key

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 22:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    op.create_table(
        "api_keys",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("label", sa.String(100), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(200), nullable=False),
        sa.Column("reads_per_second", sa.Integer(), nullable=False),
        sa.Column("writes_per_second", sa.Integer(), nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("revoked_at", timestamp),
        sa.CheckConstraint("length(key_hash) = 64", name=op.f("ck_api_keys_key_hash_length")),
        sa.CheckConstraint("length(scopes) > 0", name=op.f("ck_api_keys_has_scope")),
        sa.CheckConstraint(
            "reads_per_second >= 0 AND writes_per_second >= 0", name=op.f("ck_api_keys_budgets")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("id", name=op.f("uq_api_keys_id")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("transactions") as batch:
        batch.add_column(sa.Column("created_by", sa.String(36)))
        batch.create_foreign_key(
            op.f("fk_transactions_created_by_api_keys"), "api_keys", ["created_by"], ["id"]
        )
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.add_column(sa.Column("request_fingerprint", sa.String(64)))
        batch.add_column(sa.Column("refusal_code", sa.String(64)))
        batch.add_column(sa.Column("refusal_detail", sa.String(500)))
        batch.create_check_constraint(
            op.f("ck_idempotency_keys_refusal_complete"),
            "(refusal_code IS NULL) = (request_fingerprint IS NULL)"
            " AND (refusal_code IS NULL) = (refusal_detail IS NULL)",
        )


def downgrade() -> None:
    # Refusals stored since the upgrade go back to what 0002 knew: a refused key was free.
    op.execute("DELETE FROM idempotency_keys WHERE refusal_code IS NOT NULL")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint(op.f("ck_idempotency_keys_refusal_complete"), type_="check")
        batch.drop_column("refusal_detail")
        batch.drop_column("refusal_code")
        batch.drop_column("request_fingerprint")
    with op.batch_alter_table("transactions") as batch:
        batch.drop_constraint(op.f("fk_transactions_created_by_api_keys"), type_="foreignkey")
        batch.drop_column("created_by")
    op.drop_table("api_keys")
