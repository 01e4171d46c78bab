"""Migrations bring a database that already holds a ledger up to date without breaking it, and
refuse to when its hash chains show it was changed behind the service's back."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Connection

from wallet.service.audit import verify
from wallet.service.seed import ALICE, BOB, seed
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import alembic_config, head_revision, migrate


async def test_the_hash_chain_migration_links_the_entries_already_stored(tmp_path: Path) -> None:
    database = Database(
        create_engine(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"))
    )

    def upgrade_to(connection: Connection, revision: str) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with database.transaction(is_write=True) as connection:
        await connection.run_sync(upgrade_to, "0001")
        # A ledger as revision 0001 stored it: Alice's opening top-up, then a spend.
        for statement in (
            "INSERT INTO assets VALUES ('GOLD_COINS', 'Gold Coins', 'coins')",
            "INSERT INTO accounts (id, is_system, email, name, created_at) VALUES"
            " (:alice, 0, 'alice@example.com', 'Alice', '2026-11-01 10:00:00.000000'),"
            " ('system:treasury', 1, NULL, 'Treasury', '2026-11-01 10:00:00.000000'),"
            " ('system:revenue', 1, NULL, 'Revenue', '2026-11-01 10:00:00.000000')",
            "INSERT INTO idempotency_keys VALUES ('k1'), ('k2')",
            "INSERT INTO transactions (id, type, user_id, asset_symbol, amount, balance_after,"
            " idempotency_key, request_fingerprint, created_at) VALUES"
            " ('t1', 'topup', :alice, 'GOLD_COINS', 1000, 1000, 'k1', 'f1',"
            "  '2026-11-01 10:00:01.000001'),"
            " ('t2', 'spend', :alice, 'GOLD_COINS', 300, 700, 'k2', 'f2',"
            "  '2026-11-01 10:00:02.000002')",
            "INSERT INTO entries (id, transaction_id, account_id, asset_symbol, direction, amount,"
            " balance_after, created_at) VALUES"
            " ('e1', 't1', 'system:treasury', 'GOLD_COINS', 'debit', 1000, -1000,"
            "  '2026-11-01 10:00:01.000001'),"
            " ('e2', 't1', :alice, 'GOLD_COINS', 'credit', 1000, 1000,"
            "  '2026-11-01 10:00:01.000001'),"
            " ('e3', 't2', :alice, 'GOLD_COINS', 'debit', 300, 700, '2026-11-01 10:00:02.000002'),"
            " ('e4', 't2', 'system:revenue', 'GOLD_COINS', 'credit', 300, 300,"
            "  '2026-11-01 10:00:02.000002')",
            "INSERT INTO balances VALUES (:alice, 'GOLD_COINS', 700),"
            " ('system:treasury', 'GOLD_COINS', -1000), ('system:revenue', 'GOLD_COINS', 300)",
        ):
            await connection.execute(sa.text(statement), {"alice": ALICE})

    assert await migrate(database) == ("0001", head_revision())
    assert all(check.is_clean for check in await verify(database))
    async with database.transaction(is_write=False) as connection:
        made_by = await connection.execute(sa.text("SELECT created_by FROM transactions"))
        assert list(made_by.scalars()) == [None, None]  # made before there were API keys
        kept = await connection.execute(
            sa.text("SELECT key FROM idempotency_keys WHERE refusal_code IS NULL ORDER BY key")
        )
        assert list(kept.scalars()) == ["k1", "k2"]  # the keys of postings, holding no refusal
    # The service carries on from the migrated chains.
    await seed(database)
    assert all(check.is_clean for check in await verify(database))
    await database.close()


# The tables as revision 0001 made them, as far as a ledger's rows need.
ACCOUNTS_0001 = sa.table(
    "accounts",
    sa.column("id", sa.String()),
    sa.column("is_system", sa.Boolean()),
    sa.column("email", sa.String()),
    sa.column("name", sa.String()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
TRANSACTIONS_0001 = sa.table(
    "transactions",
    *(sa.column(name, sa.String()) for name in ("id", "type", "user_id", "asset_symbol")),
    sa.column("amount", sa.BigInteger()),
    sa.column("balance_after", sa.BigInteger()),
    sa.column("idempotency_key", sa.String()),
    sa.column("request_fingerprint", sa.String()),
    sa.column("note", sa.String()),
    sa.column("metadata", sa.JSON()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
ENTRIES_0001 = sa.table(
    "entries",
    *(sa.column(name, sa.String()) for name in ("id", "transaction_id", "account_id")),
    sa.column("asset_symbol", sa.String()),
    sa.column("direction", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("balance_after", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
OPENED = datetime(2026, 11, 1, 10, 0, 0, tzinfo=UTC)
TOPPED_UP = datetime(2026, 11, 1, 10, 0, 1, 1, tzinfo=UTC)
SPENT = datetime(2026, 11, 1, 10, 0, 2, 2, tzinfo=UTC)
# e1's link in version 1, as the release before version 2 computed it.
E1_VERSION_1 = "94117f5ce8c118af1b7849e9ac5c1aec6166dd808ca7682794579db9b3e0b702"


async def schema_step(url: str, to: str, *, is_up: bool = True) -> None:
    """Upgrade (or downgrade) the database at `url` to revision `to`, as `wallet migrate` does."""
    database = Database(create_engine(Settings(database_url=url)))

    def run(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.upgrade if is_up else command.downgrade)(config, to)

    try:
        async with database.transaction(is_write=True, is_schema_change=True) as connection:
            await connection.run_sync(run)
    finally:
        await database.close()


async def read(url: str, statement: str) -> list[Any]:
    database = Database(create_engine(Settings(database_url=url)))
    try:
        async with database.transaction(is_write=False) as connection:
            return list(await connection.execute(sa.text(statement)))
    finally:
        await database.close()


async def write(url: str, *statements: sa.Executable | str) -> None:
    database = Database(create_engine(Settings(database_url=url)))
    try:
        async with database.transaction(is_write=True) as connection:
            for statement in statements:
                is_text = isinstance(statement, str)
                await connection.execute(sa.text(statement) if is_text else statement)
    finally:
        await database.close()


async def a_version_1_ledger(url: str) -> None:
    """A database at revision 0003 holding Alice's top-up (with metadata) and spend, linked by
    the hash chain migration 0002 (version 1)."""
    await schema_step(url, "0001")
    accounts = [
        (ALICE, False, "alice@example.com", "Alice"),
        ("system:treasury", True, None, "Treasury"),
        ("system:revenue", True, None, "Revenue"),
    ]
    posted = [
        ("t1", "topup", 1000, 1000, "k1", None, {"order": "7", "shop": "Élan"}, TOPPED_UP),
        ("t2", "spend", 300, 700, "k2", "a sword", None, SPENT),
    ]
    entries = [
        ("e1", "t1", "system:treasury", "debit", 1000, -1000, TOPPED_UP),
        ("e2", "t1", ALICE, "credit", 1000, 1000, TOPPED_UP),
        ("e3", "t2", ALICE, "debit", 300, 700, SPENT),
        ("e4", "t2", "system:revenue", "credit", 300, 300, SPENT),
    ]
    await write(
        url,
        "INSERT INTO assets VALUES ('GOLD_COINS', 'Gold Coins', 'coins')",
        sa.insert(ACCOUNTS_0001).values(
            [
                {"id": i, "is_system": s, "email": e, "name": n, "created_at": OPENED}
                for i, s, e, n in accounts
            ]
        ),
        "INSERT INTO idempotency_keys VALUES ('k1'), ('k2')",
        sa.insert(TRANSACTIONS_0001).values(
            [
                {
                    "id": i,
                    "type": t,
                    "user_id": ALICE,
                    "asset_symbol": "GOLD_COINS",
                    "amount": a,
                    "balance_after": b,
                    "idempotency_key": k,
                    "request_fingerprint": f"f-{k}",
                    "note": n,
                    "metadata": m,
                    "created_at": c,
                }
                for i, t, a, b, k, n, m, c in posted
            ]
        ),
        sa.insert(ENTRIES_0001).values(
            [
                {
                    "id": i,
                    "transaction_id": t,
                    "account_id": account,
                    "asset_symbol": "GOLD_COINS",
                    "direction": d,
                    "amount": a,
                    "balance_after": b,
                    "created_at": c,
                }
                for i, t, account, d, a, b, c in entries
            ]
        ),
        "INSERT INTO balances (account_id, asset_symbol, balance) VALUES"
        f" ('{ALICE}', 'GOLD_COINS', 700), ('system:treasury', 'GOLD_COINS', -1000),"
        " ('system:revenue', 'GOLD_COINS', 300)",
    )
    await schema_step(url, "0003")


async def links(url: str) -> dict[str, str]:
    """Each entry's stored link, and each balance row's newest link (by account)."""
    stored = await read(url, "SELECT id, chain_hash FROM entries")
    heads = await read(url, "SELECT account_id, chain_hash FROM balances")
    return {row[0]: row[1] for row in [*stored, *heads]}


async def test_the_chain_version_2_migration_relinks_a_version_1_ledger_and_back(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await a_version_1_ledger(url)
    version_1 = await links(url)
    assert version_1["e1"] == E1_VERSION_1  # what 0002 made is version 1
    assert version_1["system:treasury"] == version_1["e1"]

    await schema_step(url, "0005")

    version_2 = await links(url)
    assert set(version_2) == set(version_1)
    assert not set(version_2.values()) & set(version_1.values())
    assert version_2[ALICE] == version_2["e3"]
    await schema_step(url, "0004", is_up=False)
    assert await links(url) == version_1
    await schema_step(url, "0005")
    assert await links(url) == version_2

    # 0006 relinks only chains whose version-2 links it finds unbroken; the audit checks its
    # version 3, and the service carries on from the migrated chains.
    await schema_step(url, "head")
    database = Database(create_engine(Settings(database_url=url)))
    try:
        assert {c.name: c.failures for c in await verify(database) if not c.is_clean} == {}
        await seed(database)
        assert all(check.is_clean for check in await verify(database))
    finally:
        await database.close()


@pytest.mark.parametrize(
    ("tampering", "refusal"),
    [
        pytest.param(
            "UPDATE entries SET amount = 301, balance_after = 699 WHERE id = 'e3'",
            f"entry e3 \\({ALICE} GOLD_COINS\\) is the first broken link of its chain",
            id="edited-entry",
        ),
        pytest.param(
            "UPDATE entries SET created_at = (SELECT created_at FROM entries WHERE id = 'e3')"
            " WHERE id = 'e2'",
            f"entry e2 \\({ALICE} GOLD_COINS\\) is the first broken link",
            id="edited-time",
        ),
        pytest.param(
            "UPDATE balances SET chain_hash = (SELECT chain_hash FROM entries WHERE id = 'e2')"
            f" WHERE account_id = '{ALICE}'",
            f"the balance row of {ALICE} GOLD_COINS does not record its chain's newest",
            id="rewound-head",
        ),
        pytest.param(
            "DELETE FROM entries WHERE id = 'e4'",
            "the balance row of system:revenue GOLD_COINS records a newest link but its chain "
            "has no entry",
            id="deleted-entry",
        ),
    ],
)
async def test_the_chain_version_2_migration_refuses_a_tampered_version_1_ledger(
    empty_database_url: str, tampering: str, refusal: str
) -> None:
    url = empty_database_url
    await a_version_1_ledger(url)
    await write(url, tampering)
    before = await links(url)

    with pytest.raises(RuntimeError, match=refusal):
        await schema_step(url, "0005")

    assert await read(url, "SELECT version_num FROM alembic_version") == [("0003",)]
    assert await links(url) == before  # nothing rewritten


async def test_the_chain_version_2_migration_pages_through_chains_longer_than_a_batch(
    empty_database_url: str,
) -> None:
    """12,000 entries: the migration reads and writes 10,000 at a time, so the treasury's chain
    is split between two pages."""
    url = empty_database_url
    count = 6000  # top-ups, to Alice and Bob in turn
    users = (ALICE, BOB)
    moments = [TOPPED_UP + timedelta(microseconds=n) for n in range(count)]
    accounts = [(ALICE, False, "alice@example.com"), (BOB, False, "bob@example.com")]
    accounts.append(("system:treasury", True, None))
    posted = [
        {
            "id": f"t{n}",
            "type": "topup",
            "user_id": users[n % 2],
            "asset_symbol": "GOLD_COINS",
            "amount": 1,
            "balance_after": n // 2 + 1,
            "idempotency_key": f"k{n}",
            "request_fingerprint": f"f{n}",
            "note": None,
            "metadata": {"n": str(n)},
            "created_at": moments[n],
        }
        for n in range(count)
    ]
    entries = [
        {
            "id": f"e{n}-{direction}",
            "transaction_id": f"t{n}",
            "account_id": account,
            "asset_symbol": "GOLD_COINS",
            "direction": direction,
            "amount": 1,
            "balance_after": after,
            "created_at": moments[n],
        }
        for n in range(count)
        for account, direction, after in (
            ("system:treasury", "debit", -(n + 1)),
            (users[n % 2], "credit", n // 2 + 1),
        )
    ]
    await schema_step(url, "0001")
    database = Database(create_engine(Settings(database_url=url)))
    try:
        async with database.transaction(is_write=True) as connection:
            await connection.execute(
                sa.text("INSERT INTO assets VALUES ('GOLD_COINS', 'Gold Coins', 'coins')")
            )
            await connection.execute(
                sa.insert(ACCOUNTS_0001),
                [
                    {"id": i, "is_system": s, "email": e, "name": i, "created_at": OPENED}
                    for i, s, e in accounts
                ],
            )
            await connection.execute(
                sa.text("INSERT INTO idempotency_keys VALUES (:key)"),
                [{"key": f"k{n}"} for n in range(count)],
            )
            await connection.execute(sa.insert(TRANSACTIONS_0001), posted)
            await connection.execute(sa.insert(ENTRIES_0001), entries)
            await connection.execute(
                sa.text(
                    "INSERT INTO balances (account_id, asset_symbol, balance) VALUES"
                    " (:alice, 'GOLD_COINS', :half), (:bob, 'GOLD_COINS', :half),"
                    " ('system:treasury', 'GOLD_COINS', :all)"
                ),
                {"alice": ALICE, "bob": BOB, "half": count // 2, "all": -count},
            )
        await schema_step(url, "0003")
        version_1 = await links(url)

        await schema_step(url, "0005")

        version_2 = await links(url)
        assert len(version_2) == 2 * count + 3
        assert not set(version_2.values()) & set(version_1.values())
        await schema_step(url, "0004", is_up=False)
        assert await links(url) == version_1
        await schema_step(url, "head")  # 0006 pages through them too
        assert {c.name: c.failures for c in await verify(database) if not c.is_clean} == {}
    finally:
        await database.close()
