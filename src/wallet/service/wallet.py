"""The wallet's use cases: the flows, holds, refunds, transfers and batches, users, and the
reads the API serves."""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import uuid_utils
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet import metrics
from wallet.domain.errors import (
    Refusal,
    UnknownAsset,
    UnknownHold,
    UnknownTransaction,
    UnknownUser,
    UserExists,
)
from wallet.domain.ledger import (
    Asset,
    Command,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Posted,
    Standing,
    Transaction,
    User,
)
from wallet.service.batcher import Batcher
from wallet.service.posting import post
from wallet.store import queries
from wallet.store.database import Database

T = TypeVar("T")
Page = tuple[list[T], int | None]  # the items, and the cursor (a `seq`) of the next page


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int = 50
    before: int | None = None
    offset: int | None = None


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
    ) -> list[tuple[str, int]]:
        """The user's balance of every asset (or of `asset_symbol`) as it was at `at`."""
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
