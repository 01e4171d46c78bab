"""Double-entry: every transaction moves one amount of one asset from a debited account to a
credited account, so per asset all balances sum to zero; user balances never go below zero,
system accounts may (they issue credits); every balance stays within 64 bits. Each account's
entries of an asset form a hash chain, so an edit made behind the service's back shows."""

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import NewType

from wallet.domain.errors import BalanceLimitExceeded, InsufficientFunds, InvalidRequest

UserId = NewType("UserId", str)
AccountId = NewType("AccountId", str)
TransactionId = NewType("TransactionId", str)

MAX_AMOUNT = 10**15
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
    TOPUP = "topup"
    BONUS = "bonus"
    SPEND = "spend"


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
    """One flow a client asked for; `note` is the bonus reason or the spend description."""

    flow: Flow
    user_id: UserId
    asset_symbol: str
    amount: int
    idempotency_key: str
    note: str | None = None
    metadata: Mapping[str, str] | None = None
    created_by: str | None = None  # the API key's id; not part of the request's identity

    @property
    def debited(self) -> AccountId:
        """The account the amount leaves."""
        match self.flow:
            case Flow.TOPUP:
                return AccountId(SystemAccount.TREASURY)
            case Flow.BONUS:
                return AccountId(SystemAccount.BONUS_POOL)
            case Flow.SPEND:
                return AccountId(self.user_id)

    @property
    def credited(self) -> AccountId:
        """The account the amount enters."""
        if self.flow is Flow.SPEND:
            return AccountId(SystemAccount.REVENUE)
        return AccountId(self.user_id)

    def fingerprint(self) -> str:
        """Digest of everything that makes two requests the same request."""
        canonical = json.dumps(
            [self.flow, self.user_id, self.asset_symbol, self.amount, self.note, self.metadata],
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Transaction:
    """A posted command; `balance_after` is the user's balance right after it."""

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


def link(previous: str, entry: Entry) -> str:
    """The entry's link in its (account, asset) chain: a digest of the previous link and of
    everything the entry states, so editing, deleting or reordering an entry breaks the chain."""
    created_us = (entry.created_at - EPOCH) // timedelta(microseconds=1)
    content = "|".join(
        (
            previous,
            entry.id,
            entry.transaction_id,
            entry.account_id,
            entry.asset_symbol,
            entry.direction,
            str(entry.amount),
            str(entry.balance_after),
            str(created_us),
        )
    )
    return hashlib.sha256(content.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Posted:
    """A command's success: its transaction, and whether an earlier request already applied it."""

    transaction: Transaction
    is_replay: bool


def move(balances: dict[tuple[AccountId, str], int], command: Command) -> None:
    """Apply the command's two entries to `balances` in place, or raise and change nothing."""
    if not 1 <= command.amount <= MAX_AMOUNT:
        raise InvalidRequest(f"amount must be from 1 to {MAX_AMOUNT}", field="amount")
    debited = (command.debited, command.asset_symbol)
    credited = (command.credited, command.asset_symbol)
    debited_after = balances[debited] - command.amount
    credited_after = balances[credited] + command.amount
    if debited_after < 0 and not is_system_account(command.debited):
        raise InsufficientFunds(
            f"balance of {command.asset_symbol} is {balances[debited]}, "
            f"less than the {command.amount} asked for"
        )
    if not (debited_after >= MIN_BALANCE and credited_after <= MAX_BALANCE):
        raise BalanceLimitExceeded(f"the {command.flow} would take a balance past 64 bits")
    balances[debited] = debited_after
    balances[credited] = credited_after
