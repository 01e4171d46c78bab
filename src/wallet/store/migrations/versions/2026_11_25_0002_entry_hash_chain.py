"""entry hash chain: each entry's link, and each balance row's newest link

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 18:40:00
"""

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_LINK = "0" * 64  # the link before an account's first entry
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# The columns this migration reads, as they are at revision 0001.
entries = sa.table(
    "entries",
    sa.column("seq", sa.BigInteger()),
    sa.column("id", sa.String()),
    sa.column("transaction_id", sa.String()),
    sa.column("account_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("direction", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("balance_after", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("chain_hash", sa.String()),
)
balances = sa.table(
    "balances",
    sa.column("account_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("chain_hash", sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table("balances") as batch:
        batch.add_column(
            sa.Column("chain_hash", sa.String(64), nullable=False, server_default=GENESIS_LINK)
        )
    op.add_column("entries", sa.Column("chain_hash", sa.String(64), nullable=True))
    _link_existing_entries()
    with op.batch_alter_table("entries") as batch:
        batch.alter_column("chain_hash", existing_type=sa.String(64), nullable=False)


def _link_existing_entries() -> None:
    """Chain the entries already stored, oldest first, in one pass."""
    connection = op.get_bind()
    heads: dict[tuple[str, str], str] = {}
    links = []
    for row in connection.execute(sa.select(entries).order_by(entries.c.seq)):
        key = (row.account_id, row.asset_symbol)
        heads[key] = _link_v1(heads.get(key, GENESIS_LINK), row)
        links.append({"entry_seq": row.seq, "link": heads[key]})
    if links:
        connection.execute(
            entries.update()
            .where(entries.c.seq == sa.bindparam("entry_seq"))
            .values(chain_hash=sa.bindparam("link")),
            links,
        )
        connection.execute(
            balances.update()
            .where(
                balances.c.account_id == sa.bindparam("key_account"),
                balances.c.asset_symbol == sa.bindparam("key_asset"),
            )
            .values(chain_hash=sa.bindparam("link")),
            [{"key_account": a, "key_asset": s, "link": h} for (a, s), h in heads.items()],
        )


def _link_v1(previous: str, entry: sa.Row[Any]) -> str:
    """Version 1 of the chain, frozen as this migration shipped it: SHA-256 of the previous link
    and the entry's fields joined by `|`, its creation time in microseconds since the epoch."""
    created_at = entry.created_at.replace(tzinfo=entry.created_at.tzinfo or UTC)
    created_us = (created_at - EPOCH) // timedelta(microseconds=1)
    content = "|".join(
        (
            previous,
            entry.id,
            entry.transaction_id,
            entry.account_id,
            entry.asset_symbol,
            entry.direction,
            str(entry.amount),
            str(entry.balance_after),
            str(created_us),
        )
    )
    return hashlib.sha256(content.encode()).hexdigest()


def downgrade() -> None:
    op.drop_column("entries", "chain_hash")
    with op.batch_alter_table("balances") as batch:
        batch.drop_column("chain_hash")
