"""A load run of `wallet bench`: seed the bench users, make the load's API key, load the bare ASGI
app and then each configuration's `wallet serve` cell by cell, print the table, revoke the key
and verify the ledger."""

import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from wallet.bench.database import open_database, run_on
from wallet.bench.load import ConfigurationResult, Measurement, find_wrk, run_wrk, wrk_version
from wallet.bench.plan import (
    LOAD_KEY_BUDGET_PER_S,
    LOAD_KEY_SCOPES,
    Cell,
    Configuration,
    LoadPlan,
    Variant,
)
from wallet.bench.report import (
    checks_table,
    load_run_lines,
    memory_lines,
    print_as_is,
    provenance,
    results_table,
)
from wallet.bench.server import Server, memory_mb, running_calibration, running_server
from wallet.service.access import Access
from wallet.service.audit import verify
from wallet.service.populate import prepare_users
from wallet.settings import Settings
from wallet.store.database import Database

PAUSE_BETWEEN_CELLS_S = 0.5  # lets the batches of the last cell's unanswered requests drain


@dataclass(frozen=True, slots=True)
class LoadRun:
    """What every wrk run of one `wallet bench` shares."""

    plan: LoadPlan
    database_url: str  # what the servers are given: the database's URL, password and all
    wrk: str
    run_id: str
    api_key: str
    workdir: Path
    watches_postgres: bool
    console: Console


def benchmark(settings: Settings, plan: LoadPlan, *, argv: Sequence[str], console: Console) -> int:
    """Seed, make the load's API key, measure every configuration, revoke the key, verify; the
    exit code (1: errors or a failed verify)."""
    wrk = find_wrk()
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    # One engine throughout (each asyncio.run closes its pool): the provenance names the server
    # version the first connection learnt.
    database = open_database(settings)
    funds_expiring = Variant.SPEND_EXPIRING in plan.flows
    asyncio.run(
        run_on(
            database,
            prepare_users(database, count=plan.users, funds_expiring=funds_expiring),
        )
    )
    key_id, api_key = asyncio.run(run_on(database, _create_load_key(database, run_id=run_id)))
    try:
        results = _measure(
            database,
            plan,
            database_url=settings.database_url.get_secret_value(),
            wrk=wrk,
            run_id=run_id,
            api_key=api_key,
            argv=argv,
            console=console,
        )
    finally:
        asyncio.run(run_on(database, _revoke_load_key(database, key_id)))
    errors = sum(m.errors for r in results for m in r.cells.values())
    database = open_database(settings)
    is_verified = asyncio.run(run_on(database, _verify_and_show(database, console)))
    if errors:
        console.print(f"[red]{errors} requests failed[/] (status 400 or more, or socket errors)")
    return 0 if is_verified and not errors else 1


def _measure(
    database: Database,
    plan: LoadPlan,
    *,
    database_url: str,
    wrk: str,
    run_id: str,
    api_key: str,
    argv: Sequence[str],
    console: Console,
) -> list[ConfigurationResult]:
    """Print the provenance, run the calibration and every configuration (its servers on
    `database_url`, the URL of `database`), print the results."""
    lines = provenance(database, argv=argv, extra=load_run_lines(plan, client=wrk_version(wrk)))
    for line in lines:
        print_as_is(console, line)
    with tempfile.TemporaryDirectory(prefix="wallet-bench-") as workdir:
        run = LoadRun(
            plan=plan,
            database_url=database_url,
            wrk=wrk,
            run_id=run_id,
            api_key=api_key,
            workdir=Path(workdir),
            watches_postgres=_is_local_postgres(database),
            console=console,
        )
        calibration = _run_calibration(run)
        results = [_run_configuration(run, configuration) for configuration in plan.configurations]
    console.print(
        results_table(
            plan, results, calibration, is_database_in_server=database.dialect == "sqlite"
        )
    )
    for line in memory_lines(results):
        console.print(line, highlight=False)
    return results


def _run_calibration(run: LoadRun) -> ConfigurationResult:
    """Load the bare ASGI app at each concurrency, as the configurations will be."""
    calibration = run.plan.calibration()
    result = ConfigurationResult(calibration)
    with running_calibration(calibration, workdir=run.workdir) as server:
        # It uses no database: PostgreSQL's CPU meanwhile is none of its own.
        cells = run.plan.calibration_cells()
        unwatched = replace(run, watches_postgres=False)
        for cell, measured in _run_cells(unwatched, server, cells, prefix=f"{run.run_id}-bare"):
            result.cells[cell] = measured
    return result


def _run_configuration(run: LoadRun, configuration: Configuration) -> ConfigurationResult:
    """Start the server for `configuration`, warm it up, measure every cell, stop it."""
    result = ConfigurationResult(configuration)
    with running_server(
        configuration, database_url=run.database_url, workdir=run.workdir
    ) as server:
        number = run.plan.configurations.index(configuration)
        cells = run.plan.cells()
        for cell, measured in _run_cells(run, server, cells, prefix=f"{run.run_id}-{number}"):
            result.cells[cell] = measured
            result.sample_memory(server)
        result.peak_rss_mb = [memory_mb(pid, "VmHWM") for pid in server.worker_pids()]
    return result


def _run_cells(
    run: LoadRun, server: Server, cells: Sequence[Cell], *, prefix: str
) -> Iterator[tuple[Cell, Measurement]]:
    """Warm `server` up, then measure each cell, saying how it went."""
    plan = run.plan
    name = server.configuration.name
    run.console.print(f"[dim]{name}: serving on {server.url}[/]")
    if plan.warmup_s > 0:
        _run_wrk(
            run,
            server,
            replace(cells[0], concurrency=min(16, max(plan.concurrencies))),
            duration_s=plan.warmup_s,
            prefix=f"{prefix}-warmup",
            watches_postgres=False,
        )
    for index, cell in enumerate(cells):
        time.sleep(PAUSE_BETWEEN_CELLS_S)
        measured = _run_wrk(
            run,
            server,
            cell,
            duration_s=plan.duration_s,
            prefix=f"{prefix}-{index}",
            watches_postgres=run.watches_postgres,
        )
        yield cell, measured
        mix = ", ".join(f"{kind} {count:,}" for kind, count in measured.kinds.items())
        run.console.print(
            f"[dim]{name}: {cell.scenario} {cell.flow} "
            f"c={cell.concurrency}: {measured.rate:,.0f} req/s, "
            f"p99 {measured.p99_ms:.1f} ms, {measured.errors} errors"
            + (f" (made: {mix})" if mix else "")
            + "[/]"
        )


def _run_wrk(
    run: LoadRun,
    server: Server,
    cell: Cell,
    *,
    duration_s: int,
    prefix: str,
    watches_postgres: bool,
) -> Measurement:
    return run_wrk(
        run.wrk,
        server,
        cell,
        users=run.plan.users,
        duration_s=duration_s,
        max_requests=run.plan.max_requests,
        prefix=prefix,
        api_key=run.api_key,
        workdir=run.workdir,
        watches_postgres=watches_postgres,
    )


async def _verify_and_show(database: Database, console: Console) -> bool:
    started = time.monotonic()
    checks = await verify(database)
    console.print(checks_table(checks))
    is_clean = all(check.is_clean for check in checks)
    took = f"(verify took {time.monotonic() - started:.1f} s)"
    if is_clean:
        console.print(f"ledger verified: every invariant holds {took}")
    else:
        console.print(f"[red]ledger verification FAILED[/] {took}")
    return is_clean


def _is_local_postgres(database: Database) -> bool:
    host = database.engine.url.host
    return database.dialect == "postgresql" and host in (None, "", "127.0.0.1", "localhost", "::1")


async def _create_load_key(database: Database, *, run_id: str) -> tuple[str, str]:
    """A key of the run's own for the load (its id and its secret), as a client would hold."""
    access = Access(
        database,
        default_reads_per_second=LOAD_KEY_BUDGET_PER_S,
        default_writes_per_second=LOAD_KEY_BUDGET_PER_S,
    )
    key, secret = await access.create_key(
        label=f"wallet bench {run_id}",
        scopes=LOAD_KEY_SCOPES,
        reads_per_second=LOAD_KEY_BUDGET_PER_S,
        writes_per_second=LOAD_KEY_BUDGET_PER_S,
    )
    return key.id, secret


async def _revoke_load_key(database: Database, key_id: str) -> None:
    access = Access(database, default_reads_per_second=0, default_writes_per_second=0)
    await access.revoke_key(key_id=key_id)
