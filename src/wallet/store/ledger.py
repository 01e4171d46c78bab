"""Every statement of the posting engine. Each takes a whole batch, so a batch of any size costs
the same few round trips. Row locks are taken only in `lock_balances`, in one global order.

On PostgreSQL the hot path is three statements of fixed text over array parameters (look up and
claim, lock, write), so each is prepared once per connection and a batch is five round trips
with BEGIN and COMMIT. SQLite, embedded and single-writer, runs the plain statements."""

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.errors import REFUSALS, Refusal
from wallet.domain.ledger import (
    AccountId,
    Asset,
    BalanceKey,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Kind,
    LotKey,
    LotMove,
    Portion,
    Posted,
    SpendOrder,
    Transaction,
    TransactionId,
    UserId,
    is_system_account,
)
from wallet.store.tables import (
    accounts,
    assets,
    balances,
    entries,
    holds,
    idempotency_keys,
    lot_moves,
    lots,
    transactions,
)

# The balance row a batch uses of each balance: its shard (a user's is always 0).
Shards = Mapping[BalanceKey, int]


class ShardPicker:
    """Which row of a system account's balance each batch uses. Batches take the `count`
    shards in turn from a random start, so batches in flight at once (of one process or of
    several) seldom queue on one row. A row found full (it would pass 64 bits) is left for
    good, for the one `count` shards further on; every read sums all of an account's rows."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._turn = random.randrange(count)
        self._full: set[tuple[BalanceKey, int]] = set()

    def for_batch(self, keys: Iterable[BalanceKey]) -> dict[BalanceKey, int]:
        turn, self._turn = self._turn, (self._turn + 1) % self.count
        rows: dict[BalanceKey, int] = {}
        for key in keys:
            shard = 0
            if is_system_account(key[0]):
                shard = turn
                while (key, shard) in self._full:
                    shard += self.count
            rows[key] = shard
        return rows

    def mark_full(self, key: BalanceKey, shard: int) -> None:
        self._full.add((key, shard))


@dataclass(frozen=True, slots=True)
class LockedBalance:
    balance: int
    chain_hash: str  # the newest link of the chain
    entry_count: int  # the entries of the chain
    held: int  # the sum of the holds in status held, expired or not
    paid: int  # the paid part of the balance
    expiring: int  # what its lots hold


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a batch found before taking any lock."""

    users: set[str]
    assets: dict[str, Asset]
    claimed: set[str]  # keys this transaction now holds
    balance_rows: set[BalanceKey]  # of the balance rows asked for, those that exist


def _in_order(rows: Shards) -> list[tuple[AccountId, str, int]]:
    """Balance rows as (account, asset, shard), in the global lock order."""
    return sorted((account, asset, shard) for (account, asset), shard in rows.items())


def insert_on_conflict(connection: AsyncConnection, table: sa.Table) -> Any:
    """INSERT with this dialect's ON CONFLICT support."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    return dialect.insert(table)


def _is_postgres(connection: AsyncConnection) -> bool:
    return connection.dialect.name == "postgresql"


LOOK_UP_AND_CLAIM = sa.text("""
WITH claimed AS (
    INSERT INTO idempotency_keys (key)
    SELECT k FROM unnest(CAST(:keys AS text[])) AS k ORDER BY k
    ON CONFLICT DO NOTHING
    RETURNING key
)
SELECT 'claimed' AS kind, key AS id, NULL AS asset, CAST(NULL AS integer) AS free_days,
    CAST(NULL AS integer) AS paid_days
FROM claimed
UNION ALL
SELECT 'user', id, NULL, NULL, NULL FROM accounts
WHERE id = ANY(CAST(:users AS text[])) AND NOT is_system
UNION ALL
SELECT 'asset', symbol, spend_order, free_lifetime_days, paid_lifetime_days FROM assets
WHERE symbol = ANY(CAST(:assets AS text[]))
UNION ALL
SELECT 'balance', account_id, asset_symbol, NULL, NULL FROM balances
WHERE (account_id, asset_symbol, shard) IN (
    SELECT * FROM unnest(
        CAST(:accounts AS text[]), CAST(:symbols AS text[]), CAST(:shards AS integer[])
    )
)""")


async def look_up_and_claim(
    connection: AsyncConnection,
    *,
    user_ids: Iterable[str],
    symbols: Iterable[str],
    keys: Iterable[str],
    balance_rows: Shards,
) -> Lookup:
    """Find the users, assets and balance rows a batch names, and claim its idempotency keys.

    A key that another transaction holds uncommitted makes the claim wait for that transaction
    to end (PostgreSQL). Keys go in sorted order, so two batches claiming the same keys wait on
    each other in one order, not in a cycle."""
    ordered_keys = sorted(set(keys))
    wanted_rows = _in_order(balance_rows)
    if _is_postgres(connection):
        rows = await connection.execute(
            LOOK_UP_AND_CLAIM,
            {
                "keys": ordered_keys,
                "users": sorted(set(user_ids)),
                "assets": sorted(set(symbols)),
                "accounts": [account for account, _, _ in wanted_rows],
                "symbols": [symbol for _, symbol, _ in wanted_rows],
                "shards": [shard for _, _, shard in wanted_rows],
            },
        )
        found: dict[str, set[Any]] = {"claimed": set(), "user": set()}
        found_assets: dict[str, Asset] = {}
        existing: set[BalanceKey] = set()
        for kind, found_id, asset, free_days, paid_days in rows:
            if kind == "balance":
                existing.add((AccountId(found_id), asset))
            elif kind == "asset":
                found_assets[found_id] = Asset(
                    found_id, "", "", SpendOrder(asset), free_days, paid_days
                )
            else:
                found[kind].add(found_id)
        return Lookup(found["user"], found_assets, found["claimed"], existing)

    users = await connection.execute(
        sa.select(accounts.c.id).where(accounts.c.id.in_(set(user_ids)), ~accounts.c.is_system)
    )
    asset_rows = await connection.execute(
        sa.select(assets).where(assets.c.symbol.in_(set(symbols)))
    )
    claimed: set[str] = set()
    if ordered_keys:
        claimed = set(
            await connection.scalars(
                insert_on_conflict(connection, idempotency_keys)
                .values([{"key": key} for key in ordered_keys])
                .on_conflict_do_nothing(index_elements=["key"])
                .returning(idempotency_keys.c.key)
            )
        )
    existing_rows = await connection.execute(
        sa.select(balances.c.account_id, balances.c.asset_symbol).where(
            sa.tuple_(balances.c.account_id, balances.c.asset_symbol, balances.c.shard).in_(
                wanted_rows
            )
        )
    )
    return Lookup(
        set(users.scalars()),
        {row.symbol: to_asset(row) for row in asset_rows},
        claimed,
        {(AccountId(a), s) for a, s in existing_rows},
    )


@dataclass(frozen=True, slots=True)
class References:
    """The holds and transactions that captures, releases and refunds name, and what each
    named transaction took from its user's lots (a refund gives that back)."""

    holds: dict[str, Hold]
    transactions: dict[str, Transaction]
    lots_taken: dict[TransactionId, list[Portion]]


async def find_references(
    connection: AsyncConnection, *, hold_ids: Iterable[str], transaction_ids: Iterable[str]
) -> References:
    """What captures, releases and refunds name. What is read here before any lock (who, which
    asset, how much, what it took) never changes; their state is read again under the lock
    (`read_under_lock`)."""
    found_holds: dict[str, Hold] = {}
    found_transactions: dict[str, Transaction] = {}
    taken: dict[TransactionId, list[Portion]] = {}
    if hold_ids := set(hold_ids):
        rows = await connection.execute(sa.select(holds).where(holds.c.id.in_(hold_ids)))
        found_holds = {row.id: to_hold(row) for row in rows}
    if transaction_ids := set(transaction_ids):
        rows = await connection.execute(
            sa.select(transactions).where(transactions.c.id.in_(transaction_ids))
        )
        found_transactions = {row.id: to_transaction(row) for row in rows}
        moves = await connection.execute(
            sa.select(lot_moves)
            .join(transactions, transactions.c.id == lot_moves.c.transaction_id)
            .where(
                lot_moves.c.transaction_id.in_(transaction_ids),
                lot_moves.c.account_id == transactions.c.user_id,
                lot_moves.c.amount < 0,
            )
        )
        for move in moves:
            taken.setdefault(TransactionId(move.transaction_id), []).append(
                Portion(Kind(move.kind), as_utc(move.expires_at), -move.amount)
            )
    return References(found_holds, found_transactions, taken)


async def stored_requests(
    connection: AsyncConnection, keys: Iterable[str]
) -> dict[str, tuple[str, Posted | Refusal]]:
    """For keys taken by earlier requests: the request's fingerprint and what it got, the
    transaction or hold it made (a replay) or the refusal the ledger gave it."""
    keys = set(keys)
    if not keys:
        return {}
    rows = list(
        await connection.execute(
            sa.select(transactions).where(transactions.c.idempotency_key.in_(keys))
        )
    )
    captured = {row.hold_id for row in rows if row.hold_id is not None}
    hold_rows = list(
        await connection.execute(
            sa.select(holds).where(
                holds.c.idempotency_key.in_(keys)
                | holds.c.release_key.in_(keys)
                | holds.c.id.in_(captured)
            )
        )
    )
    holds_by_id = {row.id: to_hold(row) for row in hold_rows}
    # A replay answers what the first request got: the transaction and the hold as they were
    # then, not what refunds, captures or releases have made of them since.
    stored: dict[str, tuple[str, Posted | Refusal]] = {}
    for row in rows:
        hold = holds_by_id.get(row.hold_id) if row.hold_id else None
        transaction = replace(to_transaction(row), refunded_amount=0)
        stored[row.idempotency_key] = (
            row.request_fingerprint,
            Posted((transaction,), is_replay=True, hold=hold),
        )
    for row in hold_rows:
        if row.idempotency_key in keys:
            created = holds_by_id[row.id].as_created()
            stored[row.idempotency_key] = (
                row.request_fingerprint,
                Posted((), is_replay=True, hold=created),
            )
        if row.release_key in keys:
            stored[row.release_key] = (
                row.release_fingerprint,
                Posted((), is_replay=True, hold=holds_by_id[row.id]),
            )
    if not keys - stored.keys():
        return stored
    refusals = await connection.execute(
        sa.select(idempotency_keys).where(
            idempotency_keys.c.key.in_(keys - stored.keys()),
            idempotency_keys.c.refusal_code.is_not(None),
        )
    )
    for row in refusals:
        refusal = REFUSALS[row.refusal_code](row.refusal_detail, is_replay=True)
        stored[row.key] = (row.request_fingerprint, refusal)
    return stored


async def create_balances(connection: AsyncConnection, rows: Shards) -> None:
    """Create missing balance rows at zero, in the global order, before any lock is taken: two
    concurrent first top-ups of a user both succeed (ON CONFLICT DO NOTHING waits, then skips)."""
    ordered = _in_order(rows)
    if ordered:
        await connection.execute(
            insert_on_conflict(connection, balances)
            .values(
                [
                    {"account_id": a, "asset_symbol": s, "shard": shard, "balance": 0}
                    for a, s, shard in ordered
                ]
            )
            .on_conflict_do_nothing(index_elements=["account_id", "asset_symbol", "shard"])
        )


LOCK_BALANCES = sa.text("""
SELECT account_id, asset_symbol, balance, chain_hash, entry_count, held, paid, expiring
FROM balances
WHERE (account_id, asset_symbol, shard) IN (
    SELECT * FROM unnest(
        CAST(:accounts AS text[]), CAST(:symbols AS text[]), CAST(:shards AS integer[])
    )
)
ORDER BY account_id, asset_symbol, shard
FOR UPDATE""")


async def lock_balances(
    connection: AsyncConnection, rows: Shards
) -> dict[BalanceKey, LockedBalance]:
    """Lock the existing balance rows named (a balance, its shard) and return them by balance.

    Every transaction locks in ascending (account, asset, shard) order, by primary key, so none
    waits on another in a cycle. On SQLite, BEGIN IMMEDIATE already holds the one write lock."""
    ordered = _in_order(rows)
    if not ordered:
        return {}
    if _is_postgres(connection):
        found = await connection.execute(
            LOCK_BALANCES,
            {
                "accounts": [a for a, _, _ in ordered],
                "symbols": [s for _, s, _ in ordered],
                "shards": [shard for _, _, shard in ordered],
            },
        )
    else:
        found = await connection.execute(
            sa.select(
                balances.c.account_id,
                balances.c.asset_symbol,
                balances.c.balance,
                balances.c.chain_hash,
                balances.c.entry_count,
                balances.c.held,
                balances.c.paid,
                balances.c.expiring,
            ).where(
                sa.tuple_(balances.c.account_id, balances.c.asset_symbol, balances.c.shard).in_(
                    ordered
                )
            )
        )
    return {(AccountId(row[0]), row[1]): LockedBalance(*row[2:]) for row in found}


@dataclass(frozen=True, slots=True)
class UnderLock:
    """What holds, lots and refunds change, as the locks found it."""

    active_held: dict[BalanceKey, dict[Kind, int]]  # per balance: what holds counting now reserve
    holds: dict[str, Hold]  # the named holds
    lots: dict[BalanceKey, dict[LotKey, int]]  # the lots of balances that have any
    refunded: dict[TransactionId, int]  # per named original: refunded so far


async def read_under_lock(
    connection: AsyncConnection,
    *,
    held_keys: Iterable[BalanceKey],
    lot_keys: Iterable[BalanceKey],
    hold_ids: Iterable[str],
    originals: Iterable[str],
    now: datetime,
) -> UnderLock:
    """What holds, lots and refunds change, read after the balance rows that guard it are
    locked, so a new statement sees what every earlier holder of those locks committed."""
    active_held: dict[BalanceKey, dict[Kind, int]] = {}
    found_holds: dict[str, Hold] = {}
    found_lots: dict[BalanceKey, dict[LotKey, int]] = {}
    refunded: dict[TransactionId, int] = {}
    if held_keys := sorted(set(held_keys)):
        rows = await connection.execute(
            sa.select(
                holds.c.user_id,
                holds.c.asset_symbol,
                sa.func.sum(holds.c.amount),
                sa.func.sum(holds.c.paid_amount),
            )
            .where(
                holds.c.status == HoldStatus.HELD.value,
                holds.c.expires_at > now,
                sa.tuple_(holds.c.user_id, holds.c.asset_symbol).in_(held_keys),
            )
            .group_by(holds.c.user_id, holds.c.asset_symbol)
        )
        active_held = {
            (AccountId(user), asset): {Kind.PAID: int(paid), Kind.FREE: int(total) - int(paid)}
            for user, asset, total, paid in rows
        }
    if lot_keys := sorted(set(lot_keys)):
        rows = await connection.execute(
            sa.select(lots).where(
                lots.c.remaining > 0,
                sa.tuple_(lots.c.account_id, lots.c.asset_symbol).in_(lot_keys),
            )
        )
        for row in rows:
            key = (AccountId(row.account_id), row.asset_symbol)
            found_lots.setdefault(key, {})[(Kind(row.kind), as_utc(row.expires_at))] = row.remaining
    if hold_ids := set(hold_ids):
        rows = await connection.execute(sa.select(holds).where(holds.c.id.in_(hold_ids)))
        found_holds = {row.id: to_hold(row) for row in rows}
    if originals := set(originals):
        rows = await connection.execute(
            sa.select(transactions.c.id, transactions.c.refunded_amount).where(
                transactions.c.id.in_(originals)
            )
        )
        refunded = {TransactionId(row.id): row.refunded_amount for row in rows}
    return UnderLock(active_held, found_holds, found_lots, refunded)


WRITE_POSTINGS = sa.text("""
WITH moved AS (
    UPDATE balances AS b
    SET balance = v.balance, chain_hash = v.chain_hash, entry_count = v.entry_count,
        held = v.held, paid = v.paid, expiring = v.expiring
    FROM unnest(
        CAST(:b_accounts AS text[]), CAST(:b_symbols AS text[]), CAST(:b_shards AS integer[]),
        CAST(:b_balances AS bigint[]), CAST(:b_links AS text[]), CAST(:b_counts AS bigint[]),
        CAST(:b_held AS bigint[]), CAST(:b_paid AS bigint[]), CAST(:b_expiring AS bigint[])
    ) AS v(
        account_id, asset_symbol, shard, balance, chain_hash, entry_count, held, paid, expiring
    )
    WHERE b.account_id = v.account_id AND b.asset_symbol = v.asset_symbol AND b.shard = v.shard
), released AS (
    DELETE FROM idempotency_keys WHERE key = ANY(CAST(:released AS text[]))
), refused AS (
    UPDATE idempotency_keys AS k
    SET request_fingerprint = r.fingerprint, refusal_code = r.code, refusal_detail = r.detail
    FROM unnest(
        CAST(:r_keys AS text[]), CAST(:r_fingerprints AS text[]), CAST(:r_codes AS text[]),
        CAST(:r_details AS text[])
    ) AS r(key, fingerprint, code, detail)
    WHERE k.key = r.key
), posted AS (
    INSERT INTO transactions (
        id, type, user_id, asset_symbol, amount, balance_after, idempotency_key,
        request_fingerprint, note, metadata, created_at, created_by, to_user_id, hold_id,
        refund_of, paid_amount
    )
    SELECT t.id, t.type, t.user_id, t.asset_symbol, t.amount, t.balance_after, t.key,
        t.fingerprint, t.note, CAST(t.metadata AS json), :created_at, t.created_by,
        t.to_user_id, t.hold_id, t.refund_of, t.paid_amount
    FROM unnest(
        CAST(:t_ids AS text[]), CAST(:t_types AS text[]), CAST(:t_users AS text[]),
        CAST(:t_symbols AS text[]), CAST(:t_amounts AS bigint[]),
        CAST(:t_balances AS bigint[]), CAST(:t_keys AS text[]),
        CAST(:t_fingerprints AS text[]), CAST(:t_notes AS text[]), CAST(:t_metadata AS text[]),
        CAST(:t_created_by AS text[]), CAST(:t_to_users AS text[]), CAST(:t_holds AS text[]),
        CAST(:t_refund_of AS text[]), CAST(:t_paid AS bigint[])
    ) WITH ORDINALITY AS t(
        id, type, user_id, asset_symbol, amount, balance_after, key, fingerprint, note,
        metadata, created_by, to_user_id, hold_id, refund_of, paid_amount, position
    )
    ORDER BY t.position
), lots_after AS (
    INSERT INTO lots (account_id, asset_symbol, kind, expires_at, remaining)
    SELECT * FROM unnest(
        CAST(:l_accounts AS text[]), CAST(:l_symbols AS text[]), CAST(:l_kinds AS text[]),
        CAST(:l_expires AS timestamptz[]), CAST(:l_remaining AS bigint[])
    )
    ON CONFLICT (account_id, asset_symbol, kind, expires_at)
    DO UPDATE SET remaining = EXCLUDED.remaining
), moved_lots AS (
    INSERT INTO lot_moves (transaction_id, account_id, asset_symbol, kind, expires_at, amount)
    SELECT * FROM unnest(
        CAST(:m_transactions AS text[]), CAST(:m_accounts AS text[]),
        CAST(:m_symbols AS text[]), CAST(:m_kinds AS text[]),
        CAST(:m_expires AS timestamptz[]), CAST(:m_amounts AS bigint[])
    )
)
INSERT INTO entries (
    id, transaction_id, account_id, asset_symbol, shard, direction, amount, balance_after,
    created_at, chain_hash, kind, paid_after
)
SELECT e.id, e.transaction_id, e.account_id, e.asset_symbol, e.shard, e.direction, e.amount,
    e.balance_after, :created_at, e.chain_hash, e.kind, e.paid_after
FROM unnest(
    CAST(:e_ids AS text[]), CAST(:e_transactions AS text[]), CAST(:e_accounts AS text[]),
    CAST(:e_symbols AS text[]), CAST(:e_shards AS integer[]), CAST(:e_directions AS text[]),
    CAST(:e_amounts AS bigint[]), CAST(:e_balances AS bigint[]), CAST(:e_links AS text[]),
    CAST(:e_kinds AS text[]), CAST(:e_paid AS bigint[])
) WITH ORDINALITY AS e(
    id, transaction_id, account_id, asset_symbol, shard, direction, amount, balance_after,
    chain_hash, kind, paid_after, position
)
ORDER BY e.position""")


async def write_postings(
    connection: AsyncConnection,
    *,
    changed: Mapping[BalanceKey, LockedBalance],
    posted: Sequence[tuple[str, Transaction]],
    posted_entries: Sequence[Entry],
    refused: Mapping[str, tuple[str, Refusal]],
    released: Iterable[str],
    lots_after: Mapping[tuple[BalanceKey, LotKey], int],
    moved_lots: Sequence[LotMove],
    created_at: datetime,
    shards: Shards,
) -> None:
    """Write each changed balance row, of its shard in `shards` (with its chain's newest link,
    length and held sum) once,
    insert the transactions (with their request fingerprints) and entries in application order,
    so their `seq` follows it, keep each refusal under its key, forget the claims of commands that
    failed otherwise (such a request records nothing), and write what lots hold now and what each
    transaction took from or gave to them."""
    released = sorted(set(released))
    if not (changed or posted or refused or released):
        return
    if _is_postgres(connection):
        await connection.execute(
            WRITE_POSTINGS,
            {
                "b_accounts": [a for a, _ in changed],
                "b_symbols": [s for _, s in changed],
                "b_shards": [shards[key] for key in changed],
                "b_balances": [row.balance for row in changed.values()],
                "b_links": [row.chain_hash for row in changed.values()],
                "b_counts": [row.entry_count for row in changed.values()],
                "b_held": [row.held for row in changed.values()],
                "b_paid": [row.paid for row in changed.values()],
                "b_expiring": [row.expiring for row in changed.values()],
                "released": released,
                "r_keys": list(refused),
                "r_fingerprints": [fingerprint for fingerprint, _ in refused.values()],
                "r_codes": [refusal.code for _, refusal in refused.values()],
                "r_details": [refusal.detail for _, refusal in refused.values()],
                "created_at": created_at,
                "t_ids": [t.id for _, t in posted],
                "t_types": [t.flow.value for _, t in posted],
                "t_users": [t.user_id for _, t in posted],
                "t_symbols": [t.asset_symbol for _, t in posted],
                "t_amounts": [t.amount for _, t in posted],
                "t_balances": [t.balance_after for _, t in posted],
                "t_keys": [t.idempotency_key for _, t in posted],
                "t_fingerprints": [fingerprint for fingerprint, _ in posted],
                "t_notes": [t.note for _, t in posted],
                "t_metadata": [
                    None if t.metadata is None else json.dumps(t.metadata) for _, t in posted
                ],
                "t_created_by": [t.created_by for _, t in posted],
                "t_to_users": [t.to_user_id for _, t in posted],
                "t_holds": [t.hold_id for _, t in posted],
                "t_refund_of": [t.refund_of for _, t in posted],
                "t_paid": [t.paid_amount for _, t in posted],
                "l_accounts": [account for (account, _), _ in lots_after],
                "l_symbols": [asset for (_, asset), _ in lots_after],
                "l_kinds": [kind.value for _, (kind, _) in lots_after],
                "l_expires": [expires_at for _, (_, expires_at) in lots_after],
                "l_remaining": list(lots_after.values()),
                "m_transactions": [m.transaction_id for m in moved_lots],
                "m_accounts": [m.account_id for m in moved_lots],
                "m_symbols": [m.asset_symbol for m in moved_lots],
                "m_kinds": [m.kind.value for m in moved_lots],
                "m_expires": [m.expires_at for m in moved_lots],
                "m_amounts": [m.amount for m in moved_lots],
                "e_ids": [e.id for e in posted_entries],
                "e_transactions": [e.transaction_id for e in posted_entries],
                "e_accounts": [e.account_id for e in posted_entries],
                "e_symbols": [e.asset_symbol for e in posted_entries],
                "e_shards": [shards[(e.account_id, e.asset_symbol)] for e in posted_entries],
                "e_directions": [e.direction.value for e in posted_entries],
                "e_amounts": [e.amount for e in posted_entries],
                "e_balances": [e.balance_after for e in posted_entries],
                "e_links": [e.chain_hash for e in posted_entries],
                "e_kinds": [e.kind.value for e in posted_entries],
                "e_paid": [e.paid_after for e in posted_entries],
            },
        )
        return
    if changed:
        await connection.execute(
            sa.update(balances)
            .where(
                balances.c.account_id == sa.bindparam("key_account"),
                balances.c.asset_symbol == sa.bindparam("key_asset"),
                balances.c.shard == sa.bindparam("key_shard"),
            )
            .values(
                balance=sa.bindparam("new_balance"),
                chain_hash=sa.bindparam("new_link"),
                entry_count=sa.bindparam("new_count"),
                held=sa.bindparam("new_held"),
                paid=sa.bindparam("new_paid"),
                expiring=sa.bindparam("new_expiring"),
            ),
            [
                {
                    "key_account": account,
                    "key_asset": asset,
                    "key_shard": shards[(account, asset)],
                    "new_balance": row.balance,
                    "new_link": row.chain_hash,
                    "new_count": row.entry_count,
                    "new_held": row.held,
                    "new_paid": row.paid,
                    "new_expiring": row.expiring,
                }
                for (account, asset), row in changed.items()
            ],
        )
    if released:
        await connection.execute(
            sa.delete(idempotency_keys).where(idempotency_keys.c.key.in_(released))
        )
    if refused:
        await connection.execute(
            sa.update(idempotency_keys)
            .where(idempotency_keys.c.key == sa.bindparam("refused_key"))
            .values(
                request_fingerprint=sa.bindparam("fingerprint"),
                refusal_code=sa.bindparam("code"),
                refusal_detail=sa.bindparam("detail"),
            ),
            [
                {
                    "refused_key": key,
                    "fingerprint": fingerprint,
                    "code": refusal.code,
                    "detail": refusal.detail,
                }
                for key, (fingerprint, refusal) in refused.items()
            ],
        )
    if posted:
        await connection.execute(
            sa.insert(transactions),
            [
                {
                    "id": t.id,
                    "type": t.flow.value,
                    "user_id": t.user_id,
                    "asset_symbol": t.asset_symbol,
                    "amount": t.amount,
                    "balance_after": t.balance_after,
                    "idempotency_key": t.idempotency_key,
                    "request_fingerprint": fingerprint,
                    "note": t.note,
                    "metadata": t.metadata,
                    "created_at": created_at,
                    "created_by": t.created_by,
                    "to_user_id": t.to_user_id,
                    "hold_id": t.hold_id,
                    "refund_of": t.refund_of,
                    "paid_amount": t.paid_amount,
                }
                for fingerprint, t in posted
            ],
        )
        await connection.execute(
            sa.insert(entries),
            [
                {
                    "id": e.id,
                    "transaction_id": e.transaction_id,
                    "account_id": e.account_id,
                    "asset_symbol": e.asset_symbol,
                    "shard": shards[(e.account_id, e.asset_symbol)],
                    "direction": e.direction.value,
                    "amount": e.amount,
                    "balance_after": e.balance_after,
                    "created_at": created_at,
                    "chain_hash": e.chain_hash,
                    "kind": e.kind.value,
                    "paid_after": e.paid_after,
                }
                for e in posted_entries
            ],
        )
    if lots_after:
        upsert = insert_on_conflict(connection, lots).values(
            [
                {
                    "account_id": account,
                    "asset_symbol": asset,
                    "kind": kind.value,
                    "expires_at": expires_at,
                    "remaining": remaining,
                }
                for ((account, asset), (kind, expires_at)), remaining in lots_after.items()
            ]
        )
        await connection.execute(
            upsert.on_conflict_do_update(
                index_elements=["account_id", "asset_symbol", "kind", "expires_at"],
                set_={"remaining": upsert.excluded.remaining},
            )
        )
    if moved_lots:
        await connection.execute(
            sa.insert(lot_moves),
            [
                {
                    "transaction_id": m.transaction_id,
                    "account_id": m.account_id,
                    "asset_symbol": m.asset_symbol,
                    "kind": m.kind.value,
                    "expires_at": m.expires_at,
                    "amount": m.amount,
                }
                for m in moved_lots
            ],
        )


async def write_holds(
    connection: AsyncConnection,
    *,
    created: Sequence[tuple[str, Hold]],
    ended: Mapping[str, tuple[Hold, str | None, str | None]],
) -> None:
    """Insert new holds (with their request fingerprints) and write the end of each captured or
    released one (with the release's key and fingerprint)."""
    if created:
        await connection.execute(
            sa.insert(holds),
            [
                {
                    "id": h.id,
                    "user_id": h.user_id,
                    "asset_symbol": h.asset_symbol,
                    "amount": h.amount,
                    "captured_amount": h.captured_amount,
                    "status": h.status.value,
                    "expires_at": h.expires_at,
                    "created_at": h.created_at,
                    "ended_at": h.ended_at,
                    "description": h.description,
                    "created_by": h.created_by,
                    "idempotency_key": h.idempotency_key,
                    "request_fingerprint": fingerprint,
                    "paid_amount": h.paid_amount,
                }
                for fingerprint, h in created
            ],
        )
    if ended:
        await connection.execute(
            sa.update(holds)
            .where(holds.c.id == sa.bindparam("ended_id"))
            .values(
                status=sa.bindparam("new_status"),
                captured_amount=sa.bindparam("new_captured"),
                ended_at=sa.bindparam("new_ended_at"),
                release_key=sa.bindparam("new_release_key"),
                release_fingerprint=sa.bindparam("new_release_fingerprint"),
            ),
            [
                {
                    "ended_id": hold_id,
                    "new_status": h.status.value,
                    "new_captured": h.captured_amount,
                    "new_ended_at": h.ended_at,
                    "new_release_key": release_key,
                    "new_release_fingerprint": release_fingerprint,
                }
                for hold_id, (h, release_key, release_fingerprint) in ended.items()
            ],
        )


async def due_holds(connection: AsyncConnection, *, now: datetime, limit: int) -> list[Hold]:
    """Up to `limit` holds still marked held whose expiry has passed, soonest expired first."""
    rows = await connection.execute(
        sa.select(holds)
        .where(holds.c.status == HoldStatus.HELD.value, holds.c.expires_at <= now)
        .order_by(holds.c.expires_at)
        .limit(limit)
    )
    return [to_hold(row) for row in rows]


async def due_lots(connection: AsyncConnection, *, now: datetime, limit: int) -> list[BalanceKey]:
    """Up to `limit` balances with credits that have expired, soonest expired first: of a kind,
    those in lots past their expiry beyond what the balance's active holds reserved of that kind
    (a hold keeps what it reserved until it ends; the rest expire now)."""
    due = (
        sa.select(
            lots.c.account_id,
            lots.c.asset_symbol,
            lots.c.kind,
            sa.func.sum(lots.c.remaining).label("due"),
            sa.func.min(lots.c.expires_at).label("soonest"),
        )
        .where(lots.c.remaining > 0, lots.c.expires_at <= now)
        .group_by(lots.c.account_id, lots.c.asset_symbol, lots.c.kind)
        .subquery()
    )
    reserved = (
        sa.select(
            sa.func.coalesce(
                sa.func.sum(
                    sa.case(
                        (due.c.kind == Kind.PAID.value, holds.c.paid_amount),
                        else_=holds.c.amount - holds.c.paid_amount,
                    )
                ),
                0,
            )
        )
        .where(
            holds.c.user_id == due.c.account_id,
            holds.c.asset_symbol == due.c.asset_symbol,
            holds.c.status == HoldStatus.HELD.value,
            holds.c.expires_at > now,
        )
        .scalar_subquery()
    )
    rows = await connection.execute(
        sa.select(due.c.account_id, due.c.asset_symbol)
        .where(due.c.due > reserved)
        .group_by(due.c.account_id, due.c.asset_symbol)
        .order_by(sa.func.min(due.c.soonest))
        .limit(limit)
    )
    return [(AccountId(account), asset) for account, asset in rows]


async def mark_expired(
    connection: AsyncConnection, due: Sequence[Hold], *, now: datetime
) -> list[Hold]:
    """Mark `due` holds expired (at their expiry), those still held: run it under the locks of
    their balance rows, so a capture, a release or another sweeper that got there first wins;
    take each marked hold's amount off its balance's `held`. Returns the holds it marked."""
    rows = await connection.execute(
        sa.update(holds)
        .where(
            holds.c.id.in_([h.id for h in due]),
            holds.c.status == HoldStatus.HELD.value,
            holds.c.expires_at <= now,
        )
        .values(status=HoldStatus.EXPIRED.value, ended_at=holds.c.expires_at)
        .returning(holds)
    )
    marked = [to_hold(row) for row in rows]
    released: dict[BalanceKey, int] = {}
    for hold in marked:
        key = (AccountId(hold.user_id), hold.asset_symbol)
        released[key] = released.get(key, 0) + hold.amount
    if released:
        await connection.execute(
            sa.update(balances)
            .where(
                balances.c.account_id == sa.bindparam("key_account"),
                balances.c.asset_symbol == sa.bindparam("key_asset"),
            )
            .values(held=balances.c.held - sa.bindparam("released")),
            [
                {"key_account": account, "key_asset": asset, "released": amount}
                for (account, asset), amount in sorted(released.items())
            ],
        )
    return marked


async def write_refunded(
    connection: AsyncConnection, refunded: Mapping[TransactionId, int]
) -> None:
    """Set what each original has had refunded (the database refuses more than its amount)."""
    if refunded:
        await connection.execute(
            sa.update(transactions)
            .where(transactions.c.id == sa.bindparam("original_id"))
            .values(refunded_amount=sa.bindparam("new_refunded")),
            [{"original_id": i, "new_refunded": amount} for i, amount in refunded.items()],
        )


def to_transaction(row: sa.Row[Any]) -> Transaction:
    return Transaction(
        id=TransactionId(row.id),
        flow=Flow(row.type),
        user_id=UserId(row.user_id),
        asset_symbol=row.asset_symbol,
        amount=row.amount,
        balance_after=row.balance_after,
        idempotency_key=row.idempotency_key,
        note=row.note,
        metadata=row.metadata,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        to_user_id=None if row.to_user_id is None else UserId(row.to_user_id),
        hold_id=row.hold_id,
        refund_of=None if row.refund_of is None else TransactionId(row.refund_of),
        refunded_amount=row.refunded_amount,
        paid_amount=row.paid_amount,
    )


def to_hold(row: Any) -> Hold:
    return Hold(
        id=row.id,
        user_id=UserId(row.user_id),
        asset_symbol=row.asset_symbol,
        amount=row.amount,
        captured_amount=row.captured_amount,
        status=HoldStatus(row.status),
        expires_at=as_utc(row.expires_at),
        created_at=as_utc(row.created_at),
        ended_at=None if row.ended_at is None else as_utc(row.ended_at),
        description=row.description,
        created_by=row.created_by,
        idempotency_key=row.idempotency_key,
        paid_amount=row.paid_amount,
    )


def to_asset(row: Any) -> Asset:
    return Asset(
        row.symbol,
        row.name,
        row.description,
        SpendOrder(row.spend_order),
        row.free_lifetime_days,
        row.paid_lifetime_days,
    )


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
