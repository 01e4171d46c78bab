"""Backup and restore as docs/OPERATIONS.md tells operators to do them.

PostgreSQL: `pg_dump -Fc` of a database the service has written (group commit, concurrent
flows, a refusal kept under its key), `pg_restore` into a fresh database, then `wallet verify`
on the copy: it exits 0, publishes wallet_ledger_verify_clean=1 to the PROMETHEUS_MULTIPROC_DIR
it was given, and the copy holds every row of the source; the service can carry on writing on
it. A dump taken while flows are being posted is a consistent snapshot that verifies too.

SQLite: the online backup commands of docs/OPERATIONS.md (`sqlite3 wallet.db ".backup ..."`,
where the sqlite3 shell is installed, and Python's binding of the same API), run against a
database the service holds open in WAL mode with commits still in the -wal file, copy every
commit.

Without pg_dump and pg_restore the PostgreSQL tests skip, saying which package brings them."""

import asyncio
import os
import shlex
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, multiprocess
from sqlalchemy.ext.asyncio import create_async_engine

from wallet.domain.errors import InsufficientFunds
from wallet.domain.ledger import Action, Command, Flow, UserId
from wallet.service.audit import verify
from wallet.service.batcher import Batcher
from wallet.service.seed import ALICE, BOB, seed
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import head_revision, migrate, schema_state
from wallet.store.tables import metadata

pytestmark = [pytest.mark.timeout(180)]

WALLET_COMMAND = Path(sys.executable).parent / "wallet"
OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md"
POSTGRES_CLIENT = "the PostgreSQL client programs (apt-get install postgresql-client)"
ASSETS = ("GOLD_COINS", "DIAMONDS", "LOYALTY_POINTS")
USERS = 12
Snapshot = dict[str, list[tuple[Any, ...]]]


def postgres_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed: backup and restore need {POSTGRES_CLIENT}")
    return path


def libpq_url(url: str) -> str:
    """The URL as pg_dump and operators write it; the service accepts it as it is."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def run(
    *argv: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout_s: float = 120
) -> str:
    """Run a program; its output, after asserting that it exited 0."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{' '.join(argv[:2])} exited {process.returncode}:\n{text}"
    return text


@pytest.fixture
async def fresh_database(postgres_database_url: str) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Makes empty databases on the test server (as an operator runs createdb before
    pg_restore); drops them at the end."""
    server_url = sa.make_url(postgres_database_url)
    admin = create_async_engine(server_url, isolation_level="AUTOCOMMIT")
    made: list[str] = []

    async def make() -> str:
        name = f"wallet_test_restored_{uuid.uuid4().hex[:12]}"
        async with admin.connect() as connection:
            await connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return server_url.set(database=name).render_as_string(hide_password=False)

    try:
        yield make
    finally:
        async with admin.connect() as connection:
            for name in made:
                await connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await admin.dispose()


def open_database(url: str) -> Database:
    return Database(create_engine(Settings(database_url=url, database_pool_size=5)))


def flow(kind: Flow, user_id: str, amount: int, asset: str = "GOLD_COINS") -> Command:
    return Command(
        action=Action(kind),
        user_id=UserId(user_id),
        asset_symbol=asset,
        amount=amount,
        idempotency_key=f"backup-{uuid.uuid4().hex}",
        note="restore me" if kind is not Flow.TOPUP else None,
        metadata={"orderId": uuid.uuid4().hex[:8]} if kind is Flow.TOPUP else None,
    )


async def post_all(wallet: Wallet, commands: list[Command]) -> None:
    """Post the commands at once (they share batches); refusals are expected, nothing else."""
    outcomes = await asyncio.gather(
        *(wallet.execute(command) for command in commands), return_exceptions=True
    )
    unexpected = [o for o in outcomes if isinstance(o, BaseException)]
    unexpected = [o for o in unexpected if not isinstance(o, InsufficientFunds)]
    assert not unexpected, unexpected[:5]


async def write_a_ledger(database: Database) -> list[UserId]:
    """New users, and flows of every kind through group commit, some refused; the users."""
    wallet = Wallet(database)
    users = [
        (
            await wallet.create_user(
                user_id=f"backup-{n}-{uuid.uuid4().hex[:8]}",
                email=f"backup{n}@example.com",
                name=f"Backup {n}",
            )
        ).id
        for n in range(USERS)
    ]
    batcher = Batcher(database, max_size=32, max_wait_s=0.002)
    wallet = Wallet(database, batcher=batcher)
    try:
        await post_all(
            wallet,
            [flow(Flow.TOPUP, user, 1000) for user in users]
            + [flow(Flow.BONUS, user, 25, "LOYALTY_POINTS") for user in users],
        )
        await post_all(
            wallet,
            [flow(Flow.SPEND, user, 100 * (n % 15)) for n, user in enumerate(users) if n % 15]
            + [flow(Flow.SPEND, BOB, 11, "DIAMONDS")]  # refused, and kept under its key
            + [flow(Flow.SPEND, ALICE, 300), flow(Flow.TOPUP, ALICE, 5, "DIAMONDS")],
        )
    finally:
        await batcher.close()
    return users


async def snapshot(url: str) -> Snapshot:
    """Every row of every table, in primary key order."""
    database = open_database(url)
    try:
        async with database.transaction(is_write=False, is_snapshot=True) as connection:
            return {
                table.name: [
                    tuple(row)
                    for row in await connection.execute(
                        sa.select(table).order_by(*table.primary_key.columns)
                    )
                ]
                for table in metadata.sorted_tables
            }
    finally:
        await database.close()


async def dump(source_url: str, file: Path) -> None:
    await run(
        postgres_tool("pg_dump"),
        "--format=custom",
        f"--file={file}",
        f"--dbname={libpq_url(source_url)}",
    )


async def restore(file: Path, target_url: str) -> None:
    await run(
        postgres_tool("pg_restore"),
        "--no-owner",
        "--exit-on-error",
        f"--dbname={libpq_url(target_url)}",
        str(file),
    )


async def wallet_verify(url: str, metrics_dir: Path) -> str:
    """`wallet verify` on the database at `url` (as an operator writes it), with a server's
    metrics directory; its output, after asserting exit status 0."""
    env = {**os.environ, "WALLET_DATABASE_URL": url, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    return await run(str(WALLET_COMMAND), "verify", env=env)


def published_gauge(metrics_dir: Path, name: str) -> float:
    """A gauge as a server's /metrics would show it from `metrics_dir`."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
    value = registry.get_sample_value(name)
    assert value is not None, f"{name} is not in {metrics_dir}"
    return value


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    """A server's PROMETHEUS_MULTIPROC_DIR."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    return directory


@pytest.mark.postgres_only
async def test_a_restored_dump_verifies_and_holds_every_row_of_the_source(
    postgres_database_url: str,
    fresh_database: Callable[[], Awaitable[str]],
    tmp_path: Path,
    metrics_dir: Path,
) -> None:
    source = open_database(postgres_database_url)
    try:
        users = [ALICE, BOB, *await write_a_ledger(source)]
        source_balances = [await Wallet(source).standings(user_id=user) for user in users]
    finally:
        await source.close()
    before = await snapshot(postgres_database_url)
    assert before["transactions"], "the source has a ledger to back up"
    backup = tmp_path / "wallet.dump"

    await dump(postgres_database_url, backup)
    restored_url = await fresh_database()
    await restore(backup, restored_url)
    output = await wallet_verify(libpq_url(restored_url), metrics_dir)

    assert "ledger verified: every invariant holds" in output
    assert published_gauge(metrics_dir, "wallet_ledger_verify_clean") == 1
    assert await snapshot(restored_url) == before
    restored = open_database(restored_url)
    try:
        assert await schema_state(restored) is None, "the copy is at the newest migration"
        wallet = Wallet(restored)
        assert [await wallet.standings(user_id=user) for user in users] == source_balances
        # The service carries on on the copy: its sequences were restored with the rows.
        await wallet.execute(flow(Flow.TOPUP, ALICE, 7))
        assert all(check.is_clean for check in await verify(restored))
    finally:
        await restored.close()
    assert len((await snapshot(restored_url))["transactions"]) == len(before["transactions"]) + 1


@pytest.mark.postgres_only
async def test_a_dump_taken_while_flows_are_posted_is_a_consistent_snapshot(
    postgres_database_url: str,
    fresh_database: Callable[[], Awaitable[str]],
    tmp_path: Path,
    metrics_dir: Path,
) -> None:
    source = open_database(postgres_database_url)
    users = await write_a_ledger(source)
    before_load = await snapshot(postgres_database_url)
    batcher = Batcher(source, max_size=32, max_wait_s=0.002)
    wallet = Wallet(source, batcher=batcher)
    is_loaded, is_dumped = asyncio.Event(), asyncio.Event()

    async def keep_posting() -> None:
        """Rounds of flows until one has begun after the dump ended."""
        rounds = 0
        while True:
            was_dumped = is_dumped.is_set()
            await post_all(
                wallet,
                [flow(Flow.TOPUP, user, 3) for user in users]
                + [flow(Flow.SPEND, user, 2) for user in users],
            )
            rounds += 1
            if rounds == 3:
                is_loaded.set()
            if was_dumped:
                return

    backup = tmp_path / "wallet.dump"
    load = asyncio.create_task(keep_posting())
    loaded = asyncio.create_task(is_loaded.wait())
    try:
        await asyncio.wait([load, loaded], return_when=asyncio.FIRST_COMPLETED)
        await dump(postgres_database_url, backup)
    finally:
        loaded.cancel()
        is_dumped.set()
        await load  # raises what failed the load, if anything did
        await batcher.close()
        await source.close()
    after = await snapshot(postgres_database_url)

    restored_url = await fresh_database()
    await restore(backup, restored_url)
    await wallet_verify(libpq_url(restored_url), metrics_dir)

    copy = await snapshot(restored_url)
    for table in ("transactions", "entries"):
        rows_after = {row[0]: row for row in after[table]}  # by seq
        assert all(rows_after.get(row[0]) == row for row in copy[table]), table
    # The dump was taken mid-load: it holds some of the load's flows, and not the last round.
    assert len(before_load["transactions"]) < len(copy["transactions"])
    assert len(copy["transactions"]) < len(after["transactions"])
    restored = open_database(restored_url)
    try:
        assert await migrate(restored) == (head_revision(), head_revision())
    finally:
        await restored.close()


def sqlite_backup_commands() -> list[list[str]]:
    """The SQLite backup commands of docs/OPERATIONS.md, each as an argv; the sqlite3 shell's
    only where it is installed (Python's binding of the same backup API always is)."""
    section = OPERATIONS.read_text().split("### SQLite", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.strip()[:1] not in "#"]
    assert [argv[0] for argv in commands] == ["sqlite3", "python"], commands
    return [
        [sys.executable, *argv[1:]] if argv[0] == "python" else argv
        for argv in commands
        if argv[0] != "sqlite3" or shutil.which("sqlite3")
    ]


async def test_an_sqlite_online_backup_holds_the_commits_still_in_the_wal(
    tmp_path: Path, metrics_dir: Path
) -> None:
    live_url = f"sqlite+aiosqlite:///{tmp_path / 'wallet.db'}"
    database = open_database(live_url)
    copies: list[Path] = []
    try:
        await migrate(database)
        await seed(database)
        await write_a_ledger(database)
        # The service holds the file open in WAL mode: the newest commits are in wallet.db-wal.
        assert (tmp_path / "wallet.db-wal").stat().st_size > 0
        before = await snapshot(live_url)
        for argv in sqlite_backup_commands():
            await run(*argv, cwd=tmp_path)
            copies.append((tmp_path / "wallet-backup.db").rename(tmp_path / f"{len(copies)}.db"))
    finally:
        await database.close()

    for copy in copies:
        copy_url = f"sqlite+aiosqlite:///{copy}"
        assert await snapshot(copy_url) == before, f"the backup {copy.name} lost rows"
        output = await wallet_verify(copy_url, metrics_dir)
        assert "ledger verified: every invariant holds" in output
