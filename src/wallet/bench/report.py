"""What `wallet bench` prints: the provenance of a run (when, on which machine, on what, by which
command), the results table, the workers' memory, and the verify checks."""

import math
import os
import platform
import shlex
import socket
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from wallet.bench.load import ConfigurationResult, Measurement
from wallet.bench.plan import (
    LOAD_KEY_BUDGET_PER_S,
    LOAD_KEY_SCOPES,
    Cell,
    LoadPlan,
    Mix,
    Variant,
)
from wallet.bench.server import CLOCK_TICKS, CpuUse
from wallet.service.audit import Check
from wallet.service.populate import (
    ASSET,
    EXPIRES_IN_DAYS,
    EXPIRING_ASSET,
    EXPIRING_LOTS,
    FUNDING,
)
from wallet.store.database import Database


def _cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or "unknown CPU"


def _memory_total() -> str:
    with suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    return "unknown memory"


def provenance(database: Database, *, argv: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Lines that say when, where, on what and by which command a result was measured; the
    server version is known once the database has been connected to."""
    url = database.engine.url.render_as_string(hide_password=True)
    version = ".".join(str(part) for part in database.engine.dialect.server_version_info or ())
    command = shlex.join(["wallet", *argv[1:]])
    return [
        f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"machine: {socket.gethostname()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"{_memory_total()} memory, {platform.system()} {platform.release()}",
        f"database: {database.dialect} {version} at {url}",
        f"python: {platform.python_version()}",
        *extra,
        f"command: WALLET_DATABASE_URL={shlex.quote(url)} {command}",
    ]


def load_run_lines(plan: LoadPlan, *, client: str) -> list[str]:
    """The provenance of a load run beyond the machine's: the client, the data, each server,
    the key, and how to read the columns."""
    lines = [
        f"client: {client}, on this machine, over loopback; "
        f"{plan.duration_s} s per cell after a {plan.warmup_s} s warm-up, "
        f"at most {plan.max_requests:,} requests per cell",
        f"data: {plan.users:,} bench users funded with {FUNDING:,} {ASSET} (paid credits, "
        "no lots); spread = round-robin over them, hot = all on one user; amount 1 per request",
    ]
    if Variant.SPEND_EXPIRING in plan.flows:
        lines.append(
            f"spend-expiring: spends of {EXPIRING_ASSET}, which each bench user holds as "
            f"free credits only: {EXPIRING_LOTS} bonuses of {FUNDING:,} expiring in "
            f"{EXPIRES_IN_DAYS - EXPIRING_LOTS + 1}-{EXPIRES_IN_DAYS} days, one lot each, "
            "so each spend takes from a lot; spend takes paid credits, from no lot"
        )
    if Mix.MIXED in plan.flows:
        lines.append(
            "mixed: each wrk thread captures each hold it made as soon as the hold's "
            "answer is read, and otherwise goes round spend, transfer, hold; transfers "
            "go to the next user (spread) or between the first two, each way in turn "
            "(hot)"
        )
    calibration = plan.calibration()
    return [
        *lines,
        *(f"server: {c.describe()}" for c in plan.configurations),
        f"calibration: {calibration.name}, an app that answers each spend's POST with a fixed "
        f"201 body and does nothing else, under uvicorn --workers {calibration.workers}, "
        "loaded with spends at each clients count; 'of bare ASGI' is a row's req/s over its "
        "req/s at the same clients",
        f"auth: one API key made for the run ({' '.join(sorted(LOAD_KEY_SCOPES))}), "
        f"budgets {LOAD_KEY_BUDGET_PER_S:,}/s of reads and of writes: rate limiting on, "
        "never refusing; revoked at the end",
        "CPU columns: percent of one core; wrk by getrusage, the server and PostgreSQL "
        "(on this machine) from /proc, missing backends that exit during a cell",
        "µs/req columns: CPU microseconds per request answered, of the server's processes, "
        "of PostgreSQL's (every process named postgres) and of both; rounded to what the clock "
        f"ticks ({1000 // CLOCK_TICKS} ms) of the processes that ran can tell apart; on SQLite "
        "the database works inside the server, so its CPU is in the server's columns",
    ]


def per_request(use: CpuUse | None, requests: int) -> str:
    """CPU microseconds per request, no finer than measured: each process read may be a clock
    tick off, so to one decimal, whole microseconds, or tens, hundreds... as that allows."""
    if use is None or not requests:
        return "–"
    value = use.seconds * 1e6 / requests
    step = use.resolution_s * 1e6 / requests
    if step < 0.1:
        return f"{value:.1f}"
    unit = 10 ** max(0, math.ceil(math.log10(step)))
    return f"{round(value / unit) * unit:,}"


def _share(rate: float, bare: float) -> str:
    """A rate as a percentage of the bare app's."""
    if not bare:
        return ""
    percent = 100 * rate / bare
    return f"{percent:.0f}%" if percent >= 10 else f"{percent:.1f}%"


def _percent_of_core(seconds: float, measured: Measurement) -> str:
    return f"{100 * seconds / measured.wall_s:.0f}"


def _leading_columns(result: ConfigurationResult, cell: Cell, measured: Measurement) -> list[str]:
    """A row's columns up to the rate."""
    rate = f"{measured.rate:,.0f}" + (" (capped)" if measured.is_capped else "")
    return [
        result.configuration.name,
        cell.scenario.value,
        cell.flow.value,
        str(cell.concurrency),
        f"{measured.requests:,}",
        rate,
    ]


def _measured_columns(
    measured: Measurement, database: CpuUse | None, total: CpuUse | None
) -> list[str]:
    """A row's columns from the latencies on."""
    errors = str(measured.errors) if not measured.errors else f"[red]{measured.errors}[/]"
    return [
        f"{measured.p50_ms:.1f}",
        f"{measured.p95_ms:.1f}",
        f"{measured.p99_ms:.1f}",
        errors,
        _percent_of_core(measured.client_cpu_s, measured),
        _percent_of_core(measured.server_cpu.seconds, measured),
        "–" if database is None else _percent_of_core(database.seconds, measured),
        per_request(measured.server_cpu, measured.requests),
        per_request(database, measured.requests),
        per_request(total, measured.requests),
    ]


def results_table(
    plan: LoadPlan,
    results: Sequence[ConfigurationResult],
    calibration: ConfigurationResult,
    *,
    is_database_in_server: bool,
) -> Table:
    """The calibration's rows, then one row per configuration and cell, cells grouped so
    configurations sit side by side; a variant's rows also show its rate over its plain flow's,
    when the plan has both."""
    first = results[0]
    variants = [f for f in plan.flows if isinstance(f, Variant) and f.plain in plan.flows]
    plains = sorted({variant.plain for variant in variants})
    table = Table(
        title=None if plan.is_markdown else "wallet bench: requests/s and latency per cell",
        title_justify="left",
        box=box.MARKDOWN if plan.is_markdown else box.HEAVY_HEAD,
    )
    for heading in ("configuration", "scenario", "flow"):
        table.add_column(heading)
    for heading in ("clients", "requests", "req/s"):
        table.add_column(heading, justify="right")
    ratio_headings = [f"vs {first.configuration.name}"] if len(results) > 1 else []
    if plains:
        ratio_headings.append(f"vs {'/'.join(plains)}")
    for heading in (
        *ratio_headings,
        f"of {calibration.configuration.name}",
        *("p50 ms", "p95 ms", "p99 ms", "errors", "wrk CPU%", "server CPU%", "db CPU%"),
        *("server µs/req", "db µs/req", "server+db µs/req"),
    ):
        table.add_column(heading, justify="right")

    bare_rates = {cell.concurrency: measured.rate for cell, measured in calibration.cells.items()}
    for cell, measured in calibration.cells.items():
        # The bare app uses no database: all its CPU is the server's.
        table.add_row(
            *_leading_columns(calibration, cell, measured),
            *[""] * (len(ratio_headings) + 1),
            *_measured_columns(measured, None, measured.server_cpu),
        )
    if not plan.is_markdown:
        table.add_section()
    for cell in first.cells:
        for result in results:
            measured = result.cells[cell]
            ratio = []
            if len(results) > 1:
                baseline = first.cells[cell].rate
                is_first = result is first
                ratio = ["" if is_first or not baseline else f"{measured.rate / baseline:.2f}×"]
            if plains:
                # the same configuration, scenario and clients on the plain flow
                plain = (
                    result.cells.get(replace(cell, flow=cell.flow.plain))
                    if isinstance(cell.flow, Variant)
                    else None
                )
                ratio.append(
                    "" if plain is None or not plain.rate else f"{measured.rate / plain.rate:.2f}×"
                )
            database = measured.database_cpu
            if database is not None:
                total: CpuUse | None = measured.server_cpu + database
            else:
                total = measured.server_cpu if is_database_in_server else None
            table.add_row(
                *_leading_columns(result, cell, measured),
                *ratio,
                _share(measured.rate, bare_rates.get(cell.concurrency, 0.0)),
                *_measured_columns(measured, database, total),
            )
        if not plan.is_markdown:
            table.add_section()
    return table


def memory_lines(results: Sequence[ConfigurationResult]) -> list[str]:
    """Each configuration's workers' resident memory."""
    lines = []
    for result in results:
        rss = ", ".join(f"{mb:.0f}" for mb in result.rss_mb)
        peak = ", ".join(f"{mb:.0f}" for mb in result.peak_rss_mb)
        lines.append(
            f"worker RSS, {result.configuration.name}: {rss} MB (most seen after a cell), "
            f"peak {peak} MB (VmHWM)"
        )
    return lines


def checks_table(checks: Sequence[Check]) -> Table:
    """The verify checks, as `wallet verify` shows them."""
    table = Table("check", "result")
    for check in checks:
        shown = check.failures[:10]
        more = (
            f"\n… and {len(check.failures) - len(shown)} more" if len(check.failures) > 10 else ""
        )
        result = "[green]ok[/]" if check.is_clean else "[red]" + "\n".join(shown) + "[/]" + more
        table.add_row(check.name, result)
    return table


def print_as_is(console: Console, text: str, *, style: str | None = None) -> None:
    """Text that may hold brackets or long lines (SQL, URLs, commands): no markup, no
    highlighting, no wrapping."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
