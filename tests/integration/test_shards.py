"""A system account's balance is spread over several rows (shards), each with its own chain: the
batches in flight at once take different rows, a row that would pass 64 bits hands over to
another, and every sum over them (reads, `verify`) stays exact past 64 bits."""

import asyncio
import uuid

import pytest
import sqlalchemy as sa

from wallet.domain.ledger import (
    MAX_AMOUNT,
    Action,
    Command,
    Flow,
    Posted,
    SystemAccount,
    UserId,
)
from wallet.service.audit import verify
from wallet.service.posting import post
from wallet.service.seed import ALICE
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.tables import balances

GOLD = "GOLD_COINS"
MAX_BALANCE = 2**63 - 1


def command(action: Action, amount: int, user: str = ALICE) -> Command:
    return Command(
        action=action,
        user_id=UserId(user),
        asset_symbol=GOLD,
        amount=amount,
        idempotency_key=f"shards-{uuid.uuid4().hex}",
    )


async def rows_of(database: Database, account: str) -> dict[int, int]:
    """The account's balance rows of GOLD_COINS: shard → balance."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(
            sa.select(balances.c.shard, balances.c.balance).where(
                balances.c.account_id == account, balances.c.asset_symbol == GOLD
            )
        )
        return dict(rows.all())


async def test_a_system_account_takes_top_ups_past_64_bits_and_every_sum_stays_exact(
    database_url: str,
) -> None:
    """Top-ups of the largest amount, each spent again (so the user's own balance stays small),
    until the treasury and revenue each moved more than 2^63: with one shard configured, row 0
    fills and the engine goes on in row 1, refusing nothing; `verify` and the liability report
    sum the rows exactly on both databases."""
    database = Database(create_engine(Settings(database_url=database_url)), system_shards=1)
    wallet = Wallet(database)
    try:
        before = await wallet.liabilities(asset_symbol=GOLD, at=None, since=None, until=None)
        revenue_before = sum((await rows_of(database, SystemAccount.REVENUE)).values())
        rounds = MAX_BALANCE // MAX_AMOUNT + 200  # 9,423: past what one row can take
        for start in range(0, rounds, 500):
            outcomes = await post(
                database,
                [
                    command(action, MAX_AMOUNT)
                    for _ in range(start, min(start + 500, rounds))
                    for action in (Action.TOPUP, Action.SPEND)
                ],
            )
            assert all(isinstance(outcome, Posted) for outcome in outcomes)
        moved = rounds * MAX_AMOUNT
        treasury = await rows_of(database, SystemAccount.TREASURY)
        revenue = await rows_of(database, SystemAccount.REVENUE)
        # Row 0 filled up, row 1 (0 + the one shard configured) took the rest.
        assert {0, 1} <= treasury.keys(), treasury
        assert {0, 1} <= revenue.keys(), revenue
        assert moved > MAX_BALANCE
        assert sum(revenue.values()) - revenue_before == moved

        checks = await verify(database)
        assert [c.name for c in checks if not c.is_clean] == []
        after = await wallet.liabilities(asset_symbol=GOLD, at=None, since=None, until=None)
        assert after.outstanding == before.outstanding
        assert after.moved[Flow.TOPUP][0] - before.moved[Flow.TOPUP][0] == moved
        assert after.moved[Flow.SPEND] == (moved, 0)
    finally:
        await database.close()


async def test_one_transaction_moving_more_than_a_row_holds_is_posted_in_parts(
    database_url: str,
) -> None:
    """9,300 top-ups of 10^15 handed to the engine at once (two users, each within 64 bits) move
    more than any one treasury row can take: the commands are posted in parts, each on a row
    with room, in order; none is refused, and the ledger verifies."""
    database = Database(create_engine(Settings(database_url=database_url)), system_shards=1)
    wallet = Wallet(database)
    try:
        for user in ("shard-a", "shard-b"):
            await wallet.create_user(user_id=user, email=f"{user}@example.com", name=user)
        treasury_before = sum((await rows_of(database, SystemAccount.TREASURY)).values())
        commands = [
            command(Action.TOPUP, MAX_AMOUNT, user) for user in ("shard-a", "shard-b") * 4_650
        ]

        outcomes = await post(database, commands)

        assert [o.transaction.idempotency_key for o in outcomes if isinstance(o, Posted)] == [
            c.idempotency_key for c in commands
        ]
        moved = len(commands) * MAX_AMOUNT
        assert moved > MAX_BALANCE
        treasury = await rows_of(database, SystemAccount.TREASURY)
        assert sum(treasury.values()) == treasury_before - moved
        assert all(check.is_clean for check in await verify(database))
    finally:
        await database.close()


@pytest.mark.postgres_only
async def test_concurrent_transactions_spread_over_the_rows_of_a_system_account(
    postgres_database_url: str,
) -> None:
    """Forty transactions posted at once take revenue's four configured rows in turn; every
    row's chain and the whole ledger verify."""
    settings = Settings(database_url=postgres_database_url)
    database = Database(create_engine(settings), system_shards=4)
    try:
        outcomes = await asyncio.gather(
            *(post(database, [command(Action.SPEND, 1)]) for _ in range(40))
        )
        assert all(isinstance(outcome, Posted) for (outcome,) in outcomes)
        revenue = await rows_of(database, SystemAccount.REVENUE)
        assert set(revenue) == {0, 1, 2, 3}
        assert all(check.is_clean for check in await verify(database))
    finally:
        await database.close()
