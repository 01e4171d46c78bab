"""The data `wallet bench` runs on: funded bench users for the load, or, for `--populate`, a large
generated ledger loaded in one transaction. Its transactions are made by the posting engine's own
moves (the spend order, the balances and paid parts they leave, the entries and their hash links),
on drafts of the accounts each chunk touches, so they keep every invariant the engine keeps.
Top-ups give paid credits, bonuses free ones, and a spend takes the first kind of its asset's spend
order that the user holds, no more of it than they hold. The generated history is from before any
lifetime applied: its credits never expire, so it makes no lots and every balance's `expiring` is
0."""

import random
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from wallet.domain.errors import WalletError
from wallet.domain.ledger import (
    EPOCH,
    GENESIS_LINK,
    AccountId,
    Action,
    Asset,
    BalanceKey,
    Book,
    Command,
    SystemAccount,
    UserId,
)
from wallet.service.posting import Draft, apply_flow, post
from wallet.service.seed import seed
from wallet.store import bulk, queries
from wallet.store.bulk import BalanceHead, Chunk, Plan, Row, TableSize
from wallet.store.database import Database
from wallet.store.migrate import migrate

ASSET = "GOLD_COINS"  # the asset the load run moves: bench users hold it as paid credits, no lots
FUNDING = 10**12  # each bench user's opening balance: no spend of 1 ever runs out
# The asset of the spends of expiring credits: bench users hold it as free credits only, in lots
# (bonuses of FUNDING each, one lot per bonus), so each spend takes from a lot.
EXPIRING_ASSET = "LOYALTY_POINTS"
EXPIRING_LOTS = 3
EXPIRES_IN_DAYS = 3650  # the most a bonus may ask: the bench data stays spendable for years
USER_BATCH = 500
SEED_USERS, SEED_TRANSACTIONS = 2, 6  # what `wallet seed` leaves: Alice and Bob, 3 top-ups each
ASSETS = ("GOLD_COINS", "LOYALTY_POINTS", "DIAMONDS")
SYSTEM = (SystemAccount.TREASURY, SystemAccount.BONUS_POOL, SystemAccount.REVENUE)
HEAVY_SHARE = 100  # one transaction in this many is the heavy user's: a long history to page
STRIDES = (1_000_003, 999_983, 7_919)  # primes: k * stride mod users visits every user in turn
CHUNK_TRANSACTIONS = 25_000
CHUNK_USERS = 50_000
NO_ROW = -1  # in the user balance array: the user never held the asset

OnProgress = Callable[[str, int, int], None]  # phase, done so far, total


class PopulateRefused(Exception):
    """The database cannot be filled as asked; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """What `load_ledger` wrote, how long it took, and two users worth reading."""

    users: int
    transactions: int
    seconds: float
    heavy_user: str  # one transaction in HEAVY_SHARE is theirs
    typical_user: str

    @property
    def entries(self) -> int:
        return 2 * self.transactions


def bench_user(index: int) -> UserId:
    """The id of the index-th bench user; the load's Lua script builds the same ids."""
    return UserId(f"bench-user-{index:06d}")


async def prepare_users(database: Database, *, count: int, funds_expiring: bool) -> None:
    """Migrate, seed, then create `count` bench users funded with FUNDING gold and, if asked,
    EXPIRING_LOTS lots of FUNDING free EXPIRING_ASSET credits (idempotent)."""
    await migrate(database)
    await seed(database)
    created_at = datetime.now(UTC)
    for start in range(0, count, USER_BATCH):
        batch = range(start, min(count, start + USER_BATCH))
        async with database.transaction(is_write=True) as connection:
            for index in batch:
                user_id = bench_user(index)
                await queries.insert_user(
                    connection,
                    user_id=user_id,
                    email=f"{user_id}@example.com",
                    name=f"Bench user {index}",
                    created_at=created_at,
                )
        commands = [
            Command(
                action=Action.TOPUP,
                user_id=bench_user(index),
                asset_symbol=ASSET,
                amount=FUNDING,
                idempotency_key=f"bench-fund-{index}",
            )
            for index in batch
        ]
        if funds_expiring:
            # Bonuses expiring on different days: each is a lot of its own.
            commands += [
                Command(
                    action=Action.BONUS,
                    user_id=bench_user(index),
                    asset_symbol=EXPIRING_ASSET,
                    amount=FUNDING,
                    idempotency_key=f"bench-fund-expiring-{index}-{lot}",
                    credit_expires_in_days=EXPIRES_IN_DAYS - lot,
                )
                for index in batch
                for lot in range(EXPIRING_LOTS)
            ]
        for outcome in await post(database, commands):
            if isinstance(outcome, WalletError):
                raise PopulateRefused(f"funding the bench users failed: {outcome}")


async def prepare_scratch(database: Database, *, is_forced: bool) -> None:
    """Migrate and seed a PostgreSQL database; refuse one that holds more than the seed data,
    unless forced, and refuse SQLite before touching it."""
    if database.dialect != "postgresql":
        raise PopulateRefused(
            "--populate loads PostgreSQL only: point WALLET_DATABASE_URL at a scratch "
            "PostgreSQL database (postgresql+asyncpg://...)"
        )
    await migrate(database)
    await seed(database)
    async with database.transaction(is_write=False) as connection:
        users, transactions = await bulk.count_users_and_transactions(connection)
    if (users > SEED_USERS or transactions > SEED_TRANSACTIONS) and not is_forced:
        raise PopulateRefused(
            f"the database already holds {users:,} users and {transactions:,} transactions, "
            "more than the seed data: --populate wants a scratch database "
            "(or --force to add to this one)"
        )


async def load_ledger(
    database: Database, *, users: int, entries: int, on_progress: OnProgress
) -> Loaded:
    """Load `users` users and `entries` entries (half as many transactions) in one transaction,
    dated after everything already stored and before now, where the clock allows."""
    transactions = entries // 2
    started = time.monotonic()
    async with database.transaction(is_write=True) as connection:
        # Writers wait until the load commits, so the system balances read here stay true.
        await bulk.lock_ledger(connection)
        system_before = {
            (AccountId(s), a): BalanceHead(0, 0, GENESIS_LINK, 0) for s in SYSTEM for a in ASSETS
        }
        stored = await bulk.balances_of_accounts(connection, [str(s) for s in SYSTEM])
        system_before.update({(AccountId(a), symbol): head for (a, symbol), head in stored.items()})
        assets = {asset.symbol: asset for asset in await queries.list_assets(connection)}
        latest = await bulk.latest_created_at(connection)
        span_us = users + transactions + 1000
        now_us = (datetime.now(UTC) - EPOCH) // timedelta(microseconds=1)
        latest_us = (latest - EPOCH) // timedelta(microseconds=1) if latest else 0
        generator = LedgerGenerator(
            users=users,
            tag=uuid.uuid4().hex[:4],
            first_us=max(now_us - span_us, latest_us + 1000),
            system_balances=system_before,
            assets=assets,
        )
        on_progress("users", 0, users)
        for start, stop in _slices(users, CHUNK_USERS):
            await bulk.copy_accounts(connection, generator.account_rows(start, stop))
            on_progress("users", stop, users)
        on_progress("ledger entries", 0, 2 * transactions)
        while generator.made < transactions:
            await bulk.copy_ledger(
                connection, generator.chunk(min(CHUNK_TRANSACTIONS, transactions - generator.made))
            )
            on_progress("ledger entries", 2 * generator.made, 2 * transactions)
        on_progress("user balances", 0, users)
        for start, stop in _slices(users, CHUNK_USERS):
            await bulk.copy_balances(connection, generator.user_balance_rows(start, stop))
            on_progress("user balances", stop, users)
        await bulk.upsert_balances(
            connection,
            {key: head for key, head in generator.system.items() if head != system_before[key]},
        )
    return Loaded(
        users=users,
        transactions=transactions,
        seconds=time.monotonic() - started,
        heavy_user=generator.user_id(0),
        typical_user=generator.user_id(generator.user_of(1)),
    )


async def vacuum_analyze(database: Database) -> None:
    """Fresh planner statistics and visibility map for the loaded tables."""
    await bulk.vacuum_analyze(database)


async def table_sizes(database: Database) -> list[TableSize]:
    """Rows (estimated after ANALYZE) and size with indexes of each ledger table."""
    async with database.transaction(is_write=False) as connection:
        return await bulk.table_sizes(connection)


async def explain_reads(database: Database, reads: Callable[[], Awaitable[object]]) -> list[Plan]:
    """EXPLAIN (ANALYZE, BUFFERS) of every distinct statement that `reads` runs."""
    with bulk.captured_statements(database) as statements:
        await reads()
    async with database.transaction(is_write=False) as connection:
        return await bulk.explain_analyze(connection, statements)


def _slices(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(total, start + size)) for start in range(0, total, size)]


class LedgerGenerator:
    """Makes users, then transactions that keep every invariant: each is the posting engine's
    move of a top-up, bonus or spend (never one the user cannot pay), on a draft of the accounts
    its chunk touches. Between chunks, memory holds two int64s (balance, paid part), one 32-byte
    link and an entry count per user and asset. User i is created at first_us + i; the n-th
    transaction users + 1000 µs later, plus n."""

    def __init__(
        self,
        *,
        users: int,
        tag: str,
        first_us: int,
        system_balances: Mapping[BalanceKey, BalanceHead],
        assets: Mapping[str, Asset],
    ) -> None:
        self.users = users
        self.tag = tag
        self.first_us = first_us
        self.ledger_us = first_us + users + 1000
        self.stride = next(p for p in STRIDES if users % p)
        self.rng = random.Random(int(tag, 16))
        # History from before any lifetime applied: its credits never expire, so make no lots.
        self.assets = {
            symbol: replace(asset, free_lifetime_days=None, paid_lifetime_days=None)
            for symbol, asset in assets.items()
        }
        self.user_balances = array("q", [NO_ROW]) * (users * len(ASSETS))
        self.user_paid = array("q", [0]) * (users * len(ASSETS))
        self.user_links = bytearray(32 * users * len(ASSETS))  # all zero: GENESIS_LINK
        self.user_counts = array("q", [0]) * (users * len(ASSETS))  # entries per user chain
        self.system = dict(system_balances)
        self.made = 0

    def user_id(self, index: int) -> str:
        return f"pop-{self.tag}-{index:07d}"

    def user_of(self, number: int) -> int:
        """The user of the number-th transaction: the heavy user (0), or the next in stride."""
        return 0 if number % HEAVY_SHARE == 0 else number * self.stride % self.users

    def account_rows(self, start: int, stop: int) -> list[Row]:
        """Account rows of users start..stop-1."""
        return [
            (
                self.user_id(i),
                False,
                f"{self.user_id(i)}@example.com",
                f"Populated user {i}",
                EPOCH + timedelta(microseconds=self.first_us + i),
            )
            for i in range(start, stop)
        ]

    def chunk(self, count: int) -> Chunk:
        """The next `count` transactions, with their keys and entries."""
        draft = Draft(
            Book(balances={}, paid={}, held={}, active_held={}, lots={}, holds={}, refunded={}),
            assets=self.assets,
            lots_taken={},
            links={},
            counts={},
        )
        for key, head in self.system.items():
            _put(draft, key, head)
        slots: dict[BalanceKey, int] = {}  # the user balances in the draft, by their slot
        book = draft.book
        rng = self.rng
        for number in range(self.made, self.made + count):
            user = self.user_of(number)
            draw = rng.random()
            asset_index = 0 if draw < 0.6 else 1 if draw < 0.85 else 2
            asset = ASSETS[asset_index]
            key = (AccountId(self.user_id(user)), asset)
            if key not in slots:
                slots[key] = user * len(ASSETS) + asset_index
                _put(draft, key, self._user_head(slots[key]))
            draw = rng.random()
            size = rng.random()
            if draw < 0.45 and book.balances[key] > 0:
                # No more than the user holds of the first kind the spend order takes: a spend
                # of one kind, so every transaction has two entries.
                first = next(
                    kind
                    for kind in self.assets[asset].spend_order.kinds
                    if book.sub_balance(key, kind) > 0
                )
                action, amount = (
                    Action.SPEND,
                    1 + int(size * min(book.sub_balance(key, first), 500)),
                )
            elif draw < 0.85:
                action, amount = Action.TOPUP, 1 + int(size * 1000)
            else:
                action, amount = Action.BONUS, 1 + int(size * 100)
            command = Command(
                action=action,
                user_id=UserId(key[0]),
                asset_symbol=asset,
                amount=amount,
                idempotency_key=f"populate-{self.tag}-{number}",
            )
            created_at = EPOCH + timedelta(microseconds=self.ledger_us + number)
            apply_flow(draft, command, command.fingerprint(), created_at)
        for key in self.system:
            self.system[key] = _head(draft, key)
        for key, slot in slots.items():
            self._keep_user_head(slot, _head(draft, key))
        self.made += count
        return Chunk(
            keys=[(transaction.idempotency_key,) for _, transaction in draft.transactions],
            transactions=[
                (
                    t.id,
                    t.flow.value,
                    t.user_id,
                    t.asset_symbol,
                    t.amount,
                    t.balance_after,
                    t.idempotency_key,
                    fingerprint,
                    t.created_at,
                    t.paid_amount,
                )
                for fingerprint, t in draft.transactions
            ],
            entries=[
                (
                    e.id,
                    e.transaction_id,
                    e.account_id,
                    e.asset_symbol,
                    e.direction.value,
                    e.amount,
                    e.balance_after,
                    e.created_at,
                    e.chain_hash,
                    e.kind.value,
                    e.paid_after,
                )
                for e in draft.entries
            ],
        )

    def _user_head(self, slot: int) -> BalanceHead:
        link = self.user_links[32 * slot : 32 * slot + 32].hex()
        held = max(self.user_balances[slot], 0)  # NO_ROW: nothing yet
        return BalanceHead(held, self.user_paid[slot], link, self.user_counts[slot])

    def _keep_user_head(self, slot: int, head: BalanceHead) -> None:
        self.user_balances[slot] = head.balance
        self.user_paid[slot] = head.paid
        self.user_links[32 * slot : 32 * slot + 32] = bytes.fromhex(head.link)
        self.user_counts[slot] = head.entries

    def user_balance_rows(self, start: int, stop: int) -> list[Row]:
        """Balance rows of users start..stop-1 for every asset they ever held; no lots, so
        nothing of them expires."""
        rows = []
        for user in range(start, stop):
            for asset_index, asset in enumerate(ASSETS):
                slot = user * len(ASSETS) + asset_index
                held = self.user_balances[slot]
                if held != NO_ROW:
                    chain = self.user_links[32 * slot : 32 * slot + 32].hex()
                    rows.append(
                        (
                            self.user_id(user),
                            asset,
                            held,
                            self.user_paid[slot],
                            0,
                            chain,
                            self.user_counts[slot],
                        )
                    )
        return rows


def _put(draft: Draft, key: BalanceKey, head: BalanceHead) -> None:
    """Bring a balance's head into the draft."""
    draft.book.balances[key] = head.balance
    draft.book.paid[key] = head.paid
    draft.links[key] = head.link
    draft.counts[key] = head.entries


def _head(draft: Draft, key: BalanceKey) -> BalanceHead:
    """A balance's head as the draft leaves it."""
    return BalanceHead(
        draft.book.balances[key], draft.book.paid[key], draft.links[key], draft.counts[key]
    )
