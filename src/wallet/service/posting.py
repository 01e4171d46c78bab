"""The posting engine: applies a batch of commands in one database transaction and returns one
outcome per command, in order. A command that fails (unknown user, insufficient funds, a reused
key) fails alone; the others still apply."""

import asyncio
import random
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import uuid_utils
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.errors import (
    DatabaseUnavailable,
    IdempotencyKeyReused,
    Refusal,
    UnknownAsset,
    UnknownUser,
    WalletError,
)
from wallet.domain.ledger import (
    AccountId,
    Command,
    Direction,
    Entry,
    Posted,
    Transaction,
    TransactionId,
    link,
    move,
)
from wallet.store import ledger
from wallet.store.database import Database, TransientConflict

Outcome = Posted | WalletError
# Under SERIALIZABLE isolation contended transactions abort often (40001), so a transaction is
# rerun, with jittered backoff, for this long before the caller hears 503.
RETRY_FOR_S = 20.0  # 10 s starved one request in a CI run: 64 clients, one hot row, SERIALIZABLE
MAX_BACKOFF_S = 0.05


async def post(database: Database, commands: Sequence[Command]) -> list[Outcome]:
    """Apply `commands` in arrival order in one transaction; rerun it on a transient conflict."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RETRY_FOR_S
    attempt = 0
    while True:
        try:
            async with database.transaction(is_write=True) as connection:
                return await _apply(connection, commands)
        except TransientConflict as conflict:
            if loop.time() >= deadline:
                raise DatabaseUnavailable(
                    "the database kept aborting the transaction"
                ) from conflict
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(MAX_BACKOFF_S, 0.001 * 2**attempt)))


async def _apply(connection: AsyncConnection, commands: Sequence[Command]) -> list[Outcome]:
    lookup = await ledger.look_up_and_claim(
        connection,
        user_ids={c.user_id for c in commands},
        symbols={c.asset_symbol for c in commands},
        keys={c.idempotency_key for c in commands},
        balance_keys={key for c in commands for key in _balance_keys(c)},
    )
    outcomes: list[Outcome | None] = [None] * len(commands)
    for index, command in enumerate(commands):
        if command.user_id not in lookup.users:
            outcomes[index] = UnknownUser(f"user {command.user_id} does not exist")
        elif command.asset_symbol not in lookup.assets:
            outcomes[index] = UnknownAsset(f"asset {command.asset_symbol} does not exist")
    valid = [(i, c) for i, c in enumerate(commands) if outcomes[i] is None]
    stored = await ledger.stored_requests(
        connection, {c.idempotency_key for _, c in valid} - lookup.claimed
    )

    to_lock = {
        key for _, c in valid if c.idempotency_key in lookup.claimed for key in _balance_keys(c)
    }
    await ledger.create_balances(connection, to_lock - lookup.balance_rows)
    locked = await ledger.lock_balances(connection, to_lock)
    balances = {key: balance for key, (balance, _) in locked.items()}
    links = {key: chain_hash for key, (_, chain_hash) in locked.items()}
    # Taken after the locks, so time follows the order of application.
    created_at = datetime.now(UTC)
    applied: dict[str, tuple[str, Transaction]] = {}
    refused: dict[str, tuple[str, Refusal]] = {}
    posted_entries: list[Entry] = []
    for index, command in valid:
        key = command.idempotency_key
        if key not in lookup.claimed and key not in stored:
            # Taken by a transaction this one cannot see yet (only under snapshot isolation).
            raise TransientConflict(key)
        fingerprint = command.fingerprint()
        earlier = stored.get(key) or applied.get(key) or refused.get(key)
        if earlier is not None:
            outcomes[index] = _replay(command, fingerprint, *earlier)
            continue
        try:
            move(balances, command)
        except Refusal as refusal:  # final: kept under its key like a success
            refused[key] = (fingerprint, refusal)
            outcomes[index] = refusal
            continue
        except WalletError as error:
            outcomes[index] = error
            continue
        transaction, pair = _record(command, balances, links, created_at)
        applied[key] = (fingerprint, transaction)
        posted_entries.extend(pair)
        outcomes[index] = Posted(transaction, is_replay=False)

    await ledger.write_postings(
        connection,
        changed={k: (balances[k], links[k]) for k in balances if links[k] != locked[k][1]},
        posted=list(applied.values()),
        posted_entries=posted_entries,
        refused=refused,
        released=lookup.claimed - applied.keys() - refused.keys(),
        created_at=created_at,
    )
    settled = [outcome for outcome in outcomes if outcome is not None]
    if len(settled) != len(commands):  # a reply must never shift onto another caller
        raise AssertionError("a command was left without an outcome")
    return settled


def _balance_keys(command: Command) -> tuple[ledger.BalanceKey, ledger.BalanceKey]:
    return (command.debited, command.asset_symbol), (command.credited, command.asset_symbol)


def _replay(
    command: Command, fingerprint: str, stored_fingerprint: str, earlier: Transaction | Refusal
) -> Outcome:
    if fingerprint != stored_fingerprint:
        return IdempotencyKeyReused(
            f"idempotency key {command.idempotency_key} was used for a different request"
        )
    if isinstance(earlier, Refusal):
        return type(earlier)(earlier.detail, is_replay=True)
    return Posted(earlier, is_replay=True)


def _record(
    command: Command,
    balances: dict[ledger.BalanceKey, int],
    links: dict[ledger.BalanceKey, str],
    created_at: datetime,
) -> tuple[Transaction, tuple[Entry, Entry]]:
    """The transaction and entries of an applied command; each entry extends its chain."""
    transaction_id = TransactionId(str(uuid_utils.uuid7()))
    asset = command.asset_symbol

    def entry(account: AccountId, direction: Direction) -> Entry:
        unlinked = Entry(
            id=str(uuid_utils.uuid7()),
            transaction_id=transaction_id,
            account_id=account,
            asset_symbol=asset,
            direction=direction,
            amount=command.amount,
            balance_after=balances[(account, asset)],
            created_at=created_at,
        )
        links[(account, asset)] = link(links[(account, asset)], unlinked)
        return replace(unlinked, chain_hash=links[(account, asset)])

    transaction = Transaction(
        id=transaction_id,
        flow=command.flow,
        user_id=command.user_id,
        asset_symbol=asset,
        amount=command.amount,
        balance_after=balances[(AccountId(command.user_id), asset)],
        idempotency_key=command.idempotency_key,
        note=command.note,
        metadata=command.metadata,
        created_at=created_at,
        created_by=command.created_by,
    )
    return transaction, (
        entry(command.debited, Direction.DEBIT),
        entry(command.credited, Direction.CREDIT),
    )
