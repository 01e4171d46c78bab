"""Migrations bring a database that already holds a ledger up to date without breaking it."""

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from sqlalchemy import Connection

from wallet.service.audit import verify
from wallet.service.seed import ALICE, seed
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
