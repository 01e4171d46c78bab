"""Read-only checks that the stored ledger keeps its invariants; each returns the offending rows."""

from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.ledger import GENESIS_LINK, Entry
from wallet.store.queries import to_entry
from wallet.store.tables import balances, entries, transactions

signed_amount = sa.case(
    (entries.c.direction == "credit", entries.c.amount), else_=-entries.c.amount
)


async def nonzero_asset_sums(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Assets whose balances, system accounts included, do not sum to zero."""
    total = sa.func.sum(balances.c.balance)
    return list(
        await connection.execute(
            sa.select(balances.c.asset_symbol, total.label("total"))
            .group_by(balances.c.asset_symbol)
            .having(total != 0)
        )
    )


async def balances_off_ledger(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balances that differ from the sum of their account's entries."""
    replayed = (
        sa.select(
            entries.c.account_id,
            entries.c.asset_symbol,
            sa.func.sum(signed_amount).label("replayed"),
        )
        .group_by(entries.c.account_id, entries.c.asset_symbol)
        .subquery()
    )
    replayed_total = sa.func.coalesce(replayed.c.replayed, 0).label("replayed")
    return list(
        await connection.execute(
            sa.select(
                balances.c.account_id, balances.c.asset_symbol, balances.c.balance, replayed_total
            )
            .select_from(
                balances.outerjoin(
                    replayed,
                    sa.and_(
                        replayed.c.account_id == balances.c.account_id,
                        replayed.c.asset_symbol == balances.c.asset_symbol,
                    ),
                )
            )
            .where(balances.c.balance != replayed_total)
        )
    )


async def entries_without_balance(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Accounts with entries but no balance row."""
    return list(
        await connection.execute(
            sa.select(entries.c.account_id, entries.c.asset_symbol)
            .where(
                ~sa.exists().where(
                    balances.c.account_id == entries.c.account_id,
                    balances.c.asset_symbol == entries.c.asset_symbol,
                )
            )
            .distinct()
        )
    )


async def broken_pairs(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Transactions without exactly one debit and one credit of their amount and asset, or whose
    `balance_after` is not the user's entry's."""
    debit = entries.alias("debit")
    credit = entries.alias("credit")
    user_entry_balance = sa.case(
        (transactions.c.type == "spend", debit.c.balance_after), else_=credit.c.balance_after
    )
    user_entry_account = sa.case(
        (transactions.c.type == "spend", debit.c.account_id), else_=credit.c.account_id
    )
    return list(
        await connection.execute(
            sa.select(transactions.c.id)
            .select_from(
                transactions.outerjoin(
                    debit,
                    sa.and_(
                        debit.c.transaction_id == transactions.c.id, debit.c.direction == "debit"
                    ),
                ).outerjoin(
                    credit,
                    sa.and_(
                        credit.c.transaction_id == transactions.c.id, credit.c.direction == "credit"
                    ),
                )
            )
            .where(
                sa.or_(
                    debit.c.id.is_(None),
                    credit.c.id.is_(None),
                    debit.c.amount != transactions.c.amount,
                    credit.c.amount != transactions.c.amount,
                    debit.c.asset_symbol != transactions.c.asset_symbol,
                    credit.c.asset_symbol != transactions.c.asset_symbol,
                    user_entry_account != transactions.c.user_id,
                    user_entry_balance != transactions.c.balance_after,
                )
            )
        )
    )


async def broken_chains(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Entries whose `balance_after` is not the previous entry's (of the same account and asset,
    in order of application) plus this entry's signed amount."""
    chain = sa.select(
        entries.c.id,
        entries.c.account_id,
        entries.c.asset_symbol,
        entries.c.balance_after,
        signed_amount.label("delta"),
        sa.func.lag(entries.c.balance_after, 1, 0)
        .over(partition_by=(entries.c.account_id, entries.c.asset_symbol), order_by=entries.c.seq)
        .label("previous"),
    ).subquery()
    return list(
        await connection.execute(
            sa.select(chain.c.id, chain.c.account_id, chain.c.asset_symbol).where(
                chain.c.previous + chain.c.delta != chain.c.balance_after
            )
        )
    )


async def entries_by_chain(
    connection: AsyncConnection,
) -> AsyncIterator[tuple[Entry, str | None]]:
    """Every entry, chain by chain ((account, asset), oldest first), with the newest link its
    balance row records (None when the row is missing); streamed, so memory stays flat."""
    result = await connection.stream(
        sa.select(entries, balances.c.chain_hash.label("head"))
        .select_from(
            entries.outerjoin(
                balances,
                sa.and_(
                    balances.c.account_id == entries.c.account_id,
                    balances.c.asset_symbol == entries.c.asset_symbol,
                ),
            )
        )
        .order_by(entries.c.account_id, entries.c.asset_symbol, entries.c.seq)
    )
    async for row in result:
        yield to_entry(row), row.head


async def linked_balances_without_entries(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows that record a newest link although their chain has no entry."""
    return list(
        await connection.execute(
            sa.select(balances.c.account_id, balances.c.asset_symbol).where(
                balances.c.chain_hash != GENESIS_LINK,
                ~sa.exists().where(
                    entries.c.account_id == balances.c.account_id,
                    entries.c.asset_symbol == balances.c.asset_symbol,
                ),
            )
        )
    )
