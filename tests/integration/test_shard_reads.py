"""Reads of a system account's balance sum its balance rows (shards): the liability report sees
flows whatever rows they landed in, at any moment, and its sums stay exact past 64 bits."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from wallet.domain.ledger import GENESIS_LINK, Flow, Kind, SystemAccount
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Liabilities, Wallet
from wallet.settings import Settings
from wallet.store import queries
from wallet.store.database import Database, create_engine
from wallet.store.tables import (
    assets,
    balances,
    entries,
    idempotency_keys,
    transactions,
)

MakeCommand = Callable[..., Any]
Sql = Callable[..., Awaitable[list[sa.Row[Any]]]]
SHARDS = 4
ROW_MAX = 2**63 - 1  # the most one balance row holds
ROW_MIN = -(2**63)


@pytest.fixture
async def sharded(settings: Settings) -> AsyncIterator[Database]:
    """The test database, its writers spreading system accounts over SHARDS rows."""
    database = Database(create_engine(settings), system_shards=SHARDS)
    yield database
    await database.close()


def outstanding(report: Liabilities) -> tuple[int, int]:
    return report.outstanding[Kind.PAID], report.outstanding[Kind.FREE]


async def test_the_liability_report_sums_every_shard_at_every_moment(
    sharded: Database, sql: Sql, make_command: MakeCommand
) -> None:
    wallet = Wallet(sharded)
    # Each flow its own transaction, so each takes the next shard of the system accounts.
    alices = [(Flow.TOPUP, 300), (Flow.BONUS, 100), (Flow.SPEND, 150)]  # 100 free, 50 paid
    bobs = [(Flow.TOPUP, 200), (Flow.BONUS, 60), (Flow.SPEND, 20)]  # 20 free
    posted = [await wallet.execute(make_command(flow, amount)) for flow, amount in alices]
    between = posted[-1].transaction.created_at
    for flow, amount in bobs:
        posted.append(await wallet.execute(make_command(flow, amount, user_id=BOB)))

    used = await sql(
        sa.select(entries.c.shard)
        .distinct()
        .where(
            entries.c.transaction_id.in_([p.transaction.id for p in posted]),
            entries.c.account_id.like("system:%"),
        )
    )
    assert len(used) > 1, used  # so some flows landed in shards other than 0

    now = await wallet.liabilities(asset_symbol="GOLD_COINS", at=None, since=None, until=None)
    # The seed's 1000 paid each to Alice and Bob, and the flows above.
    assert outstanding(now) == (2000 + 300 - 50 + 200, 100 - 100 + 60 - 20)
    assert now.moved == {
        Flow.TOPUP: (2000 + 300 + 200, 0),
        Flow.BONUS: (0, 100 + 60),
        Flow.SPEND: (50, 100 + 20),
    }
    then = await wallet.liabilities(asset_symbol="GOLD_COINS", at=between, since=None, until=None)
    assert outstanding(then) == (2000 + 300 - 50, 0)
    assert then.moved == {Flow.TOPUP: (2300, 0), Flow.BONUS: (0, 100), Flow.SPEND: (50, 100)}
    since_then = await wallet.liabilities(
        asset_symbol="GOLD_COINS", at=None, since=between, until=None
    )
    assert since_then.moved == {Flow.TOPUP: (200, 0), Flow.BONUS: (0, 60), Flow.SPEND: (0, 20)}

    stored: dict[SystemAccount, tuple[int, int]] = dict.fromkeys(SystemAccount, (0, 0))
    for row in await sql(
        sa.select(balances).where(
            balances.c.account_id.like("system:%"), balances.c.asset_symbol == "GOLD_COINS"
        )
    ):
        balance, paid = stored[SystemAccount(row.account_id)]
        stored[SystemAccount(row.account_id)] = (balance + row.balance, paid + row.paid)
    async with sharded.transaction(is_write=False) as connection:
        parts = await queries.system_parts_at(
            connection, asset_symbol="GOLD_COINS", at=datetime.now(UTC)
        )
    assert parts == stored


async def _put_row(
    sql: Sql,
    account: SystemAccount,
    shard: int,
    history: list[tuple[datetime, int, int]],
    *,
    asset_symbol: str,
) -> None:
    """A balance row of `account` in `shard` with an entry per (moment, balance, paid) after it,
    each of a transaction of its own, written directly: no flow reaches such sums in a test."""
    newest_balance, newest_paid = (history[-1][1], history[-1][2]) if history else (0, 0)
    await sql(
        sa.insert(balances).values(
            account_id=account.value,
            asset_symbol=asset_symbol,
            shard=shard,
            balance=newest_balance,
            paid=newest_paid,
            entry_count=len(history),
        )
    )
    for created_at, balance, paid in history:
        key, transaction_id = f"test-{uuid.uuid4().hex}", str(uuid.uuid4())
        await sql(sa.insert(idempotency_keys).values(key=key))
        await sql(
            sa.insert(transactions).values(
                id=transaction_id,
                type=Flow.TOPUP.value,
                user_id=ALICE,
                asset_symbol=asset_symbol,
                amount=1,
                paid_amount=1,
                balance_after=1,
                idempotency_key=key,
                request_fingerprint="0" * 64,
                created_at=created_at,
            )
        )
        await sql(
            sa.insert(entries).values(
                id=str(uuid.uuid4()),
                transaction_id=transaction_id,
                account_id=account.value,
                asset_symbol=asset_symbol,
                shard=shard,
                direction="debit",
                amount=1,
                balance_after=balance,
                paid_after=paid,
                created_at=created_at,
                chain_hash=GENESIS_LINK,
                kind=Kind.PAID.value,
            )
        )


async def test_system_parts_past_64_bits_are_exact(database: Database, sql: Sql) -> None:
    asset = "HUGE"
    await sql(sa.insert(assets).values(symbol=asset, name="Huge", description="Past 64 bits."))
    first = datetime(2030, 1, 1, tzinfo=UTC)
    last = first + timedelta(minutes=1)
    treasury, bonus_pool = SystemAccount.TREASURY, SystemAccount.BONUS_POOL
    await _put_row(sql, treasury, 1, [(first, 7, 7), (last, ROW_MAX, ROW_MAX)], asset_symbol=asset)
    await _put_row(sql, treasury, 2, [(last, ROW_MAX, ROW_MAX - 1)], asset_symbol=asset)
    await _put_row(sql, treasury, 3, [], asset_symbol=asset)  # no entry: counts 0
    await _put_row(sql, bonus_pool, 0, [(last, ROW_MIN, 0)], asset_symbol=asset)
    await _put_row(sql, bonus_pool, 5, [(last, ROW_MIN, 0)], asset_symbol=asset)

    async def parts_at(at: datetime) -> dict[SystemAccount, tuple[int, int]]:
        async with database.transaction(is_write=False) as connection:
            return await queries.system_parts_at(connection, asset_symbol=asset, at=at)

    assert await parts_at(last) == {
        treasury: (2 * ROW_MAX, 2 * ROW_MAX - 1),
        bonus_pool: (-(2**64), 0),
        SystemAccount.REVENUE: (0, 0),
    }
    assert await parts_at(last - timedelta(microseconds=1)) == {
        treasury: (7, 7),
        bonus_pool: (0, 0),
        SystemAccount.REVENUE: (0, 0),
    }
    assert await parts_at(first - timedelta(microseconds=1)) == dict.fromkeys(SystemAccount, (0, 0))
    report = await Wallet(database).liabilities(asset_symbol=asset, at=last, since=None, until=None)
    # Users hold what the system accounts are short of: free is balance minus paid, summed.
    assert outstanding(report) == (-(2 * ROW_MAX - 1), -(1 + -(2**64)))
