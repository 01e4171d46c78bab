"""The posting engine: applies a batch of commands in one database transaction and returns one
outcome per command, in order. A command that fails (unknown user, insufficient funds, a reused
key) fails alone; the others still apply. An atomic batch is one command: its operations all
apply, in order, or none does.

Every command takes its row locks in one step (`lock_balances`, in the global order); what holds,
lots and refunds change is read after that step, under those locks, so two commands racing for
one hold, one original, one lot or one user's available coins are decided one after the other."""

import asyncio
import contextlib
import itertools
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import structlog
import uuid_utils
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.errors import (
    CaptureExceedsHold,
    DatabaseUnavailable,
    HoldNotActive,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidRequest,
    NothingExpired,
    RefundExceedsOriginal,
    Refusal,
    UnknownAsset,
    UnknownHold,
    UnknownTransaction,
    UnknownUser,
    WalletError,
)
from wallet.domain.ledger import (
    DEFAULT_HOLD_S,
    MAX_AMOUNT,
    AccountId,
    Action,
    Asset,
    BalanceKey,
    Book,
    Command,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Kind,
    LotMove,
    Portion,
    Posted,
    SystemAccount,
    SystemRowFull,
    Transaction,
    TransactionId,
    UserId,
    check_amount,
    expiry_account,
    flow_accounts,
    is_system_account,
    link,
    lot_expiry,
    refund_accounts,
    returned,
    taken_portions,
)
from wallet.store import ledger
from wallet.store.database import Database, StaleConnection, TransientConflict
from wallet.store.ledger import LockedBalance

Outcome = Posted | WalletError
T = TypeVar("T")
# Under SERIALIZABLE isolation contended transactions abort often (40001), so a transaction is
# rerun, with jittered backoff, for this long before the caller hears 503.
RETRY_FOR_S = 20.0  # 10 s starved one request in a CI run: 64 clients, one hot row, SERIALIZABLE
MAX_BACKOFF_S = 0.05
log = structlog.get_logger()
FLOWS = {
    Action.TOPUP: Flow.TOPUP,
    Action.BONUS: Flow.BONUS,
    Action.SPEND: Flow.SPEND,
    Action.TRANSFER: Flow.TRANSFER,
}
REFERS_TO_HOLD = (Action.CAPTURE, Action.RELEASE)
Legs = list[tuple[AccountId, AccountId, list[Portion]]]  # debited, credited, portions of one kind


async def post(
    database: Database, commands: Sequence[Command], *, deadline: float | None = None
) -> list[Outcome]:
    """Apply `commands` in arrival order in one transaction; rerun it on a transient conflict
    until `deadline` (see `in_write_transaction`), and on another shard of a system account
    whose row it found full. Commands that together move more than any one row holds are
    posted in two halves, each its own transaction, in order."""
    deadline = retry_deadline() if deadline is None else deadline
    while True:
        try:
            return await in_write_transaction(
                database,
                lambda connection: _apply(connection, commands, database.shards),
                deadline=deadline,
            )
        except SystemRowFull:
            continue  # `_apply` marked the row full: the next run takes another
        except TooMuchForOneRow:
            if len(commands) == 1:  # never: one command fits an empty row (64 bits at most)
                raise
            half = len(commands) // 2
            first = await post(database, commands[:half], deadline=deadline)
            return [*first, *await post(database, commands[half:], deadline=deadline)]


class TooMuchForOneRow(Exception):
    """The commands of one transaction move more on a system account than a balance row holds
    (64 bits): `post` splits them."""


def retry_deadline() -> float:
    """When a transaction first tried now stops being rerun: RETRY_FOR_S on the loop's clock."""
    return asyncio.get_running_loop().time() + RETRY_FOR_S


async def in_write_transaction(
    database: Database,
    work: Callable[[AsyncConnection], Awaitable[T]],
    *,
    deadline: float | None = None,
) -> T:
    """Run `work` in a write transaction; rerun it on a transient conflict (a serialization
    failure or deadlock) until `deadline` (`retry_deadline()` unless given: several
    transactions may share one), then answer that the database is unavailable. Past the
    deadline it is tried once. A connection found closed before anything ran is replaced and
    the work rerun at once (SQLAlchemy then renews every connection of the pool that old)."""
    loop = asyncio.get_running_loop()
    if deadline is None:
        deadline = retry_deadline()
    attempt = 0
    while True:
        try:
            async with database.transaction(is_write=True) as connection:
                return await work(connection)
        except StaleConnection:
            if loop.time() >= deadline:
                raise
        except TransientConflict as conflict:
            if loop.time() >= deadline:
                raise DatabaseUnavailable(
                    "the database kept aborting the transaction"
                ) from conflict
            attempt += 1
            await asyncio.sleep(random.uniform(0, min(MAX_BACKOFF_S, 0.001 * 2**attempt)))


async def expire_holds(database: Database, *, limit: int) -> int:
    """Mark up to `limit` holds past their expiry as expired, taking their balance rows' locks in
    the global order as every command does; safe to run in several processes at once (each hold
    is marked once). Returns how many it marked."""
    async with database.transaction(is_write=True) as connection:
        now = datetime.now(UTC)
        due = await ledger.due_holds(connection, now=now, limit=limit)
        if not due:
            return 0
        await ledger.lock_balances(
            connection, {(AccountId(h.user_id), h.asset_symbol): 0 for h in due}
        )
        return len(await ledger.mark_expired(connection, due, now=now))


async def expire_credits(database: Database, *, limit: int) -> int:
    """Move the expired credits of up to `limit` balances out, each with an expiry transaction
    made by the engine under the same locks as every command: so several processes may run it
    at once (the second finds nothing left to expire). Returns how many transactions it made."""
    async with database.transaction(is_write=False) as connection:
        due = await ledger.due_lots(connection, now=datetime.now(UTC), limit=limit)
    if not due:
        return 0
    outcomes = await post(
        database,
        [
            Command(
                action=Action.EXPIRE,
                idempotency_key=f"expiry:{uuid_utils.uuid7()}",
                user_id=UserId(account),
                asset_symbol=asset,
            )
            for account, asset in due
        ],
    )
    return sum(isinstance(outcome, Posted) for outcome in outcomes)


async def sweep_expired(
    database: Database, *, every_s: float, limit: int, stop: asyncio.Event
) -> None:
    """Until `stop` is set: mark expired holds and move expired credits out as they fall due,
    `limit` per transaction. Reads and checks already ignore both at once; the sweep makes a
    hold's `status` say so, and the balance. A pass under way when `stop` is set finishes, so
    shutting down never cuts a statement short."""
    while not stop.is_set():
        done = 0
        for sweep in (expire_holds, expire_credits):
            try:
                done = max(done, await sweep(database, limit=limit))
            except Exception as error:  # the sweeper outlives a database outage
                log.warning("expired holds or credits not swept", error=repr(error))
        if done < limit:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


@dataclass(slots=True)
class Draft:
    """What a database batch has done so far, kept in memory until it is written."""

    book: Book
    assets: Mapping[str, Asset]
    lots_taken: Mapping[TransactionId, list[Portion]]  # by the originals refunds name
    links: dict[BalanceKey, str]
    counts: dict[BalanceKey, int]
    # What the batch makes, in order:
    transactions: list[tuple[str, Transaction]] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    lot_moves: list[LotMove] = field(default_factory=list)
    created_holds: list[tuple[str, Hold]] = field(default_factory=list)
    ended_holds: dict[str, tuple[Hold, str | None, str | None]] = field(default_factory=dict)
    refunded: dict[TransactionId, int] = field(default_factory=dict)  # originals: new total

    def copy(self) -> "Draft":
        return Draft(
            self.book.copy(),
            self.assets,
            self.lots_taken,
            dict(self.links),
            dict(self.counts),
            list(self.transactions),
            list(self.entries),
            list(self.lot_moves),
            list(self.created_holds),
            dict(self.ended_holds),
            dict(self.refunded),
        )


async def _apply(
    connection: AsyncConnection, commands: Sequence[Command], shards: ledger.ShardPicker
) -> list[Outcome]:
    outcomes: list[Outcome | None] = [None] * len(commands)
    hold_ids = {c.reference for c in commands if c.action in REFERS_TO_HOLD and c.reference}
    original_ids = {c.reference for c in commands if c.action is Action.REFUND and c.reference}
    references = (
        await ledger.find_references(connection, hold_ids=hold_ids, transaction_ids=original_ids)
        if hold_ids or original_ids
        else ledger.References({}, {}, {})
    )
    named_holds, originals = references.holds, references.transactions
    resolved: list[Command] = []
    for index, command in enumerate(commands):
        try:
            resolved.append(_resolve(command, named_holds, originals))
        except WalletError as error:
            outcomes[index] = error
            resolved.append(command)
    parts = [op for c in resolved for op in (c.operations or (c,))]
    rows = shards.for_batch({key for c in resolved for key in _balance_keys(c, originals)})
    lookup = await ledger.look_up_and_claim(
        connection,
        user_ids={u for op in parts for u in (op.user_id, op.to_user_id) if u is not None},
        symbols={op.asset_symbol for op in parts if op.asset_symbol is not None},
        keys={key for c in resolved for key in _keys(c)},
        balance_rows=rows,
    )
    for index, command in enumerate(resolved):
        if outcomes[index] is None:
            outcomes[index] = _unknown_names(command, lookup)
    valid = [(i, c) for i, c in enumerate(resolved) if outcomes[i] is None]
    taken = {key for _, c in valid for key in _keys(c)} - lookup.claimed
    # `<key>:0` too: a key an atomic batch took has nothing stored under itself.
    stored = await ledger.stored_requests(connection, taken | {f"{key}:0" for key in taken})
    _gather_batch_replays(stored, [c for _, c in valid if c.idempotency_key in taken])

    to_lock = {
        key
        for _, c in valid
        if c.idempotency_key in lookup.claimed
        for key in _balance_keys(c, originals)
    }
    await ledger.create_balances(
        connection, {key: rows[key] for key in to_lock - lookup.balance_rows}
    )
    locked = await ledger.lock_balances(connection, {key: rows[key] for key in to_lock})
    # Taken after the locks, so time follows the order of application; a hold counts until it.
    now = datetime.now(UTC)
    claimed = [c for _, c in valid if c.idempotency_key in lookup.claimed]
    under_lock = await ledger.read_under_lock(
        connection,
        held_keys=[key for key, row in locked.items() if row.held > 0],
        lot_keys=[key for key, row in locked.items() if row.expiring > 0],
        hold_ids={c.reference for c in claimed if c.action in REFERS_TO_HOLD and c.reference},
        originals={c.reference for c in claimed if c.action is Action.REFUND and c.reference},
        now=now,
    )
    draft = Draft(
        Book(
            balances={key: row.balance for key, row in locked.items()},
            paid={key: row.paid for key, row in locked.items()},
            held={key: row.held for key, row in locked.items()},
            active_held=under_lock.active_held,
            lots=under_lock.lots,
            holds=under_lock.holds,
            refunded=under_lock.refunded,
        ),
        assets=lookup.assets,
        lots_taken=references.lots_taken,
        links={key: row.chain_hash for key, row in locked.items()},
        counts={key: row.entry_count for key, row in locked.items()},
    )
    applied: dict[str, tuple[str, Posted]] = {}
    refused: dict[str, tuple[str, Refusal]] = {}
    kept: set[str] = set()  # claims that stay: the keys of what applied
    for index, command in valid:
        key = command.idempotency_key
        if key not in lookup.claimed and key not in stored:
            # Taken by a transaction this one cannot see yet (only under snapshot isolation).
            raise TransientConflict(key)
        fingerprint = commands[index].fingerprint()  # of the request as sent
        earlier = stored.get(key) or applied.get(key) or refused.get(key)
        if earlier is not None:
            outcomes[index] = _replay(command, fingerprint, *earlier)
            continue
        operation_keys = _keys(command)[1:]
        if not lookup.claimed.issuperset(operation_keys) or any(
            k in applied or k in refused for k in operation_keys
        ):
            outcomes[index] = IdempotencyKeyReused(
                f"a key of batch {key}'s transactions was used for another request"
            )
            continue
        trial = draft.copy() if command.action not in FLOWS else draft
        try:
            posted = _apply_one(trial, command, originals, fingerprint, now)
        except Refusal as refusal:
            if command.action is Action.BATCH:  # an atomic batch that failed records nothing
                outcomes[index] = refusal
            else:  # final: kept under its key like a success
                refused[key] = (fingerprint, refusal)
                outcomes[index] = refusal
            continue
        except WalletError as error:
            outcomes[index] = error
            continue
        except SystemRowFull as full:
            if locked[full.key].balance == 0:  # an empty row cannot hold it: no row can
                raise TooMuchForOneRow(full.key) from full
            shards.mark_full(full.key, rows[full.key])
            raise
        draft = trial
        applied[key] = (fingerprint, posted)
        if command.action is Action.BATCH:  # its transactions' keys are taken too
            for operation_key, transaction in zip(operation_keys, posted.transactions, strict=True):
                applied[operation_key] = (fingerprint, Posted((transaction,), is_replay=False))
        kept.update(_keys(command))
        outcomes[index] = posted

    book = draft.book
    changed = {
        key: row
        for key in locked
        if (
            row := LockedBalance(
                book.balances[key],
                draft.links[key],
                draft.counts[key],
                book.held[key],
                book.paid[key],
                book.expiring(key),
            )
        )
        != locked[key]
    }
    await ledger.write_postings(
        connection,
        changed=changed,
        posted=draft.transactions,
        posted_entries=draft.entries,
        refused=refused,
        released=lookup.claimed - kept - refused.keys(),
        lots_after={(key, lot): book.lots[key][lot] for key, lot in book.changed_lots},
        moved_lots=draft.lot_moves,
        created_at=now,
        shards=rows,
    )
    await ledger.write_holds(connection, created=draft.created_holds, ended=draft.ended_holds)
    await ledger.write_refunded(connection, draft.refunded)
    settled = [outcome for outcome in outcomes if outcome is not None]
    if len(settled) != len(commands):  # a reply must never shift onto another caller
        raise AssertionError("a command was left without an outcome")
    return settled


def _resolve(
    command: Command, named_holds: Mapping[str, Hold], originals: Mapping[str, Transaction]
) -> Command:
    """The command with the user and asset of the hold or transaction it names."""
    if command.action in REFERS_TO_HOLD:
        hold = named_holds.get(command.reference or "")
        if hold is None:
            raise UnknownHold(f"hold {command.reference} does not exist")
        return replace(command, user_id=hold.user_id, asset_symbol=hold.asset_symbol)
    if command.action is Action.REFUND:
        original = originals.get(command.reference or "")
        if original is None:
            raise UnknownTransaction(f"transaction {command.reference} does not exist")
        return replace(command, user_id=original.user_id, asset_symbol=original.asset_symbol)
    return command


def _unknown_names(command: Command, lookup: ledger.Lookup) -> WalletError | None:
    """The error for the first user or asset the command (or batch operation) names that does
    not exist, if any."""
    for index, op in enumerate(command.operations or (command,)):
        error: WalletError | None = None
        for user in (op.user_id, op.to_user_id):
            if user is not None and user not in lookup.users:
                error = UnknownUser(f"user {user} does not exist")
                break
        else:
            if op.asset_symbol not in lookup.assets:
                error = UnknownAsset(f"asset {op.asset_symbol} does not exist")
        if error is not None:
            if command.operations:
                error.operation_index = index
            return error
    return None


def _keys(command: Command) -> list[str]:
    """The idempotency keys a command claims: its own, and one per transaction of a batch."""
    key = command.idempotency_key
    return [key, *(f"{key}:{index}" for index in range(len(command.operations)))]


def _balance_keys(command: Command, originals: Mapping[str, Transaction]) -> set[BalanceKey]:
    """The balance rows a command locks."""
    keys: set[BalanceKey] = set()
    for op in command.operations or (command,):
        if op.user_id is None or op.asset_symbol is None:
            continue  # names a hold or transaction that does not exist
        asset = op.asset_symbol
        match op.action:
            case Action.HOLD | Action.RELEASE:
                keys.add((AccountId(op.user_id), asset))
            case Action.EXPIRE:
                keys.update(
                    (AccountId(account), asset)
                    for account in (op.user_id, SystemAccount.BONUS_POOL, SystemAccount.REVENUE)
                )
            case Action.REFUND:
                original = originals[op.reference or ""]
                if original.flow in (Flow.TOPUP, Flow.BONUS, Flow.SPEND):
                    _, debited, credited = refund_accounts(original)
                    keys.update(((debited, asset), (credited, asset)))
            case _:
                debited, credited = flow_accounts(op.action, op.user_id, op.to_user_id)
                keys.update(((debited, asset), (credited, asset)))
    return keys


def _gather_batch_replays(
    stored: dict[str, tuple[str, Posted | Refusal]], commands: Sequence[Command]
) -> None:
    """An atomic batch that applied is found by its transactions' keys (`<key>:<i>`), which
    carry the batch's fingerprint: make it a stored request under its own key, so a retry of
    the batch replays it and any other request with that key is told the key is taken."""
    for command in commands:
        key = command.idempotency_key
        first = stored.get(f"{key}:0")
        if key in stored or first is None:
            continue
        found: list[Transaction] = []
        for index in itertools.count():
            earlier = stored.get(f"{key}:{index}")
            if earlier is None or not isinstance(earlier[1], Posted):
                break
            found.append(earlier[1].transaction)
        stored[key] = (first[0], Posted(tuple(found), is_replay=True))


def _replay(
    command: Command, fingerprint: str, stored_fingerprint: str, earlier: Posted | Refusal
) -> Outcome:
    if fingerprint != stored_fingerprint:
        return IdempotencyKeyReused(
            f"idempotency key {command.idempotency_key} was used for a different request"
        )
    if isinstance(earlier, Refusal):
        return type(earlier)(earlier.detail, is_replay=True)
    return replace(earlier, is_replay=True)


def _apply_one(
    draft: Draft,
    command: Command,
    originals: Mapping[str, Transaction],
    fingerprint: str,
    now: datetime,
) -> Posted:
    """Apply one command to `draft`, or raise. Only a flow leaves `draft` unchanged when it
    raises; the engine gives every other command a copy."""
    book = draft.book
    user, asset = command.user_id or UserId(""), command.asset_symbol or ""
    key = (AccountId(user), asset)
    order = draft.assets[asset].spend_order if asset in draft.assets else None
    match command.action:
        case Action.BATCH:
            made = []
            for index, op in enumerate(command.operations):
                try:
                    made.append(
                        apply_flow(
                            draft,
                            replace(
                                op,
                                idempotency_key=f"{command.idempotency_key}:{index}",
                                created_by=command.created_by,
                            ),
                            fingerprint,
                            now,
                        )
                    )
                except WalletError as error:
                    error.operation_index = index
                    raise
            return Posted(tuple(made), is_replay=False)
        case Action.HOLD:
            assert command.amount is not None
            assert order is not None
            paid = book.reserve(key, command.amount, order, now)
            hold = Hold(
                id=str(uuid_utils.uuid7()),
                user_id=user,
                asset_symbol=asset,
                amount=command.amount,
                captured_amount=0,
                status=HoldStatus.HELD,
                expires_at=now + timedelta(seconds=command.expires_in_s or DEFAULT_HOLD_S),
                created_at=now,
                ended_at=None,
                description=command.note,
                created_by=command.created_by,
                idempotency_key=command.idempotency_key,
                paid_amount=paid,
            )
            draft.created_holds.append((fingerprint, hold))
            return Posted((), is_replay=False, hold=hold)
        case Action.CAPTURE | Action.RELEASE:
            assert order is not None
            hold = _active_hold(book, command.reference or "", now)
            book.end_hold(hold)
            if command.action is Action.RELEASE:
                ended = replace(hold, status=HoldStatus.RELEASED, ended_at=now)
                book.holds[hold.id] = ended
                draft.ended_holds[hold.id] = (ended, command.idempotency_key, fingerprint)
                return Posted((), is_replay=False, hold=ended)
            amount = hold.amount if command.amount is None else command.amount
            if amount > hold.amount:
                raise CaptureExceedsHold(
                    f"capture of {amount} is more than hold {hold.id}'s {hold.amount}"
                )
            ended = replace(hold, status=HoldStatus.CAPTURED, captured_amount=amount, ended_at=now)
            book.holds[hold.id] = ended
            draft.ended_holds[hold.id] = (ended, None, None)
            # What the hold reserved, in the spend order; it kept those credits from expiring.
            legs: Legs = []
            left = amount
            for kind in order.kinds:
                part = min(left, hold.reserved(kind))
                left -= part
                if part:
                    portions = book.plan(key, kind, part, now, due_first=True)
                    legs.append((AccountId(user), AccountId(SystemAccount.REVENUE), portions))
            transaction = _record(
                draft,
                replace(command, amount=amount),
                Flow.SPEND,
                legs,
                fingerprint,
                now,
                hold_id=hold.id,
            )
            return Posted((transaction,), is_replay=False, hold=ended)
        case Action.REFUND:
            original = originals[command.reference or ""]
            flow, debited, credited = refund_accounts(original)
            before = book.refunded[original.id]
            left = original.amount - before
            amount = left if command.amount is None else command.amount
            if amount > left or left == 0:
                raise RefundExceedsOriginal(
                    f"transaction {original.id} has {left} of {original.amount} left to refund,"
                    f" less than the {amount} asked for"
                )
            legs = _refund_legs(draft, original, debited, credited, before, amount, now)
            book.refunded[original.id] += amount
            draft.refunded[original.id] = book.refunded[original.id]
            transaction = _record(
                draft,
                replace(command, amount=amount),
                flow,
                legs,
                fingerprint,
                now,
                refund_of=original.id,
            )
            return Posted((transaction,), is_replay=False)
        case Action.EXPIRE:
            # At most the largest amount per transaction: the next sweep moves the rest.
            legs = []
            room = MAX_AMOUNT
            for kind in Kind:
                expired = min(book.expired(key, kind, now), room)
                if expired:
                    room -= expired
                    portions = book.plan(key, kind, expired, now, due_first=True)
                    legs.append((AccountId(user), expiry_account(kind), portions))
            if not legs:
                raise NothingExpired(f"{user} has no {asset} past its expiry")
            total = sum(p.amount for _, _, portions in legs for p in portions)
            transaction = _record(
                draft, replace(command, amount=total), Flow.EXPIRY, legs, fingerprint, now
            )
            return Posted((transaction,), is_replay=False)
    return Posted((apply_flow(draft, command, fingerprint, now),), is_replay=False)


def _refund_legs(
    draft: Draft,
    original: Transaction,
    debited: AccountId,
    credited: AccountId,
    before: int,
    amount: int,
    now: datetime,
) -> Legs:
    """A refund of a spend gives back the kinds it took, paid first, into the lots they came
    from; a reversal takes back the kind its top-up or bonus gave, of what is available."""
    if original.flow is not Flow.SPEND:
        kind = Kind.PAID if original.flow is Flow.TOPUP else Kind.FREE
        key = (debited, original.asset_symbol)
        available = draft.book.available(key, kind, now)
        if amount > available:
            raise InsufficientFunds(
                f"available {kind.value} {original.asset_symbol} is {available},"
                f" less than the {amount} asked for"
            )
        return [(debited, credited, draft.book.plan(key, kind, amount, now))]
    paid_before = min(original.paid_amount, before)
    paid = min(original.paid_amount - paid_before, amount)
    taken = draft.lots_taken.get(original.id, [])
    legs: Legs = []
    for kind, part, part_before, kind_amount in (
        (Kind.PAID, paid, paid_before, original.paid_amount),
        (Kind.FREE, amount - paid, before - paid_before, original.free_amount),
    ):
        if part:
            lots = [(p.expires_at, p.amount) for p in taken if p.kind is kind and p.expires_at]
            portions = returned(taken_portions(kind, kind_amount, lots), part_before, part)
            legs.append((debited, credited, portions))
    return legs


def _active_hold(book: Book, hold_id: str, now: datetime) -> Hold:
    hold = book.holds[hold_id]
    if not hold.is_active(now):
        status = HoldStatus.EXPIRED if hold.status is HoldStatus.HELD else hold.status
        raise HoldNotActive(f"hold {hold_id} is {status.value}, not held")
    return hold


def apply_flow(draft: Draft, command: Command, fingerprint: str, now: datetime) -> Transaction:
    """A flow: top-up, bonus, spend or transfer, with the kinds and lots it moves."""
    assert command.user_id is not None
    assert command.amount is not None
    assert command.asset_symbol is not None
    if command.to_user_id == command.user_id:
        raise InvalidRequest("a transfer needs two different users", field="toUserId")
    debited, credited = flow_accounts(command.action, command.user_id, command.to_user_id)
    asset = draft.assets[command.asset_symbol]
    if command.action in (Action.TOPUP, Action.BONUS):
        check_amount(command.amount)
        kind = Kind.PAID if command.action is Action.TOPUP else Kind.FREE
        expires_at = _credit_expiry(command, asset, kind, now)
        portions = [Portion(kind, expires_at, command.amount)]
    else:
        portions = draft.book.plan_in_order(
            (debited, command.asset_symbol), command.amount, asset.spend_order, now
        )
    legs: Legs = [
        (debited, credited, [p for p in portions if p.kind is kind])
        for kind in dict.fromkeys(p.kind for p in portions)
    ]
    return _record(draft, command, FLOWS[command.action], legs, fingerprint, now)


def _credit_expiry(command: Command, asset: Asset, kind: Kind, now: datetime) -> datetime | None:
    """When the credits a top-up or bonus gives expire: as the bonus asks, else by the asset."""
    if command.credit_expires_in_days is not None:
        return now + timedelta(days=command.credit_expires_in_days)
    if command.credit_expires_at is not None:
        if command.credit_expires_at <= now:
            raise InvalidRequest("expiresAt must be in the future", field="expiresAt")
        return command.credit_expires_at
    return lot_expiry(asset, kind, now)


def _record(
    draft: Draft,
    command: Command,
    flow: Flow,
    legs: Legs,
    fingerprint: str,
    now: datetime,
    *,
    hold_id: str | None = None,
    refund_of: TransactionId | None = None,
) -> Transaction:
    """Move each leg in the book, and make the transaction and its entries (a debit and a
    credit per kind); each entry extends its account's chain, each lot portion is recorded."""
    assert command.user_id is not None
    assert command.asset_symbol is not None
    assert command.amount is not None
    asset = command.asset_symbol
    sides = draft.book.move(asset, legs)
    transaction = Transaction(
        id=TransactionId(str(uuid_utils.uuid7())),
        flow=flow,
        user_id=UserId(command.user_id),
        asset_symbol=asset,
        amount=command.amount,
        balance_after=draft.book.balances[(AccountId(command.user_id), asset)],
        idempotency_key=command.idempotency_key,
        note=command.note,
        metadata=command.metadata,
        created_at=now,
        paid_amount=sum(p.amount for _, _, ps in legs for p in ps if p.kind is Kind.PAID),
        created_by=command.created_by,
        to_user_id=command.to_user_id,
        hold_id=hold_id,
        refund_of=refund_of,
    )
    for side in sides:
        key = (side.account, asset)
        unlinked = Entry(
            id=str(uuid_utils.uuid7()),
            transaction_id=transaction.id,
            account_id=side.account,
            asset_symbol=asset,
            direction=side.direction,
            amount=side.amount,
            balance_after=side.balance_after,
            created_at=now,
            kind=side.kind,
            paid_after=side.paid_after,
        )
        draft.links[key] = link(draft.links[key], unlinked, transaction)
        draft.counts[key] += 1
        draft.entries.append(replace(unlinked, chain_hash=draft.links[key]))
    for debited, credited, portions in legs:
        for portion in portions:
            if portion.expires_at is None:
                continue
            for account, sign in ((debited, -1), (credited, 1)):
                if is_system_account(account):
                    continue
                draft.lot_moves.append(
                    LotMove(
                        transaction.id,
                        account,
                        asset,
                        portion.kind,
                        portion.expires_at,
                        sign * portion.amount,
                    )
                )
    draft.transactions.append((fingerprint, transaction))
    return transaction
