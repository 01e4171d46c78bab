"""Every statement of the posting engine. Each takes a whole batch, so a batch of any size costs
the same few round trips. Row locks are taken only in `lock_balances`, in one global order.

On PostgreSQL the hot path is three statements of fixed text over array parameters (look up and
claim, lock, write), so each is prepared once per connection and a batch is five round trips
with BEGIN and COMMIT. SQLite, embedded and single-writer, runs the plain statements."""

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.errors import REFUSALS, Refusal
from wallet.domain.ledger import AccountId, Entry, Flow, Transaction, TransactionId, UserId
from wallet.store.tables import accounts, assets, balances, entries, idempotency_keys, transactions

BalanceKey = tuple[AccountId, str]


@dataclass(frozen=True, slots=True)
class Lookup:
    """What a batch found before taking any lock."""

    users: set[str]
    assets: set[str]
    claimed: set[str]  # keys this transaction now holds
    balance_rows: set[BalanceKey]  # balance rows that already exist


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
SELECT 'claimed' AS kind, key AS id, NULL AS asset FROM claimed
UNION ALL
SELECT 'user', id, NULL FROM accounts WHERE id = ANY(CAST(:users AS text[])) AND NOT is_system
UNION ALL
SELECT 'asset', symbol, NULL FROM assets WHERE symbol = ANY(CAST(:assets AS text[]))
UNION ALL
SELECT 'balance', account_id, asset_symbol FROM balances
WHERE (account_id, asset_symbol) IN (
    SELECT * FROM unnest(CAST(:accounts AS text[]), CAST(:symbols AS text[]))
)""")


async def look_up_and_claim(
    connection: AsyncConnection,
    *,
    user_ids: Iterable[str],
    symbols: Iterable[str],
    keys: Iterable[str],
    balance_keys: Iterable[BalanceKey],
) -> Lookup:
    """Find the users, assets and balance rows a batch names, and claim its idempotency keys.

    A key that another transaction holds uncommitted makes the claim wait for that transaction
    to end (PostgreSQL). Keys go in sorted order, so two batches claiming the same keys wait on
    each other in one order, not in a cycle."""
    ordered_keys = sorted(set(keys))
    wanted_rows = sorted(set(balance_keys))
    if _is_postgres(connection):
        rows = await connection.execute(
            LOOK_UP_AND_CLAIM,
            {
                "keys": ordered_keys,
                "users": sorted(set(user_ids)),
                "assets": sorted(set(symbols)),
                "accounts": [account for account, _ in wanted_rows],
                "symbols": [symbol for _, symbol in wanted_rows],
            },
        )
        found: dict[str, set[Any]] = {"claimed": set(), "user": set(), "asset": set()}
        balance_rows: set[BalanceKey] = set()
        for kind, found_id, asset in rows:
            if kind == "balance":
                balance_rows.add((AccountId(found_id), asset))
            else:
                found[kind].add(found_id)
        return Lookup(found["user"], found["asset"], found["claimed"], balance_rows)

    users = await connection.execute(
        sa.select(accounts.c.id).where(accounts.c.id.in_(set(user_ids)), ~accounts.c.is_system)
    )
    found_assets = await connection.execute(
        sa.select(assets.c.symbol).where(assets.c.symbol.in_(set(symbols)))
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
    existing = await connection.execute(
        sa.select(balances.c.account_id, balances.c.asset_symbol).where(
            sa.tuple_(balances.c.account_id, balances.c.asset_symbol).in_(wanted_rows)
        )
    )
    return Lookup(
        set(users.scalars()),
        set(found_assets.scalars()),
        claimed,
        {(AccountId(a), s) for a, s in existing},
    )


async def stored_requests(
    connection: AsyncConnection, keys: Iterable[str]
) -> dict[str, tuple[str, Transaction | Refusal]]:
    """For keys taken by earlier requests: the request's fingerprint and what it got, the
    transaction it made or the refusal the ledger gave it."""
    keys = set(keys)
    if not keys:
        return {}
    rows = await connection.execute(
        sa.select(transactions).where(transactions.c.idempotency_key.in_(keys))
    )
    stored: dict[str, tuple[str, Transaction | Refusal]] = {
        row.idempotency_key: (row.request_fingerprint, to_transaction(row)) for row in rows
    }
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


async def create_balances(connection: AsyncConnection, keys: Iterable[BalanceKey]) -> None:
    """Create missing balance rows at zero, in the global order, before any lock is taken: two
    concurrent first top-ups of a user both succeed (ON CONFLICT DO NOTHING waits, then skips)."""
    ordered = sorted(set(keys))
    if ordered:
        await connection.execute(
            insert_on_conflict(connection, balances)
            .values([{"account_id": a, "asset_symbol": s, "balance": 0} for a, s in ordered])
            .on_conflict_do_nothing(index_elements=["account_id", "asset_symbol"])
        )


LOCK_BALANCES = sa.text("""
SELECT account_id, asset_symbol, balance, chain_hash FROM balances
WHERE (account_id, asset_symbol) IN (
    SELECT * FROM unnest(CAST(:accounts AS text[]), CAST(:symbols AS text[]))
)
ORDER BY account_id, asset_symbol
FOR UPDATE""")


async def lock_balances(
    connection: AsyncConnection, keys: Iterable[BalanceKey]
) -> dict[BalanceKey, tuple[int, str]]:
    """Lock the existing balance rows of `keys` and return their balances and chain links.

    Every transaction locks in ascending (account, asset) order, by primary key, so none waits
    on another in a cycle. On SQLite, BEGIN IMMEDIATE already holds the one write lock."""
    ordered = sorted(set(keys))
    if not ordered:
        return {}
    if _is_postgres(connection):
        rows = await connection.execute(
            LOCK_BALANCES,
            {"accounts": [a for a, _ in ordered], "symbols": [s for _, s in ordered]},
        )
    else:
        rows = await connection.execute(
            sa.select(
                balances.c.account_id,
                balances.c.asset_symbol,
                balances.c.balance,
                balances.c.chain_hash,
            ).where(sa.tuple_(balances.c.account_id, balances.c.asset_symbol).in_(ordered))
        )
    return {
        (AccountId(account), symbol): (balance, chain_hash)
        for account, symbol, balance, chain_hash in rows
    }


WRITE_POSTINGS = sa.text("""
WITH moved AS (
    UPDATE balances AS b SET balance = v.balance, chain_hash = v.chain_hash
    FROM unnest(
        CAST(:b_accounts AS text[]), CAST(:b_symbols AS text[]), CAST(:b_balances AS bigint[]),
        CAST(:b_links AS text[])
    ) AS v(account_id, asset_symbol, balance, chain_hash)
    WHERE b.account_id = v.account_id AND b.asset_symbol = v.asset_symbol
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
        request_fingerprint, note, metadata, created_at, created_by
    )
    SELECT t.id, t.type, t.user_id, t.asset_symbol, t.amount, t.balance_after, t.key,
        t.fingerprint, t.note, CAST(t.metadata AS json), :created_at, t.created_by
    FROM unnest(
        CAST(:t_ids AS text[]), CAST(:t_types AS text[]), CAST(:t_users AS text[]),
        CAST(:t_symbols AS text[]), CAST(:t_amounts AS bigint[]),
        CAST(:t_balances AS bigint[]), CAST(:t_keys AS text[]),
        CAST(:t_fingerprints AS text[]), CAST(:t_notes AS text[]), CAST(:t_metadata AS text[]),
        CAST(:t_created_by AS text[])
    ) WITH ORDINALITY AS t(
        id, type, user_id, asset_symbol, amount, balance_after, key, fingerprint, note,
        metadata, created_by, position
    )
    ORDER BY t.position
)
INSERT INTO entries (
    id, transaction_id, account_id, asset_symbol, direction, amount, balance_after, created_at,
    chain_hash
)
SELECT e.id, e.transaction_id, e.account_id, e.asset_symbol, e.direction, e.amount,
    e.balance_after, :created_at, e.chain_hash
FROM unnest(
    CAST(:e_ids AS text[]), CAST(:e_transactions AS text[]), CAST(:e_accounts AS text[]),
    CAST(:e_symbols AS text[]), CAST(:e_directions AS text[]), CAST(:e_amounts AS bigint[]),
    CAST(:e_balances AS bigint[]), CAST(:e_links AS text[])
) WITH ORDINALITY AS e(
    id, transaction_id, account_id, asset_symbol, direction, amount, balance_after, chain_hash,
    position
)
ORDER BY e.position""")


async def write_postings(
    connection: AsyncConnection,
    *,
    changed: Mapping[BalanceKey, tuple[int, str]],
    posted: Sequence[tuple[str, Transaction]],
    posted_entries: Sequence[Entry],
    refused: Mapping[str, tuple[str, Refusal]],
    released: Iterable[str],
    created_at: datetime,
) -> None:
    """Write each changed balance (and its chain's newest link) once, insert the transactions
    (with their request fingerprints) and entries in application order, so their `seq` follows
    it, keep each refusal under its key, and forget the claims of commands that failed
    otherwise: such a request records nothing."""
    released = sorted(set(released))
    if not (changed or posted or refused or released):
        return
    if _is_postgres(connection):
        await connection.execute(
            WRITE_POSTINGS,
            {
                "b_accounts": [a for a, _ in changed],
                "b_symbols": [s for _, s in changed],
                "b_balances": [balance for balance, _ in changed.values()],
                "b_links": [chain_hash for _, chain_hash in changed.values()],
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
                "e_ids": [e.id for e in posted_entries],
                "e_transactions": [e.transaction_id for e in posted_entries],
                "e_accounts": [e.account_id for e in posted_entries],
                "e_symbols": [e.asset_symbol for e in posted_entries],
                "e_directions": [e.direction.value for e in posted_entries],
                "e_amounts": [e.amount for e in posted_entries],
                "e_balances": [e.balance_after for e in posted_entries],
                "e_links": [e.chain_hash for e in posted_entries],
            },
        )
        return
    if changed:
        await connection.execute(
            sa.update(balances)
            .where(
                balances.c.account_id == sa.bindparam("key_account"),
                balances.c.asset_symbol == sa.bindparam("key_asset"),
            )
            .values(balance=sa.bindparam("new_balance"), chain_hash=sa.bindparam("new_link")),
            [
                {
                    "key_account": account,
                    "key_asset": asset,
                    "new_balance": balance,
                    "new_link": chain_hash,
                }
                for (account, asset), (balance, chain_hash) in changed.items()
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
                    "direction": e.direction.value,
                    "amount": e.amount,
                    "balance_after": e.balance_after,
                    "created_at": created_at,
                    "chain_hash": e.chain_hash,
                }
                for e in posted_entries
            ],
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
    )


def as_utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
