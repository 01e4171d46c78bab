"""The posting engine itself under contention: batches that share users, system accounts and
idempotency keys, in different orders, applied at the same time on PostgreSQL."""

import asyncio
import random
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from concurrent_load import assert_ledger_verifies
from sqlalchemy import event

from wallet.domain.ledger import Action, Command, Posted, UserId
from wallet.service.posting import post
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(120)]

ASSETS = ("GOLD_COINS", "DIAMONDS")
OPENING = 1_000_000
SIGN = {Action.TOPUP: 1, Action.BONUS: 1, Action.SPEND: -1}


@pytest.fixture
async def postgres_database(postgres_database_url: str) -> AsyncIterator[Database]:
    database = Database(
        create_engine(Settings(database_url=postgres_database_url, database_pool_size=12))
    )
    yield database
    await database.close()


def _record_database_errors(database: Database) -> list[str]:
    """Every error the database raises from now on (a deadlock would be one), as text."""
    seen: list[str] = []

    def on_error(context: Any) -> None:
        original = context.original_exception
        seen.append(f"{getattr(original, 'sqlstate', None)}: {original!r}")

    event.listen(database.engine.sync_engine, "handle_error", on_error)
    return seen


async def test_concurrent_overlapping_batches_apply_each_key_once(
    postgres_database: Database, postgres_database_url: str
) -> None:
    database = postgres_database
    rng = random.Random(7)
    wallet = Wallet(database)
    users = [ALICE, BOB]
    for index in range(4):
        created = await wallet.create_user(
            user_id=f"batch-user-{index}", email=f"batch{index}@example.com", name=f"User {index}"
        )
        users.append(created.id)
    funded = await post(
        database,
        [
            Command(
                action=Action.TOPUP,
                user_id=UserId(user),
                asset_symbol=asset,
                amount=OPENING,
                idempotency_key=f"open:{user}:{asset}",
            )
            for user in users
            for asset in ASSETS
        ],
    )
    assert all(isinstance(o, Posted) and not o.is_replay for o in funded), funded
    opening = {
        (user, asset): await wallet.balance(user_id=user, asset_symbol=asset)
        for user in users
        for asset in ASSETS
    }

    # 100 commands, one per key; spends are small, so none can find the funds short.
    pool = [
        Command(
            action=rng.choice([Action.TOPUP, Action.BONUS, Action.SPEND]),
            user_id=UserId(rng.choice(users)),
            asset_symbol=rng.choice(ASSETS),
            amount=rng.randint(1, 100),
            idempotency_key=f"batch-key-{index:03d}",
        )
        for index in range(100)
    ]
    batches = [rng.sample(pool, 20) for _ in range(10)]
    for batch in batches[:3]:
        batch.append(batch[0])  # the same key twice in one batch: the second is a replay
    sent_keys = {c.idempotency_key for batch in batches for c in batch}
    assert len(sent_keys) > 60, "batches overlap but also cover many keys"
    assert max(Counter(c.idempotency_key for b in batches for c in b).values()) > 1

    errors = _record_database_errors(database)
    results = await asyncio.wait_for(
        asyncio.gather(*(post(database, batch) for batch in batches)), timeout=60
    )

    if Settings().database_isolation == "serializable":
        # SERIALIZABLE aborts contended transactions (40001) and the engine reruns them; a
        # deadlock (40P01) would still mean the lock order is broken.
        errors = [e for e in errors if not e.startswith("40001")]
    assert errors == [], "no deadlock, no error of any kind but a retried serialization failure"
    outcomes: dict[str, list[Posted]] = defaultdict(list)
    for batch, result in zip(batches, results, strict=True):
        assert len(result) == len(batch)
        for command, outcome in zip(batch, result, strict=True):
            assert isinstance(outcome, Posted), (command, outcome)
            assert outcome.transaction.idempotency_key == command.idempotency_key
            outcomes[command.idempotency_key].append(outcome)
    for key, posted in outcomes.items():
        firsts = [p for p in posted if not p.is_replay]
        assert len(firsts) == 1, f"{key} applied {len(firsts)} times"
        assert {p.transaction.id for p in posted} == {firsts[0].transaction.id}, key

    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(
            sa.text(
                "SELECT idempotency_key, count(*) AS n FROM transactions"
                " WHERE idempotency_key LIKE 'batch-key-%' GROUP BY idempotency_key"
            )
        )
        stored = {row.idempotency_key: row.n for row in rows}
    assert stored == dict.fromkeys(sent_keys, 1)

    # Per user and asset, the balance and its paid part: the opening top-ups' (all paid), plus
    # what each applied command moved, of each kind as its transaction says.
    expected = Counter(opening)
    expected_paid = Counter(opening)
    for command in pool:
        if command.idempotency_key in sent_keys:
            made = outcomes[command.idempotency_key][0].transaction
            account = (made.user_id, made.asset_symbol)
            expected[account] += SIGN[command.action] * made.amount
            expected_paid[account] += SIGN[command.action] * made.paid_amount
    for user, asset in opening:
        (got,) = await wallet.standings(user_id=user, asset_symbol=asset)
        assert (got.balance, got.paid) == (expected[(user, asset)], expected_paid[(user, asset)])

    await assert_ledger_verifies(postgres_database_url)
