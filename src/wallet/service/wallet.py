"""The wallet's use cases: the flows, holds, refunds, transfers and batches, users, and the
reads the API serves."""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import uuid_utils
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet import metrics
from wallet.domain.errors import (
    AssetExists,
    InvalidRequest,
    Refusal,
    UnknownAsset,
    UnknownHold,
    UnknownTransaction,
    UnknownUser,
    UserExists,
)
from wallet.domain.ledger import (
    EPOCH,
    Asset,
    Command,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Kind,
    Posted,
    Standing,
    SystemAccount,
    Transaction,
    User,
)
from wallet.service.batcher import Batcher
from wallet.service.posting import in_write_transaction, post
from wallet.store import queries
from wallet.store.database import Database

T = TypeVar("T")
Page = tuple[list[T], int | None]  # the items, and the cursor (a `seq`) of the next page


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int = 50
    before: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Liabilities:
    """What the platform owes its users of an asset at `at` (paid, free), and what moved after
    `since` up to `until`: per type of transaction, paid and free credits."""

    asset_symbol: str
    at: datetime
    outstanding: Mapping[Kind, int]
    since: datetime
    until: datetime
    moved: Mapping[Flow, tuple[int, int]]


def liabilities_body(report: Liabilities) -> dict[str, Any]:
    """The report as the API and `wallet report liabilities` show it."""
    period: dict[str, Any] = {"from": report.since, "to": report.until}
    for name, flows in (
        ("issued", (Flow.TOPUP, Flow.BONUS)),
        ("spent", (Flow.SPEND,)),
        ("refunded", (Flow.REFUND,)),
        ("reversed", (Flow.REVERSAL,)),
        ("expired", (Flow.EXPIRY,)),
    ):
        moved = [report.moved.get(flow, (0, 0)) for flow in flows]
        period[f"{name}Paid"] = sum(paid for paid, _ in moved)
        period[f"{name}Free"] = sum(free for _, free in moved)
    return {
        "assetSymbol": report.asset_symbol,
        "at": report.at,
        "outstanding": {kind.value: report.outstanding[kind] for kind in Kind},
        "period": period,
    }


class Wallet:
    """The service's entry point for every adapter (HTTP, CLI)."""

    def __init__(self, database: Database, *, batcher: Batcher | None = None) -> None:
        self.database = database
        self.batcher = batcher

    async def execute(self, command: Command) -> Posted:
        """Apply one flow, or raise the domain error that stopped it. With a batcher the command
        shares a transaction with others that arrive together; without, it has its own."""
        if self.batcher is not None:
            outcome = await self.batcher.submit(command)
        else:
            (outcome,) = await post(self.database, [command])
        if isinstance(outcome, Exception):
            if isinstance(outcome, Refusal) and outcome.is_replay:
                metrics.REPLAYS.labels(command.action.value).inc()
            raise outcome
        if outcome.is_replay:
            metrics.REPLAYS.labels(command.action.value).inc()
        else:
            for transaction in outcome.transactions:
                metrics.MONEY_MOVED.labels(transaction.flow.value, transaction.asset_symbol).inc(
                    transaction.amount
                )
        return outcome

    async def assets(self) -> list[Asset]:
        async with self.database.transaction(is_write=False) as connection:
            return await queries.list_assets(connection)

    async def create_asset(self, asset: Asset) -> Asset:
        async with self.database.transaction(is_write=True) as connection:
            if not await queries.insert_assets(connection, [asset]):
                raise AssetExists(f"asset {asset.symbol} already exists")
        return asset

    async def change_asset(self, *, symbol: str, changes: Mapping[str, Any]) -> Asset:
        """Change an asset's fields; its lifetimes apply to credits granted afterwards."""
        changed = await in_write_transaction(
            self.database,
            lambda connection: queries.update_asset(connection, symbol=symbol, changes=changes),
        )
        if changed is None:
            raise UnknownAsset(f"asset {symbol} does not exist")
        return changed

    async def liabilities(
        self,
        *,
        asset_symbol: str,
        at: datetime | None,
        since: datetime | None,
        until: datetime | None,
    ) -> Liabilities:
        """Computed from the ledger, without summing users or the bulk of transactions: per asset
        and kind all balances sum to zero, so users hold what the system accounts are short of;
        between two moments each system account's balance moved by what its flows moved, and
        only refunds, reversals and expiries (which share accounts with the flows) are summed."""
        at = datetime.now(UTC) if at is None else at.astimezone(UTC)
        until = at if until is None else until.astimezone(UTC)
        since = EPOCH if since is None else since.astimezone(UTC)
        if since > until:
            raise InvalidRequest("from must not be after to", field="from")
        async with self.database.transaction(is_write=False, is_snapshot=True) as connection:
            await _require_asset(connection, asset_symbol)
            now = await queries.system_parts_at(connection, asset_symbol=asset_symbol, at=at)
            # Nothing is stored at or before the epoch (the default `from`); `to` defaults to `at`.
            start = (
                dict.fromkeys(SystemAccount, (0, 0))
                if since == EPOCH
                else await queries.system_parts_at(connection, asset_symbol=asset_symbol, at=since)
            )
            end = (
                now
                if until == at
                else await queries.system_parts_at(connection, asset_symbol=asset_symbol, at=until)
            )
            returned = await queries.returned_between(
                connection, asset_symbol=asset_symbol, after=since, until=until
            )

        def moved(account: SystemAccount, kind: Kind) -> int:
            """How much the account's part of `kind` grew over the period."""
            (balance_from, paid_from), (balance_to, paid_to) = start[account], end[account]
            if kind is Kind.PAID:
                return paid_to - paid_from
            return (balance_to - paid_to) - (balance_from - paid_from)

        refunded_paid, refunded_free = returned.get(Flow.REFUND, (0, 0))
        reversed_paid, reversed_free = returned.get(Flow.REVERSAL, (0, 0))
        expired_paid, expired_free = returned.get(Flow.EXPIRY, (0, 0))
        # The treasury gives top-ups, the bonus pool bonuses, and they take back reversals (a
        # reversal stored before 1.3 may have taken both kinds) and, the bonus pool, free
        # expiries; revenue takes spends and paid expiries and gives refunds.
        issuers = (SystemAccount.TREASURY, SystemAccount.BONUS_POOL)
        flows = {
            Flow.TOPUP: (reversed_paid - sum(moved(a, Kind.PAID) for a in issuers), 0),
            Flow.BONUS: (
                0,
                reversed_free + expired_free - sum(moved(a, Kind.FREE) for a in issuers),
            ),
            Flow.SPEND: (
                moved(SystemAccount.REVENUE, Kind.PAID) - expired_paid + refunded_paid,
                moved(SystemAccount.REVENUE, Kind.FREE) + refunded_free,
            ),
            **returned,
        }
        outstanding = {
            Kind.PAID: -sum(paid for _, paid in now.values()),
            Kind.FREE: -sum(balance - paid for balance, paid in now.values()),
        }
        return Liabilities(asset_symbol, at, outstanding, since, until, flows)

    async def create_user(self, *, user_id: str | None, email: str, name: str) -> User:
        async with self.database.transaction(is_write=True) as connection:
            user = await queries.insert_user(
                connection,
                user_id=user_id or str(uuid_utils.uuid7()),
                email=email,
                name=name,
                created_at=datetime.now(UTC),
            )
        if user is None:
            raise UserExists(f"user {user_id} already exists")
        return user

    async def user(self, *, user_id: str) -> User:
        async with self.database.transaction(is_write=False) as connection:
            return await _require_user(connection, user_id)

    async def users(self, *, page: PageRequest) -> Page[User]:
        async with self.database.transaction(is_write=False) as connection:
            return await queries.list_users(
                connection, limit=page.limit, before=page.before, offset=page.offset
            )

    async def balance(self, *, user_id: str, asset_symbol: str) -> int:
        (standing,) = await self.standings(user_id=user_id, asset_symbol=asset_symbol)
        return standing.balance

    async def balances(self, *, user_id: str) -> list[tuple[str, int]]:
        """Every asset with the user's balance of it, zero where the user never held it."""
        return [(s.asset_symbol, s.balance) for s in await self.standings(user_id=user_id)]

    async def standings(self, *, user_id: str, asset_symbol: str | None = None) -> list[Standing]:
        """The user's balance, held and available amounts of every asset (or of one)."""
        async with self.database.transaction(is_write=False) as connection:
            await _require_user(connection, user_id)
            if asset_symbol is not None:
                await _require_asset(connection, asset_symbol)
            return await queries.standings(
                connection, user_id=user_id, now=datetime.now(UTC), only=asset_symbol
            )

    async def balances_at(
        self, *, user_id: str, at: datetime, asset_symbol: str | None = None
    ) -> list[tuple[str, int, int]]:
        """The user's balance of every asset (or of `asset_symbol`) and its paid part, as they
        were at `at`."""
        async with self.database.transaction(is_write=False) as connection:
            await _require_user(connection, user_id)
            if asset_symbol is not None:
                await _require_asset(connection, asset_symbol)
            return await queries.balances_at(
                connection, user_id=user_id, at=at.astimezone(UTC), only=asset_symbol
            )

    async def history(
        self,
        *,
        user_id: str,
        flow: Flow | None,
        asset_symbol: str | None,
        page: PageRequest,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> Page[Transaction]:
        async with self.database.transaction(is_write=False) as connection:
            await _require_user(connection, user_id)
            if asset_symbol is not None:
                await _require_asset(connection, asset_symbol)
            return await queries.list_transactions(
                connection,
                user_id=user_id,
                flow=flow,
                asset_symbol=asset_symbol,
                since=None if since is None else since.astimezone(UTC),
                until=None if until is None else until.astimezone(UTC),
                limit=page.limit,
                before=page.before,
                offset=page.offset,
            )

    async def hold(self, *, hold_id: str) -> Hold:
        async with self.database.transaction(is_write=False) as connection:
            found = await queries.find_hold(connection, hold_id)
        if found is None:
            raise UnknownHold(f"hold {hold_id} does not exist")
        return found.as_of(datetime.now(UTC))

    async def holds(
        self, *, user_id: str | None, status: HoldStatus | None, page: PageRequest
    ) -> Page[Hold]:
        now = datetime.now(UTC)
        async with self.database.transaction(is_write=False) as connection:
            if user_id is not None:
                await _require_user(connection, user_id)
            found, cursor = await queries.list_holds(
                connection,
                user_id=user_id,
                status=status,
                now=now,
                limit=page.limit,
                before=page.before,
                offset=page.offset,
            )
        return [hold.as_of(now) for hold in found], cursor

    async def transaction(
        self, *, user_id: str, transaction_id: str
    ) -> tuple[Transaction, list[Entry]]:
        async with self.database.transaction(is_write=False) as connection:
            await _require_user(connection, user_id)
            found = await queries.find_transaction(
                connection, user_id=user_id, transaction_id=transaction_id
            )
        if found is None:
            raise UnknownTransaction(
                f"transaction {transaction_id} of user {user_id} does not exist"
            )
        return found

    async def ledger(
        self, *, user_id: str, asset_symbol: str | None, page: PageRequest
    ) -> Page[Entry]:
        async with self.database.transaction(is_write=False) as connection:
            await _require_user(connection, user_id)
            if asset_symbol is not None:
                await _require_asset(connection, asset_symbol)
            return await queries.list_entries(
                connection,
                account_id=user_id,
                asset_symbol=asset_symbol,
                limit=page.limit,
                before=page.before,
                offset=page.offset,
            )


async def _require_user(connection: AsyncConnection, user_id: str) -> User:
    user = await queries.find_user(connection, user_id)
    if user is None:
        raise UnknownUser(f"user {user_id} does not exist")
    return user


async def _require_asset(connection: AsyncConnection, asset_symbol: str) -> None:
    if not await queries.asset_exists(connection, asset_symbol):
        raise UnknownAsset(f"asset {asset_symbol} does not exist")
