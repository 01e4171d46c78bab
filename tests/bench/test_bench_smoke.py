"""`wallet bench` end to end at a tiny size: the load run prints its provenance and one row per
cell and configuration with the ratio to the first, single flows, spends of expiring credits
(with their ratio to plain spends) and the mixed load (spends, transfers, holds and their
captures) alike, then verifies the ledger; `--populate` loads a 1.3 ledger of paid and free
credits that `wallet verify` accepts and shows index scans. Smoke tests, not timing assertions."""

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

from wallet.bench.plan import (
    BenchRefused,
    Configuration,
    Load,
    Mix,
    Variant,
    load_plan,
    parse_configuration,
)
from wallet.bench.report import per_request
from wallet.bench.server import CLOCK_TICKS, CpuUse
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


def _plan_of(*, flows: str, users: int = 20) -> tuple[Load, ...]:
    plan = load_plan(
        users=users, duration_s=1, warmup_s=0, concurrency="1", scenarios="spread", flows=flows,
        configurations=["on"], workers=1, max_requests=10, is_markdown=False,
    )  # fmt: skip
    return plan.flows


def test_bench_drives_the_single_flows_spends_of_expiring_credits_and_the_mixed_load_only() -> None:
    assert _plan_of(flows="spend,mixed,topup") == (Flow.SPEND, Mix.MIXED, Flow.TOPUP)
    assert _plan_of(flows="spend-expiring,spend") == (Variant.SPEND_EXPIRING, Flow.SPEND)
    for not_driven in ("transfer", "refund", "hold", "expiry", "nothing"):
        with pytest.raises(BenchRefused, match="flows: spend, topup, bonus, mixed, spend-expiring"):
            _plan_of(flows=not_driven)
    with pytest.raises(BenchRefused, match="--users 2 or more"):
        _plan_of(flows="mixed", users=1)


def test_cpu_per_request_is_shown_no_finer_than_the_clock_ticks_read_allow() -> None:
    assert CLOCK_TICKS == 100  # /proc counts CPU in ticks of 10 ms: each process may be one off
    # 2 processes over 1,000 requests: 20 µs a request unknown, so to the hundred
    assert per_request(CpuUse(1.234, 2), 1000) == "1,200"
    # 1 process over 2,000 requests: 5 µs, so to the ten
    assert per_request(CpuUse(1.2345, 1), 2000) == "620"
    # over 50,000: 0.2 µs, so whole µs; over 1,000,000: 0.01 µs, so one decimal
    assert per_request(CpuUse(1.2345, 1), 50_000) == "25"
    assert per_request(CpuUse(1.2345, 1), 1_000_000) == "1.2"
    assert per_request(None, 1000) == "–"  # not watched
    assert per_request(CpuUse(1.0, 1), 0) == "–"


@pytest.mark.postgres_only
async def test_bench_prints_a_row_per_cell_and_configuration_then_verifies(
    postgres_database_url: str,
) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed: apt-get install wrk")
    code, output = await wallet_command(
        *("bench", "--users", "20", "--duration", "1", "--warmup", "0"),
        *("--concurrency", "1,4", "--scenarios", "spread"),
        *("--flows", "spend,spend-expiring,mixed", "--workers", "1"),
        database_url=postgres_database_url,
    )

    assert code == 0, output
    for line in ("date:", "machine:", "database: postgresql", "client: wrk", "command:"):
        assert f"\n{line}" in f"\n{output}", f"no {line!r} line:\n{output}"
    assert "\nspend-expiring: spends of LOYALTY_POINTS" in output, output
    rows = _result_rows(output)
    assert sorted((r["configuration"], r["flow"], r["clients"]) for r in rows) == [
        (f"batching {name}", flow, clients)
        for name in ("off", "on")
        for flow in ("mixed", "spend", "spend-expiring")
        for clients in ("1", "4")
    ], output
    for heading in ("req/s", "p50 ms", "p99 ms", "wrk CPU%"):
        assert all(r[heading] for r in rows), f"no {heading!r} column:\n{output}"
    _check_cpu_per_request_and_the_share_of_the_bare_app(output, rows)
    assert all(
        ("×" in r["vs batching off"]) == (r["configuration"] == "batching on") for r in rows
    ), output
    # each spend of expiring credits against the plain spend of its configuration and clients
    assert all(("×" in r["vs spend"]) == (r["flow"] == "spend-expiring") for r in rows), output
    assert [r["errors"] for r in rows] == ["0"] * len(rows), output
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
    await _check_only_the_spends_of_expiring_credits_took_from_lots(postgres_database_url)


def _result_rows(output: str, configuration: str = "batching") -> list[dict[str, str]]:
    """The rows of the results table whose configuration starts so, each cell by its column's
    heading."""
    lines = output.splitlines()
    heading = next(line for line in lines if line.startswith("┃ configuration"))
    names = [name.strip() for name in heading.strip("┃").split("┃")]
    return [
        dict(zip(names, (cell.strip() for cell in line.strip("│").split("│")), strict=True))
        for line in lines
        if line.startswith(f"│ {configuration}")
    ]


def _number(text: str) -> float:
    return float(text.replace(",", "").removesuffix("%"))


def _check_cpu_per_request_and_the_share_of_the_bare_app(
    output: str, rows: list[dict[str, str]]
) -> None:
    """The bare ASGI app was loaded at each clients count, without errors; each wallet row gives
    its rate as a share of the bare app's at the same clients, and the CPU microseconds per
    request of the server, of PostgreSQL (on this machine) and of both."""
    assert "\ncalibration: bare ASGI" in output, output
    bare = {r["clients"]: r for r in _result_rows(output, "bare ASGI")}
    assert sorted(bare) == ["1", "4"], output
    assert all(r["errors"] == "0" and _number(r["req/s"]) > 0 for r in bare.values()), output
    for row in rows:
        expected = 100 * _number(row["req/s"]) / _number(bare[row["clients"]]["req/s"])
        assert abs(_number(row["of bare ASGI"]) - expected) <= 0.05 * expected + 0.1, row
        for heading in ("server µs/req", "db µs/req", "server+db µs/req"):
            assert _number(row[heading]) >= 0, f"{heading}: {row}"


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


async def _check_only_the_spends_of_expiring_credits_took_from_lots(database_url: str) -> None:
    """The load's spends of LOYALTY_POINTS took free credits, each from a lot; its spends of
    GOLD_COINS (spend, mixed) took paid credits from no lot."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            spends = (
                await connection.execute(
                    sa.text(
                        "SELECT t.asset_symbol, count(*),"
                        " count(*) FILTER (WHERE t.paid_amount = 0),"
                        " count(*) FILTER (WHERE EXISTS (SELECT 1 FROM lot_moves m"
                        " WHERE m.transaction_id = t.id AND m.amount < 0))"
                        " FROM transactions t WHERE t.type = 'spend'"
                        " AND t.idempotency_key LIKE 'bench-%'"
                        " AND t.idempotency_key NOT LIKE 'bench-fund-%'"
                        " GROUP BY t.asset_symbol"
                    )
                )
            ).all()
    finally:
        await engine.dispose()
    by_asset = {asset: (count, free, from_lots) for asset, count, free, from_lots in spends}
    assert set(by_asset) == {"GOLD_COINS", "LOYALTY_POINTS"}, spends
    gold, _, _ = by_asset["GOLD_COINS"]
    loyalty, _, _ = by_asset["LOYALTY_POINTS"]
    assert by_asset == {"GOLD_COINS": (gold, 0, 0), "LOYALTY_POINTS": (loyalty,) * 3}
    assert gold > 0
    assert loyalty > 0


@pytest.mark.postgres_only
async def test_bench_populate_loads_paid_and_free_credits_that_verify_and_read_by_index(
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
            # per kind of spend: how many, and how many left the user free credits
            spent = (
                await connection.execute(
                    sa.text(
                        "SELECT e.kind, count(*), count(*) FILTER (WHERE e.balance_after >"
                        " e.paid_after) FROM entries e JOIN transactions t"
                        " ON t.id = e.transaction_id WHERE t.type = 'spend'"
                        " AND e.direction = 'debit' GROUP BY e.kind"
                    )
                )
            ).all()
            lots, expiring = (
                await connection.execute(
                    sa.text(
                        "SELECT (SELECT count(*) FROM lots),"
                        " (SELECT coalesce(sum(expiring), 0) FROM balances)"
                    )
                )
            ).one()
    finally:
        await engine.dispose()
    assert entries == 2000 + 12  # and the seed's 6 transactions
    assert backwards == 0
    by_kind = {kind: (count, leaving_free) for kind, count, leaving_free in spent}
    assert set(by_kind) == {"free", "paid"}, spent
    assert by_kind["free"][0] > 0
    assert by_kind["paid"][0] > 0
    assert by_kind["paid"][1] == 0, "a spend took paid credits while free ones were left"
    assert (lots, expiring) == (0, 0)  # history from before any lifetime applied

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
