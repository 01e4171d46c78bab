"""Stateful property: random flows, transfers, holds (placed, captured whole or in part, released,
expired by the clock and marked by the sweeper), refunds and reversals, atomic batches, retries,
replays and reused keys, driven through the service layer (`Wallet`, `post()`, `expire_holds()`,
`expire_credits()`), agree step by step with a plain model, on SQLite and on PostgreSQL; the
ledger verifies clean throughout. The model keeps each balance's paid and free parts, its lots of
credits that expire, what each hold reserves of each kind, and what each key got; it follows
API-credits.md (1.3): spend orders (a new asset paid first, orders changed on the way), lifetimes
of free and of paid credits, bonuses that expire at a moment or after some days, credits that
expire at the exact microsecond, holds that keep what they reserved from expiring, refunds by
kind into the lots they came from, and the sweeper that moves expired credits out. The engine's
clock is the machine's, and moves only when a rule moves it. A key keeps what it got, a success
or a refusal by the ledger's state (API-operations.md: a refusal is final)."""

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import wallet.service.audit
import wallet.service.posting
import wallet.service.seed
import wallet.service.wallet
from wallet.domain.errors import (
    CaptureExceedsHold,
    HoldNotActive,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidRequest,
    NotRefundable,
    RefundExceedsOriginal,
    Refusal,
    UnknownAsset,
    UnknownHold,
    UnknownTransaction,
    UnknownUser,
    UserExists,
    WalletError,
)
from wallet.domain.ledger import (
    MAX_AMOUNT,
    Action,
    Asset,
    Command,
    Direction,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Kind,
    Posted,
    SpendOrder,
    Transaction,
    TransactionId,
    UserId,
)
from wallet.service.audit import verify
from wallet.service.posting import Outcome, expire_credits, expire_holds, post
from wallet.service.seed import ALICE, BOB, seed
from wallet.service.wallet import PageRequest, Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.ledger import as_utc, to_hold, to_transaction
from wallet.store.migrate import migrate
from wallet.store.tables import (
    balances,
    entries,
    holds,
    lot_moves,
    lots,
    metadata,
    transactions,
)

T = TypeVar("T")
BACKENDS = ["sqlite", "postgresql"]
NEW_ASSET = "GEMS"  # the machine creates it: paid first, and its paid credits last two days
ASSETS = ("DIAMONDS", NEW_ASSET, "GOLD_COINS", "LOYALTY_POINTS")  # in the order the reads list them
UNKNOWN_ASSET = "SILVER"
# Seeded users, and ids a rule may create later: a flow for one of them fails with UnknownUser
# until it exists, and the same key may then succeed. A system account is never a user.
USER_POOL = (ALICE, BOB, "carol", "dave")
NOT_A_USER = "system:treasury"
UNKNOWN_HOLD = "hold-that-never-was"
UNKNOWN_TRANSACTION = "transaction-that-never-was"
TREASURY, BONUS_POOL, REVENUE = "system:treasury", "system:bonus_pool", "system:revenue"
DEFAULT_HOLD_S = 900  # API-ledger.md: a hold without expiresInSeconds lasts 900 s
VERIFY_EVERY = 10  # steps between full ledger audits (and once more at the end)
# One client never meets a transient conflict, so a request the engine keeps rerunning is a bug:
# let it give up after a second, not the 20 s a loaded server allows.
RETRY_FOR_S = 1.0
# The kinds a spend, transfer or hold takes first and second (API-credits.md).
KINDS_IN = {
    SpendOrder.FREE_FIRST: (Kind.FREE, Kind.PAID),
    SpendOrder.PAID_FIRST: (Kind.PAID, Kind.FREE),
}

MACHINE_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    # No explain phase: on a failure it would replay the example hundreds of times more, for
    # little more than the shrunk steps already say.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)

amounts = st.one_of(
    st.integers(1, 60),  # small: many spends succeed
    st.integers(1, 1_500),  # around the seed balances: some spends overdraw
    st.sampled_from([0, MAX_AMOUNT, MAX_AMOUNT + 1]),  # the edges of the valid range
)
# Mostly ids and symbols that exist (or may), now and then ones that never will.
user_ids = st.sampled_from(USER_POOL * 3 + (NOT_A_USER,))
asset_symbols = st.sampled_from((*ASSETS, *ASSETS, UNKNOWN_ASSET))
notes = st.sampled_from([None, "gift", "refund"])
# Seconds a hold lasts: None is the default; short ones expire as the clock moves.
expiries = st.sampled_from([None, 1, 2, 60, 3600])
FLOW_ACTIONS = (Action.TOPUP, Action.BONUS, Action.SPEND, Action.TRANSFER)
# When a bonus's credits expire, from the moment it is drawn: now and before are refused.
CREDIT_EXPIRY_OFFSETS = (
    timedelta(0),
    timedelta(seconds=-1),
    timedelta(microseconds=1),
    timedelta(seconds=30),
    timedelta(hours=1),
    timedelta(days=1),
)
# A PATCH of an asset: any of its spend order and lifetimes, or none.
asset_changes = st.fixed_dictionaries(
    {},
    optional={
        "spend_order": st.sampled_from(SpendOrder),
        "free_lifetime_days": st.sampled_from([None, 1, 365]),
        "paid_lifetime_days": st.sampled_from([None, 1, 2]),
    },
)


# ---- the clock ----------------------------------------------------------------------------


class Clock:
    """The time the engine and the reads take as now while a machine runs."""

    def __init__(self) -> None:
        self.moment = datetime.now(UTC)


CLOCK = Clock()


class MachineDatetime(datetime):
    """`datetime` whose `now()` is CLOCK's: patched into the modules that take the time."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        if tz is None:  # local and naive, as datetime.now() is
            return CLOCK.moment.astimezone().replace(tzinfo=None)
        return CLOCK.moment.astimezone(tz)


# The audit too: which holds are active, for what they may reserve, is a matter of the time.
CLOCKED_MODULES = (
    wallet.service.posting,
    wallet.service.wallet,
    wallet.service.seed,
    wallet.service.audit,
)


@pytest.fixture
def machine_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `datetime.now` of the engine, the reads, the seed and the audit reads CLOCK."""
    for module in CLOCKED_MODULES:
        monkeypatch.setattr(module, "datetime", MachineDatetime)
    monkeypatch.setattr(wallet.service.posting, "RETRY_FOR_S", RETRY_FOR_S)


# ---- requests -----------------------------------------------------------------------------


@st.composite
def credit_expiries(draw: st.DrawFn) -> dict[str, Any]:
    """A bonus's expiry: none (the asset's lifetime), some days, or a moment. The moment is
    drawn from CLOCK as the rule runs (hypothesis draws a rule's arguments just before it)."""
    how = draw(st.sampled_from(["asset", "asset", "days", "at"]))
    if how == "days":
        return {"credit_expires_in_days": draw(st.sampled_from([1, 2]))}
    if how == "at":
        return {"credit_expires_at": CLOCK.moment + draw(st.sampled_from(CREDIT_EXPIRY_OFFSETS))}
    return {}


@st.composite
def flow_requests(draw: st.DrawFn) -> Command:
    """A top-up, bonus, spend or transfer without its key (the rule gives it one)."""
    action = draw(st.sampled_from(FLOW_ACTIONS))
    return Command(
        action=action,
        user_id=UserId(draw(user_ids)),
        to_user_id=UserId(draw(user_ids)) if action is Action.TRANSFER else None,
        asset_symbol=draw(asset_symbols),
        amount=draw(amounts),
        idempotency_key="",
        note=None if action is Action.TOPUP else draw(notes),
        metadata=(
            draw(st.sampled_from([None, {"order": "1"}, {"order": "2"}]))
            if action is Action.TOPUP
            else None
        ),
        **(draw(credit_expiries()) if action is Action.BONUS else {}),
    )


def with_key(command: Command, key: str) -> Command:
    return dataclasses.replace(command, idempotency_key=key)


def same_request(one: Command, other: Command) -> bool:
    """Two requests are the same when all but their keys (and the API key) are equal."""

    def bare(command: Command) -> Command:
        return dataclasses.replace(
            command,
            idempotency_key="",
            created_by=None,
            operations=tuple(bare(op) for op in command.operations),
        )

    return bare(one) == bare(other)


def operation_keys(command: Command) -> list[str]:
    return [f"{command.idempotency_key}:{i}" for i in range(len(command.operations))]


def seeded_request(transaction: Transaction) -> Command:
    """The request that made a seed top-up."""
    return Command(
        action=Action.TOPUP,
        user_id=transaction.user_id,
        asset_symbol=transaction.asset_symbol,
        amount=transaction.amount,
        idempotency_key=transaction.idempotency_key,
        note=transaction.note,
        metadata=transaction.metadata,
    )


# ---- the model ----------------------------------------------------------------------------


def is_system(account: str) -> bool:
    return account.startswith("system:")


def moved_between(action: Action, user_id: str, to_user_id: str | None) -> tuple[str, str]:
    """The accounts a flow debits and credits (the model's own table, API-ledger.md)."""
    match action:
        case Action.TOPUP:
            return TREASURY, user_id
        case Action.BONUS:
            return BONUS_POOL, user_id
        case Action.SPEND | Action.CAPTURE:
            return user_id, REVENUE
        case Action.TRANSFER:
            assert to_user_id is not None
            return user_id, to_user_id
    raise AssertionError(f"{action} moves no money")


def refunded_between(original: Transaction) -> tuple[Flow, str, str] | None:
    """A refund's type and the accounts it debits and credits; None if not refundable."""
    match original.flow:
        case Flow.SPEND:
            return Flow.REFUND, REVENUE, original.user_id
        case Flow.TOPUP:
            return Flow.REVERSAL, original.user_id, TREASURY
        case Flow.BONUS:
            return Flow.REVERSAL, original.user_id, BONUS_POOL
    return None


@dataclass(frozen=True)
class ModelAsset:
    """What the model knows of an asset: its spend order and lifetimes (named as `Asset`'s)."""

    spend_order: SpendOrder = SpendOrder.FREE_FIRST
    free_lifetime_days: int | None = None
    paid_lifetime_days: int | None = None


def seeded_assets() -> dict[str, ModelAsset]:
    """The seed's assets as API-credits.md gives them: free first; loyalty points' free
    credits last 365 days, nothing else expires."""
    return {
        "DIAMONDS": ModelAsset(),
        "GOLD_COINS": ModelAsset(),
        "LOYALTY_POINTS": ModelAsset(free_lifetime_days=365),
    }


class Piece(NamedTuple):
    """Credits of one kind a move takes or gives: of one lot (its expiry), or of those that
    never expire (None)."""

    expires_at: datetime | None
    amount: int


@dataclass(frozen=True)
class ModelLeg:
    """One kind's move from one account to another: a debit and a credit entry."""

    debited: str
    credited: str
    kind: Kind
    pieces: tuple[Piece, ...]

    @property
    def amount(self) -> int:
        return sum(p.amount for p in self.pieces)


class ModelEntry(NamedTuple):
    account: str
    direction: Direction
    kind: Kind
    amount: int
    # What the entry left in its balance row; None for a system account, whose entries state
    # one of its several rows (`verify` replays those; the model checks their sums instead).
    balance_after: int | None
    paid_after: int | None


def entry_facts(entry: Entry) -> ModelEntry:
    is_user = not is_system(entry.account_id)
    return ModelEntry(
        entry.account_id,
        entry.direction,
        entry.kind,
        entry.amount,
        entry.balance_after if is_user else None,
        entry.paid_after if is_user else None,
    )


LotMoved = tuple[str, Kind, datetime, int]  # account, kind, expiry, amount (taken: negative)
LotKey = tuple[str, str, Kind, datetime]  # user, asset, kind, expiry


class Refused(Exception):
    """The model's refusal of an operation: the error the engine must answer with (and, for
    some, the field it names)."""

    def __init__(self, error: type[WalletError], *, field: str | None = None) -> None:
        super().__init__(error.__name__)
        self.error = error
        self.field = field


@dataclass
class ModelHold:
    """A hold as stored: `status` turns expired only when the sweeper marks it."""

    id: str
    user_id: str
    asset: str
    amount: int
    paid: int  # what it reserved of paid credits; the rest, of free
    expires_at: datetime
    created_at: datetime
    description: str | None
    key: str
    status: HoldStatus = HoldStatus.HELD
    captured: int = 0
    ended_at: datetime | None = None

    def is_active(self, now: datetime) -> bool:
        return self.status is HoldStatus.HELD and now < self.expires_at

    def reserved(self, kind: Kind) -> int:
        return self.paid if kind is Kind.PAID else self.amount - self.paid

    def stored(self) -> Hold:
        return Hold(
            id=self.id,
            user_id=UserId(self.user_id),
            asset_symbol=self.asset,
            amount=self.amount,
            captured_amount=self.captured,
            status=self.status,
            expires_at=self.expires_at,
            created_at=self.created_at,
            ended_at=self.ended_at,
            description=self.description,
            created_by=None,
            idempotency_key=self.key,
            paid_amount=self.paid,
        )

    def seen(self, now: datetime) -> Hold:
        """The hold as the reads show it: past its expiry it is expired, marked or not."""
        if self.status is HoldStatus.HELD and now >= self.expires_at:
            return dataclasses.replace(
                self.stored(), status=HoldStatus.EXPIRED, ended_at=self.expires_at
            )
        return self.stored()


@dataclass(frozen=True)
class Decision:
    """What a key got, for good: the request, and its success or its refusal."""

    request: Command
    outcome: Posted | Refusal


class Model:
    """What the wallet should hold: users and assets, every account's paid and free credits,
    each user's lots, the holds, the transactions (their entries, what they took from lots,
    what has been refunded of each), and what each key got."""

    def __init__(self) -> None:
        self.users: set[str] = set()
        self.assets = seeded_assets()
        self.parts: Counter[tuple[str, str, Kind]] = Counter()  # (account, asset, kind)
        self.lots: Counter[LotKey] = Counter()  # what remains of each lot
        self.holds: dict[str, ModelHold] = {}  # in the order they were placed
        self.transactions: dict[str, Transaction] = {}  # as first made, in order
        self.entries: dict[str, list[ModelEntry]] = {}  # as written (once compared)
        self.entry_orders: dict[str, list[list[ModelEntry]]] = {}  # the orders the rules allow
        self.lot_moves: dict[str, list[LotMoved]] = {}
        self.taken: dict[str, dict[Kind, tuple[Piece, ...]]] = {}  # a spend's, in taken order
        self.balance_after: dict[tuple[str, str], int] = {}  # (transaction, account) → after
        self.refunded: Counter[str] = Counter()
        self.refunds: dict[str, list[str]] = {}
        self.history: dict[str, list[str]] = {}  # each user's transaction ids, oldest first
        self.sent: dict[str, Command] = {}  # the last request sent with each key
        self.decided: dict[str, Decision] = {}
        self.batches: list[str] = []  # keys of the atomic batches sent, applied or not
        self.unwritten: list[str] = []  # transactions not yet compared with what was written

    @property
    def now(self) -> datetime:
        return CLOCK.moment

    # -- reads of the model

    def balance(self, account: str, asset: str) -> int:
        return self.parts[(account, asset, Kind.PAID)] + self.parts[(account, asset, Kind.FREE)]

    def order(self, asset: str) -> tuple[Kind, Kind]:
        return KINDS_IN[self.assets[asset].spend_order]

    def lots_of(self, user_id: str, asset: str, kind: Kind) -> list[tuple[datetime, int]]:
        """The user's lots of a kind that hold credits, soonest to expire first."""
        return sorted(
            (at, left)
            for (u, a, k, at), left in self.lots.items()
            if (u, a, k) == (user_id, asset, kind) and left > 0
        )

    def pending_expiries(self) -> list[datetime]:
        """The moments lots with credits in them expire, still to come."""
        return sorted({lot[3] for lot, left in self.lots.items() if left > 0 and lot[3] > self.now})

    def active_holds(self, user_id: str, asset: str) -> list[ModelHold]:
        return [
            h
            for h in self.holds.values()
            if (h.user_id, h.asset) == (user_id, asset) and h.is_active(self.now)
        ]

    def held(self, user_id: str, asset: str) -> int:
        """What the user's holds that count now reserve."""
        return sum(h.amount for h in self.active_holds(user_id, asset))

    def reserved(self, user_id: str, asset: str, kind: Kind) -> int:
        return sum(h.reserved(kind) for h in self.active_holds(user_id, asset))

    def stored_held(self, user_id: str, asset: str) -> int:
        """The balance row's `held`: holds in status held, expired or not."""
        return sum(
            h.amount
            for h in self.holds.values()
            if (h.user_id, h.asset) == (user_id, asset) and h.status is HoldStatus.HELD
        )

    def expired(self, user_id: str, asset: str, kind: Kind) -> int:
        """Credits of a kind in lots past their expiry, less what active holds reserved of that
        kind: a hold keeps its credits from expiring while it lasts."""
        due = sum(left for at, left in self.lots_of(user_id, asset, kind) if at <= self.now)
        return max(0, due - self.reserved(user_id, asset, kind))

    def available_of(self, user_id: str, asset: str, kind: Kind) -> int:
        return (
            self.parts[(user_id, asset, kind)]
            - self.reserved(user_id, asset, kind)
            - self.expired(user_id, asset, kind)
        )

    def available(self, account: str, asset: str) -> int:
        return sum(self.available_of(account, asset, kind) for kind in Kind)

    def standing(
        self, user_id: str, asset: str
    ) -> tuple[str, int, int, int, int, int, tuple[int, datetime] | None]:
        """Asset, balance, paid, free, held, available and the next credits to expire."""
        balance, paid = self.balance(user_id, asset), self.parts[(user_id, asset, Kind.PAID)]
        held = self.held(user_id, asset)
        available = balance - held - sum(self.expired(user_id, asset, kind) for kind in Kind)
        assert available == self.available(user_id, asset), "the model's available disagrees"
        upcoming = [
            (at, left)
            for kind in Kind
            for at, left in self.lots_of(user_id, asset, kind)
            if at > self.now
        ]
        soonest = min((at for at, _ in upcoming), default=None)
        next_expiry = (
            None if soonest is None else (sum(n for at, n in upcoming if at == soonest), soonest)
        )
        return asset, balance, paid, balance - paid, held, available, next_expiry

    def due_balances(self) -> dict[tuple[str, str], datetime]:
        """The balances the credit sweeper moves expired credits out of, each with its soonest
        lot past its expiry of a kind that has credits expired (beyond what holds keep)."""
        due: dict[tuple[str, str], datetime] = {}
        for (user_id, asset, kind, at), left in self.lots.items():
            if left > 0 and at <= self.now and self.expired(user_id, asset, kind) > 0:
                due[(user_id, asset)] = min(at, due.get((user_id, asset), at))
        return due

    def view(self, transaction_id: str, reader: str | None = None) -> Transaction:
        """A transaction as a read shows it now (to `reader`, with their balance after it)."""
        made = self.transactions[transaction_id]
        return dataclasses.replace(
            made,
            balance_after=self.balance_after[(transaction_id, reader or made.user_id)],
            refunded_amount=self.refunded[transaction_id],
            refunds=tuple(TransactionId(r) for r in self.refunds.get(transaction_id, [])),
        )

    def refusals(self, command: Command) -> set[type[WalletError]]:
        """The errors any one of which may answer the request before the ledger looks at it.
        The contract leaves their order open: a request can be both for an unknown user and a
        reuse."""
        found: set[type[WalletError]] = set()
        key = command.idempotency_key
        decision = self.decided.get(key)
        is_reuse = decision is not None and not same_request(decision.request, command)
        match command.action:
            case Action.CAPTURE | Action.RELEASE:
                if command.reference not in self.holds:
                    found.add(UnknownHold)
            case Action.REFUND:
                if command.reference not in self.transactions:
                    found.add(UnknownTransaction)
            case Action.BATCH:
                unknown = self.first_unknown_name(command.operations)
                if unknown is not None:
                    found.add(unknown[1])
            case _:
                unknown = self.first_unknown_name([command])
                if unknown is not None:
                    found.add(unknown[1])
                assert command.amount is not None
                if not 1 <= command.amount <= MAX_AMOUNT:
                    found.add(InvalidRequest)
                if command.action is Action.TRANSFER and command.to_user_id == command.user_id:
                    found.add(InvalidRequest)
                # expiresAt must be in the future when the bonus applies; a replay still replays.
                expires_at = command.credit_expires_at
                is_too_late = expires_at is not None and expires_at <= self.now
                if is_too_late and (decision is None or is_reuse):
                    found.add(InvalidRequest)
        if is_reuse:
            found.add(IdempotencyKeyReused)
        taken = [k for k in operation_keys(command) if k in self.decided]
        if command.action is Action.BATCH and decision is None and taken:
            found.add(IdempotencyKeyReused)  # an operation's key is another request's
        return found

    def is_only_too_late(self, command: Command) -> bool:
        """A valid bonus but for its expiresAt, which is not in the future."""
        return (
            command.action is Action.BONUS
            and command.amount is not None
            and 1 <= command.amount <= MAX_AMOUNT
            and command.credit_expires_at is not None
            and command.credit_expires_at <= self.now
        )

    def first_unknown_name(
        self, operations: Any
    ) -> tuple[int, type[UnknownUser] | type[UnknownAsset]] | None:
        """The first operation naming a user or an asset that does not exist, and the error."""
        for index, op in enumerate(operations):
            if any(u is not None and u not in self.users for u in (op.user_id, op.to_user_id)):
                return index, UnknownUser
            if op.asset_symbol not in self.assets:
                return index, UnknownAsset
        return None

    def debit_of(self, command: Command) -> tuple[str, str, int, Kind | None]:
        """The user, asset and amount a request would take from a user's available credits,
        and the one kind it takes if it takes one only (a reversal)."""
        if command.action is Action.REFUND:
            original = self.transactions[command.reference or ""]
            kind = {Flow.TOPUP: Kind.PAID, Flow.BONUS: Kind.FREE}.get(original.flow)
            return original.user_id, original.asset_symbol, original.amount, kind
        assert command.user_id is not None
        assert command.asset_symbol is not None
        assert command.amount is not None
        return command.user_id, command.asset_symbol, command.amount, None

    # -- what a request takes and gives, by the rules of API-credits.md

    def split(self, user_id: str, asset: str, amount: int) -> dict[Kind, int]:
        """How much of each kind `amount` takes of the available credits: the asset's first
        kind's first."""
        available = {kind: self.available_of(user_id, asset, kind) for kind in Kind}
        if amount > sum(available.values()):
            raise Refused(InsufficientFunds)
        split: dict[Kind, int] = {}
        left = amount
        for kind in self.order(asset):
            split[kind] = min(left, available[kind])
            left -= split[kind]
        return split

    def take(
        self, user_id: str, asset: str, kind: Kind, amount: int, *, kept_too: bool = False
    ) -> tuple[Piece, ...]:
        """The credits of one kind `amount` takes: lots soonest to expire first (those past
        their expiry only when `kept_too`: a capture takes what its hold kept), then the
        credits that never expire."""
        pieces: list[Piece] = []
        left = amount
        user_lots = self.lots_of(user_id, asset, kind)
        for at, remaining in user_lots:
            if left and (kept_too or at > self.now):
                part = min(left, remaining)
                pieces.append(Piece(at, part))
                left -= part
        if left:
            never = self.parts[(user_id, asset, kind)] - sum(n for _, n in user_lots)
            assert left <= never, f"the model takes {left} {kind} of {never} that never expire"
            pieces.append(Piece(None, left))
        return tuple(pieces)

    def taking(self, user_id: str, credited: str, asset: str, amount: int) -> list[ModelLeg]:
        """A spend's or transfer's legs: the available credits in the spend order."""
        split = self.split(user_id, asset, amount)
        return [
            ModelLeg(user_id, credited, kind, self.take(user_id, asset, kind, split[kind]))
            for kind in self.order(asset)
            if split[kind]
        ]

    def credit_expiry(self, command: Command, kind: Kind) -> datetime | None:
        """When credits a top-up or bonus gives expire: as the bonus asks, else by the asset's
        lifetime of that kind as it is now."""
        if command.credit_expires_in_days is not None:
            return self.now + timedelta(days=command.credit_expires_in_days)
        if command.credit_expires_at is not None:
            if command.credit_expires_at <= self.now:
                raise Refused(InvalidRequest, field="expiresAt")
            return command.credit_expires_at
        asset = self.assets[command.asset_symbol or ""]
        days = asset.paid_lifetime_days if kind is Kind.PAID else asset.free_lifetime_days
        return None if days is None else self.now + timedelta(days=days)

    def flow_legs(self, op: Command) -> list[ModelLeg]:
        """A top-up's, bonus's, spend's or transfer's legs, or raise Refused."""
        assert op.user_id is not None
        assert op.asset_symbol is not None
        assert op.amount is not None
        if op.action is Action.TRANSFER and op.to_user_id == op.user_id:
            raise Refused(InvalidRequest)
        if not 1 <= op.amount <= MAX_AMOUNT:
            raise Refused(InvalidRequest)
        debited, credited = moved_between(op.action, op.user_id, op.to_user_id)
        if op.action in (Action.TOPUP, Action.BONUS):
            kind = Kind.PAID if op.action is Action.TOPUP else Kind.FREE
            expires_at = self.credit_expiry(op, kind)
            return [ModelLeg(debited, credited, kind, (Piece(expires_at, op.amount),))]
        return self.taking(debited, credited, op.asset_symbol, op.amount)

    def refund_legs(self, original: Transaction, amount: int) -> list[ModelLeg]:
        """A spend's refund: paid first, each kind last taken first, into the lots it came
        from."""
        paid_before = min(original.paid_amount, self.refunded[original.id])
        free_before = self.refunded[original.id] - paid_before
        paid = min(original.paid_amount - paid_before, amount)
        legs: list[ModelLeg] = []
        for kind, part, before in (
            (Kind.PAID, paid, paid_before),
            (Kind.FREE, amount - paid, free_before),
        ):
            if not part:
                continue
            pieces: list[Piece] = []
            for piece in reversed(self.taken[original.id].get(kind, ())):
                skipped = min(before, piece.amount)
                before -= skipped
                given = min(part, piece.amount - skipped)
                if given:
                    pieces.append(Piece(piece.expires_at, given))
                    part -= given
            assert not part, f"the model gives back more {kind} than {original.id} took"
            legs.append(ModelLeg(REVENUE, original.user_id, kind, tuple(pieces)))
        return legs

    # -- moving credits

    def save(self) -> tuple[Counter[tuple[str, str, Kind]], Counter[LotKey]]:
        return Counter(self.parts), Counter(self.lots)

    def restore(self, saved: tuple[Counter[tuple[str, str, Kind]], Counter[LotKey]]) -> None:
        self.parts, self.lots = Counter(saved[0]), Counter(saved[1])

    def apply(self, asset: str, legs: Iterable[ModelLeg]) -> list[ModelEntry]:
        """Move each leg, lots with their pieces; the entries, in order, with each balance and
        paid part after them."""
        written: list[ModelEntry] = []
        for leg in legs:
            for account, direction, sign in (
                (leg.debited, Direction.DEBIT, -1),
                (leg.credited, Direction.CREDIT, 1),
            ):
                self.parts[(account, asset, leg.kind)] += sign * leg.amount
                if not is_system(account):
                    for piece in leg.pieces:
                        if piece.expires_at is not None:
                            lot = (account, asset, leg.kind, piece.expires_at)
                            self.lots[lot] += sign * piece.amount
                            assert self.lots[lot] >= 0, f"the model took too much of {lot}"
                is_user = not is_system(account)
                written.append(
                    ModelEntry(
                        account,
                        direction,
                        leg.kind,
                        leg.amount,
                        self.balance(account, asset) if is_user else None,
                        self.parts[(account, asset, Kind.PAID)] if is_user else None,
                    )
                )
        return written

    # -- checking an outcome, and applying it

    def check(self, command: Command, outcome: Outcome) -> None:
        """Check one outcome against the model, and apply it to the model."""
        self.sent[command.idempotency_key] = command
        refusals = self.refusals(command)
        if refusals:
            assert type(outcome) in refusals, f"{command} gave {outcome!r}, not one of {refusals}"
            assert isinstance(outcome, WalletError)
            unknown = (
                self.first_unknown_name(command.operations)
                if command.action is Action.BATCH
                else None
            )
            if unknown is not None and type(outcome) is unknown[1]:
                assert outcome.operation_index == unknown[0], f"{command} gave {outcome!r}"
            elif command.action is not Action.BATCH:
                assert outcome.operation_index is None, f"{command} gave {outcome!r}"
            if isinstance(outcome, InvalidRequest) and self.is_only_too_late(command):
                assert outcome.field == "expiresAt", f"{command} gave {outcome!r}"
            return
        decision = self.decided.get(command.idempotency_key)
        if decision is not None:
            self.check_replay(command, decision, outcome)
            return
        match command.action:
            case Action.TOPUP | Action.BONUS | Action.SPEND | Action.TRANSFER:
                self.check_flow(command, outcome)
            case Action.HOLD:
                self.check_hold(command, outcome)
            case Action.CAPTURE | Action.RELEASE:
                self.check_capture_or_release(command, outcome)
            case Action.REFUND:
                self.check_refund(command, outcome)
            case Action.BATCH:
                self.check_batch(command, outcome)

    def check_replay(self, command: Command, decision: Decision, outcome: Outcome) -> None:
        """The key's first answer again, whatever the state is now, flagged as a replay."""
        first = decision.outcome
        if isinstance(first, Refusal):
            assert type(outcome) is type(first), f"a retry of {command} gave {outcome!r}"
            assert isinstance(outcome, Refusal)
            assert outcome.is_replay, f"a retry of refused {command} was refused anew"
            assert outcome.detail == first.detail, "a replay returned another refusal"
            return
        assert isinstance(outcome, Posted), f"a retry of {command} gave {outcome!r}"
        assert outcome.is_replay, f"a retry of {command} was applied anew"
        assert len(outcome.transactions) == len(first.transactions), outcome
        # What the first answer said, not what refunds, captures, releases or the clock have
        # made of its transactions and hold since (API.md: "the stored response is returned").
        assert outcome.transactions == first.transactions, f"replayed {outcome}, made {first}"
        assert outcome.hold == first.hold, f"replayed {outcome.hold}, made {first.hold}"

    def refuse(
        self,
        command: Command,
        outcome: Outcome,
        refusal: type[WalletError],
        *,
        is_stored: bool = True,
        operation_index: int | None = None,
        field: str | None = None,
    ) -> None:
        assert type(outcome) is refusal, f"{command} gave {outcome!r}, not {refusal.__name__}"
        assert isinstance(outcome, WalletError)
        assert outcome.operation_index == operation_index, f"{command} gave {outcome!r}"
        if field is not None:
            assert isinstance(outcome, InvalidRequest)
            assert outcome.field == field, f"{command} gave {outcome!r} on {outcome.field}"
        if isinstance(outcome, Refusal):
            assert not outcome.is_replay, f"{command} gave {outcome!r}"
            if is_stored:
                self.decided[command.idempotency_key] = Decision(command, outcome)

    def applied(self, command: Command, outcome: Outcome, *, made: int) -> Posted:
        assert isinstance(outcome, Posted), f"{command} gave {outcome!r}"
        assert not outcome.is_replay, f"{command} was a replay: {outcome!r}"
        assert len(outcome.transactions) == made, outcome
        self.decided[command.idempotency_key] = Decision(command, outcome)
        return outcome

    def record(
        self,
        transaction: Transaction,
        *,
        flow: Flow,
        user_id: str,
        asset: str,
        legs: list[ModelLeg],
        key: str,
        note: str | None,
        metadata: Any = None,
        to_user_id: str | None = None,
        hold_id: str | None = None,
        refund_of: str | None = None,
        is_either_order: bool = False,
    ) -> None:
        """Check a transaction the ledger made, and move its legs in the model. Its entries are
        compared once written: in the legs' order, or (`is_either_order`) in either order of
        its two legs, which the rules leave open."""
        orders: list[list[ModelEntry]] = []
        if is_either_order and len(legs) == 2:
            saved = self.save()
            orders.append(self.apply(asset, reversed(legs)))
            self.restore(saved)
        orders.insert(0, self.apply(asset, legs))
        expected = Transaction(
            id=transaction.id,
            flow=flow,
            user_id=UserId(user_id),
            asset_symbol=asset,
            amount=sum(leg.amount for leg in legs),
            balance_after=self.balance(user_id, asset),
            idempotency_key=key,
            note=note,
            metadata=metadata,
            created_at=self.now,
            paid_amount=sum(leg.amount for leg in legs if leg.kind is Kind.PAID),
            to_user_id=None if to_user_id is None else UserId(to_user_id),
            hold_id=hold_id,
            refund_of=None if refund_of is None else TransactionId(refund_of),
        )
        assert transaction == expected, f"made {transaction}, not {expected}"
        self.transactions[transaction.id] = transaction
        self.entry_orders[transaction.id] = orders
        self.lot_moves[transaction.id] = sorted(
            (account, leg.kind, piece.expires_at, sign * piece.amount)
            for leg in legs
            for account, sign in ((leg.debited, -1), (leg.credited, 1))
            if not is_system(account)
            for piece in leg.pieces
            if piece.expires_at is not None
        )
        if flow is Flow.SPEND:
            self.taken[transaction.id] = {leg.kind: leg.pieces for leg in legs}
        for account in dict.fromkeys(e.account for e in orders[0]):
            self.balance_after[(transaction.id, account)] = self.balance(account, asset)
            if not is_system(account):
                self.history[account].append(transaction.id)
        self.unwritten.append(transaction.id)

    def check_flow(self, command: Command, outcome: Outcome) -> None:
        assert command.user_id is not None
        assert command.asset_symbol is not None
        try:
            legs = self.flow_legs(command)
        except Refused as refused:
            self.refuse(command, outcome, refused.error)
            return
        posted = self.applied(command, outcome, made=1)
        assert posted.hold is None
        self.record(
            posted.transaction,
            flow=Flow(command.action.value),
            user_id=command.user_id,
            asset=command.asset_symbol,
            legs=legs,
            key=command.idempotency_key,
            note=command.note,
            metadata=command.metadata,
            to_user_id=command.to_user_id,
        )

    def check_hold(self, command: Command, outcome: Outcome) -> None:
        assert command.user_id is not None
        assert command.asset_symbol is not None
        assert command.amount is not None
        try:
            split = self.split(command.user_id, command.asset_symbol, command.amount)
        except Refused as refused:
            self.refuse(command, outcome, refused.error)
            return
        posted = self.applied(command, outcome, made=0)
        assert posted.hold is not None
        placed = ModelHold(
            id=posted.hold.id,
            user_id=command.user_id,
            asset=command.asset_symbol,
            amount=command.amount,
            paid=split[Kind.PAID],
            expires_at=self.now + timedelta(seconds=command.expires_in_s or DEFAULT_HOLD_S),
            created_at=self.now,
            description=command.note,
            key=command.idempotency_key,
        )
        assert placed.id not in self.holds
        assert posted.hold == placed.stored(), f"placed {posted.hold}, not {placed.stored()}"
        self.holds[placed.id] = placed

    def check_capture_or_release(self, command: Command, outcome: Outcome) -> None:
        hold = self.holds[command.reference or ""]
        if not hold.is_active(self.now):
            self.refuse(command, outcome, HoldNotActive)
            return
        if command.action is Action.RELEASE:
            posted = self.applied(command, outcome, made=0)
            hold.status, hold.ended_at = HoldStatus.RELEASED, self.now
            assert posted.hold == hold.stored(), f"released {posted.hold}, not {hold.stored()}"
            return
        amount = hold.amount if command.amount is None else command.amount
        if amount > hold.amount:
            self.refuse(command, outcome, CaptureExceedsHold)
            return
        # What the hold reserved, in the spend order, lots past their expiry too (it kept them).
        legs: list[ModelLeg] = []
        left = amount
        for kind in self.order(hold.asset):
            part = min(left, hold.reserved(kind))
            left -= part
            if part:
                pieces = self.take(hold.user_id, hold.asset, kind, part, kept_too=True)
                legs.append(ModelLeg(hold.user_id, REVENUE, kind, pieces))
        posted = self.applied(command, outcome, made=1)
        hold.status, hold.captured, hold.ended_at = HoldStatus.CAPTURED, amount, self.now
        assert posted.hold == hold.stored(), f"captured {posted.hold}, not {hold.stored()}"
        self.record(
            posted.transaction,
            flow=Flow.SPEND,
            user_id=hold.user_id,
            asset=hold.asset,
            legs=legs,
            key=command.idempotency_key,
            note=command.note,
            hold_id=hold.id,
        )

    def check_refund(self, command: Command, outcome: Outcome) -> None:
        original = self.transactions[command.reference or ""]
        refund = refunded_between(original)
        if refund is None:
            self.refuse(command, outcome, NotRefundable)
            return
        flow, debited, credited = refund
        left = original.amount - self.refunded[original.id]
        amount = left if command.amount is None else command.amount
        if left == 0 or amount > left:
            self.refuse(command, outcome, RefundExceedsOriginal)
            return
        asset = original.asset_symbol
        if original.flow is Flow.SPEND:
            legs = self.refund_legs(original, amount)
        else:  # a reversal takes back the kind its top-up or bonus gave, of what is available
            kind = Kind.PAID if original.flow is Flow.TOPUP else Kind.FREE
            if amount > self.available_of(debited, asset, kind):
                self.refuse(command, outcome, InsufficientFunds)
                return
            legs = [ModelLeg(debited, credited, kind, self.take(debited, asset, kind, amount))]
        posted = self.applied(command, outcome, made=1)
        assert posted.hold is None
        self.record(
            posted.transaction,
            flow=flow,
            user_id=original.user_id,
            asset=asset,
            legs=legs,
            key=command.idempotency_key,
            note=command.note,
            metadata=command.metadata,
            refund_of=original.id,
        )
        self.refunded[original.id] += amount
        self.refunds.setdefault(original.id, []).append(posted.transaction.id)

    def check_batch(self, command: Command, outcome: Outcome) -> None:
        """All operations apply, in order, each seeing what the earlier left, or none does and
        nothing is recorded (not even a refusal): the key stays free."""
        saved = self.save()
        for index, op in enumerate(command.operations):
            assert op.asset_symbol is not None
            try:
                self.apply(op.asset_symbol, self.flow_legs(op))
            except Refused as refused:
                self.restore(saved)
                self.refuse(
                    command,
                    outcome,
                    refused.error,
                    is_stored=False,
                    operation_index=index,
                    field=refused.field,
                )
                return
        self.restore(saved)
        posted = self.applied(command, outcome, made=len(command.operations))
        assert posted.hold is None
        for index, (op, transaction) in enumerate(
            zip(command.operations, posted.transactions, strict=True)
        ):
            assert op.user_id is not None
            assert op.asset_symbol is not None
            key = f"{command.idempotency_key}:{index}"
            self.record(
                transaction,
                flow=Flow(op.action.value),
                user_id=op.user_id,
                asset=op.asset_symbol,
                legs=self.flow_legs(op),
                key=key,
                note=op.note,
                metadata=op.metadata,
                to_user_id=op.to_user_id,
            )
            # An operation's key is taken by the batch: only the batch replays it.
            self.decided[key] = Decision(command, Posted((transaction,), is_replay=False))

    def check_expiry(self, transaction: Transaction) -> None:
        """An expiry the sweeper made: of each kind, the balance's credits past their expiry
        less what its active holds reserved of that kind, from the lots soonest first, paid
        then free, up to the largest amount (the next sweep takes the rest), free back to the
        bonus pool and paid to revenue, under a key of its own."""
        user_id, asset = transaction.user_id, transaction.asset_symbol
        legs = []
        room = MAX_AMOUNT
        for kind in (Kind.PAID, Kind.FREE):
            pieces = []
            left_to_take = min(self.expired(user_id, asset, kind), room)
            room -= left_to_take
            for at, left in self.lots_of(user_id, asset, kind):
                if at <= self.now and left_to_take > 0:
                    pieces.append(Piece(at, min(left, left_to_take)))
                    left_to_take -= pieces[-1].amount
            if pieces:
                account = REVENUE if kind is Kind.PAID else BONUS_POOL
                legs.append(ModelLeg(user_id, account, kind, tuple(pieces)))
        prefix, _, rest = transaction.idempotency_key.partition(":")
        assert (prefix, uuid.UUID(rest).version) == ("expiry", 7), transaction.idempotency_key
        self.record(
            transaction,
            flow=Flow.EXPIRY,
            user_id=user_id,
            asset=asset,
            legs=legs,
            key=transaction.idempotency_key,
            note=None,
            is_either_order=True,
        )


# ---- the machine --------------------------------------------------------------------------


class WalletMachine(RuleBasedStateMachine):
    """Drives one seeded database; each hypothesis example starts from a freshly emptied one,
    with the clock at the real time of its start."""

    keys = Bundle("keys")

    def __init__(self, database: Database, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.database = database
        self.loop = loop
        self.wallet = Wallet(database)
        self.model = Model()
        self.fresh_keys = 0
        self.steps = 0
        self.steps_checked = -1  # reaches `steps` only when every check of the last step passed
        self.audited = -1  # the step of the last full audit
        CLOCK.moment = datetime.now(UTC)
        self.run(_reset(database))

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(work)

    def fresh_key(self) -> str:
        self.fresh_keys += 1
        return f"key-{self.fresh_keys}"

    def execute(self, command: Command) -> Outcome:
        try:
            return self.run(self.wallet.execute(command))
        except WalletError as error:
            return error

    def check(self, command: Command, outcome: Outcome) -> None:
        self.model.check(command, outcome)

    def send(self, command: Command) -> None:
        self.check(command, self.execute(command))

    def keyed(self, command: Command, key: str | None) -> tuple[Command, bool]:
        """The command with the given key, or a fresh one; and whether the key is new."""
        if key is None:
            return with_key(command, self.fresh_key()), True
        return with_key(command, key), False

    def step(self) -> None:
        self.steps += 1

    def some_key(self) -> st.SearchStrategy[str | None]:
        """Mostly none (a fresh key), now and then one already used for whatever request."""
        return st.one_of(st.none(), st.none(), st.none(), self.keys)

    # -- drawing requests that name what the model holds

    def draw_user(self, data: st.DataObject) -> str:
        """Mostly a user that exists; now and then one that may, or never will."""
        users = sorted(self.model.users)
        return data.draw(st.sampled_from([*users, *users, *users, *USER_POOL, NOT_A_USER]))

    def draw_hold(self, data: st.DataObject) -> Command:
        """A hold of a little, of about all that is available, or of any amount."""
        user_id = self.draw_user(data)
        asset = data.draw(asset_symbols, label="asset")
        available = self.model.available(user_id, asset)
        amount = data.draw(
            st.one_of(
                st.integers(1, 50),
                st.sampled_from([max(1, available - 1), max(1, available), available + 1]),
                amounts,
            ),
            label="amount",
        )
        return Command(
            action=Action.HOLD,
            user_id=UserId(user_id),
            asset_symbol=asset,
            amount=amount,
            expires_in_s=data.draw(expiries, label="expires in"),
            note=data.draw(notes, label="description"),
            idempotency_key="",
        )

    def draw_hold_id(self, data: st.DataObject) -> str:
        """Mostly a hold that counts now; or any, ended or expired; or none that exists."""
        active = [i for i, h in self.model.holds.items() if h.is_active(CLOCK.moment)]
        choices = [*active, *active, *active, *self.model.holds, UNKNOWN_HOLD]
        return data.draw(st.sampled_from(choices), label="hold")

    def draw_capture(self, data: st.DataObject, hold_id: str | None = None) -> Command:
        hold_id = hold_id or self.draw_hold_id(data)
        hold = self.model.holds.get(hold_id)
        size = hold.amount if hold is not None else 10
        how = data.draw(st.sampled_from(["all", "part", "exact", "over", "max"]), label="capture")
        amount = {
            "all": None,
            "part": data.draw(st.integers(1, max(1, size - 1)), label="part"),
            "exact": size,
            "over": size + 1,
            "max": MAX_AMOUNT,
        }[how]
        return Command(
            action=Action.CAPTURE,
            reference=hold_id,
            amount=amount,
            note=data.draw(notes, label="description"),
            idempotency_key="",
        )

    def draw_release(self, data: st.DataObject) -> Command:
        return Command(action=Action.RELEASE, reference=self.draw_hold_id(data), idempotency_key="")

    def draw_refund(self, data: st.DataObject) -> Command:
        model = self.model
        refundable = [
            i
            for i, t in model.transactions.items()
            if t.flow in (Flow.SPEND, Flow.TOPUP, Flow.BONUS) and model.refunded[i] < t.amount
        ]
        choices = [*refundable, *refundable, *refundable, *model.transactions, UNKNOWN_TRANSACTION]
        original_id = data.draw(st.sampled_from(choices), label="original")
        original = self.model.transactions.get(original_id)
        size = original.amount if original is not None else 10
        left = size - self.model.refunded[original_id]
        how = data.draw(
            st.sampled_from(["rest", "part", "exact-rest", "over", "whole"]), label="refund"
        )
        amount = {
            "rest": None,
            "part": data.draw(st.integers(1, max(1, left - 1)), label="part"),
            "exact-rest": max(1, left),
            "over": left + 1,
            "whole": size,
        }[how]
        return Command(
            action=Action.REFUND,
            reference=original_id,
            amount=amount,
            note=data.draw(notes, label="reason"),
            idempotency_key="",
        )

    def draw_batch(self, data: st.DataObject) -> Command:
        """An atomic batch: random operations, or ones that move everything available and then
        one more unit (so the last fails), or top-ups with a spend of what they brought."""
        shape = data.draw(st.sampled_from(["random", "overdraw-last", "fund-then-spend"]))
        if shape == "random":
            operations = data.draw(st.lists(flow_requests(), min_size=1, max_size=4), label="ops")
        else:
            user = data.draw(st.sampled_from(sorted(self.model.users)), label="user")
            asset = data.draw(st.sampled_from(ASSETS), label="asset")
            others = sorted(self.model.users - {user})
            if shape == "overdraw-last":
                available = self.model.available(user, asset)
                move = (
                    Command(
                        action=Action.TRANSFER,
                        user_id=UserId(user),
                        to_user_id=UserId(data.draw(st.sampled_from(others), label="to")),
                        asset_symbol=asset,
                        amount=available,
                        idempotency_key="",
                    )
                    if others and available > 0
                    else Command(
                        action=Action.TOPUP,
                        user_id=UserId(user),
                        asset_symbol=asset,
                        amount=1,
                        idempotency_key="",
                    )
                )
                last = Command(
                    action=Action.SPEND,
                    user_id=UserId(user),
                    asset_symbol=asset,
                    amount=1 if move.action is Action.TRANSFER else available + 2,
                    idempotency_key="",
                )
                operations = [move, last]
            else:
                topup = Command(
                    action=Action.TOPUP,
                    user_id=UserId(user),
                    asset_symbol=asset,
                    amount=data.draw(st.integers(1, 100), label="amount"),
                    idempotency_key="",
                )
                spend = dataclasses.replace(
                    topup,
                    action=Action.SPEND,
                    amount=self.model.available(user, asset) + topup.amount,  # type: ignore[operator]
                    note="all of it",
                )
                operations = [topup, spend]
        return Command(action=Action.BATCH, idempotency_key="", operations=tuple(operations))

    def draw_request(self, data: st.DataObject) -> Command:
        kind = data.draw(
            st.sampled_from(
                ["flow", "flow", "flow", "hold", "capture", "release", "refund", "batch"]
            ),
            label="kind",
        )
        match kind:
            case "flow":
                return data.draw(flow_requests(), label="flow")
            case "hold":
                return self.draw_hold(data)
            case "capture":
                return self.draw_capture(data)
            case "release":
                return self.draw_release(data)
            case "refund":
                return self.draw_refund(data)
        return self.draw_batch(data)

    def draw_grant_expiry(self, data: st.DataObject, how: str) -> dict[str, Any]:
        """An opening grant's expiry: a bonus's in seconds or days, or none asked."""
        if how == "bonus-seconds":
            seconds = data.draw(st.integers(1, 120), label="seconds")
            return {"credit_expires_at": CLOCK.moment + timedelta(seconds=seconds)}
        if how == "bonus-days":
            return {"credit_expires_in_days": data.draw(st.integers(1, 2), label="days")}
        return {}

    # -- rules

    @initialize(target=keys, data=st.data())
    def seed_is_known_and_credits_granted(self, data: st.DataObject) -> Any:
        """The seed's users and opening top-ups, read back (their keys may be replayed); a new
        asset, paid first, whose paid credits last two days; and, so that both kinds and lots
        are in play from the start, grants to the seeded users in one call: bonuses that never
        expire (or by the asset's lifetime), that expire in seconds or in days, and top-ups."""
        self.step()
        gems = Asset(NEW_ASSET, "Gems", "Bought in packs.", SpendOrder.PAID_FIRST, None, 2)
        assert self.run(self.wallet.create_asset(gems)) == gems
        self.model.assets[NEW_ASSET] = ModelAsset(SpendOrder.PAID_FIRST, None, 2)
        for user_id in (ALICE, BOB):
            self.model.users.add(user_id)
            self.model.history[user_id] = []
        for user_id in (ALICE, BOB):
            seeded, _ = self.run(
                self.wallet.history(
                    user_id=user_id, flow=None, asset_symbol=None, page=PageRequest(limit=500)
                )
            )
            for transaction in reversed(seeded):
                command = seeded_request(transaction)
                self.model.sent[command.idempotency_key] = command
                self.model.decided[command.idempotency_key] = Decision(
                    command, Posted((transaction,), is_replay=False)
                )
                self.model.record(
                    transaction,
                    flow=Flow.TOPUP,
                    user_id=user_id,
                    asset=transaction.asset_symbol,
                    legs=self.model.flow_legs(command),
                    key=transaction.idempotency_key,
                    note=None,
                )
        grants = [
            Command(
                action=Action.TOPUP if how == "topup" else Action.BONUS,
                user_id=user_id,
                asset_symbol=asset,
                amount=data.draw(st.integers(1, 600), label="amount"),
                idempotency_key=self.fresh_key(),
                **self.draw_grant_expiry(data, how),
            )
            for user_id in (ALICE, BOB)
            for asset in ASSETS
            for how in data.draw(
                st.lists(
                    st.sampled_from(["topup", "bonus", "bonus-seconds", "bonus-days"]),
                    max_size=2,
                    unique=True,
                ),
                label=f"grants of {asset}",
            )
        ]
        for command, outcome in zip(grants, self.run(post(self.database, grants)), strict=True):
            self.check(command, outcome)
        return multiple(*self.model.decided)

    @rule(user_id=st.sampled_from(USER_POOL))
    def create_user(self, user_id: str) -> None:
        """A user of the pool: created once, UserExists ever after."""
        self.step()
        try:
            user = self.run(
                self.wallet.create_user(
                    user_id=user_id, email=f"{user_id}@example.com", name=user_id.title()
                )
            )
        except UserExists:
            assert user_id in self.model.users, f"creating new user {user_id} gave UserExists"
            return
        assert user_id not in self.model.users, f"user {user_id} was created twice"
        assert user.id == user_id
        assert user.created_at == CLOCK.moment
        self.model.users.add(user_id)
        self.model.history[user_id] = []

    @rule(symbol=st.sampled_from((*ASSETS, UNKNOWN_ASSET)), changes=asset_changes)
    def change_an_asset(self, symbol: str, changes: dict[str, Any]) -> None:
        """An asset's spend order or lifetimes changed (PATCH): the order applies to what is
        taken from now on, holds already placed included; a lifetime to credits granted from
        now on."""
        self.step()
        try:
            changed = self.run(self.wallet.change_asset(symbol=symbol, changes=changes))
        except UnknownAsset:
            assert symbol not in self.model.assets
            return
        asset = self.model.assets[symbol] = dataclasses.replace(
            self.model.assets[symbol], **changes
        )
        listed = {
            a.symbol: ModelAsset(a.spend_order, a.free_lifetime_days, a.paid_lifetime_days)
            for a in self.run(self.wallet.assets())
        }
        assert listed == self.model.assets
        assert listed[changed.symbol] == asset

    @rule(target=keys, request=flow_requests(), key=st.none() | keys)
    def execute_flow(self, request: Command, key: str | None) -> Any:
        """A top-up, bonus, spend or transfer with a fresh key, or with a key already used for
        whatever request."""
        self.step()
        command, is_new = self.keyed(request, key)
        self.send(command)
        return command.idempotency_key if is_new else multiple()

    @rule(target=keys, data=st.data())
    def place_a_hold(self, data: st.DataObject) -> Any:
        """A hold; if placed, then perhaps its end at once: captured (whole, in part or more
        than held), released, or both one after the other (the second finds it ended)."""
        self.step()
        command, is_new = self.keyed(self.draw_hold(data), data.draw(self.some_key()))
        self.send(command)
        decision = self.model.decided.get(command.idempotency_key)
        if decision is not None and isinstance(decision.outcome, Posted) and is_new:
            assert decision.outcome.hold is not None
            hold_id = decision.outcome.hold.id
            then = data.draw(
                st.sampled_from(["", "capture", "release", "capture-release", "release-capture"])
            )
            for action in filter(None, then.split("-")):
                request = (
                    self.draw_capture(data, hold_id)
                    if action == "capture"
                    else Command(action=Action.RELEASE, reference=hold_id, idempotency_key="")
                )
                self.send(with_key(request, self.fresh_key()))
        return command.idempotency_key if is_new else multiple()

    @precondition(lambda self: bool(self.model.holds))
    @rule(target=keys, data=st.data())
    def capture_a_hold(self, data: st.DataObject) -> Any:
        """A capture of all of a hold (the default, or its amount), of part of it, or of more:
        of any hold, held, ended or past its expiry, or of none."""
        self.step()
        command, is_new = self.keyed(self.draw_capture(data), data.draw(self.some_key()))
        self.send(command)
        return command.idempotency_key if is_new else multiple()

    @precondition(lambda self: bool(self.model.holds))
    @rule(target=keys, data=st.data())
    def release_a_hold(self, data: st.DataObject) -> Any:
        self.step()
        command, is_new = self.keyed(self.draw_release(data), data.draw(self.some_key()))
        self.send(command)
        return command.idempotency_key if is_new else multiple()

    @rule(target=keys, data=st.data())
    def refund_a_transaction(self, data: st.DataObject) -> Any:
        """A refund of a spend, or a reversal of a top-up or bonus, of what is left (the
        default), of part, of exactly the rest or of more; or of a transfer, refund, reversal
        or expiry; or of a transaction that does not exist."""
        self.step()
        command, is_new = self.keyed(self.draw_refund(data), data.draw(self.some_key()))
        self.send(command)
        return command.idempotency_key if is_new else multiple()

    @rule(target=keys, data=st.data())
    def post_an_atomic_batch(self, data: st.DataObject) -> Any:
        self.step()
        command, is_new = self.keyed(self.draw_batch(data), data.draw(self.some_key()))
        self.model.batches.append(command.idempotency_key)
        self.send(command)
        return command.idempotency_key if is_new else multiple()

    @precondition(lambda self: bool(self.model.batches))
    @rule(data=st.data(), request=flow_requests())
    def use_the_key_of_a_batch_operation(self, data: st.DataObject, request: Command) -> None:
        """A flow sent with `<key>:<i>` of a batch: taken if the batch applied, else free (and
        then the batch can no longer apply under its key)."""
        self.step()
        batch_key = data.draw(st.sampled_from(self.model.batches), label="batch")
        index = data.draw(st.integers(0, len(self.model.sent[batch_key].operations)))
        self.send(with_key(request, f"{batch_key}:{index}"))

    @rule(key=keys)
    def retry(self, key: str) -> None:
        """The last request sent with a key, again: a replay if it applied or the ledger's state
        refused it, else a new try."""
        self.step()
        self.send(self.model.sent[key])

    @rule(key=keys, data=st.data())
    def reuse_key_for_a_nearly_same_request(self, key: str, data: st.DataObject) -> None:
        """The last request of a key with one field changed: a reuse if the key applied or was
        refused by the ledger's state."""
        self.step()
        sent = self.model.sent[key]
        changes = nearly_same(sent)
        change = data.draw(st.sampled_from(sorted(changes)), label="change")
        self.send(dataclasses.replace(sent, **changes[change]))

    @rule(target=keys, data=st.data())
    def take_about_everything_available(self, data: st.DataObject) -> Any:
        """A spend, transfer or hold (alone, or as an atomic batch's one operation) of what is
        available minus one, exactly, or plus one: the edge of overdrawing, where holds count
        and expired ones no longer do, nor do expired credits."""
        self.step()
        held = [
            (h.user_id, h.asset) for h in self.model.holds.values() if h.is_active(CLOCK.moment)
        ]
        expiring = sorted({(u, a) for (u, a, _, _), left in self.model.lots.items() if left})
        pairs = [(u, a) for u in sorted(self.model.users) for a in ASSETS]
        user_id, asset = data.draw(
            st.sampled_from([*held, *held, *expiring, *expiring, *pairs]), label="whose"
        )
        available = self.model.available(user_id, asset)
        if available > 1 and data.draw(st.booleans(), label="hold some first"):
            hold = Command(
                action=Action.HOLD,
                user_id=UserId(user_id),
                asset_symbol=asset,
                amount=data.draw(st.integers(1, available - 1), label="held"),
                expires_in_s=data.draw(expiries, label="expires in"),
                idempotency_key=self.fresh_key(),
            )
            self.send(hold)
        margin = data.draw(st.sampled_from([-1, 0, 1]), label="margin")
        action = data.draw(st.sampled_from([Action.SPEND, Action.TRANSFER, Action.HOLD]))
        others = sorted(self.model.users - {user_id})
        if action is Action.TRANSFER and not others:
            action = Action.SPEND
        command = Command(
            action=action,
            user_id=UserId(user_id),
            to_user_id=(
                UserId(data.draw(st.sampled_from(others), label="to"))
                if action is Action.TRANSFER
                else None
            ),
            asset_symbol=asset,
            amount=max(1, min(MAX_AMOUNT, self.model.available(user_id, asset) + margin)),
            expires_in_s=data.draw(expiries) if action is Action.HOLD else None,
            idempotency_key="",
        )
        if action is not Action.HOLD and data.draw(st.booleans(), label="in a batch"):
            command = Command(action=Action.BATCH, idempotency_key="", operations=(command,))
        command = with_key(command, self.fresh_key())
        if command.action is Action.BATCH:
            self.model.batches.append(command.idempotency_key)
        self.send(command)
        return command.idempotency_key

    def both_kinds_available(self) -> list[tuple[str, str]]:
        return [
            (u, a)
            for u in sorted(self.model.users)
            for a in ASSETS
            if all(self.model.available_of(u, a, kind) > 0 for kind in Kind)
        ]

    @precondition(lambda self: bool(self.both_kinds_available()))
    @rule(target=keys, data=st.data())
    def take_from_both_kinds(self, data: st.DataObject) -> Any:
        """A spend, transfer or hold (a spend or transfer perhaps in an atomic batch) of all
        the available credits of the asset's first kind and some of the second."""
        self.step()
        user_id, asset = data.draw(st.sampled_from(self.both_kinds_available()), label="whose")
        first, second = self.model.order(asset)
        second_part = data.draw(
            st.integers(1, self.model.available_of(user_id, asset, second)), label="second"
        )
        others = sorted(self.model.users - {user_id})
        action = data.draw(
            st.sampled_from([Action.SPEND, Action.HOLD, *([Action.TRANSFER] if others else [])])
        )
        command = Command(
            action=action,
            user_id=UserId(user_id),
            to_user_id=(
                UserId(data.draw(st.sampled_from(others), label="to"))
                if action is Action.TRANSFER
                else None
            ),
            asset_symbol=asset,
            amount=self.model.available_of(user_id, asset, first) + second_part,
            expires_in_s=data.draw(expiries) if action is Action.HOLD else None,
            idempotency_key="",
        )
        if action is not Action.HOLD and data.draw(st.booleans(), label="in a batch"):
            command = Command(action=Action.BATCH, idempotency_key="", operations=(command,))
        command = with_key(command, self.fresh_key())
        if command.action is Action.BATCH:
            self.model.batches.append(command.idempotency_key)
        self.send(command)
        return command.idempotency_key

    def expiring_within_a_hold(self) -> list[tuple[str, str, datetime]]:
        """Lots to expire while a hold placed now may still last (a week at most), of users
        with credits available."""
        now, model = CLOCK.moment, self.model
        return sorted(
            {
                (user_id, asset, at)
                for (user_id, asset, _, at), left in model.lots.items()
                if left > 0
                and now < at <= now + timedelta(days=7)
                and model.available(user_id, asset) > 0
            }
        )

    @precondition(lambda self: bool(self.expiring_within_a_hold()))
    @rule(target=keys, data=st.data())
    def hold_credits_past_their_expiry(self, data: st.DataObject) -> Any:
        """A hold that lasts past the expiry of some of the balance's credits; the clock to
        that expiry: what the hold reserved of each kind stays the hold's (neither available
        nor expired), and the credit sweeper moves out only the rest; then the hold is
        captured (lots past their expiry first), released or runs out, and what it kept
        expires at once, and is swept."""
        self.step()
        user_id, asset, expiry = data.draw(
            st.sampled_from(self.expiring_within_a_hold()), label="lot"
        )
        lasts = int((expiry - CLOCK.moment).total_seconds()) + data.draw(st.integers(0, 60))
        hold = Command(
            action=Action.HOLD,
            user_id=UserId(user_id),
            asset_symbol=asset,
            amount=data.draw(st.integers(1, self.model.available(user_id, asset)), label="held"),
            expires_in_s=max(1, lasts),
            idempotency_key=self.fresh_key(),
        )
        self.send(hold)
        placed = self.model.decided[hold.idempotency_key].outcome
        assert isinstance(placed, Posted)
        assert placed.hold is not None
        CLOCK.moment = expiry
        self.balances_match_the_model()
        self.sweep_expired_credits(100)
        end = data.draw(st.sampled_from(["capture", "release", "run out", "last"]), label="end")
        if end == "capture":
            self.send(with_key(self.draw_capture(data, placed.hold.id), self.fresh_key()))
        elif end == "release":
            release = Command(
                action=Action.RELEASE, reference=placed.hold.id, idempotency_key=self.fresh_key()
            )
            self.send(release)
        elif end == "run out":
            CLOCK.moment = max(CLOCK.moment, placed.hold.expires_at)
        self.balances_match_the_model()
        self.sweep_expired_credits(100)
        return hold.idempotency_key

    def spends_of_lots_to_expire(self) -> list[tuple[str, datetime]]:
        """Spends with something left to refund that took credits from lots still to expire."""
        model = self.model
        return sorted(
            {
                (spend_id, piece.expires_at)
                for spend_id, taken in model.taken.items()
                if model.refunded[spend_id] < model.transactions[spend_id].amount
                for pieces in taken.values()
                for piece in pieces
                if piece.expires_at is not None and piece.expires_at > CLOCK.moment
            }
        )

    @precondition(lambda self: bool(self.spends_of_lots_to_expire()))
    @rule(target=keys, data=st.data())
    def refund_a_spend_once_its_credits_expired(self, data: st.DataObject) -> Any:
        """The clock to the expiry of a lot a spend took from, then its refund (of the rest, or
        of part): the credits go back into the lots they came from, past their expiry, so they
        are expired at once; then the sweeper moves them out."""
        self.step()
        spend_id, expiry = data.draw(
            st.sampled_from(self.spends_of_lots_to_expire()), label="spend"
        )
        CLOCK.moment = expiry
        left = self.model.transactions[spend_id].amount - self.model.refunded[spend_id]
        refund = Command(
            action=Action.REFUND,
            reference=spend_id,
            amount=data.draw(st.none() | st.integers(1, left), label="amount"),
            idempotency_key=self.fresh_key(),
        )
        self.send(refund)
        self.balances_match_the_model()
        self.sweep_expired_credits(100)
        return refund.idempotency_key

    @precondition(
        lambda self: any(isinstance(d.outcome, Refusal) for d in self.model.decided.values())
    )
    @rule(data=st.data())
    def retry_a_refusal_once_the_funds_are_there(self, data: st.DataObject) -> None:
        """A request the ledger refused, sent again, after a top-up (or, for a bonus's reversal,
        a bonus) that covers it if funds were short: the refusal is final (API-operations.md),
        so this is it replayed, not a new try."""
        self.step()
        refused = [k for k, d in self.model.decided.items() if isinstance(d.outcome, Refusal)]
        key = data.draw(st.sampled_from(refused), label="refused key")
        decision = self.model.decided[key]
        command = decision.request
        if isinstance(decision.outcome, InsufficientFunds):
            user_id, asset, amount, kind = self.model.debit_of(command)

            def available() -> int:
                if kind is None:
                    return self.model.available(user_id, asset)
                return self.model.available_of(user_id, asset, kind)

            shortfall = amount - available()
            if shortfall > 0:
                funding = Command(
                    action=Action.BONUS if kind is Kind.FREE else Action.TOPUP,
                    user_id=UserId(user_id),
                    asset_symbol=asset,
                    amount=shortfall,
                    idempotency_key=self.fresh_key(),
                )
                self.send(funding)
                assert amount <= available()
        self.send(command)

    @rule(data=st.data())
    def advance_the_clock(self, data: st.DataObject) -> None:
        """Time passes: a microsecond, some seconds, some days, or to exactly a hold's or a
        lot's expiry or just before it (a hold counts until `now >= expiresAt`; credits are
        available until then)."""
        self.step()
        now = CLOCK.moment
        holds_end = {h.expires_at for h in self.model.holds.values() if h.is_active(now)}
        pending = sorted(holds_end | set(self.model.pending_expiries()))
        how = data.draw(
            st.sampled_from(
                [
                    "tick",
                    "seconds",
                    "days",
                    *(["to-expiry", "before-expiry"] * 2 if pending else []),
                ]
            ),
            label="how",
        )
        if how == "tick":
            CLOCK.moment = now + timedelta(microseconds=1)
        elif how == "seconds":
            CLOCK.moment = now + timedelta(seconds=data.draw(st.integers(1, 120)))
        elif how == "days":
            CLOCK.moment = now + timedelta(days=data.draw(st.integers(1, 3)))
        else:
            expiry = data.draw(st.sampled_from(pending), label="expiry")
            if how == "before-expiry":
                expiry -= timedelta(microseconds=1)
            CLOCK.moment = max(now, expiry)

    @precondition(lambda self: any(h.status is HoldStatus.HELD for h in self.model.holds.values()))
    @rule(limit=st.sampled_from([1, 2, 100]))
    def sweep_expired_holds(self, limit: int) -> None:
        """One step of the sweeper: marks the `limit` soonest expired holds still held (any of
        those expiring at one moment, at the cut), at their expiry; nothing else changes."""
        self.step()
        marked = self.run(expire_holds(self.database, limit=limit))
        now = CLOCK.moment
        due = sorted(
            (
                h
                for h in self.model.holds.values()
                if h.status is HoldStatus.HELD and h.expires_at <= now
            ),
            key=lambda h: h.expires_at,
        )
        assert marked == min(limit, len(due)), f"marked {marked} of {len(due)} due"
        stored = self.run(_stored_holds(self.database))
        cut = due[marked - 1].expires_at if marked else None
        newly = 0
        for hold in due:
            status = stored[hold.id].status
            if cut is None or hold.expires_at > cut:
                assert status is HoldStatus.HELD, f"{hold.id} marked past the limit"
            elif hold.expires_at < cut:
                assert status is HoldStatus.EXPIRED, f"{hold.id} not marked, a later one was"
            if status is HoldStatus.EXPIRED:
                hold.status, hold.ended_at = HoldStatus.EXPIRED, hold.expires_at
                newly += 1
        assert newly == marked

    @precondition(lambda self: any(h.is_active(CLOCK.moment) for h in self.model.holds.values()))
    @rule(data=st.data(), is_reached=st.booleans(), limit=st.sampled_from([1, 100]))
    def let_a_hold_run_to_its_expiry_and_sweep(
        self, data: st.DataObject, is_reached: bool, limit: int
    ) -> None:
        """The clock to exactly a hold's expiry (it no longer counts, and is due) or a
        microsecond before (it still counts, and is not due), then the sweeper."""
        self.step()
        active = [h for h in self.model.holds.values() if h.is_active(CLOCK.moment)]
        hold = data.draw(st.sampled_from(active), label="hold")
        CLOCK.moment = hold.expires_at - (timedelta(0) if is_reached else timedelta(microseconds=1))
        assert hold.is_active(CLOCK.moment) is not is_reached
        self.balances_match_the_model()
        self.sweep_expired_holds(limit)
        if not is_reached:
            assert hold.status is HoldStatus.HELD
        elif limit == 100:
            assert hold.status is HoldStatus.EXPIRED

    @precondition(lambda self: any(left > 0 for left in self.model.lots.values()))
    @rule(limit=st.sampled_from([1, 2, 100]))
    def sweep_expired_credits(self, limit: int) -> None:
        """One pass of the credit sweeper: an expiry transaction for each of the `limit`
        balances whose credits expired soonest (any of those at one moment, at the cut); credits
        an active hold reserved stay until it ends."""
        self.step()
        due = self.model.due_balances()
        made = self.run(expire_credits(self.database, limit=limit))
        assert made == min(limit, len(due)), f"{made} expiries for {len(due)} balances due"
        found = self.run(_expiries_not_in(self.database, self.model.transactions))
        assert len(found) == made, f"{len(found)} expiry transactions written, {made} made"
        cut = sorted(due.values())[made - 1] if made else None
        swept = set()
        for transaction in found:
            balance = (transaction.user_id, transaction.asset_symbol)
            assert balance in due, f"expired {balance}, which had nothing due"
            assert cut is not None
            assert due[balance] <= cut, f"expired {balance} past the limit"
            swept.add(balance)
            self.model.check_expiry(transaction)
        skipped = [b for b, at in due.items() if cut is not None and at < cut and b not in swept]
        assert not skipped, f"{skipped} not expired, a later one was"

    @precondition(lambda self: bool(self.model.pending_expiries()))
    @rule(data=st.data(), is_reached=st.booleans(), limit=st.sampled_from([1, 100]))
    def let_credits_run_to_their_expiry_and_sweep(
        self, data: st.DataObject, is_reached: bool, limit: int
    ) -> None:
        """The clock to exactly a lot's expiry (its credits are no longer available, unless a
        hold keeps them, and are due) or a microsecond before (still available), then the
        credit sweeper."""
        self.step()
        expiry = data.draw(st.sampled_from(self.model.pending_expiries()), label="expiry")
        CLOCK.moment = expiry - (timedelta(0) if is_reached else timedelta(microseconds=1))
        self.balances_match_the_model()
        self.sweep_expired_credits(limit)

    @rule(data=st.data())
    def refund_all_that_is_left_then_once_more(self, data: st.DataObject) -> None:
        """A refund of what is left (the default), and then another: nothing is left."""
        self.step()
        command = self.draw_refund(data)
        for _ in range(2):
            self.send(with_key(dataclasses.replace(command, amount=None), self.fresh_key()))

    @rule(key=keys)
    def read_transaction(self, key: str) -> None:
        """A key's transactions read back whole, to each user they name, with a debit and a
        credit entry of each kind they move; no other user can read them."""
        self.step()
        decision = self.model.decided.get(key)
        if decision is None or not isinstance(decision.outcome, Posted):
            sent = self.model.sent[key]
            if sent.user_id in self.model.users:  # a failed request left no transaction
                history, _ = self.run(
                    self.wallet.history(
                        user_id=sent.user_id,
                        flow=None,
                        asset_symbol=None,
                        page=PageRequest(limit=500),
                    )
                )
                assert all(t.idempotency_key != key for t in history)
            return
        for made in decision.outcome.transactions:
            written = self.model.entries[made.id]
            readers = {e.account for e in written if not is_system(e.account)}
            for reader in sorted(readers):
                transaction, found = self.run(
                    self.wallet.transaction(user_id=reader, transaction_id=made.id)
                )
                expected = self.model.view(made.id, reader)
                assert transaction == expected, f"read {transaction}, not {expected}"
                assert sorted(entry_facts(e) for e in found) == sorted(written)
                assert all(e.transaction_id == made.id for e in found)
            for user_id in sorted(self.model.users - readers):  # others cannot read it
                try:
                    self.run(self.wallet.transaction(user_id=user_id, transaction_id=made.id))
                except UnknownTransaction:
                    continue
                raise AssertionError(f"user {user_id} read another user's transaction")

    @rule(user_id=st.sampled_from(USER_POOL))
    def read_history_and_ledger(self, user_id: str) -> None:
        """A user's transactions (a transfer in both users' lists, expiries too) and ledger
        entries (a kind's each) list exactly what applied, newest first, each with that user's
        balance and paid part after it."""
        self.step()
        page = PageRequest(limit=500)
        if user_id not in self.model.users:
            for read in (
                self.wallet.history(user_id=user_id, flow=None, asset_symbol=None, page=page),
                self.wallet.ledger(user_id=user_id, asset_symbol=None, page=page),
            ):
                try:
                    self.run(read)
                except UnknownUser:
                    continue
                raise AssertionError(f"read of a user {user_id} who does not exist")
            return
        newest_first = list(reversed(self.model.history[user_id]))
        history, cursor = self.run(
            self.wallet.history(user_id=user_id, flow=None, asset_symbol=None, page=page)
        )
        assert cursor is None
        assert history == [self.model.view(t, user_id) for t in newest_first]
        found, cursor = self.run(self.wallet.ledger(user_id=user_id, asset_symbol=None, page=page))
        assert cursor is None
        assert [(e.transaction_id, entry_facts(e)) for e in found] == [
            (t, e)
            for t in newest_first
            for e in reversed(self.model.entries[t])
            if e.account == user_id
        ]

    @rule(
        user_id=st.none() | st.sampled_from(USER_POOL),
        status=st.none() | st.sampled_from(HoldStatus),
        data=st.data(),
    )
    def read_holds(
        self, user_id: str | None, status: HoldStatus | None, data: st.DataObject
    ) -> None:
        """The holds, newest first, as they stand now (past its expiry a hold is expired,
        marked or not), by user and status; and one hold by its id."""
        self.step()
        now = CLOCK.moment
        try:
            found, cursor = self.run(
                self.wallet.holds(user_id=user_id, status=status, page=PageRequest(limit=500))
            )
        except UnknownUser:
            assert user_id not in self.model.users
            return
        assert user_id is None or user_id in self.model.users
        assert cursor is None
        expected = [
            h.seen(now)
            for h in reversed(self.model.holds.values())
            if user_id in (None, h.user_id) and status in (None, h.seen(now).status)
        ]
        assert found == expected
        hold_id = self.draw_hold_id(data)
        try:
            one = self.run(self.wallet.hold(hold_id=hold_id))
        except UnknownHold:
            assert hold_id not in self.model.holds
            return
        assert one == self.model.holds[hold_id].seen(now)

    @rule(target=keys, data=st.data(), size=st.integers(1, 6))
    def post_several_commands_at_once(self, data: st.DataObject, size: int) -> Any:
        """Several commands in one transaction (as the batcher groups requests): fresh and used
        keys, keys repeated within the call, as the same request or another, and an atomic
        batch beside a request with one of its operations' keys; outcomes follow the model in
        arrival order."""
        self.step()
        commands: list[Command] = []
        new_keys: list[str] = []
        while len(commands) < size:
            shape = data.draw(
                st.sampled_from(
                    ["new", "repeat", "rekey", "batch-and-its-key"] if commands else ["new"]
                ),
                label="shape",
            )
            if shape == "repeat":
                commands.append(data.draw(st.sampled_from(commands), label="repeat"))
                continue
            request = self.draw_request(data)
            if shape == "rekey":
                earlier = data.draw(st.sampled_from(commands), label="rekey")
                commands.append(with_key(request, earlier.idempotency_key))
                continue
            if shape == "batch-and-its-key":
                batch = with_key(self.draw_batch(data), self.fresh_key())
                flow = with_key(
                    data.draw(flow_requests(), label="flow"), f"{batch.idempotency_key}:0"
                )
                pair = (
                    [batch, flow]
                    if data.draw(st.booleans(), label="batch first")
                    else [flow, batch]
                )
                commands += pair
                self.model.batches.append(batch.idempotency_key)
                new_keys.append(batch.idempotency_key)
                continue
            command, is_new = self.keyed(request, data.draw(st.none() | self.keys, label="key"))
            commands.append(command)
            if command.action is Action.BATCH:
                self.model.batches.append(command.idempotency_key)
            if is_new:
                new_keys.append(command.idempotency_key)

        outcomes = self.run(post(self.database, commands))

        assert len(outcomes) == len(commands)
        for command, outcome in zip(commands, outcomes, strict=True):
            self.check(command, outcome)
        return multiple(*new_keys)

    @invariant()
    def balances_match_the_model(self) -> None:
        """Each user's balance, its paid and free parts, held and available amounts and next
        credits to expire, of every asset, as of now; every lot; and the entries and lot moves
        of the transactions made since."""
        for user_id in sorted(self.model.users):
            found = self.run(self.wallet.standings(user_id=user_id))
            assert [
                (s.asset_symbol, s.balance, s.paid, s.free, s.held, s.available, s.next_expiry)
                for s in found
            ] == [self.model.standing(user_id, asset) for asset in ASSETS], f"{user_id}"
        self.lots_and_new_transactions_match_the_model()
        if self.steps % VERIFY_EVERY == 0:
            self.assert_ledger_is_sound()
        self.steps_checked = self.steps

    def lots_and_new_transactions_match_the_model(self) -> None:
        """What remains of every lot; and the entries of each transaction made since the last
        look (a debit and a credit per kind, in the order the rules give) and what it took
        from or gave to each lot."""
        made = self.model.unwritten
        stored_lots, written, moved = self.run(_stored_since(self.database, made))
        assert stored_lots == +self.model.lots
        for transaction_id in made:
            orders = self.model.entry_orders.pop(transaction_id)
            found = written.get(transaction_id, [])
            assert found in orders, f"{transaction_id} wrote {found}, not one of {orders}"
            self.model.entries[transaction_id] = found
            expected = self.model.lot_moves[transaction_id]
            assert moved.get(transaction_id, []) == expected, f"{transaction_id}'s lot moves"
        made.clear()

    def assert_ledger_is_sound(self) -> None:
        """`verify` finds nothing, and every stored balance, paid part, held sum and sum of
        lots, system accounts included, and every stored hold is the model's (so per asset
        and kind balances sum to zero)."""
        self.audited = self.steps
        failures = [f"{c.name}: {f}" for c in self.run(verify(self.database)) for f in c.failures]
        assert not failures, failures
        stored = self.run(_stored_balances(self.database))
        model = self.model
        pairs = {(account, asset) for account, asset, _ in model.parts}
        pairs |= {(h.user_id, h.asset) for h in model.holds.values()}
        expiring: Counter[tuple[str, str]] = Counter()
        for (user_id, asset, _, _), left in model.lots.items():
            expiring[(user_id, asset)] += left
        expected = {
            (account, asset): (
                model.balance(account, asset),
                model.parts[(account, asset, Kind.PAID)],
                model.stored_held(account, asset),
                expiring[(account, asset)],
            )
            for account, asset in pairs
        }
        assert stored == {k: v for k, v in expected.items() if v != (0, 0, 0, 0)}
        for asset in ASSETS:
            for kind in Kind:
                assert (
                    sum(n for (_, a, k), n in model.parts.items() if (a, k) == (asset, kind)) == 0
                )
            assert sum(b for (_, a), (b, *_) in stored.items() if a == asset) == 0
            assert sum(p for (_, a), (_, p, *_) in stored.items() if a == asset) == 0
        stored_holds = self.run(_stored_holds(self.database))
        assert stored_holds == {h.id: h.stored() for h in self.model.holds.values()}

    def teardown(self) -> None:
        # After a failed step the model is behind the database; the failure is already reported.
        # After the last step's own audit, nothing has changed since.
        if self.steps_checked == self.steps and self.audited != self.steps:
            self.assert_ledger_is_sound()


def nearly_same(sent: Command) -> dict[str, dict[str, Any]]:
    """One-field changes of a request, by name: each makes another request."""
    changes: dict[str, dict[str, Any]] = {}
    user = {"user_id": BOB if sent.user_id == ALICE else ALICE}
    asset = {"asset_symbol": "DIAMONDS" if sent.asset_symbol != "DIAMONDS" else "GOLD_COINS"}
    if sent.amount is None:
        amount: dict[str, Any] = {"amount": 1}
    else:
        amount = {"amount": sent.amount + 1 if sent.amount < MAX_AMOUNT else 1}
    note = {"note": "changed" if sent.note is None else None}
    match sent.action:
        case Action.TOPUP:
            changes = {"flow": {"action": Action.BONUS, "metadata": None}, "user": user}
            changes |= {"asset": asset, "amount": amount}
            changes["metadata"] = {
                "metadata": {"order": "changed"} if sent.metadata is None else None
            }
        case Action.BONUS | Action.SPEND:
            no_expiry = {"credit_expires_in_days": None, "credit_expires_at": None}
            changes = {"flow": {"action": Action.TOPUP, "note": None, **no_expiry}}
            changes |= {"user": user, "asset": asset, "amount": amount, "note": note}
            if sent.action is Action.BONUS:  # a bonus's expiry is part of the request
                days = 2 if sent.credit_expires_in_days == 1 else 1
                changes["expiry"] = {**no_expiry, "credit_expires_in_days": days}
        case Action.TRANSFER:
            changes = {"flow": {"action": Action.SPEND, "to_user_id": None}, "user": user}
            changes |= {"asset": asset, "amount": amount, "note": note}
            changes["receiver"] = {"to_user_id": "carol" if sent.to_user_id != "carol" else BOB}
        case Action.HOLD:
            changes = {"flow": {"action": Action.SPEND, "expires_in_s": None}, "user": user}
            changes |= {"asset": asset, "amount": amount, "note": note}
            changes["expiry"] = {"expires_in_s": 60 if sent.expires_in_s is None else None}
        case Action.CAPTURE:
            changes = {"flow": {"action": Action.RELEASE, "amount": None, "note": None}}
            changes |= {"amount": amount, "note": note}
            changes["amount-default"] = {"amount": None if sent.amount is not None else 1}
            changes["hold"] = {"reference": UNKNOWN_HOLD}
        case Action.RELEASE:
            changes = {"flow": {"action": Action.CAPTURE}, "hold": {"reference": UNKNOWN_HOLD}}
        case Action.REFUND:
            changes = {"amount": amount, "note": note}
            changes["amount-default"] = {"amount": None if sent.amount is not None else 1}
            changes["original"] = {"reference": UNKNOWN_TRANSACTION}
        case Action.BATCH:
            first, *rest = sent.operations
            changes = {"more": {"operations": (*sent.operations, first)}}
            if rest:
                changes["fewer"] = {"operations": tuple(rest)}
            changes |= {
                "first-amount": {
                    "operations": (
                        dataclasses.replace(first, amount=(first.amount or 0) + 1),
                        *rest,
                    )
                },
            }
    return changes


async def _reset(database: Database) -> None:
    """Empty every table and seed again, so an example starts where the seed leaves off."""
    async with database.transaction(is_write=True) as connection:
        if database.dialect == "postgresql":
            tables = ", ".join(table.name for table in metadata.sorted_tables)
            await connection.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY"))
        else:
            for table in reversed(metadata.sorted_tables):
                await connection.execute(table.delete())
    await seed(database)


async def _stored_balances(
    database: Database,
) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """Every balance's balance, paid part, held sum and lots' sum that is not all zero, read
    past the service (a system account's: the sums over its rows)."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(sa.select(balances))
        found: dict[tuple[str, str], tuple[int, int, int, int]] = {}
        for r in rows:
            balance, paid, held, expiring = found.get((r.account_id, r.asset_symbol), (0, 0, 0, 0))
            found[(r.account_id, r.asset_symbol)] = (
                balance + r.balance,
                paid + r.paid,
                held + r.held,
                expiring + r.expiring,
            )
        return {k: v for k, v in found.items() if v != (0, 0, 0, 0)}


async def _stored_since(
    database: Database, transaction_ids: list[str]
) -> tuple[Counter[LotKey], dict[str, list[ModelEntry]], dict[str, list[LotMoved]]]:
    """What remains of every lot that holds credits; and the entries of the transactions, in the
    order written, and their lot moves; read past the service, in one read."""
    written: dict[str, list[ModelEntry]] = {}
    moved: dict[str, list[LotMoved]] = {}
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(sa.select(lots).where(lots.c.remaining != 0))
        stored_lots = Counter(
            {
                (r.account_id, r.asset_symbol, Kind(r.kind), as_utc(r.expires_at)): r.remaining
                for r in rows
            }
        )
        if not transaction_ids:
            return stored_lots, written, moved
        rows = await connection.execute(
            sa.select(entries)
            .where(entries.c.transaction_id.in_(transaction_ids))
            .order_by(entries.c.seq)
        )
        for r in rows:
            written.setdefault(r.transaction_id, []).append(
                ModelEntry(
                    r.account_id,
                    Direction(r.direction),
                    Kind(r.kind),
                    r.amount,
                    None if is_system(r.account_id) else r.balance_after,
                    None if is_system(r.account_id) else r.paid_after,
                )
            )
        rows = await connection.execute(
            sa.select(lot_moves).where(lot_moves.c.transaction_id.in_(transaction_ids))
        )
        for r in rows:
            moved.setdefault(r.transaction_id, []).append(
                (r.account_id, Kind(r.kind), as_utc(r.expires_at), r.amount)
            )
    return stored_lots, written, {t: sorted(m) for t, m in moved.items()}


async def _expiries_not_in(database: Database, known: Iterable[str]) -> list[Transaction]:
    """The expiry transactions the model does not know yet, in the order they were made."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(
            sa.select(transactions)
            .where(transactions.c.type == Flow.EXPIRY.value)
            .order_by(transactions.c.seq)
        )
        return [t for t in map(to_transaction, rows) if t.id not in known]


async def _stored_holds(database: Database) -> dict[str, Hold]:
    """Every hold as stored (an expired one is `held` until marked), read past the service."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(sa.select(holds))
        return {r.id: to_hold(r) for r in rows}


def _run_machine(url: str, *, is_new: bool) -> None:
    """Run the machine on its own event loop, which also creates and disposes the engine."""
    loop = asyncio.new_event_loop()
    try:
        database = Database(create_engine(Settings(database_url=url)))
        try:
            if is_new:
                loop.run_until_complete(migrate(database))
            # Any factory will do (hypothesis calls it), though its stubs ask for a class.
            run_state_machine_as_test(
                lambda: WalletMachine(database, loop),  # type: ignore[arg-type]
                settings=MACHINE_SETTINGS,
            )
        finally:
            loop.run_until_complete(database.close())
    finally:
        loop.close()


# Passing takes seconds; a failure is worth its minimal example, and hypothesis may shrink for up
# to five minutes before printing it.
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("machine_clock")
@pytest.mark.parametrize("backend", BACKENDS)
def test_random_flows_holds_refunds_batches_and_retries_agree_with_a_model(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    # A plain (sync) test: pytest-asyncio leaves it alone, so the machine owns its loop.
    if backend == "sqlite":
        _run_machine(f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}", is_new=True)
    else:
        _run_machine(request.getfixturevalue("postgres_url"), is_new=False)


# ---- what the machine found, each alone (API.md, API-operations.md, API-ledger.md) ----------


def _gold(action: Action, key: str, amount: int = 5) -> Command:
    return Command(
        action=action,
        user_id=ALICE,
        asset_symbol="GOLD_COINS",
        amount=amount,
        idempotency_key=key,
    )


def _batch(key: str) -> Command:
    return Command(
        action=Action.BATCH, idempotency_key=key, operations=(_gold(Action.TOPUP, "", 3),)
    )


async def test_a_request_under_the_key_of_an_applied_atomic_batch_is_a_reuse(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """409 idempotency_key_reused, at once: a batch's own key is taken, like any other. (The
    engine found the key taken but nothing stored under it, so it reran the transaction until
    RETRY_FOR_S ran out and answered 503 database_unavailable, 20 s later in production.)"""
    monkeypatch.setattr(wallet.service.posting, "RETRY_FOR_S", RETRY_FOR_S)
    (applied,) = await post(database, [_batch("order-7")])
    assert isinstance(applied, Posted)
    for request in (
        _gold(Action.TOPUP, "order-7"),
        _gold(Action.SPEND, "order-7"),
        _gold(Action.HOLD, "order-7"),
        Command(action=Action.REFUND, reference=applied.transaction.id, idempotency_key="order-7"),
    ):
        (outcome,) = await post(database, [request])
        assert isinstance(outcome, IdempotencyKeyReused), f"{request.action}: {outcome!r}"


@pytest.mark.parametrize("is_batch_first", [True, False])
async def test_a_batch_beside_a_request_under_one_of_its_operation_keys_each_get_their_answer(
    database: Database, is_batch_first: bool
) -> None:
    """Two requests in one call (as the batcher groups them) that both want the key
    `<key>:0`: the first takes it, the other is a reuse, and the rest of the call applies.
    (The engine checked a batch's operation keys against the keys the call had claimed, not
    against those an earlier command of the call had used, so both wrote a transaction under
    `<key>:0` and the whole call failed with 409 conflict.)"""
    batch, request = _batch("order-8"), _gold(Action.TOPUP, "order-8:0", amount=7)
    pair = [batch, request] if is_batch_first else [request, batch]
    outcomes = await post(database, [*pair, _gold(Action.TOPUP, "order-9")])
    assert isinstance(outcomes[0], Posted), outcomes
    assert isinstance(outcomes[1], IdempotencyKeyReused), outcomes
    assert isinstance(outcomes[2], Posted), outcomes


async def test_a_refusal_under_an_operation_key_keeps_that_key_from_a_batch_in_the_same_call(
    database: Database,
) -> None:
    """A spend refused for good under `order-10:0`, then in the same call the batch `order-10`:
    the key holds the refusal, so the batch is a reuse and the spend's retry replays its
    refusal. (The batch applied under `order-10:0` too, and the spend's retry answered 409.)"""
    spend = _gold(Action.SPEND, "order-10:0", amount=10**6)
    refused, batch_outcome = await post(database, [spend, _batch("order-10")])
    assert isinstance(refused, InsufficientFunds), refused
    assert isinstance(batch_outcome, IdempotencyKeyReused), batch_outcome
    (again,) = await post(database, [spend])
    assert isinstance(again, InsufficientFunds), again
    assert again.is_replay


async def test_a_replay_is_the_first_answer_even_after_a_refund_or_the_end_of_its_hold(
    database: Database,
) -> None:
    """API.md: "the stored response is returned"; API-operations.md: "the same status and body
    again". A retry of a spend that has since been refunded, or of a hold since captured, gets
    the answer the first request got. (The engine answers with the state of now: the spend with
    its refundedAmount and refunds, the hold captured.)"""
    spend = _gold(Action.SPEND, "order-11")
    (spent,) = await post(database, [spend])
    assert isinstance(spent, Posted)
    refund = Command(
        action=Action.REFUND, reference=spent.transaction.id, amount=2, idempotency_key="r-11"
    )
    hold = _gold(Action.HOLD, "order-12")
    (placed,) = await post(database, [hold])
    assert isinstance(placed, Posted)
    assert placed.hold is not None
    capture = Command(action=Action.CAPTURE, reference=placed.hold.id, idempotency_key="c-12")
    assert all(isinstance(o, Posted) for o in await post(database, [refund, capture]))
    spent_again, placed_again = await post(database, [spend, hold])
    assert spent_again == dataclasses.replace(spent, is_replay=True)
    assert placed_again == dataclasses.replace(placed, is_replay=True)


@pytest.mark.usefixtures("machine_clock")
async def test_credits_expiring_beyond_the_largest_amount_are_swept_like_any_others(
    database: Database,
) -> None:
    """API-credits.md: the service moves expired credits out by itself, with expiry
    transactions. What a balance has past its expiry (two bonuses that expire at one moment
    share a lot) can be more than a transaction's largest amount (10**15); and a sweep pass is
    one database transaction. (Open: the engine makes one expiry of 10**15 + 1, which breaks
    the amount check, so the pass fails as a conflict, for every balance in it, on every pass:
    the other user's 5 expired credits are never moved out either.)"""
    CLOCK.moment = datetime.now(UTC)
    soon = CLOCK.moment + timedelta(seconds=1)
    for key, user_id, amount in (("big-1", ALICE, MAX_AMOUNT), ("big-2", ALICE, 1), ("5", BOB, 5)):
        bonus = Command(
            action=Action.BONUS,
            user_id=user_id,
            asset_symbol="GOLD_COINS",
            amount=amount,
            idempotency_key=key,
            credit_expires_at=soon,
        )
        (granted,) = await post(database, [bonus])
        assert isinstance(granted, Posted), granted
    CLOCK.moment = soon
    for _ in range(3):  # however many transactions the largest expiry takes
        if not await expire_credits(database, limit=100):
            break
    wallet = Wallet(database)
    for user_id in (ALICE, BOB):
        (standing,) = await wallet.standings(user_id=user_id, asset_symbol="GOLD_COINS")
        assert (standing.balance, standing.free) == (1000, 0), f"{user_id}: {standing}"
