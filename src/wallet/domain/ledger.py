"""Double-entry, by kind: every credit is paid (bought) or free (granted), and a transaction moves
each kind from a debited account to a credited account in a debit and a credit entry of that
kind, so per asset and per kind all balances sum to zero; user balances never go below zero,
system accounts may (they issue credits); every balance stays within 64 bits. Credits that expire
sit in lots, one per user, asset, kind and moment of expiry, which the balance's moves consume in
the asset's spend order. Each account's entries of an asset form a hash chain, so an edit made
behind the service's back shows."""

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NewType

from wallet.domain.errors import (
    BalanceLimitExceeded,
    InsufficientFunds,
    InvalidRequest,
    NotRefundable,
)

UserId = NewType("UserId", str)
AccountId = NewType("AccountId", str)
TransactionId = NewType("TransactionId", str)

MAX_AMOUNT = 10**15
DEFAULT_HOLD_S = 900
MAX_HOLD_S = 604_800
MIN_BALANCE = -(2**63)
MAX_BALANCE = 2**63 - 1
SYSTEM_PREFIX = "system:"
GENESIS_LINK = "0" * 64  # the link before an account's first entry
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class SystemAccount(StrEnum):
    TREASURY = "system:treasury"
    BONUS_POOL = "system:bonus_pool"
    REVENUE = "system:revenue"


class Flow(StrEnum):
    """The types of transaction."""

    TOPUP = "topup"
    BONUS = "bonus"
    SPEND = "spend"
    TRANSFER = "transfer"
    REFUND = "refund"  # of a spend: revenue back to the user
    REVERSAL = "reversal"  # of a top-up or bonus: the user back to where it came from
    EXPIRY = "expiry"  # credits past their expiry: free to the bonus pool, paid to revenue


class Action(StrEnum):
    """What a command asks for."""

    TOPUP = "topup"
    BONUS = "bonus"
    SPEND = "spend"
    TRANSFER = "transfer"
    REFUND = "refund"  # makes a refund or a reversal, by the original's type
    HOLD = "hold"
    CAPTURE = "capture"
    RELEASE = "release"
    BATCH = "batch"
    EXPIRE = "expire"  # the sweeper's: move a user's expired credits of an asset out


class Kind(StrEnum):
    PAID = "paid"  # bought: a top-up
    FREE = "free"  # granted: a bonus


class SpendOrder(StrEnum):
    FREE_FIRST = "free_first"
    PAID_FIRST = "paid_first"

    @property
    def kinds(self) -> tuple[Kind, Kind]:
        return (Kind.FREE, Kind.PAID) if self is SpendOrder.FREE_FIRST else (Kind.PAID, Kind.FREE)


class HoldStatus(StrEnum):
    HELD = "held"
    CAPTURED = "captured"
    RELEASED = "released"
    EXPIRED = "expired"


class Direction(StrEnum):
    DEBIT = "debit"  # the amount leaves the account
    CREDIT = "credit"  # the amount enters the account


def is_system_account(account_id: str) -> bool:
    """True for the ids reserved to system accounts."""
    return account_id.startswith(SYSTEM_PREFIX)


@dataclass(frozen=True, slots=True)
class Asset:
    symbol: str
    name: str
    description: str
    spend_order: SpendOrder = SpendOrder.FREE_FIRST
    free_lifetime_days: int | None = None  # of free credits granted without an expiry
    paid_lifetime_days: int | None = None

    def lifetime_days(self, kind: Kind) -> int | None:
        return self.paid_lifetime_days if kind is Kind.PAID else self.free_lifetime_days


@dataclass(frozen=True, slots=True)
class User:
    id: UserId
    email: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Command:
    """One request to the ledger. Which fields it has depends on the action: a flow names a user,
    an asset and an amount; a transfer also `to_user_id`; a refund, capture or release names its
    `reference` (the original transaction, or the hold); a batch holds its `operations`.
    `note` is the bonus or refund reason, or the spend, transfer, hold or capture description."""

    action: Action
    idempotency_key: str
    user_id: UserId | None = None
    asset_symbol: str | None = None
    amount: int | None = None
    to_user_id: UserId | None = None
    reference: str | None = None
    expires_in_s: int | None = None  # a hold's lifetime
    credit_expires_in_days: int | None = None  # a bonus's credits'
    credit_expires_at: datetime | None = None
    note: str | None = None
    metadata: Mapping[str, str] | None = None
    operations: tuple["Command", ...] = ()
    created_by: str | None = None  # the API key's id; not part of the request's identity

    def _identity(self) -> list[object]:
        identity: list[object] = [
            self.action,
            self.user_id,
            self.asset_symbol,
            self.amount,
            self.note,
            self.metadata,
        ]
        extra = [self.to_user_id, self.reference, self.expires_in_s]
        if any(value is not None for value in extra) or self.operations:
            # Appended only when present, so the three flows keep the digests they always had.
            identity.append([*extra, [operation._identity() for operation in self.operations]])
        if self.credit_expires_in_days is not None or self.credit_expires_at is not None:
            expires_at = (
                None if self.credit_expires_at is None else _timestamp(self.credit_expires_at)
            )
            identity.append(["expiry", self.credit_expires_in_days, expires_at])
        return identity

    def fingerprint(self) -> str:
        """Digest of everything that makes two requests the same request."""
        canonical = json.dumps(self._identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Transaction:
    """A posted money movement; `balance_after` is its user's balance right after it (for a
    transfer, the sender's, or in the receiver's reads the receiver's)."""

    id: TransactionId
    flow: Flow
    user_id: UserId
    asset_symbol: str
    amount: int
    balance_after: int
    idempotency_key: str
    note: str | None
    metadata: Mapping[str, str] | None
    created_at: datetime
    paid_amount: int  # how much of `amount` was paid credits; the rest was free
    created_by: str | None = None
    to_user_id: UserId | None = None
    hold_id: str | None = None  # the hold a spend captured
    refund_of: TransactionId | None = None  # what a refund or reversal gives back
    refunded_amount: int = 0
    refunds: tuple[TransactionId, ...] = ()

    @property
    def free_amount(self) -> int:
        return self.amount - self.paid_amount


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation of part of a user's balance: it counts in `held` while `status` is held and
    `expires_at` is in the future; money moves only when it is captured."""

    id: str
    user_id: UserId
    asset_symbol: str
    amount: int
    captured_amount: int
    status: HoldStatus
    expires_at: datetime
    created_at: datetime
    ended_at: datetime | None
    description: str | None
    created_by: str | None
    idempotency_key: str
    paid_amount: int  # what it reserved of paid credits; the rest, of free

    def reserved(self, kind: Kind) -> int:
        return self.paid_amount if kind is Kind.PAID else self.amount - self.paid_amount

    def is_active(self, now: datetime) -> bool:
        return self.status is HoldStatus.HELD and now < self.expires_at

    def as_created(self) -> "Hold":
        """The hold as its creation answered it."""
        return replace(self, status=HoldStatus.HELD, captured_amount=0, ended_at=None)

    def as_of(self, now: datetime) -> "Hold":
        """The hold as it stands at `now`: past its expiry it is expired, marked or not yet."""
        if self.status is HoldStatus.HELD and now >= self.expires_at:
            return replace(self, status=HoldStatus.EXPIRED, ended_at=self.expires_at)
        return self


@dataclass(frozen=True, slots=True)
class Standing:
    """A user's position in one asset: the balance and its paid part, what their active holds
    reserve of it, what has expired and is not moved out yet, and the next credits to expire."""

    asset_symbol: str
    balance: int
    paid: int
    held: int
    expired: int = 0
    next_expiry: tuple[int, datetime] | None = None  # amount, moment

    @property
    def free(self) -> int:
        return self.balance - self.paid

    @property
    def available(self) -> int:
        return self.balance - self.held - self.expired


@dataclass(frozen=True, slots=True)
class Entry:
    """One side of a transaction in one account's ledger."""

    id: str
    transaction_id: TransactionId
    account_id: AccountId
    asset_symbol: str
    direction: Direction
    amount: int
    balance_after: int  # its balance row's right after it (a system account has several rows)
    created_at: datetime
    kind: Kind
    paid_after: int  # its balance row's paid credits right after this entry
    chain_hash: str = ""  # its link in its balance row's chain; see `link`


CHAIN_VERSION = 3
_quote = json.encoder.encode_basestring  # a JSON string, non-ASCII kept (ensure_ascii=False)


@functools.lru_cache(maxsize=8)  # the transactions of one batch share their time
def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json(text: str | None) -> str:
    return "null" if text is None else _quote(text)


def link_content(previous: str, entry: Entry, transaction: Transaction) -> bytes:
    """The bytes an entry's link digests, in the encoding docs/LEDGER.md defines: one line of
    JSON, keys sorted, no white space, UTF-8, integers in full. It is what
    `json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)` writes for
    the record docs/LEDGER.md shows (tests/unit/test_chain_encoding.py holds the two equal),
    written out by hand because this runs twice per transaction on the write path."""
    created = _timestamp(transaction.created_at)
    entry_created = (
        created if entry.created_at == transaction.created_at else _timestamp(entry.created_at)
    )
    metadata = (
        "null"
        if transaction.metadata is None
        else json.dumps(
            dict(transaction.metadata), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
    )
    return (
        f'{{"entry":{{"account":{_quote(entry.account_id)},"amount":{entry.amount:d},'
        f'"assetSymbol":{_quote(entry.asset_symbol)},"balanceAfter":{entry.balance_after:d},'
        f'"createdAt":"{entry_created}","direction":"{entry.direction.value}",'
        f'"id":{_quote(entry.id)},"kind":"{entry.kind.value}","paidAfter":{entry.paid_after:d}}},'
        f'"previous":{_quote(previous)},"transaction":{{"amount":{transaction.amount:d},'
        f'"assetSymbol":{_quote(transaction.asset_symbol)},"createdAt":"{created}",'
        f'"createdBy":{_json(transaction.created_by)},"freeAmount":{transaction.free_amount:d},'
        f'"holdId":{_json(transaction.hold_id)},"id":{_quote(transaction.id)},'
        f'"idempotencyKey":{_quote(transaction.idempotency_key)},"metadata":{metadata},'
        f'"note":{_json(transaction.note)},"paidAmount":{transaction.paid_amount:d},'
        f'"refundOf":{_json(transaction.refund_of)},"toUserId":{_json(transaction.to_user_id)},'
        f'"type":"{transaction.flow.value}","userId":{_quote(transaction.user_id)}}},'
        f'"v":{CHAIN_VERSION}}}'
    ).encode()


def link(previous: str, entry: Entry, transaction: Transaction) -> str:
    """The entry's link in its balance row's chain: a digest of the previous link, of
    everything the entry states and of its transaction's header, so editing, relabelling,
    deleting or reordering an entry breaks the chain."""
    return hashlib.sha256(link_content(previous, entry, transaction)).hexdigest()


@dataclass(frozen=True, slots=True)
class Posted:
    """A command's success, and whether an earlier request already applied it: the transactions it
    made (one; a batch's, in order; none for a hold or a release) and the hold it concerns."""

    transactions: tuple[Transaction, ...]
    is_replay: bool
    hold: Hold | None = None

    @property
    def transaction(self) -> Transaction:
        return self.transactions[0]


BalanceKey = tuple[AccountId, str]
LotKey = tuple[Kind, datetime]  # a user's credits of one kind that expire at one moment


@dataclass(frozen=True, slots=True)
class Portion:
    """Part of a move: credits of one kind, from one lot (`expires_at`) or from the credits
    that never expire (None)."""

    kind: Kind
    expires_at: datetime | None
    amount: int


@dataclass(frozen=True, slots=True)
class Leg:
    """One side of a move: what an account's entry of it states."""

    account: AccountId
    direction: Direction
    kind: Kind
    amount: int
    balance_after: int
    paid_after: int


@dataclass(frozen=True, slots=True)
class LotMove:
    """What a transaction took from (negative) or gave to (positive) one lot."""

    transaction_id: TransactionId
    account_id: AccountId
    asset_symbol: str
    kind: Kind
    expires_at: datetime
    amount: int


def unprotected(due: int, held: int) -> int:
    """Of a kind's credits past their expiry, those that have expired: an active hold keeps
    what it reserved (the credits expiring soonest) until it ends."""
    return max(0, due - held)


def standing(
    asset_symbol: str,
    balance: int,
    paid: int,
    held: Mapping[Kind, int],
    lots: list[tuple[Kind, datetime, int]],
    now: datetime,
) -> Standing:
    """A user's position in an asset at `now`, from the balance, what active holds reserve of each
    kind, and the lots (kind, expiry, remaining)."""
    expired = 0
    for kind in Kind:
        due = sum(left for k, at, left in lots if k is kind and at <= now)
        expired += unprotected(due, held.get(kind, 0))
    upcoming = [(at, left) for _, at, left in lots if at > now and left > 0]
    next_expiry = None
    if upcoming:
        soonest = min(at for at, _ in upcoming)
        next_expiry = (sum(left for at, left in upcoming if at == soonest), soonest)
    return Standing(asset_symbol, balance, paid, sum(held.values()), expired, next_expiry)


class SystemRowFull(Exception):
    """A system account's balance row in this batch would pass 64 bits: not the request's
    fault, so no refusal; the batch runs again on another of the account's rows (shards)."""

    def __init__(self, key: BalanceKey) -> None:
        super().__init__(f"the balance row of {key[0]} in {key[1]} is full")
        self.key = key


@dataclass(slots=True)
class Book:
    """The locked state a batch of commands works on: balances and their paid parts, what holds
    reserve, the lots of expiring credits, and refunded totals."""

    balances: dict[BalanceKey, int]
    paid: dict[BalanceKey, int]
    held: dict[BalanceKey, int]  # the sum of holds in status held, expired or not
    active_held: dict[BalanceKey, dict[Kind, int]]  # what the holds that count now reserve
    lots: dict[BalanceKey, dict[LotKey, int]]  # what remains of each lot
    holds: dict[str, Hold]
    refunded: dict[TransactionId, int]  # per refundable original: refunded so far
    changed_lots: set[tuple[BalanceKey, LotKey]] = field(default_factory=set)

    def copy(self) -> "Book":
        return Book(
            dict(self.balances),
            dict(self.paid),
            dict(self.held),
            {key: dict(kinds) for key, kinds in self.active_held.items()},
            {key: dict(lots) for key, lots in self.lots.items()},
            dict(self.holds),
            dict(self.refunded),
            set(self.changed_lots),
        )

    def sub_balance(self, key: BalanceKey, kind: Kind) -> int:
        paid = self.paid[key]
        return paid if kind is Kind.PAID else self.balances[key] - paid

    def _held(self, key: BalanceKey, kind: Kind) -> int:
        return self.active_held.get(key, {}).get(kind, 0)

    def _due(self, key: BalanceKey, kind: Kind, now: datetime) -> int:
        lots = self.lots.get(key, {})
        return sum(left for (k, at), left in lots.items() if k is kind and at <= now)

    def expired(self, key: BalanceKey, kind: Kind, now: datetime) -> int:
        return unprotected(self._due(key, kind, now), self._held(key, kind))

    def available(self, key: BalanceKey, kind: Kind, now: datetime) -> int:
        return self.sub_balance(key, kind) - self._held(key, kind) - self.expired(key, kind, now)

    def plan(
        self, key: BalanceKey, kind: Kind, amount: int, now: datetime, *, due_first: bool = False
    ) -> list[Portion]:
        """Which credits of one kind `amount` takes: lots soonest to expire first (past their
        expiry only when `due_first`: a capture takes what its hold kept), then the credits
        that never expire. The caller has checked there are enough."""
        portions: list[Portion] = []
        left = amount
        for (k, at), remaining in sorted(self.lots.get(key, {}).items(), key=lambda lot: lot[0][1]):
            if k is kind and remaining > 0 and (due_first or at > now) and left > 0:
                part = min(left, remaining)
                portions.append(Portion(kind, at, part))
                left -= part
        if left > 0:
            portions.append(Portion(kind, None, left))
        return portions

    def plan_in_order(
        self, key: BalanceKey, amount: int, order: SpendOrder, now: datetime
    ) -> list[Portion]:
        """Which available credits a spend or transfer of `amount` takes, in the spend order,
        or raise when not enough are available."""
        check_amount(amount)
        split = self.split(key, amount, order, now)
        return [p for kind, part in split.items() if part for p in self.plan(key, kind, part, now)]

    def split(
        self, key: BalanceKey, amount: int, order: SpendOrder, now: datetime
    ) -> dict[Kind, int]:
        """How much of each kind `amount` takes of the available credits, in the spend order."""
        available = {kind: self.available(key, kind, now) for kind in order.kinds}
        if amount > sum(available.values()):
            raise InsufficientFunds(
                f"available {key[1]} is {sum(available.values())}, less than the {amount} asked for"
            )
        split: dict[Kind, int] = {}
        left = amount
        for kind in order.kinds:
            split[kind] = min(left, available[kind])
            left -= split[kind]
        return split

    def move(self, asset: str, legs: list[tuple[AccountId, AccountId, list[Portion]]]) -> list[Leg]:
        """Move each leg's portions (all of one kind) from its debited to its credited account,
        or raise and change nothing: every balance row stays within 64 bits (a system account's
        row that would not raises `SystemRowFull`: the batch moves to another row of it). A
        user's lots give and take with the portions. Returns each side of each leg, with the
        balances after it."""
        after: dict[BalanceKey, tuple[int, int]] = {}
        for debited, credited, portions in legs:
            amount = sum(p.amount for p in portions)
            paid = amount if portions[0].kind is Kind.PAID else 0
            for key, sign in (((debited, asset), -1), ((credited, asset), 1)):
                balance, paid_part = after.get(key, (self.balances[key], self.paid[key]))
                after[key] = (balance + sign * amount, paid_part + sign * paid)
        beyond = [
            key
            for key, pair in after.items()
            if not all(MIN_BALANCE <= v <= MAX_BALANCE for v in pair)
        ]
        for key in beyond:
            if is_system_account(key[0]):
                raise SystemRowFull(key)
        if beyond:
            raise BalanceLimitExceeded("the transaction would take a balance past 64 bits")
        sides: list[Leg] = []
        for debited, credited, portions in legs:
            kind = portions[0].kind
            amount = sum(p.amount for p in portions)
            for account, direction, sign in (
                (debited, Direction.DEBIT, -1),
                (credited, Direction.CREDIT, 1),
            ):
                key = (account, asset)
                self.balances[key] += sign * amount
                if kind is Kind.PAID:
                    self.paid[key] += sign * amount
                if not is_system_account(account):
                    for portion in portions:
                        if portion.expires_at is not None:
                            lot = (kind, portion.expires_at)
                            lots = self.lots.setdefault(key, {})
                            lots[lot] = lots.get(lot, 0) + sign * portion.amount
                            self.changed_lots.add((key, lot))
                sides.append(
                    Leg(account, direction, kind, amount, self.balances[key], self.paid[key])
                )
        return sides

    def reserve(self, key: BalanceKey, amount: int, order: SpendOrder, now: datetime) -> int:
        """Count a new hold of `amount` against the balance, taking available credits in the
        spend order, or raise when not available. Returns what it reserved of paid credits."""
        check_amount(amount)
        split = self.split(key, amount, order, now)
        reserved = self.active_held.setdefault(key, {})
        for kind, part in split.items():
            reserved[kind] = reserved.get(kind, 0) + part
        self.held[key] = self.held.get(key, 0) + amount
        return split[Kind.PAID]

    def end_hold(self, hold: Hold) -> None:
        """Stop counting an active hold (captured or released)."""
        key = (AccountId(hold.user_id), hold.asset_symbol)
        self.held[key] -= hold.amount
        reserved = self.active_held.setdefault(key, {})
        for kind in Kind:
            reserved[kind] = reserved.get(kind, 0) - hold.reserved(kind)

    def expiring(self, key: BalanceKey) -> int:
        """What the lots of a balance hold: its credits that can expire."""
        return sum(self.lots.get(key, {}).values())


def lot_expiry(asset: Asset, kind: Kind, now: datetime) -> datetime | None:
    """When credits of `kind` granted now expire by the asset's lifetimes, if ever."""
    days = asset.lifetime_days(kind)
    return None if days is None else now + timedelta(days=days)


def returned(taken: list[Portion], before: int, amount: int) -> list[Portion]:
    """What a refund of `amount` of one kind gives back of `taken` (the kind's portions, in the
    order they were taken), after `before` was given back already: last taken, first returned,
    so credits that never expire come back before lots, and later lots before sooner ones."""
    portions: list[Portion] = []
    skip, left = before, amount
    for portion in reversed(taken):
        part = portion.amount
        gone = min(skip, part)
        skip -= gone
        part = min(left, part - gone)
        if part > 0:
            portions.append(replace(portion, amount=part))
            left -= part
    return portions


def taken_portions(kind: Kind, amount: int, lots: list[tuple[datetime, int]]) -> list[Portion]:
    """The portions of one kind a transaction took, in the order it took them, from what it
    took of each lot (soonest first) and its amount of that kind."""
    ordered = [Portion(kind, at, part) for at, part in sorted(lots)]
    rest = amount - sum(p.amount for p in ordered)
    return ordered + ([Portion(kind, None, rest)] if rest > 0 else [])


def check_amount(amount: int) -> None:
    if not 1 <= amount <= MAX_AMOUNT:
        raise InvalidRequest(f"amount must be from 1 to {MAX_AMOUNT}", field="amount")


def flow_accounts(
    action: Action, user_id: UserId, to_user_id: UserId | None
) -> tuple[AccountId, AccountId]:
    """The accounts a flow debits and credits."""
    match action:
        case Action.TOPUP:
            return AccountId(SystemAccount.TREASURY), AccountId(user_id)
        case Action.BONUS:
            return AccountId(SystemAccount.BONUS_POOL), AccountId(user_id)
        case Action.SPEND | Action.CAPTURE:
            return AccountId(user_id), AccountId(SystemAccount.REVENUE)
        case Action.TRANSFER if to_user_id is not None:
            return AccountId(user_id), AccountId(to_user_id)
    raise ValueError(f"{action} moves no money by itself")


def expiry_account(kind: Kind) -> AccountId:
    """Where expired credits go: free back to the bonus pool, paid to revenue (breakage)."""
    return AccountId(SystemAccount.BONUS_POOL if kind is Kind.FREE else SystemAccount.REVENUE)


def refund_accounts(original: Transaction) -> tuple[Flow, AccountId, AccountId]:
    """A refund's type and the accounts it debits and credits: the original's, swapped."""
    match original.flow:
        case Flow.SPEND:
            return Flow.REFUND, AccountId(SystemAccount.REVENUE), AccountId(original.user_id)
        case Flow.TOPUP:
            return Flow.REVERSAL, AccountId(original.user_id), AccountId(SystemAccount.TREASURY)
        case Flow.BONUS:
            return Flow.REVERSAL, AccountId(original.user_id), AccountId(SystemAccount.BONUS_POOL)
    raise NotRefundable(f"a {original.flow} cannot be refunded")
