"""`wallet bench` end to end at a tiny size: the load run prints its provenance and one row per
cell and configuration with the ratio to the first, single flows and the mixed load (spends,
transfers, holds and their captures) alike, then verifies the ledger; `--populate` loads a
ledger that `wallet verify` accepts and shows index scans. Smoke tests, not timing assertions."""

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

from wallet.bench import BenchRefused, Configuration, Mix, load_plan, parse_configuration
from wallet.domain.ledger import Flow

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


def _plan_of(*, flows: str, users: int = 20) -> tuple[Flow | Mix, ...]:
    plan = load_plan(
        users=users, duration_s=1, warmup_s=0, concurrency="1", scenarios="spread", flows=flows,
        configurations=["on"], workers=1, max_requests=10, is_markdown=False,
    )  # fmt: skip
    return plan.flows


def test_bench_drives_the_single_flows_and_the_mixed_load_only() -> None:
    assert _plan_of(flows="spend,mixed,topup") == (Flow.SPEND, Mix.MIXED, Flow.TOPUP)
    for not_driven in ("transfer", "refund", "hold", "nothing"):
        with pytest.raises(BenchRefused, match="flows: spend, topup, bonus, mixed"):
            _plan_of(flows=not_driven)
    with pytest.raises(BenchRefused, match="--users 2 or more"):
        _plan_of(flows="mixed", users=1)


@pytest.mark.postgres_only
async def test_bench_prints_a_row_per_cell_and_configuration_then_verifies(
    postgres_database_url: str,
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed: apt-get install wrk")
    code, output = await wallet_command(
        *("bench", "--users", "20", "--duration", "1", "--warmup", "0"),
        *("--concurrency", "1,4", "--scenarios", "spread", "--flows", "spend,mixed"),
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
    row = re.compile(
        r"^│ batching (off|on)\s+│ spread\s+│ (spend|mixed)\s+│\s+(\d+) │(.*)$", re.MULTILINE
    )
    rows = row.findall(output)
    assert sorted((name, flow, clients) for name, flow, clients, _ in rows) == [
        (name, flow, clients)
        for name in ("off", "on")
        for flow in ("mixed", "spend")
        for clients in ("1", "4")
    ], output
    assert all("×" in rest for name, _, _, rest in rows if name == "on"), output
    # after clients: requests, req/s, the ratio (blank for the baseline), p50, p95, p99, errors
    errors = [rest.split("│")[6].strip() for _, _, _, rest in rows]
    assert errors == ["0"] * len(rows), output
    made = re.findall(
        r"spread mixed c=\d+: .* 0 errors \(made: spend (\d+), transfer (\d+), "
        r"hold (\d+), capture (\d+)\)",
        output,
    )
    assert len(made) == 4, output
    assert all(int(count) > 0 for counts in made for count in counts), output
    assert "worker RSS, batching on:" in output
    assert "ledger verified: every invariant holds" in output
    await _check_the_load_used_its_own_rate_limited_key(postgres_database_url, output)
    await _check_the_mixed_load_transferred_and_captured(postgres_database_url)


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


async def _check_the_mixed_load_transferred_and_captured(database_url: str) -> None:
    """The mixed cells left transfers and captured holds in the ledger."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            transfers = (
                await connection.execute(
                    sa.text(
                        "SELECT count(*) FROM transactions WHERE type = 'transfer'"
                        " AND idempotency_key LIKE 'bench-%'"
                    )
                )
            ).scalar()
            captured = (
                await connection.execute(
                    sa.text("SELECT count(*) FROM holds WHERE status = 'captured'")
                )
            ).scalar()
    finally:
        await engine.dispose()
    assert transfers, "the mixed load made no transfer"
    assert captured, "the mixed load captured no hold"


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
