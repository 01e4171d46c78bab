"""holds, refunds, reversals and transfers; each balance's held sum and entry count; longer keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_LENGTH = 132
MAX_AMOUNT_SQL = "1000000000000000"
HELD_ONLY = sa.text("status = 'held'")


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column(
            "key",
            existing_type=sa.String(128),
            type_=sa.String(KEY_LENGTH),
            existing_nullable=False,
        )
    op.create_table(
        "holds",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("asset_symbol", sa.String(32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("captured_amount", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("expires_at", timestamp, nullable=False),
        sa.Column("created_at", timestamp, nullable=False),
        sa.Column("ended_at", timestamp),
        sa.Column("description", sa.String(500)),
        sa.Column("created_by", sa.String(36)),
        sa.Column("idempotency_key", sa.String(KEY_LENGTH), nullable=False),
        sa.Column("request_fingerprint", sa.String(64), nullable=False),
        sa.Column("release_key", sa.String(KEY_LENGTH)),
        sa.Column("release_fingerprint", sa.String(64)),
        sa.CheckConstraint(
            f"amount BETWEEN 1 AND {MAX_AMOUNT_SQL}", name=op.f("ck_holds_amount_range")
        ),
        sa.CheckConstraint(
            "status IN ('held', 'captured', 'released', 'expired')", name=op.f("ck_holds_status")
        ),
        sa.CheckConstraint(
            "(status = 'held') = (ended_at IS NULL)", name=op.f("ck_holds_ended_when_not_held")
        ),
        sa.CheckConstraint(
            "captured_amount BETWEEN 0 AND amount AND (status = 'captured') = (captured_amount > 0)",
            name=op.f("ck_holds_captured_within_amount"),
        ),
        sa.CheckConstraint(
            "(status = 'released') = (release_key IS NOT NULL)"
            " AND (release_key IS NULL) = (release_fingerprint IS NULL)",
            name=op.f("ck_holds_release_recorded"),
        ),
        sa.CheckConstraint(
            "substr(user_id, 1, 7) <> 'system:'", name=op.f("ck_holds_user_not_system")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["accounts.id"], name=op.f("fk_holds_user_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["asset_symbol"], ["assets.symbol"], name=op.f("fk_holds_asset_symbol_assets")
        ),
        sa.ForeignKeyConstraint(
            ["created_by"], ["api_keys.id"], name=op.f("fk_holds_created_by_api_keys")
        ),
        sa.ForeignKeyConstraint(
            ["idempotency_key"],
            ["idempotency_keys.key"],
            name=op.f("fk_holds_idempotency_key_idempotency_keys"),
        ),
        sa.ForeignKeyConstraint(
            ["release_key"],
            ["idempotency_keys.key"],
            name=op.f("fk_holds_release_key_idempotency_keys"),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_holds")),
        sa.UniqueConstraint("id", name=op.f("uq_holds_id")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_holds_idempotency_key")),
        sa.UniqueConstraint("release_key", name=op.f("uq_holds_release_key")),
    )
    op.create_index("ix_holds_user_seq", "holds", ["user_id", "seq"])
    op.create_index("ix_holds_user_status_seq", "holds", ["user_id", "status", "seq"])
    op.create_index("ix_holds_status_seq", "holds", ["status", "seq"])
    op.create_index(
        "ix_holds_held_user_asset",
        "holds",
        ["user_id", "asset_symbol"],
        postgresql_where=HELD_ONLY,
        sqlite_where=HELD_ONLY,
    )
    op.create_index(
        "ix_holds_held_expires_at",
        "holds",
        ["expires_at"],
        postgresql_where=HELD_ONLY,
        sqlite_where=HELD_ONLY,
    )
    with op.batch_alter_table("balances") as batch:
        batch.add_column(
            sa.Column("entry_count", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("held", sa.BigInteger(), nullable=False, server_default="0"))
        batch.create_check_constraint(
            op.f("ck_balances_entry_count_not_negative"), "entry_count >= 0"
        )
        batch.create_check_constraint(op.f("ck_balances_held_not_negative"), "held >= 0")
    op.execute(
        "UPDATE balances SET entry_count = (SELECT count(*) FROM entries"
        " WHERE entries.account_id = balances.account_id"
        " AND entries.asset_symbol = balances.asset_symbol)"
    )
    with op.batch_alter_table("transactions") as batch:
        batch.alter_column(
            "idempotency_key",
            existing_type=sa.String(128),
            type_=sa.String(KEY_LENGTH),
            existing_nullable=False,
        )
        batch.add_column(sa.Column("to_user_id", sa.String(64)))
        batch.add_column(sa.Column("hold_id", sa.String(36)))
        batch.add_column(sa.Column("refund_of", sa.String(36)))
        batch.add_column(
            sa.Column("refunded_amount", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.create_foreign_key(
            op.f("fk_transactions_to_user_id_accounts"), "accounts", ["to_user_id"], ["id"]
        )
        batch.create_foreign_key(
            op.f("fk_transactions_hold_id_holds"), "holds", ["hold_id"], ["id"]
        )
        batch.create_foreign_key(
            op.f("fk_transactions_refund_of_transactions"), "transactions", ["refund_of"], ["id"]
        )
        batch.create_unique_constraint(op.f("uq_transactions_hold_id"), ["hold_id"])
        batch.drop_constraint(op.f("ck_transactions_type"), type_="check")
        batch.create_check_constraint(
            op.f("ck_transactions_type"),
            "type IN ('topup', 'bonus', 'spend', 'transfer', 'refund', 'reversal')",
        )
        batch.create_check_constraint(
            op.f("ck_transactions_transfer_receiver"),
            "(type = 'transfer') = (to_user_id IS NOT NULL) AND to_user_id <> user_id",
        )
        batch.create_check_constraint(
            op.f("ck_transactions_capture_is_spend"), "hold_id IS NULL OR type = 'spend'"
        )
        batch.create_check_constraint(
            op.f("ck_transactions_refund_names_original"),
            "(type IN ('refund', 'reversal')) = (refund_of IS NOT NULL)",
        )
        batch.create_check_constraint(
            op.f("ck_transactions_refunded_within_amount"),
            "refunded_amount BETWEEN 0 AND amount"
            " AND (refunded_amount = 0 OR type IN ('topup', 'bonus', 'spend'))",
        )
        batch.create_index("ix_transactions_refund_of", ["refund_of"])
    op.create_index(
        "ix_entries_account_asset_created_at",
        "entries",
        ["account_id", "asset_symbol", "created_at", "seq"],
    )


def downgrade() -> None:
    # Money movements 0003 cannot represent are never dropped: such a ledger stays at 0004.
    connection = op.get_bind()
    newer = (
        connection.execute(
            sa.text(
                "SELECT count(*) FROM transactions WHERE type NOT IN ('topup', 'bonus', 'spend')"
                " OR hold_id IS NOT NULL OR length(idempotency_key) > 128"
            )
        ).scalar_one()
        + connection.execute(sa.text("SELECT count(*) FROM holds")).scalar_one()
    )
    if newer:
        raise RuntimeError(
            f"{newer} holds and transactions need revision 0004; the downgrade would lose them"
        )
    op.drop_index("ix_entries_account_asset_created_at", table_name="entries")
    with op.batch_alter_table("transactions") as batch:
        batch.drop_index("ix_transactions_refund_of")
        for name in (
            "refunded_within_amount",
            "refund_names_original",
            "capture_is_spend",
            "transfer_receiver",
            "type",
        ):
            batch.drop_constraint(op.f(f"ck_transactions_{name}"), type_="check")
        batch.create_check_constraint(
            op.f("ck_transactions_type"), "type IN ('topup', 'bonus', 'spend')"
        )
        batch.drop_constraint(op.f("uq_transactions_hold_id"), type_="unique")
        batch.drop_constraint(op.f("fk_transactions_refund_of_transactions"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_transactions_hold_id_holds"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_transactions_to_user_id_accounts"), type_="foreignkey")
        batch.drop_column("refunded_amount")
        batch.drop_column("refund_of")
        batch.drop_column("hold_id")
        batch.drop_column("to_user_id")
        batch.alter_column(
            "idempotency_key",
            existing_type=sa.String(KEY_LENGTH),
            type_=sa.String(128),
            existing_nullable=False,
        )
    op.drop_table("holds")
    op.execute("DELETE FROM idempotency_keys WHERE length(key) > 128")
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.alter_column(
            "key",
            existing_type=sa.String(KEY_LENGTH),
            type_=sa.String(128),
            existing_nullable=False,
        )
    with op.batch_alter_table("balances") as batch:
        batch.drop_constraint(op.f("ck_balances_held_not_negative"), type_="check")
        batch.drop_constraint(op.f("ck_balances_entry_count_not_negative"), type_="check")
        batch.drop_column("held")
        batch.drop_column("entry_count")
