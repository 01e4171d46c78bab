"""Read-only checks that the stored ledger keeps its invariants; each returns the offending rows.
Sums are compared in SQL, exactly (integers; PostgreSQL's numeric sums), never as floats."""

from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.ledger import (
    EPOCH,
    GENESIS_LINK,
    AccountId,
    Action,
    Direction,
    Entry,
    Flow,
    Transaction,
    TransactionId,
    UserId,
    flow_accounts,
    refund_accounts,
)
from wallet.store.ledger import as_utc, to_transaction
from wallet.store.tables import balances, entries, holds, transactions

STREAM_ROWS = 2000  # rows fetched per round trip when streaming: memory stays flat
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


# Stand-ins for a transaction's user and receiver, to read the domain's account rules as SQL.
_USER, _RECEIVER = "\0user", "\0receiver"


def _account_rules(
    original: sa.FromClause,
) -> list[tuple[sa.ColumnElement[bool], AccountId, AccountId]]:
    """Per type (and, for a refund or reversal, per type of the original): the condition, and
    the accounts the domain says it debits and credits, with _USER and _RECEIVER standing in."""
    rules: list[tuple[sa.ColumnElement[bool], AccountId, AccountId]] = []
    for flow in (Flow.TOPUP, Flow.BONUS, Flow.SPEND, Flow.TRANSFER):
        debited, credited = flow_accounts(Action(flow.value), UserId(_USER), UserId(_RECEIVER))
        rules.append((transactions.c.type == flow.value, debited, credited))
    for refunded in (Flow.TOPUP, Flow.BONUS, Flow.SPEND):
        stand_in = Transaction(
            id=TransactionId(""),
            flow=refunded,
            user_id=UserId(_USER),
            asset_symbol="",
            amount=1,
            balance_after=0,
            idempotency_key="",
            note=None,
            metadata=None,
            created_at=EPOCH,
        )
        flow, debited, credited = refund_accounts(stand_in)
        condition = sa.and_(transactions.c.type == flow.value, original.c.type == refunded.value)
        rules.append((condition, debited, credited))
    return rules


def _account_expression(account: AccountId) -> sa.ColumnElement[Any]:
    if account == _USER:
        return transactions.c.user_id
    if account == _RECEIVER:
        return transactions.c.to_user_id
    return sa.literal(str(account))


async def broken_pairs(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Transactions without exactly one debit and one credit of their amount and asset, between
    the accounts their type moves money between (a refund's, by the type of its original), or
    whose `balance_after` is not their user's entry's."""
    debit = entries.alias("debit")
    credit = entries.alias("credit")
    original = transactions.alias("original")
    rules = _account_rules(original)
    expected_debit = sa.case(
        *((condition, _account_expression(d)) for condition, d, _ in rules), else_=None
    )
    expected_credit = sa.case(
        *((condition, _account_expression(c)) for condition, _, c in rules), else_=None
    )
    user_entry_balance = sa.case(
        *(
            (condition, debit.c.balance_after if d == _USER else credit.c.balance_after)
            for condition, d, _ in rules
        ),
        else_=None,
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
                )
                .outerjoin(
                    credit,
                    sa.and_(
                        credit.c.transaction_id == transactions.c.id, credit.c.direction == "credit"
                    ),
                )
                .outerjoin(original, original.c.id == transactions.c.refund_of)
            )
            .where(
                sa.or_(
                    debit.c.id.is_(None),
                    credit.c.id.is_(None),
                    debit.c.amount != transactions.c.amount,
                    credit.c.amount != transactions.c.amount,
                    debit.c.asset_symbol != transactions.c.asset_symbol,
                    credit.c.asset_symbol != transactions.c.asset_symbol,
                    debit.c.account_id.is_distinct_from(expected_debit),
                    credit.c.account_id.is_distinct_from(expected_credit),
                    user_entry_balance.is_distinct_from(transactions.c.balance_after),
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
) -> AsyncIterator[tuple[Entry, Transaction | None, str | None]]:
    """Every entry, chain by chain ((account, asset), oldest first), with its transaction (None
    when missing) and the newest link its balance row records (None when the row is missing);
    streamed, so memory stays flat."""
    result = await connection.stream(
        sa.select(
            transactions,
            *(column.label(f"entry_{column.name}") for column in entries.c),
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
        .execution_options(yield_per=STREAM_ROWS)
    )
    async for rows in result.partitions():
        for row in rows:
            transaction = None if row.id is None else to_transaction(row)
            yield _entry(row), transaction, row.head


def _entry(row: sa.Row[Any]) -> Entry:
    """The entry of a row whose entry columns are labelled `entry_<column>`."""
    return Entry(
        id=row.entry_id,
        transaction_id=TransactionId(row.entry_transaction_id),
        account_id=AccountId(row.entry_account_id),
        asset_symbol=row.entry_asset_symbol,
        direction=Direction(row.entry_direction),
        amount=row.entry_amount,
        balance_after=row.entry_balance_after,
        created_at=as_utc(row.entry_created_at),
        chain_hash=row.entry_chain_hash,
    )


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


async def miscounted_chains(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows whose `entry_count` is not the number of their chain's entries."""
    counted = (
        sa.select(entries.c.account_id, entries.c.asset_symbol, sa.func.count().label("entries"))
        .group_by(entries.c.account_id, entries.c.asset_symbol)
        .subquery()
    )
    total = sa.func.coalesce(counted.c.entries, 0).label("entries")
    return list(
        await connection.execute(
            sa.select(balances.c.account_id, balances.c.asset_symbol, balances.c.entry_count, total)
            .select_from(
                balances.outerjoin(
                    counted,
                    sa.and_(
                        counted.c.account_id == balances.c.account_id,
                        counted.c.asset_symbol == balances.c.asset_symbol,
                    ),
                )
            )
            .where(balances.c.entry_count != total)
        )
    )


def _held_sums() -> sa.Subquery:
    return (
        sa.select(holds.c.user_id, holds.c.asset_symbol, sa.func.sum(holds.c.amount).label("held"))
        .where(holds.c.status == "held")
        .group_by(holds.c.user_id, holds.c.asset_symbol)
        .subquery()
    )


async def held_off_holds(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows whose `held` is not the sum of their user's holds of the asset in status
    held (expired or not), and held holds of a user and asset without a balance row."""
    held = _held_sums()
    total = sa.func.coalesce(held.c.held, 0).label("holds")
    same_key = sa.and_(
        held.c.user_id == balances.c.account_id, held.c.asset_symbol == balances.c.asset_symbol
    )
    off = await connection.execute(
        sa.select(balances.c.account_id, balances.c.asset_symbol, balances.c.held, total)
        .select_from(balances.outerjoin(held, same_key))
        .where(balances.c.held != total)
    )
    homeless = await connection.execute(
        sa.select(
            held.c.user_id.label("account_id"),
            held.c.asset_symbol,
            sa.null().label("held"),
            held.c.held.label("holds"),
        ).where(~sa.exists().where(same_key))
    )
    return [*off, *homeless]


async def overcaptured_holds(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Holds captured for more than their amount."""
    return list(
        await connection.execute(
            sa.select(holds.c.id, holds.c.amount, holds.c.captured_amount).where(
                holds.c.captured_amount > holds.c.amount
            )
        )
    )


async def captures_without_their_spend(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Captured holds without exactly one transaction naming them, a spend of the captured
    amount by the hold's user in the hold's asset."""
    matching = sa.and_(
        transactions.c.type == "spend",
        transactions.c.amount == holds.c.captured_amount,
        transactions.c.user_id == holds.c.user_id,
        transactions.c.asset_symbol == holds.c.asset_symbol,
    )
    found = sa.func.count(transactions.c.id)
    matched = sa.func.coalesce(sa.func.sum(sa.case((matching, 1), else_=0)), 0)
    return list(
        await connection.execute(
            sa.select(holds.c.id, holds.c.captured_amount, found.label("transactions"))
            .select_from(holds.outerjoin(transactions, transactions.c.hold_id == holds.c.id))
            .where(holds.c.status == "captured")
            .group_by(holds.c.id, holds.c.captured_amount)
            .having(sa.or_(found != 1, matched != 1))
        )
    )


async def captures_of_holds_not_captured(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Transactions naming a hold that is not captured, or that does not exist."""
    return list(
        await connection.execute(
            sa.select(transactions.c.id, transactions.c.hold_id, holds.c.status)
            .select_from(transactions.outerjoin(holds, holds.c.id == transactions.c.hold_id))
            .where(
                transactions.c.hold_id.is_not(None),
                holds.c.status.is_distinct_from("captured"),
            )
        )
    )


async def refunds_off_originals(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Transactions refunded for more than their amount (by `refunded_amount` or by the sum of
    their refunds and reversals), or whose `refunded_amount` is not that sum."""
    refund = transactions.alias("refund")
    refunds = (
        sa.select(refund.c.refund_of, sa.func.sum(refund.c.amount).label("refunds"))
        .where(refund.c.refund_of.is_not(None))
        .group_by(refund.c.refund_of)
        .subquery()
    )
    total = sa.func.coalesce(refunds.c.refunds, 0)
    return list(
        await connection.execute(
            sa.select(
                transactions.c.id,
                transactions.c.amount,
                transactions.c.refunded_amount,
                total.label("refunds"),
            )
            .select_from(transactions.outerjoin(refunds, refunds.c.refund_of == transactions.c.id))
            .where(
                sa.or_(
                    transactions.c.refunded_amount > transactions.c.amount,
                    transactions.c.refunded_amount != total,
                    total > transactions.c.amount,
                )
            )
        )
    )


async def chain_heads(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """The newest link and length of every chain with entries, by account, then asset."""
    return list(
        await connection.execute(
            sa.select(
                balances.c.account_id,
                balances.c.asset_symbol,
                balances.c.chain_hash,
                balances.c.entry_count,
            )
            .where(balances.c.entry_count > 0)
            .order_by(balances.c.account_id, balances.c.asset_symbol)
        )
    )
