"""The data `wallet bench` runs on: funded bench users for the load, or, for `--populate`, a large
generated ledger that keeps every invariant (balances and their paid parts sum to zero per asset,
users never below zero, each balanceAfter and paidAfter continues its account's chain, each
transaction moves one kind), loaded in one transaction. Top-ups give paid credits, bonuses free
ones, and a spend takes the first kind of its asset's spend order that the user holds, no more of
it than they hold. The generated history is from before any lifetime applied: its credits never
expire, so it makes no lots and every balance's `expiring` is 0."""

import random
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from wallet.domain.errors import WalletError
from wallet.domain.ledger import (
    EPOCH,
    GENESIS_LINK,
    AccountId,
    Action,
    Command,
    Direction,
    Entry,
    Flow,
    Kind,
    SpendOrder,
    SystemAccount,
    Transaction,
    TransactionId,
    UserId,
    is_system_account,
    link,
)
from wallet.service.posting import post
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
            (str(s), a): BalanceHead(0, 0, GENESIS_LINK, 0) for s in SYSTEM for a in ASSETS
        }
        system_before.update(await bulk.balances_of_accounts(connection, [str(s) for s in SYSTEM]))
        # A spend takes its first kind first: read how each asset orders them (free_first seeded).
        orders = {a.symbol: a.spend_order for a in await queries.list_assets(connection)}
        latest = await bulk.latest_created_at(connection)
        span_us = users + transactions + 1000
        now_us = (datetime.now(UTC) - EPOCH) // timedelta(microseconds=1)
        latest_us = (latest - EPOCH) // timedelta(microseconds=1) if latest else 0
        generator = LedgerGenerator(
            users=users,
            tag=uuid.uuid4().hex[:4],
            first_us=max(now_us - span_us, latest_us + 1000),
            system_balances=system_before,
            spend_orders=tuple(orders[asset] for asset in ASSETS),
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
            {
                key: head
                for key in generator.system_balances
                if (head := generator.system_head(key)) != system_before[key]
            },
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


def _uuid7(moment_us: int, tag: int, number: int) -> str:
    """A UUIDv7 string whose time is `moment_us` and whose random bits are `tag` and `number`."""
    ms = moment_us // 1000
    return (
        f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{tag & 0xFFF:03x}-"
        f"{0x8000 | (number >> 48) & 0x3FFF:04x}-{number & 0xFFFFFFFFFFFF:012x}"
    )


class LedgerGenerator:
    """Makes users, then transactions that keep every invariant: users never go below zero, in
    all or in either kind, and every balanceAfter, paidAfter and hash link continues its
    account's chains. Memory: two int64s (balance, paid part) and one 32-byte link per user and
    asset. User i is created at first_us + i; the n-th transaction users + 1000 µs later, plus n."""

    def __init__(
        self,
        *,
        users: int,
        tag: str,
        first_us: int,
        system_balances: dict[tuple[str, str], BalanceHead],
        spend_orders: tuple[SpendOrder, ...],  # of ASSETS, in their order
    ) -> None:
        self.users = users
        self.tag = tag
        self.tag_bits = int(tag, 16)
        self.first_us = first_us
        self.ledger_us = first_us + users + 1000
        self.stride = next(p for p in STRIDES if users % p)
        self.rng = random.Random(self.tag_bits)
        self.spend_orders = spend_orders
        self.user_balances = array("q", [NO_ROW]) * (users * len(ASSETS))
        self.user_paid = array("q", [0]) * (users * len(ASSETS))
        self.user_links = bytearray(32 * users * len(ASSETS))  # all zero: GENESIS_LINK
        self.user_counts = array("q", [0]) * (users * len(ASSETS))  # entries per user chain
        self.system_balances = {key: head.balance for key, head in system_balances.items()}
        self.system_paid = {key: head.paid for key, head in system_balances.items()}
        self.system_links = {key: head.link for key, head in system_balances.items()}
        self.system_counts = {key: head.entries for key, head in system_balances.items()}
        self.made = 0

    def user_id(self, index: int) -> str:
        return f"pop-{self.tag}-{index:07d}"

    def user_of(self, number: int) -> int:
        """The user of the number-th transaction: the heavy user (0), or the next in stride."""
        return 0 if number % HEAVY_SHARE == 0 else number * self.stride % self.users

    def system_head(self, key: tuple[str, str]) -> BalanceHead:
        """A system account's balance row as the generated transactions leave it."""
        return BalanceHead(
            self.system_balances[key],
            self.system_paid[key],
            self.system_links[key],
            self.system_counts[key],
        )

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
        keys: list[Row] = []
        transactions: list[Row] = []
        entries: list[Row] = []
        rng = self.rng
        balances = self.user_balances
        user_paid = self.user_paid
        system = self.system_balances
        system_paid = self.system_paid
        for number in range(self.made, self.made + count):
            user = self.user_of(number)
            draw = rng.random()
            asset_index = 0 if draw < 0.6 else 1 if draw < 0.85 else 2
            asset = ASSETS[asset_index]
            slot = user * len(ASSETS) + asset_index
            held = max(balances[slot], 0)
            paid = user_paid[slot]
            draw = rng.random()
            size = rng.random()
            if draw < 0.45 and held > 0:
                # The spend order takes its first kind first: a spend of no more than the user
                # holds of the first kind they hold takes that kind alone.
                parts = {Kind.PAID: paid, Kind.FREE: held - paid}
                first, second = self.spend_orders[asset_index].kinds
                kind = first if parts[first] > 0 else second
                flow, amount = Flow.SPEND, 1 + int(size * min(parts[kind], 500))
            elif draw < 0.85:
                flow, kind, amount = Flow.TOPUP, Kind.PAID, 1 + int(size * 1000)
            else:
                flow, kind, amount = Flow.BONUS, Kind.FREE, 1 + int(size * 100)
            paid_amount = amount if kind is Kind.PAID else 0
            user_id = self.user_id(user)
            if flow is Flow.SPEND:
                debited, credited = user_id, str(SystemAccount.REVENUE)
                user_after, user_paid_after = held - amount, paid - paid_amount
                system_key = (credited, asset)
                system[system_key] += amount
                system_paid[system_key] += paid_amount
                debited_after = (user_after, user_paid_after)
                credited_after = (system[system_key], system_paid[system_key])
            else:
                debited = str(
                    SystemAccount.TREASURY if flow is Flow.TOPUP else SystemAccount.BONUS_POOL
                )
                credited = user_id
                user_after, user_paid_after = held + amount, paid + paid_amount
                system_key = (debited, asset)
                system[system_key] -= amount
                system_paid[system_key] -= paid_amount
                debited_after = (system[system_key], system_paid[system_key])
                credited_after = (user_after, user_paid_after)
            balances[slot] = user_after
            user_paid[slot] = user_paid_after
            moment_us = self.ledger_us + number
            created_at = EPOCH + timedelta(microseconds=moment_us)
            transaction_id = _uuid7(moment_us, self.tag_bits, number)
            key = f"populate-{self.tag}-{number}"
            fingerprint = Command(
                action=Action(flow.value),
                user_id=UserId(user_id),
                asset_symbol=asset,
                amount=amount,
                idempotency_key=key,
            ).fingerprint()
            keys.append((key,))
            transactions.append(
                (
                    transaction_id,
                    flow.value,
                    user_id,
                    asset,
                    amount,
                    user_after,
                    key,
                    fingerprint,
                    created_at,
                    paid_amount,
                )
            )
            transaction = Transaction(
                id=TransactionId(transaction_id),
                flow=flow,
                user_id=UserId(user_id),
                asset_symbol=asset,
                amount=amount,
                balance_after=user_after,
                idempotency_key=key,
                note=None,
                metadata=None,
                created_at=created_at,
                paid_amount=paid_amount,
            )
            debit_id = _uuid7(moment_us, self.tag_bits, 2 * number)
            credit_id = _uuid7(moment_us, self.tag_bits, 2 * number + 1)
            for entry_id, account, direction, (after, paid_after) in (
                (debit_id, debited, Direction.DEBIT, debited_after),
                (credit_id, credited, Direction.CREDIT, credited_after),
            ):
                entry = Entry(
                    id=entry_id,
                    transaction_id=TransactionId(transaction_id),
                    account_id=AccountId(account),
                    asset_symbol=asset,
                    direction=direction,
                    amount=amount,
                    balance_after=after,
                    created_at=created_at,
                    kind=kind,
                    paid_after=paid_after,
                )
                entries.append(
                    (
                        entry_id,
                        transaction_id,
                        account,
                        asset,
                        direction.value,
                        amount,
                        after,
                        created_at,
                        self._extend_chain(entry, transaction, slot),
                        kind.value,
                        paid_after,
                    )
                )
        self.made += count
        return Chunk(keys, transactions, entries)

    def _extend_chain(self, entry: Entry, transaction: Transaction, user_slot: int) -> str:
        """Link `entry` into its account's chain (the user's is kept at `user_slot`)."""
        if is_system_account(entry.account_id):
            key = (entry.account_id, entry.asset_symbol)
            self.system_links[key] = link(self.system_links[key], entry, transaction)
            self.system_counts[key] += 1
            return self.system_links[key]
        where = slice(32 * user_slot, 32 * user_slot + 32)
        new_link = link(self.user_links[where].hex(), entry, transaction)
        self.user_links[where] = bytes.fromhex(new_link)
        self.user_counts[user_slot] += 1
        return new_link

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
