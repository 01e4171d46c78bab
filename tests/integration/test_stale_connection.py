"""No ping before a transaction (it would cost every batch a round trip): a pooled connection
the database has closed is found by the transaction's first statement. A write is run again at
once on a new connection and applied once; a read is answered unavailable (503) that once; and
the pool renews its other connections of that age before their next use."""

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from app_clients import app_client, create_key
from wallet.domain.errors import DatabaseUnavailable
from wallet.domain.ledger import Flow, Posted
from wallet.http import app as app_module
from wallet.service.posting import post
from wallet.service.seed import ALICE
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

pytestmark = pytest.mark.postgres_only
MakeCommand = Callable[..., Any]
POOLED = 3


@pytest.fixture
async def pooled(postgres_database_url: str) -> AsyncIterator[Database]:
    """A database whose pool holds POOLED open connections, idle."""
    database = Database(create_engine(Settings(database_url=postgres_database_url)))

    async def hold_a_connection(ready: asyncio.Barrier) -> None:
        async with database.transaction(is_write=False) as connection:
            await connection.execute(sa.text("SELECT 1"))
            await ready.wait()  # all open at once, so the pool keeps POOLED of them

    ready = asyncio.Barrier(POOLED)
    await asyncio.gather(*(hold_a_connection(ready) for _ in range(POOLED)))
    yield database
    await database.close()


async def close_the_pools_connections(url: str) -> int:
    """What a database restart does to the pool: every other session of the database ends."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            ended = await connection.scalar(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
    finally:
        await engine.dispose()
    await asyncio.sleep(0.2)  # the ends reach the pooled sockets
    return int(ended or 0)


async def test_a_write_on_a_closed_connection_runs_again_on_a_new_one_and_applies_once(
    pooled: Database, postgres_database_url: str, make_command: MakeCommand
) -> None:
    wallet = Wallet(pooled)
    before = await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS")
    ended = await close_the_pools_connections(postgres_database_url)

    outcomes = await post(pooled, [make_command(Flow.SPEND, 7)])
    after = await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS")

    assert ended >= 1
    assert isinstance(outcomes[0], Posted)
    assert not outcomes[0].is_replay
    assert after == before - 7


async def test_a_read_on_a_closed_connection_is_unavailable_once_then_the_pool_is_renewed(
    pooled: Database, postgres_database_url: str
) -> None:
    wallet = Wallet(pooled)
    ended = await close_the_pools_connections(postgres_database_url)

    with pytest.raises(DatabaseUnavailable):
        await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS")
    # The other pooled connections were closed too; none of them is used again.
    answers = await asyncio.gather(
        *(wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") for _ in range(POOLED))
    )

    assert ended >= POOLED
    assert answers == [answers[0]] * POOLED


async def test_the_api_answers_a_read_on_a_closed_connection_503_then_serves_again(
    postgres_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The expiry sweeper sweeps once at start, then not again during the test: a sweep would
    # meet the closed connection first and leave the read a fresh one (CI saw it happen).
    monkeypatch.setattr(app_module, "SWEEP_EVERY_S", 3600)
    key = await create_key(postgres_database_url)
    path = f"/api/v1/wallet/balance/{ALICE}/GOLD_COINS"
    async with app_client(Settings(database_url=postgres_database_url), key=key) as client:
        assert (await client.get(path)).status_code == 200
        await close_the_pools_connections(postgres_database_url)

        once = await client.get(path)
        again = await client.get(path)

    assert (once.status_code, once.json()["code"]) == (503, "database_unavailable")
    assert once.headers["Retry-After"] == "1"
    assert again.status_code == 200
