"""The migrations on an empty database, SQLite and PostgreSQL: they build the schema up to the
newest revision, the newest one steps down and back up (through the API and through the
`alembic` command with the repository's alembic.ini, as docs/OPERATIONS.md tells operators), and
the migrated schema is exactly the models' (`wallet.store.tables.metadata`).

Drift is looked for twice. Alembic's autogenerate comparison (what `alembic check` runs, here
with column types and server defaults compared too) covers tables, columns, types, nullability,
server defaults, indexes, unique and foreign key constraints. It does not compare CHECK
constraints on any backend (a documented limitation of autogenerate), so they are compared
here by name on both backends, and on SQLite, which keeps their text verbatim, by text too
(PostgreSQL rewrites the text, `BETWEEN` into `>= AND <=`, so there only names are compared).

Each PostgreSQL test gets a throwaway database, created on the server of the session's test
database (the `postgres_url` fixture, which skips when the server is down) and dropped after."""

import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from wallet.domain.errors import InsufficientFunds
from wallet.domain.ledger import Action, Command, Flow
from wallet.service.audit import verify
from wallet.service.seed import ALICE, BOB, seed
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import alembic_config, head_revision, migrate
from wallet.store.tables import metadata

ROOT = Path(__file__).resolve().parents[2]
ALEMBIC_INI = ROOT / "alembic.ini"
ALEMBIC_COMMAND = Path(sys.executable).parent / "alembic"
T = TypeVar("T")


async def on_connection(url: str, work: Callable[[Connection], T]) -> T:
    """Run `work` in one schema-changing transaction, as the `alembic` command's env.py and
    `wallet migrate` do (on SQLite: foreign keys off around it, all checked before commit)."""
    database = Database(create_engine(Settings(database_url=url)))
    try:
        async with database.transaction(is_write=True, is_schema_change=True) as connection:
            return await connection.run_sync(work)
    finally:
        await database.close()


def revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def step(to: str, *, is_up: bool) -> Callable[[Connection], str | None]:
    """An alembic upgrade or downgrade to `to` on the connection; the revision it leaves."""

    def run(connection: Connection) -> str | None:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.upgrade if is_up else command.downgrade)(config, to)
        return revision(connection)

    return run


def previous_revision() -> str | None:
    """The revision the newest migration revises."""
    head = ScriptDirectory.from_config(alembic_config()).get_revision(head_revision())
    assert head is not None
    previous = head.down_revision
    assert previous is None or isinstance(previous, str), "the history has one branch"
    return previous


def autogenerate_diff(connection: Connection) -> list[Any]:
    """What `alembic check` would find between the models and this database."""
    context = MigrationContext.configure(
        connection,
        opts={"compare_type": True, "compare_server_default": True, "target_metadata": metadata},
    )
    return list(compare_metadata(context, metadata))


def check_constraints(connection: Connection) -> dict[str, str]:
    """Every CHECK constraint of the models' tables in this database: name -> text."""
    inspector = sa.inspect(connection)
    return {
        str(check["name"]): " ".join(check["sqltext"].split())
        for table in metadata.sorted_tables
        for check in inspector.get_check_constraints(table.name)
    }


def model_check_constraints() -> dict[str, str]:
    """Every CHECK constraint of the models, by its name after the naming convention."""
    return {
        str(constraint.name): " ".join(str(constraint.sqltext).split())
        for table in metadata.sorted_tables
        for constraint in table.constraints
        if isinstance(constraint, sa.CheckConstraint)
    }


def assert_no_drift(connection: Connection) -> None:
    diff = autogenerate_diff(connection)
    assert diff == [], f"the migrated schema differs from the models: {diff}"
    in_database, in_models = check_constraints(connection), model_check_constraints()
    # PostgreSQL rewrites the text (BETWEEN becomes >= AND <=): there, names alone.
    is_text_kept = connection.dialect.name == "sqlite"
    database_side = set(in_database.items()) if is_text_kept else set(in_database)
    model_side = set(in_models.items()) if is_text_kept else set(in_models)
    only_in_database = sorted(map(str, database_side - model_side))
    only_in_models = sorted(map(str, model_side - database_side))
    assert only_in_database == only_in_models == [], (
        f"CHECK constraints differ; only in the database: {only_in_database}; "
        f"only in the models: {only_in_models}"
    )


async def test_migrations_build_the_newest_schema_on_an_empty_database(
    empty_database_url: str,
) -> None:
    assert await on_connection(empty_database_url, revision) is None
    database = Database(create_engine(Settings(database_url=empty_database_url)))
    try:
        assert await migrate(database) == (None, head_revision())
        assert await migrate(database) == (head_revision(), head_revision())
    finally:
        await database.close()

    def tables(connection: Connection) -> set[str]:
        return set(sa.inspect(connection).get_table_names())

    assert await on_connection(empty_database_url, tables) == {
        *metadata.tables,
        "alembic_version",
    }


async def test_the_migrated_schema_has_no_drift_from_the_models(empty_database_url: str) -> None:
    await on_connection(empty_database_url, step("head", is_up=True))
    await on_connection(empty_database_url, assert_no_drift)


async def test_the_newest_migration_steps_down_one_revision_and_back_up(
    empty_database_url: str,
) -> None:
    await on_connection(empty_database_url, step("head", is_up=True))

    assert await on_connection(empty_database_url, step("-1", is_up=False)) == previous_revision()
    assert await on_connection(empty_database_url, step("head", is_up=True)) == head_revision()
    await on_connection(empty_database_url, assert_no_drift)


async def test_the_newest_migration_steps_down_and_back_up_under_a_ledger(
    empty_database_url: str,
) -> None:
    """The round trip on a database the service has written to: the ledger survives it
    (what the downgrade itself drops, such as API keys for 0003, is not asked back). One
    shard: 0006 has a single balance row per account and asset."""
    settings = Settings(database_url=empty_database_url)
    database = Database(create_engine(settings), system_shards=1)
    try:
        await migrate(database)
        await seed(database)
        wallet = Wallet(database)
        flows = [(Flow.TOPUP, 250), (Flow.BONUS, 40), (Flow.SPEND, 30), (Flow.SPEND, 300)]
        for flow, amount in [*flows, (Flow.BONUS, 5)]:
            await wallet.execute(
                Command(
                    action=Action(flow),
                    user_id=ALICE,
                    asset_symbol="GOLD_COINS",
                    amount=amount,
                    idempotency_key=f"migrations-{uuid.uuid4().hex}",
                )
            )
        with pytest.raises(InsufficientFunds):  # a refusal kept under its key since 0003
            await wallet.execute(
                Command(
                    action=Action.SPEND,
                    user_id=BOB,
                    asset_symbol="DIAMONDS",
                    amount=11,
                    idempotency_key=f"migrations-{uuid.uuid4().hex}",
                )
            )
        before = {user: await wallet.standings(user_id=user) for user in (ALICE, BOB)}
        # The second spend took the first bonus's last 10 free coins, then 290 paid ones.
        assert [(s.balance, s.paid) for s in before[ALICE] if s.asset_symbol == "GOLD_COINS"] == [
            (965, 960)
        ]
    finally:
        await database.close()

    assert await on_connection(empty_database_url, step("-1", is_up=False)) == previous_revision()
    assert await on_connection(empty_database_url, step("head", is_up=True)) == head_revision()

    database = Database(create_engine(Settings(database_url=empty_database_url)))
    try:
        wallet = Wallet(database)
        assert {user: await wallet.standings(user_id=user) for user in (ALICE, BOB)} == before
        assert all(check.is_clean for check in await verify(database))
    finally:
        await database.close()


async def test_the_shard_migration_refuses_to_step_down_while_shards_hold_entries(
    empty_database_url: str,
) -> None:
    """0006 has one balance row per account and asset: a ledger whose system accounts use
    other rows stays at 0007, untouched, rather than lose them."""
    database = Database(create_engine(Settings(database_url=empty_database_url)), system_shards=4)
    try:
        await migrate(database)
        await seed(database)
        wallet = Wallet(database)
        for _ in range(4):  # each transaction takes the next of the four rows
            await wallet.execute(
                Command(
                    action=Action.TOPUP,
                    user_id=ALICE,
                    asset_symbol="GOLD_COINS",
                    amount=5,
                    idempotency_key=f"migrations-{uuid.uuid4().hex}",
                )
            )
    finally:
        await database.close()

    with pytest.raises(RuntimeError, match="shards other than 0"):
        await on_connection(empty_database_url, step("-1", is_up=False))

    database = Database(create_engine(Settings(database_url=empty_database_url)))
    try:
        async with database.transaction(is_write=False) as connection:
            assert await connection.run_sync(revision) == head_revision()
        assert all(check.is_clean for check in await verify(database))
    finally:
        await database.close()


def alembic_cli(url: str, *args: str, cwd: Path) -> str:
    """The `alembic` command with the repository's alembic.ini, run from `cwd`."""
    done = subprocess.run(
        [str(ALEMBIC_COMMAND), "-c", str(ALEMBIC_INI), *args],
        env={**os.environ, "WALLET_DATABASE_URL": url},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"alembic {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


async def test_the_alembic_command_with_the_repository_config_steps_down_and_up(
    empty_database_url: str, tmp_path: Path
) -> None:
    """docs/OPERATIONS.md's commands, from a directory other than the checkout."""
    await on_connection(empty_database_url, step("head", is_up=True))

    assert alembic_cli(empty_database_url, "current", cwd=tmp_path).split() == [
        head_revision(),
        "(head)",
    ]
    alembic_cli(empty_database_url, "downgrade", "-1", cwd=tmp_path)
    assert alembic_cli(empty_database_url, "current", cwd=tmp_path).split() == [
        str(previous_revision())
    ]
    alembic_cli(empty_database_url, "upgrade", "head", cwd=tmp_path)
    assert await on_connection(empty_database_url, revision) == head_revision()
