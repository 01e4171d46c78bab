"""`wallet bench`: load from outside the server, measured. The command starts `wallet serve` itself
for each configuration compared, drives it over loopback with wrk (bounded in seconds and in
requests), prints one table with its provenance, and ends by verifying the ledger. With
`--populate` it bulk-loads a large, consistent ledger instead and shows that reads stay indexed."""

import asyncio
import http.client
import math
import os
import platform
import random
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from array import array
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from string import Template
from typing import Any, TypeVar

import sqlalchemy as sa
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import event

from wallet.domain.errors import WalletError
from wallet.domain.ledger import Command, Flow, SystemAccount, UserId
from wallet.service.audit import Check, verify
from wallet.service.posting import post
from wallet.service.seed import ALICE, seed
from wallet.service.wallet import PageRequest, Wallet
from wallet.settings import Settings
from wallet.store import queries
from wallet.store.database import Database, create_engine
from wallet.store.migrate import migrate

ASSET = "GOLD_COINS"
FUNDING = 10**12  # each bench user's opening balance: no spend of 1 ever runs out
SEED_USERS, SEED_TRANSACTIONS = 2, 6  # what `wallet seed` leaves: Alice and Bob, 3 top-ups each
USER_BATCH = 500
HEALTH_PATH = "/api/v1/health"
LONG_TIMEOUT_S = 3600.0  # bulk loads, VACUUM and verify on 10M entries outlast the API's timeout
STOP_GRACE_S = 15.0
PAUSE_BETWEEN_CELLS_S = 0.5  # lets the batches of the last cell's unanswered requests drain
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MACHINE_WIDTH = 160  # a table for docs is not wrapped to an 80-column pipe
T = TypeVar("T")


class BenchRefused(Exception):
    """A run that cannot start or cannot go on; the message says why and what to do."""


class Scenario(StrEnum):
    SPREAD = "spread"  # round-robin over every bench user: only the system account is hot
    HOT = "hot"  # every request on one user: the user's row is hot too


# ---- options ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Configuration:
    """One server set-up to measure: its name, its environment overrides, its worker count."""

    name: str
    environment: dict[str, str]
    workers: int

    def describe(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.environment.items()) or "defaults"
        return f"{self.name}: {settings}, --workers {self.workers}"


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What `wallet bench` runs: every configuration, scenario, flow and concurrency."""

    users: int = 1000
    duration_s: int = 5
    warmup_s: int = 1
    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    scenarios: tuple[Scenario, ...] = (Scenario.SPREAD, Scenario.HOT)
    flows: tuple[Flow, ...] = (Flow.SPEND, Flow.TOPUP)
    configurations: tuple[Configuration, ...] = ()
    max_requests: int = 1_000_000
    startup_timeout_s: float = 30.0
    is_markdown: bool = False  # print the table as Markdown, to paste into docs


@dataclass(frozen=True, slots=True)
class PopulatePlan:
    """What `wallet bench --populate` loads."""

    users: int = 1_000_000
    entries: int = 10_000_000
    is_forced: bool = False


DEFAULT_CONFIGURATIONS = ("batching off:WALLET_BATCH_MAX_SIZE=1", "batching on")


def parse_configuration(spec: str, *, workers: int) -> Configuration:
    """'NAME' or 'NAME:WALLET_X=value,...,workers=N' into a configuration."""
    name, _, assignments = spec.partition(":")
    environment: dict[str, str] = {}
    for assignment in filter(None, (a.strip() for a in assignments.split(","))):
        key, is_assignment, value = assignment.partition("=")
        key = key.strip()
        if not is_assignment:
            raise BenchRefused(f"configuration {spec!r}: {assignment!r} is not KEY=VALUE")
        if key == "workers":
            workers = _positive_int(value, what=f"workers in configuration {spec!r}")
            continue
        setting = key.removeprefix("WALLET_").lower()
        if not key.startswith("WALLET_") or setting not in Settings.model_fields:
            raise BenchRefused(f"configuration {spec!r}: {key} is not a WALLET_ setting")
        if setting == "database_url":
            raise BenchRefused(
                "a configuration cannot change WALLET_DATABASE_URL: set it for the run"
            )
        environment[key] = value.strip()
    if not name.strip():
        raise BenchRefused(f"configuration {spec!r} has no name")
    return Configuration(name.strip(), environment, workers)


def parse_list(text: str, *, what: str) -> tuple[str, ...]:
    """A comma-separated option, without blanks or repeats."""
    items = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise BenchRefused(f"{what}: give at least one value")
    return items


def _positive_int(text: str, *, what: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise BenchRefused(f"{what}: {text!r} is not a whole number") from None
    if number < 1:
        raise BenchRefused(f"{what}: {number} is less than 1")
    return number


def load_plan(
    *,
    users: int,
    duration_s: int,
    warmup_s: int,
    concurrency: str,
    scenarios: str,
    flows: str,
    configurations: Sequence[str],
    workers: int,
    max_requests: int,
    is_markdown: bool = False,
) -> LoadPlan:
    """The plan the options describe, or BenchRefused naming the bad option."""
    try:
        chosen_scenarios = tuple(Scenario(s) for s in parse_list(scenarios, what="--scenarios"))
        chosen_flows = tuple(Flow(f) for f in parse_list(flows, what="--flows"))
    except ValueError as error:
        raise BenchRefused(f"{error}; scenarios: spread, hot; flows: spend, topup, bonus") from None
    chosen = [parse_configuration(c, workers=workers) for c in configurations]
    if len({c.name for c in chosen}) != len(chosen):
        raise BenchRefused("two configurations have the same name")
    return LoadPlan(
        users=users,
        duration_s=duration_s,
        warmup_s=warmup_s,
        concurrencies=tuple(
            _positive_int(c, what="--concurrency")
            for c in parse_list(concurrency, what="--concurrency")
        ),
        scenarios=chosen_scenarios,
        flows=chosen_flows,
        configurations=tuple(chosen),
        max_requests=max_requests,
        is_markdown=is_markdown,
    )


# ---- provenance -------------------------------------------------------------------------


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


def _wrk_version(wrk: str) -> str:
    completed = subprocess.run(  # noqa: S603 (wrk found on PATH, fixed arguments)
        [wrk, "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    return (completed.stdout or completed.stderr).splitlines()[0].split(" Copyright")[0].strip()


def database_description(database: Database) -> str:
    """Backend and server version of a database that has been connected to."""
    version = database.engine.dialect.server_version_info or ()
    return f"{database.dialect} {'.'.join(str(part) for part in version)}"


def provenance(database: Database, *, argv: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """Lines that say when, where, on what and by which command a result was measured."""
    url = sa.make_url(str(database.engine.url)).render_as_string(hide_password=True)
    command = shlex.join(["wallet", *argv[1:]])
    return [
        f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"machine: {socket.gethostname()}, {os.cpu_count()} CPUs ({_cpu_model()}), "
        f"{_memory_total()} memory, {platform.system()} {platform.release()}",
        f"database: {database_description(database)} at {url}",
        f"python: {platform.python_version()}",
        *extra,
        f"command: WALLET_DATABASE_URL={shlex.quote(url)} {command}",
    ]


# ---- data -------------------------------------------------------------------------------


def bench_user(index: int) -> UserId:
    """The id of the index-th bench user; the Lua script builds the same ids."""
    return UserId(f"bench-user-{index:06d}")


async def prepare_users(database: Database, *, count: int) -> None:
    """Migrate, seed, then create `count` bench users funded with FUNDING gold (idempotent)."""
    await migrate(database)
    await seed(database)
    created_at = datetime.now(UTC)
    for start in range(0, count, USER_BATCH):
        batch = range(start, min(count, start + USER_BATCH))
        async with database.transaction(is_write=True) as connection:
            for index in batch:
                user_id = bench_user(index)
                await queries.insert_user(
                    connection,
                    user_id=user_id,
                    email=f"{user_id}@example.com",
                    name=f"Bench user {index}",
                    created_at=created_at,
                )
        commands = [
            Command(
                flow=Flow.TOPUP,
                user_id=bench_user(index),
                asset_symbol=ASSET,
                amount=FUNDING,
                idempotency_key=f"bench-fund-{index}",
            )
            for index in batch
        ]
        for outcome in await post(database, commands):
            if isinstance(outcome, WalletError):
                raise BenchRefused(f"funding the bench users failed: {outcome}")


# ---- the server -------------------------------------------------------------------------


@dataclass
class Server:
    """A `wallet serve` started for one configuration."""

    configuration: Configuration
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        with suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def worker_pids(self) -> list[int]:
        """The processes that serve requests: the workers uvicorn spawned, or itself alone."""
        if self.configuration.workers == 1:
            return [self.process.pid]
        return [
            pid
            for pid in _children(self.process.pid)
            if b"spawn_main" in _read_bytes(f"/proc/{pid}/cmdline")
        ]


def _read_bytes(path: str) -> bytes:
    with suppress(OSError):
        return Path(path).read_bytes()
    return b""


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name, which may hold spaces: state is field 0."""
    return _read_bytes(f"/proc/{pid}/stat").decode().rpartition(")")[2].split()


def _children(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(int(stat.parent.name))
        if len(fields) > 1 and int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def _cpu_times(pids: Sequence[int]) -> dict[int, float]:
    """User plus system CPU seconds each process has used so far."""
    times = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if len(fields) > 12:
            times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return times


def _cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two samples; processes that ended in between are missed."""
    return sum(used - before.get(pid, 0.0) for pid, used in after.items())


def _memory_mb(pid: int, field_name: str) -> float:
    for line in _read_bytes(f"/proc/{pid}/status").decode().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def _postgres_pids() -> list[int]:
    return [
        int(comm.parent.name)
        for comm in Path("/proc").glob("[0-9]*/comm")
        if _read_bytes(str(comm)).strip() == b"postgres"
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wallet_command() -> list[str]:
    script = Path(sys.executable).parent / "wallet"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from wallet.cli import app; app()"]


def _is_healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        connection.request("GET", HEALTH_PATH)
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


@contextmanager
def running_server(
    configuration: Configuration, *, database_url: str, workdir: Path, startup_timeout_s: float
) -> Iterator[Server]:
    """`wallet serve` on a free loopback port, healthy; stopped (SIGTERM, then SIGKILL of its
    process group after STOP_GRACE_S) whatever happens in the block."""
    port = _free_port()
    log_path = workdir / f"server-{port}.log"
    # The server inherits this environment; the run's database and the configuration win.
    environment = {
        **os.environ,
        "WALLET_DATABASE_URL": database_url,
        **configuration.environment,
    }
    command = [*_wallet_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (this package's own command)
            [*command, "--workers", str(configuration.workers)],
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its workers share its process group, to kill them if need be
        )
    server = Server(configuration, process, port, log_path)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _is_healthy(port):
            if process.poll() is not None:
                raise BenchRefused(f"the server exited at start-up:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchRefused(
                    f"the server was not healthy within {startup_timeout_s:.0f} s:\n"
                    f"{server.log_tail()}"
                )
            time.sleep(0.1)
        yield server
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ---- the load ---------------------------------------------------------------------------

LUA = Template("""-- written by `wallet bench`: one $flow per request, each with its own key
local prefix = "$prefix"
local users = $users
local is_hot = $is_hot
local threads_count = $threads
local max_per_thread = $max_per_thread
local path = "/api/v1/wallet/$flow"
local headers = {["Content-Type"] = "application/json"}
local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  sent = 0
  capped = 0
  offset = math.floor(tid * users / threads_count)
end

function request()
  if sent >= max_per_thread then
    -- the request bound: this thread stops; the duration bound ends the run
    capped = 1
    wrk.thread:stop()
  end
  sent = sent + 1
  local user = 0
  if not is_hot then
    user = (offset + sent) % users
  end
  local body = string.format(
    '{"userId":"bench-user-%06d","assetSymbol":"$asset","amount":1,"idempotencyKey":"%s-%d-%d"}',
    user, prefix, tid, sent)
  return wrk.format("POST", path, headers, body)
end

function done(summary, latency, requests)
  local capped_threads = 0
  for _, thread in ipairs(threads) do
    capped_threads = capped_threads + thread:get("capped")
  end
  local errors = summary.errors
  io.write(string.format(
    "wallet-bench requests=%d duration_us=%d p50_us=%d p95_us=%d p99_us=%d "
    .. "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d "
    .. "capped_threads=%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), errors.status, errors.connect, errors.read, errors.write,
    errors.timeout, capped_threads))
end
""")


@dataclass(frozen=True, slots=True)
class Cell:
    scenario: Scenario
    flow: Flow
    concurrency: int


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one wrk run saw, and the CPU each side used meanwhile (percent of one core)."""

    requests: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    http_errors: int  # answers of status 400 or more
    socket_errors: int  # connect, read, write errors and timeouts
    is_capped: bool
    client_cpu: float
    server_cpu: float
    database_cpu: float | None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        return self.http_errors + self.socket_errors


@dataclass
class ConfigurationResult:
    configuration: Configuration
    cells: dict[Cell, Measurement] = field(default_factory=dict)
    rss_mb: list[float] = field(default_factory=list)  # per worker, the most seen after a cell
    peak_rss_mb: list[float] = field(default_factory=list)  # per worker, VmHWM at the end


def find_wrk() -> str:
    """The wrk executable, or BenchRefused saying how to install it."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchRefused("wrk is not installed: `apt-get install wrk` (Debian's package)")
    return wrk


def run_wrk(
    wrk: str,
    server: Server,
    cell: Cell,
    *,
    users: int,
    duration_s: int,
    max_requests: int,
    prefix: str,
    workdir: Path,
    watches_postgres: bool,
) -> Measurement:
    """One wrk run of `duration_s` seconds (at most `max_requests` requests) against `server`."""
    threads = min(cell.concurrency, os.cpu_count() or 1)
    script = workdir / f"{prefix}.lua"
    script.write_text(
        LUA.substitute(
            flow=cell.flow.value,
            prefix=prefix,
            users=users,
            is_hot="true" if cell.scenario is Scenario.HOT else "false",
            threads=threads,
            max_per_thread=math.ceil(max_requests / threads),
            asset=ASSET,
        )
    )
    command = [wrk, f"-t{threads}", f"-c{cell.concurrency}", f"-d{duration_s}s", "--timeout", "10s"]
    server_before = _cpu_times([server.process.pid, *_children(server.process.pid)])
    database_before = _cpu_times(_postgres_pids() if watches_postgres else [])
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    try:
        completed = subprocess.run(  # noqa: S603 (wrk, with the script this run wrote)
            [*command, "-s", str(script), server.url],
            capture_output=True,
            text=True,
            timeout=duration_s + 60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchRefused(f"wrk did not finish within {duration_s + 60} s") from None
    wall = time.monotonic() - started
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = _cpu_used(
        server_before, _cpu_times([server.process.pid, *_children(server.process.pid)])
    )
    database_cpu = _cpu_used(
        database_before, _cpu_times(_postgres_pids() if watches_postgres else [])
    )
    client_cpu = (
        client_after.ru_utime
        - client_before.ru_utime
        + client_after.ru_stime
        - client_before.ru_stime
    )
    summary = _wrk_summary(completed.stdout)
    if completed.returncode != 0 or summary is None:
        raise BenchRefused(
            f"wrk failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
        )
    return Measurement(
        requests=summary["requests"],
        seconds=summary["duration_us"] / 1e6,
        p50_ms=summary["p50_us"] / 1000,
        p95_ms=summary["p95_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        http_errors=summary["status_errors"],
        socket_errors=sum(
            summary[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")
        ),
        is_capped=summary["capped_threads"] > 0,
        client_cpu=100 * client_cpu / wall,
        server_cpu=100 * server_cpu / wall,
        database_cpu=100 * database_cpu / wall if watches_postgres else None,
    )


def _wrk_summary(output: str) -> dict[str, int] | None:
    for line in output.splitlines():
        if line.startswith("wallet-bench "):
            pairs = (item.partition("=") for item in line.split()[1:])
            return {key: int(value) for key, _, value in pairs}
    return None


def _sample_memory(server: Server, result: ConfigurationResult) -> None:
    rss = [_memory_mb(pid, "VmRSS") for pid in server.worker_pids()]
    if len(result.rss_mb) != len(rss):
        result.rss_mb = rss
    else:
        result.rss_mb = [max(a, b) for a, b in zip(result.rss_mb, rss, strict=True)]


def run_configuration(
    configuration: Configuration,
    plan: LoadPlan,
    *,
    wrk: str,
    database_url: str,
    run_id: str,
    workdir: Path,
    watches_postgres: bool,
    console: Console,
) -> ConfigurationResult:
    """Start the server for `configuration`, warm it up, measure every cell, stop it."""
    result = ConfigurationResult(configuration)
    cells = [
        Cell(scenario, flow, concurrency)
        for scenario in plan.scenarios
        for flow in plan.flows
        for concurrency in plan.concurrencies
    ]
    with running_server(
        configuration,
        database_url=database_url,
        workdir=workdir,
        startup_timeout_s=plan.startup_timeout_s,
    ) as server:
        console.print(f"[dim]{configuration.name}: serving on {server.url}[/]")
        number = plan.configurations.index(configuration)
        if plan.warmup_s > 0:
            run_wrk(
                wrk,
                server,
                replace(cells[0], concurrency=min(16, max(plan.concurrencies))),
                users=plan.users,
                duration_s=plan.warmup_s,
                max_requests=plan.max_requests,
                prefix=f"{run_id}-{number}-warmup",
                workdir=workdir,
                watches_postgres=False,
            )
        for index, cell in enumerate(cells):
            time.sleep(PAUSE_BETWEEN_CELLS_S)
            measured = run_wrk(
                wrk,
                server,
                cell,
                users=plan.users,
                duration_s=plan.duration_s,
                max_requests=plan.max_requests,
                prefix=f"{run_id}-{number}-{index}",
                workdir=workdir,
                watches_postgres=watches_postgres,
            )
            result.cells[cell] = measured
            _sample_memory(server, result)
            console.print(
                f"[dim]{configuration.name}: {cell.scenario} {cell.flow} "
                f"c={cell.concurrency}: {measured.rate:,.0f} req/s, "
                f"p99 {measured.p99_ms:.1f} ms, {measured.errors} errors[/]"
            )
        result.peak_rss_mb = [_memory_mb(pid, "VmHWM") for pid in server.worker_pids()]
    return result


def results_table(plan: LoadPlan, results: Sequence[ConfigurationResult]) -> Table:
    """One row per configuration and cell, cells grouped so configurations sit side by side."""
    first = results[0]
    table = Table(
        title=None if plan.is_markdown else "wallet bench: requests/s and latency per cell",
        title_justify="left",
        box=box.MARKDOWN if plan.is_markdown else box.HEAVY_HEAD,
    )
    for heading in ("configuration", "scenario", "flow"):
        table.add_column(heading)
    for heading in ("clients", "requests", "req/s"):
        table.add_column(heading, justify="right")
    if len(results) > 1:
        table.add_column(f"vs {first.configuration.name}", justify="right")
    for heading in ("p50 ms", "p95 ms", "p99 ms", "errors", "wrk CPU%", "server CPU%", "db CPU%"):
        table.add_column(heading, justify="right")
    for cell in first.cells:
        for result in results:
            measured = result.cells[cell]
            rate = f"{measured.rate:,.0f}" + (" (capped)" if measured.is_capped else "")
            ratio = []
            if len(results) > 1:
                baseline = first.cells[cell].rate
                is_first = result is first
                ratio = ["" if is_first or not baseline else f"{measured.rate / baseline:.2f}×"]
            errors = str(measured.errors) if not measured.errors else f"[red]{measured.errors}[/]"
            database_cpu = "–" if measured.database_cpu is None else f"{measured.database_cpu:.0f}"
            table.add_row(
                result.configuration.name,
                cell.scenario.value,
                cell.flow.value,
                str(cell.concurrency),
                f"{measured.requests:,}",
                rate,
                *ratio,
                f"{measured.p50_ms:.1f}",
                f"{measured.p95_ms:.1f}",
                f"{measured.p99_ms:.1f}",
                errors,
                f"{measured.client_cpu:.0f}",
                f"{measured.server_cpu:.0f}",
                database_cpu,
            )
        if not plan.is_markdown:
            table.add_section()
    return table


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


def _with_long_timeout(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"database_timeout_s": max(settings.database_timeout_s, LONG_TIMEOUT_S)}
    )


def _is_local_postgres(database: Database) -> bool:
    host = database.engine.url.host
    return database.dialect == "postgresql" and host in (None, "", "127.0.0.1", "localhost", "::1")


def benchmark(settings: Settings, plan: LoadPlan, *, argv: Sequence[str], console: Console) -> int:
    """Seed, measure every configuration, verify; the exit code (1: errors or a failed verify)."""
    wrk = find_wrk()
    database = Database(create_engine(_with_long_timeout(settings)))
    asyncio.run(_run_on(database, prepare_users(database, count=plan.users)))
    lines = provenance(
        database,
        argv=argv,
        extra=[
            f"client: {_wrk_version(wrk)}, on this machine, over loopback; "
            f"{plan.duration_s} s per cell after a {plan.warmup_s} s warm-up, "
            f"at most {plan.max_requests:,} requests per cell",
            f"data: {plan.users:,} bench users funded with {FUNDING:,} {ASSET}; "
            "spread = round-robin over them, hot = all on one user; amount 1 per request",
            *(f"server: {c.describe()}" for c in plan.configurations),
            "CPU columns: percent of one core; wrk by getrusage, the server and PostgreSQL "
            "(on this machine) from /proc, missing backends that exit during a cell",
        ],
    )
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    watches_postgres = _is_local_postgres(database)
    results = []
    with tempfile.TemporaryDirectory(prefix="wallet-bench-") as workdir:
        for configuration in plan.configurations:
            results.append(
                run_configuration(
                    configuration,
                    plan,
                    wrk=wrk,
                    database_url=settings.database_url,
                    run_id=run_id,
                    workdir=Path(workdir),
                    watches_postgres=watches_postgres,
                    console=console,
                )
            )
    console.print(results_table(plan, results))
    for result in results:
        rss = ", ".join(f"{mb:.0f}" for mb in result.rss_mb)
        peak = ", ".join(f"{mb:.0f}" for mb in result.peak_rss_mb)
        console.print(
            f"worker RSS, {result.configuration.name}: {rss} MB (most seen after a cell), "
            f"peak {peak} MB (VmHWM)",
            highlight=False,
        )
    errors = sum(m.errors for r in results for m in r.cells.values())
    database = Database(create_engine(_with_long_timeout(settings)))
    is_verified = asyncio.run(_run_on(database, _verify_and_show(database, console)))
    if errors:
        console.print(f"[red]{errors} requests failed[/] (status 400 or more, or socket errors)")
    return 0 if is_verified and not errors else 1


async def _run_on(database: Database, work: Awaitable[T]) -> T:
    try:
        return await work
    finally:
        await database.close()


# ---- --populate -------------------------------------------------------------------------

ASSETS = ("GOLD_COINS", "LOYALTY_POINTS", "DIAMONDS")
SYSTEM = (SystemAccount.TREASURY, SystemAccount.BONUS_POOL, SystemAccount.REVENUE)
HEAVY_SHARE = 100  # one transaction in this many is the heavy user's: a long history to page
STRIDES = (1_000_003, 999_983, 7_919)  # primes: k * stride mod users visits every user in turn
CHUNK_TRANSACTIONS = 25_000
CHUNK_USERS = 50_000
COPY_TIMEOUT_S = 600.0
NO_ROW = -1  # in the user balance array: the user never held the asset
TIMED_READS = 50
TRANSACTION_COLUMNS = (
    "id",
    "type",
    "user_id",
    "asset_symbol",
    "amount",
    "balance_after",
    "idempotency_key",
    "request_fingerprint",
    "created_at",
)
ENTRY_COLUMNS = (
    "id",
    "transaction_id",
    "account_id",
    "asset_symbol",
    "direction",
    "amount",
    "balance_after",
    "created_at",
)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

Row = tuple[Any, ...]


def _uuid7(moment_us: int, tag: int, number: int) -> str:
    """A UUIDv7 string whose time is `moment_us` and whose random bits are `tag` and `number`."""
    ms = moment_us // 1000
    return (
        f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{tag & 0xFFF:03x}-"
        f"{0x8000 | (number >> 48) & 0x3FFF:04x}-{number & 0xFFFFFFFFFFFF:012x}"
    )


@dataclass(frozen=True, slots=True)
class Chunk:
    keys: list[Row]
    transactions: list[Row]
    entries: list[Row]


class LedgerGenerator:
    """Makes transactions that keep every invariant: users never go below zero, and every
    balanceAfter continues its account's chain. Memory: one int64 per user and asset."""

    def __init__(
        self,
        *,
        users: int,
        tag: str,
        first_us: int,
        system_balances: dict[tuple[str, str], int],
    ) -> None:
        self.users = users
        self.tag = tag
        self.tag_bits = int(tag, 16)
        self.first_us = first_us
        self.stride = next(p for p in STRIDES if users % p)
        self.rng = random.Random(int(tag, 16))
        self.user_balances = array("q", [NO_ROW]) * (users * len(ASSETS))
        self.system_balances = dict(system_balances)
        self.made = 0

    def user_id(self, index: int) -> str:
        return f"pop-{self.tag}-{index:07d}"

    def user_of(self, number: int) -> int:
        """The user of the number-th transaction: the heavy user (0), or the next in stride."""
        return 0 if number % HEAVY_SHARE == 0 else number * self.stride % self.users

    def chunk(self, count: int) -> Chunk:
        """The next `count` transactions, with their keys and entries."""
        keys: list[Row] = []
        transactions: list[Row] = []
        entries: list[Row] = []
        rng = self.rng
        balances = self.user_balances
        system = self.system_balances
        for number in range(self.made, self.made + count):
            user = self.user_of(number)
            draw = rng.random()
            asset_index = 0 if draw < 0.6 else 1 if draw < 0.85 else 2
            asset = ASSETS[asset_index]
            slot = user * len(ASSETS) + asset_index
            held = max(balances[slot], 0)
            draw = rng.random()
            size = rng.random()
            if draw < 0.45 and held > 0:
                flow, amount = Flow.SPEND, 1 + int(size * min(held, 500))
            elif draw < 0.85:
                flow, amount = Flow.TOPUP, 1 + int(size * 1000)
            else:
                flow, amount = Flow.BONUS, 1 + int(size * 100)
            user_id = self.user_id(user)
            if flow is Flow.SPEND:
                debited, credited = user_id, str(SystemAccount.REVENUE)
                user_after = held - amount
                system[(credited, asset)] += amount
                debited_after, credited_after = user_after, system[(credited, asset)]
            else:
                debited = str(
                    SystemAccount.TREASURY if flow is Flow.TOPUP else SystemAccount.BONUS_POOL
                )
                credited = user_id
                user_after = held + amount
                system[(debited, asset)] -= amount
                debited_after, credited_after = system[(debited, asset)], user_after
            balances[slot] = user_after
            moment_us = self.first_us + number
            created_at = EPOCH + timedelta(microseconds=moment_us)
            transaction_id = _uuid7(moment_us, self.tag_bits, number)
            key = f"populate-{self.tag}-{number}"
            fingerprint = Command(
                flow=flow,
                user_id=UserId(user_id),
                asset_symbol=asset,
                amount=amount,
                idempotency_key=key,
            ).fingerprint()
            keys.append((key,))
            transactions.append(
                (
                    transaction_id,
                    flow.value,
                    user_id,
                    asset,
                    amount,
                    user_after,
                    key,
                    fingerprint,
                    created_at,
                )
            )
            debit_id = _uuid7(moment_us, self.tag_bits, 2 * number)
            credit_id = _uuid7(moment_us, self.tag_bits, 2 * number + 1)
            entries.append(
                (
                    debit_id,
                    transaction_id,
                    debited,
                    asset,
                    "debit",
                    amount,
                    debited_after,
                    created_at,
                )
            )
            entries.append(
                (
                    credit_id,
                    transaction_id,
                    credited,
                    asset,
                    "credit",
                    amount,
                    credited_after,
                    created_at,
                )
            )
        self.made += count
        return Chunk(keys, transactions, entries)

    def user_balance_rows(self, start: int, stop: int) -> list[Row]:
        """Balance rows of users start..stop-1 for every asset they ever held."""
        rows = []
        for user in range(start, stop):
            for asset_index, asset in enumerate(ASSETS):
                held = self.user_balances[user * len(ASSETS) + asset_index]
                if held != NO_ROW:
                    rows.append((self.user_id(user), asset, held))
        return rows


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


async def _scalar(connection: Any, sql: str) -> Any:
    return (await connection.execute(sa.text(sql))).scalar()


def _refuse_sqlite(database: Database) -> None:
    if database.dialect != "postgresql":
        raise BenchRefused(
            "--populate loads PostgreSQL only: point WALLET_DATABASE_URL at a scratch "
            "PostgreSQL database (postgresql+asyncpg://...)"
        )


async def _refuse_unless_scratch(database: Database, plan: PopulatePlan) -> None:
    async with database.transaction(is_write=False) as connection:
        users = await _scalar(connection, "SELECT count(*) FROM accounts WHERE NOT is_system")
        transactions = await _scalar(connection, "SELECT count(*) FROM transactions")
    if (users > SEED_USERS or transactions > SEED_TRANSACTIONS) and not plan.is_forced:
        raise BenchRefused(
            f"the database already holds {users:,} users and {transactions:,} transactions, "
            "more than the seed data: --populate wants a scratch database "
            "(or --force to add to this one)"
        )


async def populate(database: Database, plan: PopulatePlan, *, console: Console) -> tuple[str, str]:
    """Load plan.users users and plan.entries entries in one transaction, then VACUUM ANALYZE;
    the ids of the heavy user and of a typical one."""
    transactions_total = plan.entries // 2
    tag = uuid.uuid4().hex[:4]
    started = time.monotonic()
    async with database.transaction(is_write=True) as connection:
        # Writers wait until the load commits, so the system balances read here stay true.
        await connection.execute(
            sa.text(
                "LOCK TABLE accounts, balances, idempotency_keys, transactions, entries "
                "IN EXCLUSIVE MODE"
            )
        )
        rows = await connection.execute(
            sa.text(
                "SELECT account_id, asset_symbol, balance FROM balances "
                "WHERE account_id = ANY(:ids)"
            ),
            {"ids": [str(s) for s in SYSTEM]},
        )
        system_balances = {(str(s), a): 0 for s in SYSTEM for a in ASSETS}
        system_balances.update({(r.account_id, r.asset_symbol): r.balance for r in rows})
        latest = await _scalar(
            connection,
            "SELECT greatest((SELECT max(created_at) FROM accounts), "
            "(SELECT max(created_at) FROM transactions))",
        )
        span_us = plan.users + transactions_total + 1000
        now_us = (datetime.now(UTC) - EPOCH) // timedelta(microseconds=1)
        latest_us = (latest - EPOCH) // timedelta(microseconds=1) if latest else 0
        first_us = max(now_us - span_us, latest_us + 1000)
        generator = LedgerGenerator(
            users=plan.users,
            tag=tag,
            first_us=first_us + plan.users + 1000,
            system_balances=system_balances,
        )
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None

        async def copy(table: str, records: list[Row], columns: Sequence[str]) -> None:
            await raw.copy_records_to_table(
                table, records=records, columns=list(columns), timeout=COPY_TIMEOUT_S
            )

        with _progress(console) as progress:
            users_task = progress.add_task("users", total=plan.users)
            for start in range(0, plan.users, CHUNK_USERS):
                stop = min(plan.users, start + CHUNK_USERS)
                await copy(
                    "accounts",
                    [
                        (
                            generator.user_id(i),
                            False,
                            f"{generator.user_id(i)}@example.com",
                            f"Populated user {i}",
                            EPOCH + timedelta(microseconds=first_us + i),
                        )
                        for i in range(start, stop)
                    ],
                    ("id", "is_system", "email", "name", "created_at"),
                )
                progress.update(users_task, completed=stop)
            entries_task = progress.add_task("ledger entries", total=2 * transactions_total)
            while generator.made < transactions_total:
                chunk = generator.chunk(
                    min(CHUNK_TRANSACTIONS, transactions_total - generator.made)
                )
                await copy("idempotency_keys", chunk.keys, ("key",))
                await copy("transactions", chunk.transactions, TRANSACTION_COLUMNS)
                await copy("entries", chunk.entries, ENTRY_COLUMNS)
                progress.update(entries_task, completed=2 * generator.made)
            balances_task = progress.add_task("user balances", total=plan.users)
            for start in range(0, plan.users, CHUNK_USERS):
                stop = min(plan.users, start + CHUNK_USERS)
                await copy(
                    "balances",
                    generator.user_balance_rows(start, stop),
                    ("account_id", "asset_symbol", "balance"),
                )
                progress.update(balances_task, completed=stop)
        changed = [
            {"account": account, "asset": asset, "balance": balance}
            for (account, asset), balance in generator.system_balances.items()
            if balance != system_balances[(account, asset)]
        ]
        if changed:
            await connection.execute(
                sa.text(
                    "INSERT INTO balances (account_id, asset_symbol, balance) "
                    "VALUES (:account, :asset, :balance) ON CONFLICT (account_id, asset_symbol) "
                    "DO UPDATE SET balance = excluded.balance"
                ),
                changed,
            )
    loaded = time.monotonic() - started
    console.print(
        f"loaded {plan.users:,} users, {transactions_total:,} transactions and "
        f"{2 * transactions_total:,} entries in {loaded:.1f} s "
        f"({2 * transactions_total / loaded:,.0f} entries/s), one transaction",
        highlight=False,
    )
    started = time.monotonic()
    async with database.engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(
            sa.text("VACUUM (ANALYZE) accounts, balances, idempotency_keys, transactions, entries")
        )
    console.print(f"VACUUM (ANALYZE) took {time.monotonic() - started:.1f} s", highlight=False)
    return generator.user_id(0), generator.user_id(generator.user_of(1))


@dataclass(frozen=True, slots=True)
class Read:
    """One read the API serves, as the service runs it."""

    name: str
    run: Callable[[Wallet, str], Awaitable[object]]


READS = (
    Read(
        "balance (GET /wallet/balance/{user}/GOLD_COINS)",
        lambda wallet, user: wallet.balance(user_id=user, asset_symbol=ASSET),
    ),
    Read(
        "history, first page of 50 (GET /wallet/transactions/{user})",
        lambda wallet, user: wallet.history(
            user_id=user, flow=None, asset_symbol=None, page=PageRequest()
        ),
    ),
    Read(
        "ledger, first page of 50 (GET /wallet/ledger/{user})",
        lambda wallet, user: wallet.ledger(user_id=user, asset_symbol=None, page=PageRequest()),
    ),
)


async def time_reads(database: Database, users: Sequence[tuple[str, str]]) -> Table:
    """Median and p95 of TIMED_READS runs of each read for each (label, user id)."""
    wallet = Wallet(database)
    table = Table("read", "user", "median ms", "p95 ms", title=f"reads, {TIMED_READS} runs each")
    for read in READS:
        for label, user in users:
            await read.run(wallet, user)  # warm the pool and the cache
            took = []
            for _ in range(TIMED_READS):
                started = time.perf_counter()
                await read.run(wallet, user)
                took.append((time.perf_counter() - started) * 1000)
            p95 = statistics.quantiles(took, n=20)[-1]
            table.add_row(read.name, label, f"{statistics.median(took):.2f}", f"{p95:.2f}")
    return table


async def explain_reads(database: Database, user: str, *, console: Console) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of every distinct statement the reads run for `user`."""
    statements: dict[str, Any] = {}

    def capture(*args: Any) -> None:
        _connection, _cursor, statement, parameters = args[:4]
        statements.setdefault(statement, parameters)

    wallet = Wallet(database)
    event.listen(database.engine.sync_engine, "before_cursor_execute", capture)
    try:
        for read in READS:
            await read.run(wallet, user)
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", capture)
    async with database.transaction(is_write=False) as connection:
        raw = (await connection.get_raw_connection()).driver_connection
        assert raw is not None
        for statement, parameters in statements.items():
            if not statement.lstrip().upper().startswith("SELECT"):
                continue
            plan = await raw.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + statement, *(parameters or ()), timeout=60
            )
            console.print(
                f"\n{statement}\nparameters: {list(parameters or ())}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            console.print(
                "\n".join(row[0] for row in plan), markup=False, highlight=False, soft_wrap=True
            )


async def table_sizes(database: Database) -> Table:
    """Rows (estimated after ANALYZE) and size with indexes of each ledger table."""
    table = Table("table", "rows", "size with indexes", title="tables")
    async with database.transaction(is_write=False) as connection:
        for name in ("accounts", "balances", "transactions", "entries"):
            row = (
                await connection.execute(
                    sa.text(
                        "SELECT reltuples::bigint, "
                        "pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class "
                        "WHERE oid = CAST(:name AS regclass)"
                    ),
                    {"name": name},
                )
            ).one()
            table.add_row(name, f"{row[0]:,}", row[1])
    return table


def populate_command(
    settings: Settings, plan: PopulatePlan, *, argv: Sequence[str], console: Console
) -> int:
    """`wallet bench --populate`: load, then show the plans and timings of the API's reads."""
    database = Database(create_engine(_with_long_timeout(settings)))

    _refuse_sqlite(database)

    async def work() -> None:
        await migrate(database)
        await seed(database)
        await _refuse_unless_scratch(database, plan)
        for line in provenance(database, argv=argv):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        alice = str(ALICE)
        console.print(await time_reads(database, [("seed data only: Alice", alice)]))
        heavy, typical = await populate(database, plan, console=console)
        console.print(await table_sizes(database))
        console.print(
            await time_reads(
                database,
                [("heavy user", heavy), ("typical user", typical), ("Alice", alice)],
            )
        )
        console.print(f"\nplans for the heavy user {heavy}:")
        await explain_reads(database, heavy, console=console)

    asyncio.run(_run_on(database, work()))
    return 0


def run(
    settings: Settings,
    *,
    plan: LoadPlan | PopulatePlan,
    argv: Sequence[str],
    console: Console,
) -> int:
    """The `wallet bench` command: its exit code; a refusal is printed, with exit code 2."""
    if not console.is_terminal:
        console = Console(width=MACHINE_WIDTH)
    try:
        if isinstance(plan, PopulatePlan):
            return populate_command(settings, plan, argv=argv, console=console)
        return benchmark(settings, plan, argv=argv, console=console)
    except BenchRefused as refusal:
        console.print(
            f"wallet bench: {refusal}", style="red", markup=False, highlight=False, soft_wrap=True
        )
        return 2
