"""Read-only checks that the stored ledger keeps its invariants; each returns the offending rows.
Sums are exact integers, never floats: compared in SQL, or, where they may pass 64 bits (SQLite's
sum() fails there), taken as two sums and added in Python."""

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.ledger import (
    EPOCH,
    GENESIS_LINK,
    SYSTEM_PREFIX,
    AccountId,
    Action,
    Direction,
    Entry,
    Flow,
    Kind,
    Transaction,
    TransactionId,
    UserId,
    expiry_account,
    flow_accounts,
    refund_accounts,
)
from wallet.store.ledger import as_utc, to_transaction
from wallet.store.queries import exact_sum, joined
from wallet.store.tables import balances, entries, holds, lot_moves, lots, transactions

STREAM_ROWS = 2000  # rows fetched per round trip when streaming: memory stays flat
signed_amount = sa.case(
    (entries.c.direction == "credit", entries.c.amount), else_=-entries.c.amount
)
signed_paid_amount = sa.case((entries.c.kind == Kind.PAID.value, signed_amount), else_=0)
# The one kind a top-up or a bonus gives.
ISSUED_KIND = {Flow.TOPUP: Kind.PAID, Flow.BONUS: Kind.FREE}


async def plan_for_whole_tables(connection: AsyncConnection) -> None:
    """The checks read whole tables, which hash joins suit at any size. Right after a burst of
    writes, before autovacuum has analyzed them, PostgreSQL may expect one row and nest loops
    instead: quadratic (the pair check took 14.5 s instead of 0.05 s on 19k transactions)."""
    if connection.dialect.name == "postgresql":
        await connection.execute(sa.text("SET LOCAL enable_nestloop = off"))


def _is_user(account: sa.ColumnElement[str]) -> sa.ColumnElement[bool]:
    return sa.func.substr(account, 1, len(SYSTEM_PREFIX)) != SYSTEM_PREFIX


class AssetSum(NamedTuple):
    asset_symbol: str
    total: int
    paid: int
    free: int


async def asset_sums(connection: AsyncConnection) -> list[AssetSum]:
    """Per asset, the sums of all balances, system accounts included, and of their paid and
    free parts; exact, since users' balances may add up past 64 bits."""
    rows = await connection.execute(
        sa.select(
            balances.c.asset_symbol,
            *exact_sum(balances.c.balance),
            *exact_sum(balances.c.paid),
        ).group_by(balances.c.asset_symbol)
    )
    sums = []
    for asset, total_high, total_low, paid_high, paid_low in rows:
        total, paid = joined(total_high, total_low), joined(paid_high, paid_low)
        sums.append(AssetSum(asset, total, paid, total - paid))
    return sums


async def user_parts_out_of_range(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """User balances whose paid part is below zero or above the balance (so the free part is)."""
    return list(
        await connection.execute(
            sa.select(
                balances.c.account_id, balances.c.asset_symbol, balances.c.balance, balances.c.paid
            ).where(
                _is_user(balances.c.account_id),
                sa.or_(balances.c.paid < 0, balances.c.paid > balances.c.balance),
            )
        )
    )


def _chain_key(table: sa.FromClause) -> list[sa.ColumnElement[Any]]:
    """The columns that name a chain, a balance row: (account, asset, shard)."""
    return [table.c.account_id, table.c.asset_symbol, table.c.shard]


def _same_chain(table: sa.FromClause, other: sa.FromClause) -> sa.ColumnElement[bool]:
    return sa.and_(*(a == b for a, b in zip(_chain_key(table), _chain_key(other), strict=True)))


async def balances_off_ledger(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows that differ from the sum of their chain's entries (per row, so the sum
    stays within 64 bits, as the row's balance does)."""
    replayed = (
        sa.select(*_chain_key(entries), sa.func.sum(signed_amount).label("replayed"))
        .group_by(*_chain_key(entries))
        .subquery()
    )
    replayed_total = sa.func.coalesce(replayed.c.replayed, 0).label("replayed")
    return list(
        await connection.execute(
            sa.select(*_chain_key(balances), balances.c.balance, replayed_total)
            .select_from(balances.outerjoin(replayed, _same_chain(replayed, balances)))
            .where(balances.c.balance != replayed_total)
        )
    )


async def entries_without_balance(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Chains with entries but no balance row."""
    return list(
        await connection.execute(
            sa.select(*_chain_key(entries))
            .where(~sa.exists().where(_same_chain(balances, entries)))
            .distinct()
        )
    )


# Stand-ins for a transaction's user and receiver, to read the domain's account rules as SQL.
_USER, _RECEIVER = "\0user", "\0receiver"
Rule = tuple[sa.ColumnElement[bool], AccountId, AccountId]


def _account_rules(original: sa.FromClause, kind: Kind) -> list[Rule]:
    """Per type (for a refund or reversal, per type of the original): the condition, and the
    accounts the domain says it debits and credits credits of `kind` between, with _USER and
    _RECEIVER standing in. A type that never moves `kind` has no rule for it. A reversal has one
    for both kinds: the service's take back the kind their original gave, but one stored before
    version 1.3 may have taken back the other kind too (docs/LEDGER.md, migration 0006)."""
    rules: list[Rule] = []
    for flow in (Flow.TOPUP, Flow.BONUS, Flow.SPEND, Flow.TRANSFER):
        if ISSUED_KIND.get(flow, kind) is kind:
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
            paid_amount=0,
        )
        flow, debited, credited = refund_accounts(stand_in)
        condition = sa.and_(transactions.c.type == flow.value, original.c.type == refunded.value)
        rules.append((condition, debited, credited))
    rules.append((transactions.c.type == Flow.EXPIRY.value, AccountId(_USER), expiry_account(kind)))
    return rules


def _account_expression(account: AccountId) -> sa.ColumnElement[Any]:
    if account == _USER:
        return transactions.c.user_id
    if account == _RECEIVER:
        return transactions.c.to_user_id
    return sa.literal(str(account))


def _is_broken_pair(
    original: sa.FromClause, kind: Kind, debit: sa.FromClause, credit: sa.FromClause
) -> sa.ColumnElement[bool]:
    """Whether a transaction's debit and credit entries of `kind` (either may be missing) are
    not a pair of one amount in its asset between the accounts its type moves that kind
    between, when it has either."""
    rules = _account_rules(original, kind)
    debited = sa.case(*((condition, _account_expression(d)) for condition, d, _ in rules))
    credited = sa.case(*((condition, _account_expression(c)) for condition, _, c in rules))
    return sa.or_(
        sa.and_(debit.c.id.is_(None), credit.c.id.is_not(None)),
        sa.and_(
            debit.c.id.is_not(None),
            sa.or_(
                credit.c.id.is_(None),
                debit.c.amount != credit.c.amount,
                debit.c.asset_symbol != transactions.c.asset_symbol,
                credit.c.asset_symbol != transactions.c.asset_symbol,
                debit.c.account_id.is_distinct_from(debited),
                credit.c.account_id.is_distinct_from(credited),
            ),
        ),
    )


async def broken_pairs(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Transactions that do not move, of each kind they move, one debit and one credit entry of
    one amount in their asset, between the accounts their type moves that kind between (a
    refund's or reversal's by the type of its original); whose amount is not the sum over the
    kinds, or whose `paid_amount` not the paid kind's; or whose `balance_after` is not that of
    their user's entry that comes last in the user's chain. One pass: each kind's debit and
    credit are joined by the unique (transaction, kind, direction)."""
    original = transactions.alias("original")
    joined: sa.FromClause = transactions.outerjoin(
        original, original.c.id == transactions.c.refund_of
    )
    broken: list[sa.ColumnElement[bool]] = []
    moved: dict[Kind, sa.ColumnElement[Any]] = {}
    users: dict[Kind, tuple[sa.ColumnElement[Any], sa.ColumnElement[Any]]] = {}
    for kind in Kind:
        debit, credit = entries.alias(f"{kind.value}_debit"), entries.alias(f"{kind.value}_credit")
        for side, direction in ((debit, Direction.DEBIT), (credit, Direction.CREDIT)):
            joined = joined.outerjoin(
                side,
                sa.and_(
                    side.c.transaction_id == transactions.c.id,
                    side.c.kind == kind.value,
                    side.c.direction == direction.value,
                ),
            )
        broken.append(_is_broken_pair(original, kind, debit, credit))
        moved[kind] = sa.func.coalesce(debit.c.amount, 0)
        # The user's entry of this kind (its account is checked above), null without one.
        is_debit_users = debit.c.account_id == transactions.c.user_id
        is_credit_users = credit.c.account_id == transactions.c.user_id
        users[kind] = (
            sa.case((is_debit_users, debit.c.seq), (is_credit_users, credit.c.seq)),
            sa.case(
                (is_debit_users, debit.c.balance_after),
                (is_credit_users, credit.c.balance_after),
            ),
        )
    (paid_seq, paid_balance), (free_seq, free_balance) = users[Kind.PAID], users[Kind.FREE]
    last_balance = sa.case(
        (free_seq.is_(None), paid_balance),
        (paid_seq.is_(None), free_balance),
        (paid_seq > free_seq, paid_balance),
        else_=free_balance,
    )
    return list(
        await connection.execute(
            sa.select(transactions.c.id)
            .select_from(joined)
            .where(
                sa.or_(
                    *broken,
                    transactions.c.amount != moved[Kind.PAID] + moved[Kind.FREE],
                    transactions.c.paid_amount != moved[Kind.PAID],
                    last_balance.is_distinct_from(transactions.c.balance_after),
                )
            )
            .distinct()
        )
    )


async def broken_chains(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Entries whose `balance_after` is not the previous entry's (of the same chain: account,
    asset and shard, in order of application) plus this entry's signed amount, or whose
    `paid_after` is not the previous one's plus its signed amount if it is of paid credits (both
    from 0)."""

    def in_chain(column: sa.ColumnElement[int]) -> sa.ColumnElement[int]:
        return sa.func.lag(column, 1, 0).over(
            partition_by=_chain_key(entries), order_by=entries.c.seq
        )

    chain = sa.select(
        entries.c.id,
        *_chain_key(entries),
        entries.c.balance_after,
        entries.c.paid_after,
        signed_amount.label("delta"),
        signed_paid_amount.label("paid_delta"),
        in_chain(entries.c.balance_after).label("previous"),
        in_chain(entries.c.paid_after).label("previous_paid"),
    ).subquery()
    balance_off = chain.c.previous + chain.c.delta != chain.c.balance_after
    paid_off = chain.c.previous_paid + chain.c.paid_delta != chain.c.paid_after
    return list(
        await connection.execute(
            sa.select(
                chain.c.id,
                *_chain_key(chain),
                balance_off.label("is_balance_off"),
                paid_off.label("is_paid_off"),
            ).where(sa.or_(balance_off, paid_off))
        )
    )


async def paid_off_chain_heads(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows whose `paid` is not their chain's newest entry's `paid_after` (0 without
    entries); one index look-up per balance row."""
    newest = sa.func.coalesce(
        sa.select(entries.c.paid_after)
        .where(_same_chain(entries, balances))
        .order_by(entries.c.seq.desc())
        .limit(1)
        .scalar_subquery(),
        0,
    )
    return list(
        await connection.execute(
            sa.select(
                *_chain_key(balances),
                balances.c.paid,
                newest.label("paid_after"),
            ).where(balances.c.paid != newest)
        )
    )


async def entries_by_chain(
    connection: AsyncConnection,
) -> AsyncIterator[tuple[Entry, int, Transaction | None, str | None]]:
    """Every entry, chain by chain ((account, asset, shard), oldest first), with its shard, its
    transaction (None when missing) and the newest link its balance row records (None when the
    row is missing); streamed, so memory stays flat."""
    result = await connection.stream(
        sa.select(
            transactions,
            *(column.label(f"entry_{column.name}") for column in entries.c),
            balances.c.chain_hash.label("head"),
        )
        .select_from(
            entries.outerjoin(
                transactions, transactions.c.id == entries.c.transaction_id
            ).outerjoin(balances, _same_chain(balances, entries))
        )
        .order_by(*_chain_key(entries), entries.c.seq)
        .execution_options(yield_per=STREAM_ROWS)
    )
    async for rows in result.partitions():
        for row in rows:
            transaction = None if row.id is None else to_transaction(row)
            yield _entry(row), row.entry_shard, transaction, row.head


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
        kind=Kind(row.entry_kind),
        paid_after=row.entry_paid_after,
        chain_hash=row.entry_chain_hash,
    )


async def linked_balances_without_entries(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows that record a newest link although their chain has no entry."""
    return list(
        await connection.execute(
            sa.select(*_chain_key(balances)).where(
                balances.c.chain_hash != GENESIS_LINK,
                ~sa.exists().where(_same_chain(entries, balances)),
            )
        )
    )


async def miscounted_chains(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows whose `entry_count` is not the number of their chain's entries."""
    counted = (
        sa.select(*_chain_key(entries), sa.func.count().label("entries"))
        .group_by(*_chain_key(entries))
        .subquery()
    )
    total = sa.func.coalesce(counted.c.entries, 0).label("entries")
    return list(
        await connection.execute(
            sa.select(*_chain_key(balances), balances.c.entry_count, total)
            .select_from(balances.outerjoin(counted, _same_chain(counted, balances)))
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


async def holds_paid_out_of_range(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Holds that reserve less than none, or more than their amount, of paid credits."""
    return list(
        await connection.execute(
            sa.select(holds.c.id, holds.c.amount, holds.c.paid_amount).where(
                sa.or_(holds.c.paid_amount < 0, holds.c.paid_amount > holds.c.amount)
            )
        )
    )


async def overreserved_parts(connection: AsyncConnection, *, now: datetime) -> list[sa.Row[Any]]:
    """User balances whose holds active at `now` reserve more of a kind than the balance's part
    of that kind (the credits a hold reserved are kept from every other move while it lasts).
    `now` must be no earlier than the read's snapshot: a hold active then was active in it."""
    reserved = (
        sa.select(
            holds.c.user_id,
            holds.c.asset_symbol,
            sa.func.sum(holds.c.paid_amount).label("paid"),
            sa.func.sum(holds.c.amount - holds.c.paid_amount).label("free"),
        )
        .where(holds.c.status == "held", holds.c.expires_at > now)
        .group_by(holds.c.user_id, holds.c.asset_symbol)
        .subquery()
    )
    free_part = balances.c.balance - balances.c.paid
    return list(
        await connection.execute(
            sa.select(
                balances.c.account_id,
                balances.c.asset_symbol,
                balances.c.paid,
                free_part.label("free"),
                reserved.c.paid.label("reserved_paid"),
                reserved.c.free.label("reserved_free"),
            )
            .select_from(
                balances.join(
                    reserved,
                    sa.and_(
                        reserved.c.user_id == balances.c.account_id,
                        reserved.c.asset_symbol == balances.c.asset_symbol,
                    ),
                )
            )
            .where(sa.or_(reserved.c.paid > balances.c.paid, reserved.c.free > free_part))
        )
    )


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
    amount by the hold's user in the hold's asset, of no more of each kind than it reserved."""
    matching = sa.and_(
        transactions.c.type == "spend",
        transactions.c.amount == holds.c.captured_amount,
        transactions.c.user_id == holds.c.user_id,
        transactions.c.asset_symbol == holds.c.asset_symbol,
        transactions.c.paid_amount <= holds.c.paid_amount,
        transactions.c.amount - transactions.c.paid_amount <= holds.c.amount - holds.c.paid_amount,
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
    their refunds and reversals), or whose `refunded_amount` is not that sum, or (spends) whose
    refunds did not give back paid credits first: their paid amounts sum to the original's paid
    amount, or to all they gave back if less. (A reversal stored before version 1.3 may have
    taken back more of the other kind than the service's do, so reversals are not held to it.)"""
    refund = transactions.alias("refund")
    refunds = (
        sa.select(
            refund.c.refund_of,
            sa.func.sum(refund.c.amount).label("refunds"),
            sa.func.sum(refund.c.paid_amount).label("refunds_paid"),
        )
        .where(refund.c.refund_of.is_not(None))
        .group_by(refund.c.refund_of)
        .subquery()
    )
    total = sa.func.coalesce(refunds.c.refunds, 0)
    total_paid = sa.func.coalesce(refunds.c.refunds_paid, 0)
    paid_first = sa.case(
        (transactions.c.paid_amount < total, transactions.c.paid_amount), else_=total
    )
    return list(
        await connection.execute(
            sa.select(
                transactions.c.id,
                transactions.c.amount,
                transactions.c.paid_amount,
                transactions.c.refunded_amount,
                total.label("refunds"),
                total_paid.label("refunds_paid"),
            )
            .select_from(transactions.outerjoin(refunds, refunds.c.refund_of == transactions.c.id))
            .where(
                sa.or_(
                    transactions.c.refunded_amount > transactions.c.amount,
                    transactions.c.refunded_amount != total,
                    total > transactions.c.amount,
                    sa.and_(transactions.c.type == Flow.SPEND.value, total_paid != paid_first),
                )
            )
        )
    )


async def lots_below_zero(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Lots that hold less than nothing."""
    return list(await connection.execute(sa.select(lots).where(lots.c.remaining < 0)))


async def lots_off_balances(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balance rows whose `expiring` is not the sum of their lots, or (a user's) is more than
    the balance; and lots of a user and asset without a balance row (`balance` null)."""
    summed = (
        sa.select(
            lots.c.account_id, lots.c.asset_symbol, sa.func.sum(lots.c.remaining).label("lots")
        )
        .group_by(lots.c.account_id, lots.c.asset_symbol)
        .subquery()
    )
    total = sa.func.coalesce(summed.c.lots, 0)
    same_key = sa.and_(
        summed.c.account_id == balances.c.account_id,
        summed.c.asset_symbol == balances.c.asset_symbol,
    )
    off = await connection.execute(
        sa.select(
            balances.c.account_id,
            balances.c.asset_symbol,
            balances.c.balance,
            balances.c.expiring,
            total.label("lots"),
        )
        .select_from(balances.outerjoin(summed, same_key))
        .where(
            sa.or_(
                balances.c.expiring != total,
                sa.and_(_is_user(balances.c.account_id), balances.c.expiring > balances.c.balance),
            )
        )
    )
    homeless = await connection.execute(
        sa.select(
            summed.c.account_id,
            summed.c.asset_symbol,
            sa.null().label("balance"),
            sa.null().label("expiring"),
            summed.c.lots,
        ).where(~sa.exists().where(same_key))
    )
    return [*off, *homeless]


async def lots_above_their_part(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Balances whose lots of a kind hold more than the balance's part of that kind."""
    summed = (
        sa.select(
            lots.c.account_id,
            lots.c.asset_symbol,
            lots.c.kind,
            sa.func.sum(lots.c.remaining).label("lots"),
        )
        .group_by(lots.c.account_id, lots.c.asset_symbol, lots.c.kind)
        .subquery()
    )
    part = sa.case(
        (summed.c.kind == Kind.PAID.value, balances.c.paid),
        else_=balances.c.balance - balances.c.paid,
    )
    return list(
        await connection.execute(
            sa.select(
                summed.c.account_id,
                summed.c.asset_symbol,
                summed.c.kind,
                summed.c.lots,
                part.label("part"),
            )
            .select_from(
                summed.join(
                    balances,
                    sa.and_(
                        balances.c.account_id == summed.c.account_id,
                        balances.c.asset_symbol == summed.c.asset_symbol,
                    ),
                )
            )
            .where(summed.c.lots > part)
        )
    )


def _lot_key(table: sa.FromClause, other: sa.FromClause) -> sa.ColumnElement[bool]:
    return sa.and_(
        *(
            table.c[name] == other.c[name]
            for name in ("account_id", "asset_symbol", "kind", "expires_at")
        )
    )


async def lots_off_their_moves(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Lots whose `remaining` is not the sum of what transactions gave to and took from them,
    and moves of a lot that does not exist (`remaining` null)."""
    moved = (
        sa.select(
            lot_moves.c.account_id,
            lot_moves.c.asset_symbol,
            lot_moves.c.kind,
            lot_moves.c.expires_at,
            sa.func.sum(lot_moves.c.amount).label("moved"),
        )
        .group_by(
            lot_moves.c.account_id,
            lot_moves.c.asset_symbol,
            lot_moves.c.kind,
            lot_moves.c.expires_at,
        )
        .subquery()
    )
    total = sa.func.coalesce(moved.c.moved, 0)
    off = await connection.execute(
        sa.select(
            lots.c.account_id,
            lots.c.asset_symbol,
            lots.c.kind,
            lots.c.expires_at,
            lots.c.remaining,
            total.label("moved"),
        )
        .select_from(lots.outerjoin(moved, _lot_key(moved, lots)))
        .where(lots.c.remaining != total)
    )
    homeless = await connection.execute(
        sa.select(
            moved.c.account_id,
            moved.c.asset_symbol,
            moved.c.kind,
            moved.c.expires_at,
            sa.null().label("remaining"),
            moved.c.moved,
        ).where(~sa.exists().where(_lot_key(moved, lots)))
    )
    return [*off, *homeless]


async def expiries_off_lots(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """Expiry transactions that do not match the lots they ended: each of their lot moves takes
    from a lot of their user that expired at or before them, and per kind the moves take what
    they moved of that kind. `strays` counts the moves that break the first rule."""
    taken_of = {
        kind: sa.func.coalesce(
            sa.func.sum(sa.case((lot_moves.c.kind == kind.value, -lot_moves.c.amount), else_=0)),
            0,
        )
        for kind in Kind
    }
    stray = sa.or_(
        lot_moves.c.account_id != transactions.c.user_id,
        lot_moves.c.amount >= 0,
        lot_moves.c.expires_at > transactions.c.created_at,
    )
    strays = sa.func.coalesce(sa.func.sum(sa.case((stray, 1), else_=0)), 0)
    return list(
        await connection.execute(
            sa.select(
                transactions.c.id,
                transactions.c.amount,
                transactions.c.paid_amount,
                taken_of[Kind.PAID].label("paid_taken"),
                taken_of[Kind.FREE].label("free_taken"),
                strays.label("strays"),
            )
            .select_from(
                transactions.outerjoin(lot_moves, lot_moves.c.transaction_id == transactions.c.id)
            )
            .where(transactions.c.type == Flow.EXPIRY.value)
            .group_by(transactions.c.id, transactions.c.amount, transactions.c.paid_amount)
            .having(
                sa.or_(
                    strays != 0,
                    taken_of[Kind.PAID] != transactions.c.paid_amount,
                    taken_of[Kind.FREE] != transactions.c.amount - transactions.c.paid_amount,
                )
            )
        )
    )


async def chain_heads(connection: AsyncConnection) -> list[sa.Row[Any]]:
    """The newest link and length of every chain with entries, by account, asset, then shard."""
    return list(
        await connection.execute(
            sa.select(*_chain_key(balances), balances.c.chain_hash, balances.c.entry_count)
            .where(balances.c.entry_count > 0)
            .order_by(*_chain_key(balances))
        )
    )
