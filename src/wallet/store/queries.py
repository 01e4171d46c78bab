"""Every read the API serves. Lists are newest first by `seq`, the order of application, and
page by keyset (`seq` below the cursor) so deep pages cost what the first page costs."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.access import ApiKey, Scope
from wallet.domain.ledger import (
    AccountId,
    Asset,
    Direction,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Kind,
    Standing,
    SystemAccount,
    Transaction,
    TransactionId,
    User,
    UserId,
    standing,
)
from wallet.store.ledger import as_utc, insert_on_conflict, to_asset, to_hold, to_transaction
from wallet.store.tables import (
    RETURNS,
    accounts,
    api_keys,
    assets,
    balances,
    entries,
    holds,
    lots,
    transactions,
)

T = TypeVar("T")


async def list_assets(connection: AsyncConnection) -> list[Asset]:
    rows = await connection.execute(sa.select(assets).order_by(assets.c.symbol))
    return [to_asset(row) for row in rows]


async def update_asset(
    connection: AsyncConnection, *, symbol: str, changes: Mapping[str, Any]
) -> Asset | None:
    """Set the fields in `changes` (named as Asset's, which are its columns) of an asset, in one
    statement, so a change of other fields made meanwhile stays; returns the asset as it is
    now, or None if there is none."""
    statement: sa.Executable = sa.select(assets).where(assets.c.symbol == symbol)
    if changes:
        row_values = _asset_row(replace(Asset(symbol, "", ""), **changes))
        statement = (
            sa.update(assets)
            .where(assets.c.symbol == symbol)
            .values({name: row_values[name] for name in changes})
            .returning(assets)
        )
    row = (await connection.execute(statement)).first()
    return None if row is None else to_asset(row)


def _asset_row(asset: Asset) -> dict[str, Any]:
    return {
        "symbol": asset.symbol,
        "name": asset.name,
        "description": asset.description,
        "spend_order": asset.spend_order.value,
        "free_lifetime_days": asset.free_lifetime_days,
        "paid_lifetime_days": asset.paid_lifetime_days,
    }


async def asset_exists(connection: AsyncConnection, symbol: str) -> bool:
    row = await connection.execute(sa.select(assets.c.symbol).where(assets.c.symbol == symbol))
    return row.first() is not None


async def find_user(connection: AsyncConnection, user_id: str) -> User | None:
    row = (
        await connection.execute(
            sa.select(accounts).where(accounts.c.id == user_id, ~accounts.c.is_system)
        )
    ).first()
    return _to_user(row) if row else None


async def insert_user(
    connection: AsyncConnection, *, user_id: str, email: str, name: str, created_at: datetime
) -> User | None:
    """Insert the user, or return None when the id is taken."""
    row = (
        await connection.execute(
            insert_on_conflict(connection, accounts)
            .values(id=user_id, is_system=False, email=email, name=name, created_at=created_at)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(accounts)
        )
    ).first()
    return _to_user(row) if row else None


async def insert_system_accounts(
    connection: AsyncConnection, names: Mapping[str, str], *, created_at: datetime
) -> None:
    await connection.execute(
        insert_on_conflict(connection, accounts)
        .values(
            [
                {"id": i, "is_system": True, "name": n, "created_at": created_at}
                for i, n in names.items()
            ]
        )
        .on_conflict_do_nothing(index_elements=["id"])
    )


async def insert_assets(connection: AsyncConnection, new_assets: Sequence[Asset]) -> set[str]:
    """Insert the assets whose symbols are free; returns the symbols it inserted."""
    inserted = await connection.scalars(
        insert_on_conflict(connection, assets)
        .values([_asset_row(asset) for asset in new_assets])
        .on_conflict_do_nothing(index_elements=["symbol"])
        .returning(assets.c.symbol)
    )
    return set(inserted)


async def list_users(
    connection: AsyncConnection, *, limit: int, before: int | None, offset: int | None
) -> tuple[list[User], int | None]:
    query = sa.select(accounts).where(~accounts.c.is_system)
    return await _page(connection, query, accounts.c.seq, _to_user, limit, before, offset)


async def standings(
    connection: AsyncConnection, *, user_id: str, now: datetime, only: str | None = None
) -> list[Standing]:
    """Every asset (or `only` that one) with the user's balance of it, its paid part, what their
    holds that count at `now` reserve, their lots; zeros where the user never held it."""
    query = (
        sa.select(
            assets.c.symbol,
            sa.func.coalesce(balances.c.balance, 0),
            sa.func.coalesce(balances.c.paid, 0),
        )
        .select_from(
            assets.outerjoin(
                balances,
                sa.and_(
                    balances.c.asset_symbol == assets.c.symbol, balances.c.account_id == user_id
                ),
            )
        )
        .order_by(assets.c.symbol)
    )
    held_query = (
        sa.select(
            holds.c.asset_symbol, sa.func.sum(holds.c.amount), sa.func.sum(holds.c.paid_amount)
        )
        .where(
            holds.c.user_id == user_id,
            holds.c.status == HoldStatus.HELD.value,
            holds.c.expires_at > now,
        )
        .group_by(holds.c.asset_symbol)
    )
    lots_query = sa.select(lots).where(lots.c.account_id == user_id, lots.c.remaining > 0)
    if only is not None:
        query = query.where(assets.c.symbol == only)
        held_query = held_query.where(holds.c.asset_symbol == only)
        lots_query = lots_query.where(lots.c.asset_symbol == only)
    held = {
        symbol: {Kind.PAID: int(paid), Kind.FREE: int(total) - int(paid)}
        for symbol, total, paid in await connection.execute(held_query)
    }
    found_lots: dict[str, list[tuple[Kind, datetime, int]]] = {}
    for row in await connection.execute(lots_query):
        found_lots.setdefault(row.asset_symbol, []).append(
            (Kind(row.kind), as_utc(row.expires_at), row.remaining)
        )
    return [
        standing(symbol, balance, paid, held.get(symbol, {}), found_lots.get(symbol, []), now)
        for symbol, balance, paid in await connection.execute(query)
    ]


async def balances_at(
    connection: AsyncConnection, *, user_id: str, at: datetime, only: str | None = None
) -> list[tuple[str, int, int]]:
    """Every asset (or `only` that one) with the user's balance and its paid part right after
    their last entry at or before `at`: one index look-up per asset, never a sum over history."""

    def newest(column: sa.ColumnElement[int]) -> sa.ScalarSelect[int]:
        return (
            sa.select(column)
            .where(
                entries.c.account_id == user_id,
                entries.c.asset_symbol == assets.c.symbol,
                entries.c.shard == 0,  # a user's one balance row
                entries.c.created_at <= at,
            )
            .order_by(entries.c.created_at.desc(), entries.c.seq.desc())
            .limit(1)
            .scalar_subquery()
        )

    query = sa.select(
        assets.c.symbol,
        sa.func.coalesce(newest(entries.c.balance_after), 0),
        sa.func.coalesce(newest(entries.c.paid_after), 0),
    ).order_by(assets.c.symbol)
    if only is not None:
        query = query.where(assets.c.symbol == only)
    return [(symbol, balance, paid) for symbol, balance, paid in await connection.execute(query)]


async def system_parts_at(
    connection: AsyncConnection, *, asset_symbol: str, at: datetime
) -> dict[SystemAccount, tuple[int, int]]:
    """Each system account's balance of the asset and its paid part at `at`: the sum over its
    balance rows (shards) of each row's values right after its last entry at or before `at`, in
    one statement that finds each row's entry by one index look-up. The sums, which may pass 64
    bits, are taken in Python."""
    newest = entries.alias("newest")
    newest_seq = (
        sa.select(entries.c.seq)
        .where(
            entries.c.account_id == balances.c.account_id,
            entries.c.asset_symbol == balances.c.asset_symbol,
            entries.c.shard == balances.c.shard,
            entries.c.created_at <= at,
        )
        .order_by(entries.c.created_at.desc(), entries.c.seq.desc())
        .limit(1)
        .scalar_subquery()
    )
    # A row without an entry by `at` joins none, and counts 0.
    rows = await connection.execute(
        sa.select(balances.c.account_id, newest.c.balance_after, newest.c.paid_after)
        .select_from(balances.join(newest, newest.c.seq == newest_seq))
        .where(
            balances.c.account_id.in_([account.value for account in SystemAccount]),
            balances.c.asset_symbol == asset_symbol,
        )
    )
    found = dict.fromkeys(SystemAccount, (0, 0))
    for account, balance, paid in rows:
        total, total_paid = found[SystemAccount(account)]
        found[SystemAccount(account)] = (total + balance, total_paid + paid)
    return found


# Sums of amounts are taken in two parts, so that no database sum leaves 64 bits (SQLite's
# sum() fails past them): the high bits and the low ones, put together in Python.
_LOW_BITS = 1 << 20


def exact_sum(column: sa.ColumnElement[int]) -> list[sa.ColumnElement[Any]]:
    """The sum of `column` as two sums (high bits, low bits): put them together with `joined`."""
    return [sa.func.sum(column // _LOW_BITS), sa.func.sum(column % _LOW_BITS)]


def joined(high: int | None, low: int | None) -> int:
    return int(high or 0) * _LOW_BITS + int(low or 0)


async def returned_between(
    connection: AsyncConnection, *, asset_symbol: str, after: datetime, until: datetime
) -> dict[Flow, tuple[int, int]]:
    """Per type of refund, reversal and expiry, the paid and free credits of the asset they moved
    after `after` and up to `until`: one range scan of a partial index that holds what it sums."""
    paid = transactions.c.paid_amount
    free = transactions.c.amount - transactions.c.paid_amount
    rows = await connection.execute(
        sa.select(transactions.c.type, *exact_sum(paid), *exact_sum(free))
        .where(
            RETURNS,
            transactions.c.asset_symbol == asset_symbol,
            transactions.c.created_at > after,
            transactions.c.created_at <= until,
        )
        .group_by(transactions.c.type)
    )
    return {
        Flow(flow): (joined(paid_high, paid_low), joined(free_high, free_low))
        for flow, paid_high, paid_low, free_high, free_low in rows
    }


# A user's transactions are found through their entries, so a transfer is in both users' lists,
# each with that user's balance after it (the entry's).
_SEEN_BY_USER = [c for c in transactions.c if c.name not in ("seq", "balance_after")] + [
    entries.c.seq,
    entries.c.balance_after,
]
_later_entry = entries.alias("later_entry")
# A transaction that moves two kinds has two entries in each account: the later one says the
# balance after it. A user is on one side of a transaction (debited or credited), so its later
# entry is the later one of the same direction. (Matching the account instead lets PostgreSQL's
# generic plan read every entry of the user for each row.)
_last_entry_of_its_user = ~(
    sa.select(_later_entry.c.seq)
    .where(
        _later_entry.c.transaction_id == entries.c.transaction_id,
        _later_entry.c.direction == entries.c.direction,
        _later_entry.c.seq > entries.c.seq,
    )
    .exists()
)


async def list_transactions(
    connection: AsyncConnection,
    *,
    user_id: str,
    flow: Flow | None,
    asset_symbol: str | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
    before: int | None,
    offset: int | None,
) -> tuple[list[Transaction], int | None]:
    query = (
        sa.select(*_SEEN_BY_USER)
        .select_from(entries.join(transactions, transactions.c.id == entries.c.transaction_id))
        .where(entries.c.account_id == user_id, _last_entry_of_its_user)
    )
    if flow is not None:
        query = query.where(transactions.c.type == flow.value)
    if asset_symbol is not None:
        query = query.where(entries.c.asset_symbol == asset_symbol)
    if since is not None:
        query = query.where(entries.c.created_at >= since)
    if until is not None:
        query = query.where(entries.c.created_at <= until)
    found, cursor = await _page(
        connection, query, entries.c.seq, to_transaction, limit, before, offset
    )
    return await with_refunds(connection, found), cursor


async def find_transaction(
    connection: AsyncConnection, *, user_id: str, transaction_id: str
) -> tuple[Transaction, list[Entry]] | None:
    row = (
        await connection.execute(
            sa.select(*_SEEN_BY_USER)
            .select_from(entries.join(transactions, transactions.c.id == entries.c.transaction_id))
            .where(
                transactions.c.id == transaction_id,
                entries.c.account_id == user_id,
                _last_entry_of_its_user,
            )
        )
    ).first()
    if row is None:
        return None
    entry_rows = await connection.execute(
        sa.select(entries).where(entries.c.transaction_id == transaction_id).order_by(entries.c.seq)
    )
    (found,) = await with_refunds(connection, [to_transaction(row)])
    return found, [to_entry(r) for r in entry_rows]


async def with_refunds(
    connection: AsyncConnection, found: Sequence[Transaction]
) -> list[Transaction]:
    """`found`, each with the ids of its refunds (newest last), read for those refunded."""
    refunded = [t.id for t in found if t.refunded_amount]
    if not refunded:
        return list(found)
    rows = await connection.execute(
        sa.select(transactions.c.refund_of, transactions.c.id)
        .where(transactions.c.refund_of.in_(refunded))
        .order_by(transactions.c.seq)
    )
    refunds: dict[str, list[TransactionId]] = {}
    for original, refund in rows:
        refunds.setdefault(original, []).append(TransactionId(refund))
    return [replace(t, refunds=tuple(refunds.get(t.id, ()))) for t in found]


async def find_hold(connection: AsyncConnection, hold_id: str) -> Hold | None:
    row = (await connection.execute(sa.select(holds).where(holds.c.id == hold_id))).first()
    return to_hold(row) if row else None


async def list_holds(
    connection: AsyncConnection,
    *,
    user_id: str | None,
    status: HoldStatus | None,
    now: datetime,
    limit: int,
    before: int | None,
    offset: int | None,
) -> tuple[list[Hold], int | None]:
    """Holds newest first; a hold past its expiry is `expired` here whether or not the sweeper
    has marked it yet."""
    query = sa.select(holds)
    if user_id is not None:
        query = query.where(holds.c.user_id == user_id)
    is_held = holds.c.status == HoldStatus.HELD.value
    match status:
        case HoldStatus.HELD:
            query = query.where(is_held, holds.c.expires_at > now)
        case HoldStatus.EXPIRED:
            query = query.where(
                (holds.c.status == HoldStatus.EXPIRED.value)
                | (is_held & (holds.c.expires_at <= now))
            )
        case HoldStatus.CAPTURED | HoldStatus.RELEASED:
            query = query.where(holds.c.status == status.value)
    return await _page(connection, query, holds.c.seq, to_hold, limit, before, offset)


async def list_entries(
    connection: AsyncConnection,
    *,
    account_id: str,
    asset_symbol: str | None,
    limit: int,
    before: int | None,
    offset: int | None,
) -> tuple[list[Entry], int | None]:
    query = sa.select(entries).where(entries.c.account_id == account_id)
    if asset_symbol is not None:
        query = query.where(entries.c.asset_symbol == asset_symbol)
    return await _page(connection, query, entries.c.seq, to_entry, limit, before, offset)


async def list_api_keys(
    connection: AsyncConnection, *, limit: int, before: int | None, offset: int | None
) -> tuple[list[ApiKey], int | None]:
    return await _page(
        connection, sa.select(api_keys), api_keys.c.seq, _to_api_key, limit, before, offset
    )


async def find_api_key(connection: AsyncConnection, key_hash: str) -> ApiKey | None:
    row = (
        await connection.execute(sa.select(api_keys).where(api_keys.c.key_hash == key_hash))
    ).first()
    return _to_api_key(row) if row else None


async def has_api_key(connection: AsyncConnection) -> bool:
    return (await connection.execute(sa.select(api_keys.c.seq).limit(1))).first() is not None


async def insert_api_key(connection: AsyncConnection, key: ApiKey, *, key_hash: str) -> None:
    await connection.execute(
        sa.insert(api_keys).values(
            id=key.id,
            label=key.label,
            key_hash=key_hash,
            scopes=" ".join(sorted(key.scopes)),
            reads_per_second=key.reads_per_second,
            writes_per_second=key.writes_per_second,
            created_at=key.created_at,
        )
    )


async def revoke_api_key(connection: AsyncConnection, key_id: str, *, at: datetime) -> bool:
    """Mark the key revoked (once: a second revocation keeps the first time); False if unknown."""
    result = await connection.execute(
        sa.update(api_keys)
        .where(api_keys.c.id == key_id)
        .values(revoked_at=sa.func.coalesce(api_keys.c.revoked_at, at))
    )
    return result.rowcount > 0


async def _page(
    connection: AsyncConnection,
    query: sa.Select[Any],
    seq: sa.ColumnElement[int],
    convert: Callable[[sa.Row[Any]], T],
    limit: int,
    before: int | None,
    offset: int | None,
) -> tuple[list[T], int | None]:
    """One page newest first, and the cursor of the next page (None on the last)."""
    if before is not None:
        query = query.where(seq < before)
    query = query.order_by(seq.desc()).limit(limit + 1)
    if offset:
        query = query.offset(offset)
    rows = list(await connection.execute(query))
    has_more = len(rows) > limit
    rows = rows[:limit]
    return [convert(r) for r in rows], (rows[-1].seq if has_more else None)


def _to_api_key(row: sa.Row[Any]) -> ApiKey:
    return ApiKey(
        id=row.id,
        label=row.label,
        scopes=frozenset(Scope(s) for s in row.scopes.split()),
        reads_per_second=row.reads_per_second,
        writes_per_second=row.writes_per_second,
        created_at=as_utc(row.created_at),
        revoked_at=None if row.revoked_at is None else as_utc(row.revoked_at),
    )


def _to_user(row: sa.Row[Any]) -> User:
    return User(UserId(row.id), row.email, row.name, as_utc(row.created_at))


def to_entry(row: sa.Row[Any]) -> Entry:
    return Entry(
        id=row.id,
        transaction_id=TransactionId(row.transaction_id),
        account_id=AccountId(row.account_id),
        asset_symbol=row.asset_symbol,
        direction=Direction(row.direction),
        amount=row.amount,
        balance_after=row.balance_after,
        created_at=as_utc(row.created_at),
        kind=Kind(row.kind),
        paid_after=row.paid_after,
        chain_hash=row.chain_hash,
    )
