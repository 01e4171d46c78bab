"""`wallet bench`: load from outside the server, measured. The command starts `wallet serve` itself
for each configuration compared, drives it over loopback with wrk (bounded in seconds and in
requests), prints one table with its provenance, and ends by verifying the ledger. With
`--populate` it bulk-loads a large, consistent ledger instead and shows that reads stay indexed."""

import asyncio
import http.client
import math
import os
import platform
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
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from string import Template
from typing import TypeVar

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from wallet.domain.access import KEY_PATTERN, Scope
from wallet.domain.ledger import Flow
from wallet.service.access import Access
from wallet.service.audit import Check, verify
from wallet.service.populate import (
    ASSET,
    EXPIRES_IN_DAYS,
    EXPIRING_ASSET,
    EXPIRING_LOTS,
    FUNDING,
    OnProgress,
    PopulateRefused,
    explain_reads,
    load_ledger,
    prepare_scratch,
    prepare_users,
    table_sizes,
    vacuum_analyze,
)
from wallet.service.seed import ALICE
from wallet.service.wallet import PageRequest, Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

HEALTH_PATH = "/api/v1/health"
LONG_TIMEOUT_S = 3600.0  # bulk loads, VACUUM and verify on 10M entries outlast the API's timeout
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
PAUSE_BETWEEN_CELLS_S = 0.5  # lets the batches of the last cell's unanswered requests drain
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MACHINE_WIDTH = 200  # a table for docs is not wrapped to an 80-column pipe
TIMED_READS = 50
# The load's API key: rate limiting stays on, as in production (each request pays for its
# check), with a budget so large it never refuses one; 0 would mean unlimited and skip the check.
LOAD_KEY_BUDGET_PER_S = 1_000_000
# The three flows, and the mixed load's transfers, holds and captures (debit), no more.
LOAD_KEY_SCOPES = frozenset({Scope.WALLET_CREDIT, Scope.WALLET_DEBIT})
T = TypeVar("T")


class BenchRefused(Exception):
    """A run that cannot start or cannot go on; the message says why and what to do."""


class Scenario(StrEnum):
    SPREAD = "spread"  # round-robin over every bench user: only the system account is hot
    HOT = "hot"  # every request on one user: the user's row is hot too


class Mix(StrEnum):
    """A load of several kinds of request in one cell, driven beside the single flows."""

    MIXED = "mixed"  # spend, transfer, hold, and capture of a hold the same wrk thread made


class Variant(StrEnum):
    """A single flow on other credits than its plain flow's, measured beside it: the table shows
    its rate over the plain flow's."""

    SPEND_EXPIRING = "spend-expiring"  # spends of free credits in lots: each takes from a lot

    @property
    def plain(self) -> Flow:
        return Flow.SPEND


Load = Flow | Mix | Variant
# What --flows accepts: a single flow (every request posts it), a variant of one, or a mix.
LOADS: dict[str, Load] = {
    load.value: load
    for load in (Flow.SPEND, Flow.TOPUP, Flow.BONUS, Mix.MIXED, Variant.SPEND_EXPIRING)
}
MIX_KINDS = ("spend", "transfer", "hold", "capture")  # what a mixed cell counts, per kind


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

    users: int
    duration_s: int
    warmup_s: int
    concurrencies: tuple[int, ...]
    scenarios: tuple[Scenario, ...]
    flows: tuple[Load, ...]
    configurations: tuple[Configuration, ...]
    max_requests: int
    is_markdown: bool  # print the table as Markdown, to paste into docs


@dataclass(frozen=True, slots=True)
class PopulatePlan:
    """What `wallet bench --populate` loads."""

    users: int
    entries: int
    is_forced: bool


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


def _load(name: str) -> Load:
    if name not in LOADS:
        raise ValueError(f"{name!r} is not a flow the bench drives")
    return LOADS[name]


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
    is_markdown: bool,
) -> LoadPlan:
    """The plan the options describe, or BenchRefused naming the bad option."""
    try:
        chosen_scenarios = tuple(Scenario(s) for s in parse_list(scenarios, what="--scenarios"))
        chosen_flows = tuple(_load(f) for f in parse_list(flows, what="--flows"))
    except ValueError as error:
        choices = ", ".join(LOADS)
        raise BenchRefused(f"{error}; scenarios: spread, hot; flows: {choices}") from None
    if Mix.MIXED in chosen_flows and users < 2:
        raise BenchRefused("--flows mixed transfers between two users: give --users 2 or more")
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

    def pids(self) -> list[int]:
        """The server and every process it started."""
        return [self.process.pid, *_children(self.process.pid)]

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
    configuration: Configuration, *, database_url: str, workdir: Path
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
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _is_healthy(port):
            if process.poll() is not None:
                raise BenchRefused(f"the server exited at start-up:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchRefused(
                    f"the server was not healthy within {STARTUP_TIMEOUT_S:.0f} s:\n"
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

# The load's Lua script: a common head and tail around a `request` of each kind of load.
LUA_HEAD = """-- written by `wallet bench`: $what, each request with its own key
local prefix = "$prefix"
local users = $users
local is_hot = $is_hot
local threads_count = $threads
local max_per_thread = $max_per_thread
local headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer $api_key"}
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

-- The next request's number in this thread and its user.
local function next_request()
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
  return sent, user
end
"""
LUA_FLOW = """
local path = "/api/v1/wallet/$flow"

function request()
  local number, user = next_request()
  local body = string.format(
    '{"userId":"bench-user-%06d","assetSymbol":"$asset","amount":1,"idempotencyKey":"%s-%d-%d"}',
    user, prefix, tid, number)
  return wrk.format("POST", path, headers, body)
end
"""
# wrk tells `request` nothing of the connection it writes to, so a thread's connections share
# one queue of hold ids: each hold's id goes in when its answer is read, and the thread's next
# request, on whichever connection, captures it. Otherwise the thread goes round spend,
# transfer, hold; so about a quarter of the requests are of each kind.
LUA_MIXED = """
local round = {"spend", "transfer", "hold"}
local answered = {}  -- ids of holds answered and not yet captured, oldest first
local oldest, newest = 1, 0
local turn = 0
count_spend, count_transfer, count_hold, count_capture = 0, 0, 0, 0

function request()
  local number, user = next_request()
  local key = string.format("%s-%d-%d", prefix, tid, number)
  if oldest <= newest then
    local hold = answered[oldest]
    answered[oldest] = nil
    oldest = oldest + 1
    count_capture = count_capture + 1
    return wrk.format("POST", "/api/v1/wallet/holds/" .. hold .. "/capture", headers,
      string.format('{"idempotencyKey":"%s"}', key))
  end
  turn = turn % #round + 1
  local kind = round[turn]
  if kind == "transfer" then
    count_transfer = count_transfer + 1
    -- spread: to the next user; hot: between the first two, each way in turn
    local from, to = user, (user + 1) % users
    if is_hot then
      from = count_transfer % 2
      to = 1 - from
    end
    return wrk.format("POST", "/api/v1/wallet/transfer", headers, string.format(
      '{"fromUserId":"bench-user-%06d","toUserId":"bench-user-%06d","assetSymbol":"$asset",'
      .. '"amount":1,"idempotencyKey":"%s"}', from, to, key))
  end
  local body = string.format(
    '{"userId":"bench-user-%06d","assetSymbol":"$asset","amount":1,"idempotencyKey":"%s"}',
    user, key)
  if kind == "hold" then
    count_hold = count_hold + 1
    return wrk.format("POST", "/api/v1/wallet/holds", headers, body)
  end
  count_spend = count_spend + 1
  return wrk.format("POST", "/api/v1/wallet/spend", headers, body)
end

function response(status, _, body)
  -- a new hold's body begins with its id; a capture's begins with "hold", a transaction's
  -- with "transactionId"
  local hold = status == 201 and body:match('^{"holdId":"([^"]+)"')
  if hold then
    newest = newest + 1
    answered[newest] = hold
  end
end
"""
LUA_DONE = """
function done(summary, latency, requests)
  local capped_threads = 0
  for _, thread in ipairs(threads) do
    capped_threads = capped_threads + thread:get("capped")
  end
  local counts = ""  -- requests of each kind, in a mixed load
  for _, kind in ipairs({$counted}) do
    local count = 0
    for _, thread in ipairs(threads) do
      count = count + thread:get("count_" .. kind)
    end
    counts = counts .. string.format(" %s=%d", kind, count)
  end
  local errors = summary.errors
  io.write(string.format(
    "wallet-bench requests=%d duration_us=%d p50_us=%d p95_us=%d p99_us=%d "
    .. "status_errors=%d connect_errors=%d read_errors=%d write_errors=%d timeouts=%d "
    .. "capped_threads=%d%s\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), errors.status, errors.connect, errors.read, errors.write,
    errors.timeout, capped_threads, counts))
end
"""
FLOW_LUA = Template(LUA_HEAD + LUA_FLOW + LUA_DONE)
MIXED_LUA = Template(LUA_HEAD + LUA_MIXED + LUA_DONE)


@dataclass(frozen=True, slots=True)
class Cell:
    scenario: Scenario
    flow: Load
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
    kinds: dict[str, int] = field(default_factory=dict)  # a mix's requests made, per kind

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
    api_key: str,
    workdir: Path,
    watches_postgres: bool,
) -> Measurement:
    """One wrk run of `duration_s` seconds (at most `max_requests` requests) against `server`,
    each request sending `api_key`."""
    if KEY_PATTERN.fullmatch(api_key) is None:  # it goes into a Lua string literal as it is
        raise BenchRefused("the load's API key is not one the service issues")
    threads = min(cell.concurrency, os.cpu_count() or 1)
    script = workdir / f"{prefix}.lua"
    is_mixed = cell.flow is Mix.MIXED
    flow, asset = (
        (cell.flow.plain, EXPIRING_ASSET) if isinstance(cell.flow, Variant) else (cell.flow, ASSET)
    )
    script.write_text(
        (MIXED_LUA if is_mixed else FLOW_LUA).substitute(
            what=f"a mix of {', '.join(MIX_KINDS)}" if is_mixed else f"one {cell.flow} per request",
            api_key=api_key,
            flow=flow.value,
            prefix=prefix,
            users=users,
            is_hot="true" if cell.scenario is Scenario.HOT else "false",
            threads=threads,
            max_per_thread=math.ceil(max_requests / threads),
            asset=asset,
            counted=", ".join(f'"{kind}"' for kind in MIX_KINDS) if is_mixed else "",
        )
    )
    command = [wrk, f"-t{threads}", f"-c{cell.concurrency}", f"-d{duration_s}s", "--timeout", "10s"]
    server_before = _cpu_times(server.pids())
    database_before = _cpu_times(_postgres_pids()) if watches_postgres else None
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
    server_cpu = _cpu_used(server_before, _cpu_times(server.pids()))
    database_cpu = (
        None
        if database_before is None
        else _cpu_used(database_before, _cpu_times(_postgres_pids()))
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
        database_cpu=None if database_cpu is None else 100 * database_cpu / wall,
        kinds={kind: summary[kind] for kind in MIX_KINDS if kind in summary},
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
    api_key: str,
    workdir: Path,
    watches_postgres: bool,
    console: Console,
) -> ConfigurationResult:
    """Start the server for `configuration`, warm it up, measure every cell, stop it."""
    result = ConfigurationResult(configuration)
    # The flows of one concurrency run one after the other (and sit together in the table), so
    # a variant and its plain flow meet the machine in the same state.
    cells = [
        Cell(scenario, flow, concurrency)
        for scenario in plan.scenarios
        for concurrency in plan.concurrencies
        for flow in plan.flows
    ]
    with running_server(configuration, database_url=database_url, workdir=workdir) as server:
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
                api_key=api_key,
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
                api_key=api_key,
                workdir=workdir,
                watches_postgres=watches_postgres,
            )
            result.cells[cell] = measured
            _sample_memory(server, result)
            mix = ", ".join(f"{kind} {count:,}" for kind, count in measured.kinds.items())
            console.print(
                f"[dim]{configuration.name}: {cell.scenario} {cell.flow} "
                f"c={cell.concurrency}: {measured.rate:,.0f} req/s, "
                f"p99 {measured.p99_ms:.1f} ms, {measured.errors} errors"
                + (f" (made: {mix})" if mix else "")
                + "[/]"
            )
        result.peak_rss_mb = [_memory_mb(pid, "VmHWM") for pid in server.worker_pids()]
    return result


def results_table(plan: LoadPlan, results: Sequence[ConfigurationResult]) -> Table:
    """One row per configuration and cell, cells grouped so configurations sit side by side; a
    variant's rows also show its rate over its plain flow's, when the plan has both."""
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
    if len(results) > 1:
        table.add_column(f"vs {first.configuration.name}", justify="right")
    if plains:
        table.add_column(f"vs {'/'.join(plains)}", justify="right")
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


def benchmark(settings: Settings, plan: LoadPlan, *, argv: Sequence[str], console: Console) -> int:
    """Seed, make the load's API key, measure every configuration, revoke the key, verify; the
    exit code (1: errors or a failed verify)."""
    wrk = find_wrk()
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    # One engine throughout (each asyncio.run closes its pool): the provenance names the server
    # version the first connection learnt.
    database = Database(create_engine(_with_long_timeout(settings)))
    funds_expiring = Variant.SPEND_EXPIRING in plan.flows
    asyncio.run(
        _run_on(
            database,
            prepare_users(database, count=plan.users, funds_expiring=funds_expiring),
        )
    )
    key_id, api_key = asyncio.run(_run_on(database, _create_load_key(database, run_id=run_id)))
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
        asyncio.run(_run_on(database, _revoke_load_key(database, key_id)))
    errors = sum(m.errors for r in results for m in r.cells.values())
    database = Database(create_engine(_with_long_timeout(settings)))
    is_verified = asyncio.run(_run_on(database, _verify_and_show(database, console)))
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
    """Print the provenance, run every configuration (its servers on `database_url`, the
    URL of `database`), print the results."""
    lines = provenance(
        database,
        argv=argv,
        extra=[
            f"client: {_wrk_version(wrk)}, on this machine, over loopback; "
            f"{plan.duration_s} s per cell after a {plan.warmup_s} s warm-up, "
            f"at most {plan.max_requests:,} requests per cell",
            f"data: {plan.users:,} bench users funded with {FUNDING:,} {ASSET} (paid credits, "
            "no lots); spread = round-robin over them, hot = all on one user; amount 1 per request",
            *(
                [
                    f"spend-expiring: spends of {EXPIRING_ASSET}, which each bench user holds as "
                    f"free credits only: {EXPIRING_LOTS} bonuses of {FUNDING:,} expiring in "
                    f"{EXPIRES_IN_DAYS - EXPIRING_LOTS + 1}-{EXPIRES_IN_DAYS} days, one lot each, "
                    "so each spend takes from a lot; spend takes paid credits, from no lot"
                ]
                if Variant.SPEND_EXPIRING in plan.flows
                else []
            ),
            *(
                [
                    "mixed: each wrk thread captures each hold it made as soon as the hold's "
                    "answer is read, and otherwise goes round spend, transfer, hold; transfers "
                    "go to the next user (spread) or between the first two, each way in turn "
                    "(hot)"
                ]
                if Mix.MIXED in plan.flows
                else []
            ),
            *(f"server: {c.describe()}" for c in plan.configurations),
            f"auth: one API key made for the run ({' '.join(sorted(LOAD_KEY_SCOPES))}), "
            f"budgets {LOAD_KEY_BUDGET_PER_S:,}/s of reads and of writes: rate limiting on, "
            "never refusing; revoked at the end",
            "CPU columns: percent of one core; wrk by getrusage, the server and PostgreSQL "
            "(on this machine) from /proc, missing backends that exit during a cell",
        ],
    )
    for line in lines:
        _print_as_is(console, line)
    watches_postgres = _is_local_postgres(database)
    results = []
    with tempfile.TemporaryDirectory(prefix="wallet-bench-") as workdir:
        for configuration in plan.configurations:
            results.append(
                run_configuration(
                    configuration,
                    plan,
                    wrk=wrk,
                    database_url=database_url,
                    run_id=run_id,
                    api_key=api_key,
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
    return results


async def _run_on(database: Database, work: Awaitable[T]) -> T:
    try:
        return await work
    finally:
        await database.close()


# ---- --populate -------------------------------------------------------------------------


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
    Read(
        # The newest entry at or before `at` is one index descent, wherever `at` falls.
        "every balance at a time (GET /wallet/balances/{user}?at=)",
        lambda wallet, user: wallet.balances_at(user_id=user, at=datetime.now(UTC)),
    ),
    Read(
        # Outstanding: three index descents; the period: every transaction of the asset so far.
        "liabilities of GOLD_COINS, whole history (GET /reports/liabilities)",
        lambda wallet, _: wallet.liabilities(asset_symbol=ASSET, at=None, since=None, until=None),
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


async def show_plans(database: Database, user: str, *, console: Console) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of every distinct statement the reads run for `user`."""
    wallet = Wallet(database)

    async def reads() -> None:
        for read in READS:
            await read.run(wallet, user)

    for explained in await explain_reads(database, reads):
        _print_as_is(console, f"\n{explained.statement}\nparameters: {explained.parameters}")
        _print_as_is(console, "\n".join(explained.lines))


def populate_command(
    settings: Settings, plan: PopulatePlan, *, argv: Sequence[str], console: Console
) -> int:
    """`wallet bench --populate`: load, then show the plans and timings of the API's reads."""
    database = Database(create_engine(_with_long_timeout(settings)))

    async def work() -> None:
        await prepare_scratch(database, is_forced=plan.is_forced)
        for line in provenance(database, argv=argv):
            _print_as_is(console, line)
        alice = str(ALICE)
        console.print(await time_reads(database, [("seed data only: Alice", alice)]))
        with _progress_bars(console) as show:
            loaded = await load_ledger(
                database, users=plan.users, entries=plan.entries, on_progress=show
            )
        console.print(
            f"loaded {loaded.users:,} users, {loaded.transactions:,} transactions and "
            f"{loaded.entries:,} entries in {loaded.seconds:.1f} s "
            f"({loaded.entries / loaded.seconds:,.0f} entries/s), one transaction",
            highlight=False,
        )
        started = time.monotonic()
        await vacuum_analyze(database)
        console.print(f"VACUUM (ANALYZE) took {time.monotonic() - started:.1f} s", highlight=False)
        sizes = Table("table", "rows", "size with indexes", title="tables")
        for size in await table_sizes(database):
            sizes.add_row(size.name, f"{size.rows:,}", size.size)
        console.print(sizes)
        heavy = loaded.heavy_user
        users = [("heavy user", heavy), ("typical user", loaded.typical_user), ("Alice", alice)]
        console.print(await time_reads(database, users))
        console.print(f"\nplans for the heavy user {heavy}:")
        await show_plans(database, heavy, console=console)

    asyncio.run(_run_on(database, work()))
    return 0


@contextmanager
def _progress_bars(console: Console) -> Iterator[OnProgress]:
    """Shows a load's progress: a bar per phase, added when the phase starts."""
    tasks: dict[str, TaskID] = {}
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(TextColumn("{task.description}"), *columns, console=console) as progress:

        def show(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done)

        yield show


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
    except (BenchRefused, PopulateRefused) as refusal:
        _print_as_is(console, f"wallet bench: {refusal}", style="red")
        return 2


def _print_as_is(console: Console, text: str, *, style: str | None = None) -> None:
    """Text that may hold brackets or long lines (SQL, URLs, commands): no markup, no
    highlighting, no wrapping."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)
