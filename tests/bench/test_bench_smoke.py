"""`wallet bench` end to end at a tiny size: the load run prints its provenance and one row per
cell and configuration with the ratio to the first, then verifies the ledger; `--populate` loads
a ledger that `wallet verify` accepts and shows index scans. Smoke tests, not timing assertions."""

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from wallet.bench import BenchRefused, Configuration, parse_configuration

pytestmark = pytest.mark.timeout(120)
WALLET = Path(sys.executable).parent / "wallet"


async def wallet_command(*args: str, database_url: str) -> tuple[int, str]:
    """Run the real `wallet` command; its exit code and output (stdout and stderr)."""
    completed = await asyncio.to_thread(
        subprocess.run,
        [str(WALLET), *args],
        env={**os.environ, "WALLET_DATABASE_URL": database_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=100,
        check=False,
    )
    return completed.returncode, completed.stdout


async def _autocommit(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(sa.text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def scratch_url(postgres_database_url: str) -> AsyncIterator[str]:
    """An empty database of its own on the test server, dropped at the end."""
    name = f"wallet_bench_{uuid.uuid4().hex[:12]}"
    await _autocommit(postgres_database_url, f'CREATE DATABASE "{name}"')
    yield (
        sa.make_url(postgres_database_url).set(database=name).render_as_string(hide_password=False)
    )
    await _autocommit(postgres_database_url, f'DROP DATABASE "{name}" WITH (FORCE)')


def test_bench_configurations_parse_with_their_settings_and_workers() -> None:
    assert parse_configuration("on", workers=2) == Configuration("on", {}, 2)
    assert parse_configuration(
        "off:WALLET_BATCH_MAX_SIZE=1, workers=1", workers=2
    ) == Configuration("off", {"WALLET_BATCH_MAX_SIZE": "1"}, 1)
    for bad in ("x:WALLET_NO_SUCH=1", "x:WALLET_DATABASE_URL=sqlite://", "x:PATH=/", ":a=1"):
        with pytest.raises(BenchRefused):
            parse_configuration(bad, workers=1)


@pytest.mark.postgres_only
async def test_bench_prints_a_row_per_cell_and_configuration_then_verifies(
    postgres_database_url: str,
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed: apt-get install wrk")
    code, output = await wallet_command(
        *("bench", "--users", "20", "--duration", "1", "--warmup", "0"),
        *("--concurrency", "1,4", "--scenarios", "spread", "--flows", "spend"),
        *("--workers", "1"),
        database_url=postgres_database_url,
    )

    assert code == 0, output
    for line in ("date:", "machine:", "database: postgresql", "client: wrk", "command:"):
        assert f"\n{line}" in f"\n{output}", f"no {line!r} line:\n{output}"
    for heading in ("configuration", "clients", "req/s", "vs batching off", "p50 ms", "p99 ms"):
        assert heading in output, f"no {heading!r} column:\n{output}"
    for heading in ("errors", "wrk CPU%"):
        assert heading in output, f"no {heading!r} column:\n{output}"
    row = re.compile(r"^│ batching (off|on)\s+│ spread\s+│ spend\s+│\s+(\d+) │(.*)$", re.MULTILINE)
    rows = row.findall(output)
    assert sorted((name, clients) for name, clients, _ in rows) == [
        ("off", "1"),
        ("off", "4"),
        ("on", "1"),
        ("on", "4"),
    ], output
    assert all("×" in rest for name, _, rest in rows if name == "on"), output
    assert "worker RSS, batching on:" in output
    assert "ledger verified: every invariant holds" in output
    await _check_the_load_used_its_own_rate_limited_key(postgres_database_url, output)


async def _check_the_load_used_its_own_rate_limited_key(database_url: str, output: str) -> None:
    """The bench made an API key for its load with budgets (not 0: unlimited would skip rate
    limiting) that never refuse, sent it with every request, never printed it, and revoked it."""
    assert "auth: one API key made for the run" in output, output
    assert not re.search(r"wk_[A-Za-z0-9_-]{43}", output), "the bench printed its key"
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            keys = (
                await connection.execute(
                    sa.text(
                        "SELECT id, scopes, reads_per_second, writes_per_second, revoked_at"
                        " FROM api_keys WHERE label LIKE 'wallet bench %'"
                    )
                )
            ).all()
            makers = (
                await connection.execute(
                    sa.text(
                        "SELECT created_by, count(*) FROM transactions"
                        " WHERE idempotency_key LIKE 'bench-%'"
                        " AND idempotency_key NOT LIKE 'bench-fund-%' GROUP BY created_by"
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    assert len(keys) == 1, keys
    (key_id, scopes, reads, writes, revoked_at) = keys[0]
    assert (scopes, reads, writes) == ("wallet:credit wallet:debit", 1_000_000, 1_000_000)
    assert revoked_at is not None, "the bench left its key live"
    assert [maker for maker, _ in makers] == [key_id], makers
    assert makers[0][1] > 0


@pytest.mark.postgres_only
async def test_bench_populate_loads_a_ledger_that_verifies_and_reads_by_index(
    scratch_url: str,
) -> None:
    code, output = await wallet_command(
        "bench", "--populate", "--populate-users", "200", "--populate-entries", "2000",
        database_url=scratch_url,
    )  # fmt: skip

    assert code == 0, output
    assert "loaded 200 users, 1,000 transactions and 2,000 entries" in output
    assert "Index Scan" in output, output
    code, verified = await wallet_command("verify", database_url=scratch_url)
    assert code == 0, verified
    assert "ledger verified" in verified
    engine = create_async_engine(scratch_url)
    try:
        async with engine.connect() as connection:
            entries = (await connection.execute(sa.text("SELECT count(*) FROM entries"))).scalar()
            backwards = (
                await connection.execute(
                    sa.text(
                        "SELECT count(*) FROM (SELECT created_at < lag(created_at) OVER "
                        "(ORDER BY seq) AS goes_back FROM transactions) t WHERE goes_back"
                    )
                )
            ).scalar()
    finally:
        await engine.dispose()
    assert entries == 2000 + 12  # and the seed's 6 transactions
    assert backwards == 0

    code, output = await wallet_command(
        "bench", "--populate", "--populate-users", "10", "--populate-entries", "20",
        database_url=scratch_url,
    )  # fmt: skip
    assert code == 2, output
    assert "more than the seed data" in output


async def test_bench_populate_refuses_sqlite(tmp_path: Path) -> None:
    database_file = tmp_path / "wallet.db"
    code, output = await wallet_command(
        "bench", "--populate", database_url=f"sqlite+aiosqlite:///{database_file}"
    )

    assert code == 2, output
    assert "PostgreSQL only" in output
    assert not database_file.exists()
