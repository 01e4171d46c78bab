"""Double-entry: every transaction moves one amount of one asset from a debited account to a
credited account, so per asset all balances sum to zero; user balances never go below zero,
system accounts may (they issue credits); every balance stays within 64 bits. Each account's
entries of an asset form a hash chain, so an edit made behind the service's back shows."""

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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
    expires_in_s: int | None = None
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
    created_by: str | None = None
    to_user_id: UserId | None = None
    hold_id: str | None = None  # the hold a spend captured
    refund_of: TransactionId | None = None  # what a refund or reversal gives back
    refunded_amount: int = 0
    refunds: tuple[TransactionId, ...] = ()


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
    """A user's position in one asset: the balance, and what their active holds reserve of it."""

    asset_symbol: str
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


@dataclass(frozen=True, slots=True)
class Entry:
    """One side of a transaction in one account's ledger."""

    id: str
    transaction_id: TransactionId
    account_id: AccountId
    asset_symbol: str
    direction: Direction
    amount: int
    balance_after: int
    created_at: datetime
    chain_hash: str = ""  # this entry's link in its account's chain; see `link`


CHAIN_VERSION = 2
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
        f'"id":{_quote(entry.id)}}},"previous":{_quote(previous)},'
        f'"transaction":{{"amount":{transaction.amount:d},'
        f'"assetSymbol":{_quote(transaction.asset_symbol)},"createdAt":"{created}",'
        f'"createdBy":{_json(transaction.created_by)},"holdId":{_json(transaction.hold_id)},'
        f'"id":{_quote(transaction.id)},"idempotencyKey":{_quote(transaction.idempotency_key)},'
        f'"metadata":{metadata},"note":{_json(transaction.note)},'
        f'"refundOf":{_json(transaction.refund_of)},"toUserId":{_json(transaction.to_user_id)},'
        f'"type":"{transaction.flow.value}","userId":{_quote(transaction.user_id)}}},'
        f'"v":{CHAIN_VERSION}}}'
    ).encode()


def link(previous: str, entry: Entry, transaction: Transaction) -> str:
    """The entry's link in its (account, asset) chain: a digest of the previous link, of
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


@dataclass(slots=True)
class Book:
    """The locked state a batch of commands works on: balances, and what counts against them."""

    balances: dict[BalanceKey, int]
    held: dict[BalanceKey, int]  # the sum of holds in status held, expired or not
    active_held: dict[BalanceKey, int]  # the sum of holds that count now
    holds: dict[str, Hold]
    refunded: dict[TransactionId, int]  # per refundable original: refunded so far

    def available(self, key: BalanceKey) -> int:
        return self.balances[key] - self.active_held.get(key, 0)

    def copy(self) -> "Book":
        return Book(
            dict(self.balances),
            dict(self.held),
            dict(self.active_held),
            dict(self.holds),
            dict(self.refunded),
        )

    def move(self, debited: AccountId, credited: AccountId, asset: str, amount: int) -> None:
        """Move `amount` between two accounts, or raise and change nothing: a user can move only
        what is available (not held), and every balance stays within 64 bits."""
        check_amount(amount)
        debit_key, credit_key = (debited, asset), (credited, asset)
        debited_after = self.balances[debit_key] - amount
        credited_after = self.balances[credit_key] + amount
        if not is_system_account(debited) and amount > self.available(debit_key):
            raise InsufficientFunds(
                f"available {asset} is {self.available(debit_key)}, "
                f"less than the {amount} asked for"
            )
        if not (debited_after >= MIN_BALANCE and credited_after <= MAX_BALANCE):
            raise BalanceLimitExceeded("the transaction would take a balance past 64 bits")
        self.balances[debit_key] = debited_after
        self.balances[credit_key] = credited_after

    def reserve(self, key: BalanceKey, amount: int) -> None:
        """Count a new hold of `amount` against the balance, or raise when not available."""
        check_amount(amount)
        if amount > self.available(key):
            raise InsufficientFunds(
                f"available {key[1]} is {self.available(key)}, less than the {amount} asked for"
            )
        self.held[key] = self.held.get(key, 0) + amount
        self.active_held[key] = self.active_held.get(key, 0) + amount

    def end_hold(self, hold: Hold) -> None:
        """Stop counting an active hold (captured or released)."""
        key = (AccountId(hold.user_id), hold.asset_symbol)
        self.held[key] -= hold.amount
        self.active_held[key] -= hold.amount


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
