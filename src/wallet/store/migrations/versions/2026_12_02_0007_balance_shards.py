"""balance shards: a system account has several balance rows per asset, each with its own chain

Every stored balance row and entry becomes shard 0, so the history, its links and its chains stay
as they are; the service adds the other shards of a system account as it first uses them. The
downgrade refuses while any shard other than 0 holds a row or an entry: their chains cannot be
merged into one without rewriting their links (rows that never had an entry are dropped).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 13:00:00
"""

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SHARD_RULE = "shard = 0 OR (shard > 0 AND substr(account_id, 1, 7) = 'system:')"


@contextmanager
def _new_key_on_sqlite() -> Iterator[None]:
    """SQLite's batch mode rebuilds the table with the new primary key, as asked, and warns that
    the reflected columns were flagged with the old one; nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Table '_alembic_tmp_balances'", sa.exc.SAWarning)
        yield


def upgrade() -> None:
    is_postgres = op.get_bind().dialect.name == "postgresql"
    with _new_key_on_sqlite(), op.batch_alter_table("balances") as batch:
        batch.add_column(sa.Column("shard", sa.Integer(), nullable=False, server_default="0"))
        if is_postgres:  # SQLite's batch mode recreates the table with the new key instead
            batch.drop_constraint(op.f("pk_balances"), type_="primary")
        batch.create_primary_key(op.f("pk_balances"), ["account_id", "asset_symbol", "shard"])
        batch.create_check_constraint(op.f("ck_balances_shard"), SHARD_RULE)
    with op.batch_alter_table("entries") as batch:
        batch.add_column(sa.Column("shard", sa.Integer(), nullable=False, server_default="0"))
        batch.create_check_constraint(op.f("ck_entries_shard"), SHARD_RULE)
    op.drop_index("ix_entries_account_asset_created_at", table_name="entries")
    op.create_index(
        "ix_entries_account_asset_shard_created_at",
        "entries",
        ["account_id", "asset_symbol", "shard", "created_at", "seq"],
    )


def downgrade() -> None:
    connection = op.get_bind()
    # Rows a batch created but never wrote to (its commands were refused) hold nothing.
    connection.execute(sa.text("DELETE FROM balances WHERE shard > 0 AND entry_count = 0"))
    sharded = sum(
        connection.execute(sa.text(statement)).scalar_one()
        for statement in (
            "SELECT count(*) FROM balances WHERE shard > 0",
            "SELECT count(*) FROM entries WHERE shard > 0",
        )
    )
    if sharded:
        raise RuntimeError(
            f"{sharded} balance rows and entries are in shards other than 0, which revision 0006 "
            "cannot represent; the downgrade would lose them"
        )
    is_postgres = connection.dialect.name == "postgresql"
    op.drop_index("ix_entries_account_asset_shard_created_at", table_name="entries")
    op.create_index(
        "ix_entries_account_asset_created_at",
        "entries",
        ["account_id", "asset_symbol", "created_at", "seq"],
    )
    with op.batch_alter_table("entries") as batch:
        batch.drop_constraint(op.f("ck_entries_shard"), type_="check")
        batch.drop_column("shard")
    with _new_key_on_sqlite(), op.batch_alter_table("balances") as batch:
        batch.drop_constraint(op.f("ck_balances_shard"), type_="check")
        if is_postgres:
            batch.drop_constraint(op.f("pk_balances"), type_="primary")
        batch.create_primary_key(op.f("pk_balances"), ["account_id", "asset_symbol"])
        batch.drop_column("shard")
