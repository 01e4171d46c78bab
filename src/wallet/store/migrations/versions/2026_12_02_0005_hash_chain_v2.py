"""hash chain version 2: each link digests its entry and its transaction's header

Every stored entry is linked again, chain by chain, oldest first, and each balance row records its
chain's new newest link. Before a chain is rewritten its stored links are checked with the
version they were made with: a chain that is already broken (an entry edited, deleted or reordered
behind the service's back) stops the migration, naming the first broken entry, so the new links
never bless tampering. The downgrade does the same the other way. Both link encodings are frozen
copies: docs/LEDGER.md defines version 2, and the domain's `link` may change after this shipped.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:00:00
"""

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_LINK = "0" * 64  # the link before an account's first entry
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
BATCH = 10_000  # entries read, and links written, per statement: memory stays flat

# The columns this migration reads and writes, as they are at revision 0004.
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
transactions = sa.table(
    "transactions",
    sa.column("id", sa.String()),
    sa.column("type", sa.String()),
    sa.column("user_id", sa.String()),
    sa.column("to_user_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("hold_id", sa.String()),
    sa.column("refund_of", sa.String()),
    sa.column("idempotency_key", sa.String()),
    sa.column("note", sa.String()),
    sa.column("metadata", sa.JSON()),
    sa.column("created_by", sa.String()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
balances = sa.table(
    "balances",
    sa.column("account_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("chain_hash", sa.String()),
)

Link = Callable[[str, Any], str]  # (previous link, joined entry row) -> link


def upgrade() -> None:
    _relink(stored=_link_v1, stored_version=1, new=_link_v2)


def downgrade() -> None:
    _relink(stored=_link_v2, stored_version=2, new=_link_v1)


def _relink(*, stored: Link, stored_version: int, new: Link) -> None:
    """Check every chain's stored links with `stored`, and replace them with `new` ones; raise,
    before anything commits, at the first link or balance row that does not match."""
    connection = op.get_bind()
    chain: tuple[str, str] | None = None
    stored_previous = new_previous = GENESIS_LINK
    head: str | None = None
    links: list[tuple[int, str]] = []
    heads: list[tuple[str, str, str]] = []

    def end_chain() -> None:
        if chain is None:
            return
        if head != stored_previous:
            raise RuntimeError(
                f"the balance row of {chain[0]} {chain[1]} does not record its chain's newest "
                f"version-{stored_version} link: the stored ledger was changed behind the "
                "service's back; restore it (or have it audited) before migrating"
            )
        heads.append((chain[0], chain[1], new_previous))

    after: tuple[str, str, int] | None = None
    while rows := _read_batch(connection, after):
        for row in rows:
            if (row.account_id, row.asset_symbol) != chain:
                end_chain()
                chain = (row.account_id, row.asset_symbol)
                stored_previous = new_previous = GENESIS_LINK
                head = row.head
            if row.t_id is None:
                raise RuntimeError(
                    f"entry {row.id} ({row.account_id} {row.asset_symbol}) names transaction "
                    f"{row.transaction_id}, which does not exist: the stored ledger was changed "
                    "behind the service's back; restore it (or have it audited) before migrating"
                )
            if stored(stored_previous, row) != row.chain_hash:
                raise RuntimeError(
                    f"entry {row.id} ({row.account_id} {row.asset_symbol}) is the first broken "
                    f"link of its chain (version {stored_version}): the stored ledger was "
                    "changed behind the service's back; restore it (or have it audited) "
                    "before migrating"
                )
            stored_previous = row.chain_hash
            new_previous = new(new_previous, row)
            links.append((row.seq, new_previous))
        last = rows[-1]
        after = (last.account_id, last.asset_symbol, last.seq)
        _write_links(connection, links)
        links.clear()
        _write_heads(connection, heads)
        heads.clear()
    end_chain()
    _write_heads(connection, heads)
    stray = connection.execute(
        sa.select(balances.c.account_id, balances.c.asset_symbol)
        .where(
            balances.c.chain_hash != GENESIS_LINK,
            ~sa.exists().where(
                entries.c.account_id == balances.c.account_id,
                entries.c.asset_symbol == balances.c.asset_symbol,
            ),
        )
        .limit(1)
    ).first()
    if stray is not None:
        raise RuntimeError(
            f"the balance row of {stray.account_id} {stray.asset_symbol} records a newest link "
            "but its chain has no entry: the stored ledger was changed behind the service's "
            "back; restore it (or have it audited) before migrating"
        )


def _read_batch(connection: sa.Connection, after: tuple[str, str, int] | None) -> list[Any]:
    """The next BATCH entries in chain order ((account, asset), then seq), each with its
    transaction's header and its balance row's newest link. Keyset pages over the
    (account_id, asset_symbol, seq) index, so each page costs the same: the rest of the current
    chain, then the chains after it. (One row-value comparison over all three columns would do,
    but SQLite seeks on its first two only and would rescan a long chain for every page.)"""
    query = (
        sa.select(
            entries,
            *(column.label(f"t_{column.name}") for column in transactions.c),
            balances.c.chain_hash.label("head"),
        )
        .select_from(
            entries.outerjoin(
                transactions, transactions.c.id == entries.c.transaction_id
            ).outerjoin(
                balances,
                sa.and_(
                    balances.c.account_id == entries.c.account_id,
                    balances.c.asset_symbol == entries.c.asset_symbol,
                ),
            )
        )
        .order_by(entries.c.account_id, entries.c.asset_symbol, entries.c.seq)
    )
    if after is None:
        return list(connection.execute(query.limit(BATCH)))
    account, asset, seq = after
    rows = list(
        connection.execute(
            query.where(
                entries.c.account_id == account,
                entries.c.asset_symbol == asset,
                entries.c.seq > seq,
            ).limit(BATCH)
        )
    )
    if len(rows) < BATCH:
        later_chains = sa.tuple_(entries.c.account_id, entries.c.asset_symbol) > sa.tuple_(
            sa.literal(account), sa.literal(asset)
        )
        rows += connection.execute(query.where(later_chains).limit(BATCH - len(rows)))
    return rows


def _write_links(connection: sa.Connection, links: list[tuple[int, str]]) -> None:
    if not links:
        return
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text(
                "UPDATE entries SET chain_hash = v.link"
                " FROM unnest(CAST(:seqs AS bigint[]), CAST(:links AS text[])) AS v(seq, link)"
                " WHERE entries.seq = v.seq"
            ),
            {"seqs": [seq for seq, _ in links], "links": [link for _, link in links]},
        )
        return
    connection.execute(
        entries.update()
        .where(entries.c.seq == sa.bindparam("entry_seq"))
        .values(chain_hash=sa.bindparam("link")),
        [{"entry_seq": seq, "link": link} for seq, link in links],
    )


def _write_heads(connection: sa.Connection, heads: list[tuple[str, str, str]]) -> None:
    if not heads:
        return
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text(
                "UPDATE balances SET chain_hash = v.link FROM unnest(CAST(:accounts AS text[]),"
                " CAST(:symbols AS text[]), CAST(:links AS text[])) AS v(account, symbol, link)"
                " WHERE balances.account_id = v.account AND balances.asset_symbol = v.symbol"
            ),
            {
                "accounts": [account for account, _, _ in heads],
                "symbols": [symbol for _, symbol, _ in heads],
                "links": [link for _, _, link in heads],
            },
        )
        return
    connection.execute(
        balances.update()
        .where(
            balances.c.account_id == sa.bindparam("key_account"),
            balances.c.asset_symbol == sa.bindparam("key_asset"),
        )
        .values(chain_hash=sa.bindparam("link")),
        [{"key_account": a, "key_asset": s, "link": link} for a, s, link in heads],
    )


def _utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _link_v1(previous: str, row: Any) -> str:
    """Version 1, frozen: SHA-256 of the previous link and the entry's fields joined by `|`, its
    creation time in microseconds since the epoch."""
    created_us = (_utc(row.created_at) - EPOCH) // timedelta(microseconds=1)
    content = "|".join(
        (
            previous,
            row.id,
            row.transaction_id,
            row.account_id,
            row.asset_symbol,
            row.direction,
            str(row.amount),
            str(row.balance_after),
            str(created_us),
        )
    )
    return hashlib.sha256(content.encode()).hexdigest()


def _timestamp(moment: datetime) -> str:
    return _utc(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _link_v2(previous: str, row: Any) -> str:
    """Version 2, frozen as docs/LEDGER.md defines it: SHA-256 of one line of JSON (keys sorted,
    no white space, UTF-8) of the previous link, the entry and its transaction's header."""
    record = {
        "v": 2,
        "previous": previous,
        "entry": {
            "id": row.id,
            "account": row.account_id,
            "assetSymbol": row.asset_symbol,
            "direction": row.direction,
            "amount": row.amount,
            "balanceAfter": row.balance_after,
            "createdAt": _timestamp(row.created_at),
        },
        "transaction": {
            "id": row.t_id,
            "type": row.t_type,
            "userId": row.t_user_id,
            "toUserId": row.t_to_user_id,
            "assetSymbol": row.t_asset_symbol,
            "amount": row.t_amount,
            "holdId": row.t_hold_id,
            "refundOf": row.t_refund_of,
            "idempotencyKey": row.t_idempotency_key,
            "note": row.t_note,
            "metadata": None if row.t_metadata is None else dict(row.t_metadata),
            "createdBy": row.t_created_by,
            "createdAt": _timestamp(row.t_created_at),
        },
    }
    content = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()
