"""The load of `wallet bench`: wrk driving a server over loopback with a Lua script the run writes
(one flow per request, or a mix), bounded in seconds and in requests, and what it measured: wrk's
summary, and the CPU the client, the server and PostgreSQL used meanwhile."""

import math
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from wallet.bench.plan import MIX_KINDS, BenchRefused, Cell, Configuration, Mix, Scenario, Variant
from wallet.bench.server import CpuUse, Server, cpu_times, cpu_used, memory_mb, postgres_pids
from wallet.domain.access import KEY_PATTERN
from wallet.service.populate import ASSET, EXPIRING_ASSET

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
class Measurement:
    """What one wrk run saw, and the CPU each side used meanwhile."""

    requests: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    http_errors: int  # answers of status 400 or more
    socket_errors: int  # connect, read, write errors and timeouts
    is_capped: bool
    wall_s: float  # how long wrk ran, by this process's clock: what CPU percentages divide
    client_cpu_s: float
    server_cpu: CpuUse
    database_cpu: CpuUse | None  # None: PostgreSQL's processes were not watched
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

    def sample_memory(self, server: Server) -> None:
        """Keep the most each worker's resident memory has been seen at."""
        rss = [memory_mb(pid, "VmRSS") for pid in server.worker_pids()]
        if len(self.rss_mb) != len(rss):
            self.rss_mb = rss
        else:
            self.rss_mb = [max(a, b) for a, b in zip(self.rss_mb, rss, strict=True)]


def find_wrk() -> str:
    """The wrk executable, or BenchRefused saying how to install it."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchRefused("wrk is not installed: `apt-get install wrk` (Debian's package)")
    return wrk


def wrk_version(wrk: str) -> str:
    completed = subprocess.run(  # noqa: S603 (wrk found on PATH, fixed arguments)
        [wrk, "-v"], capture_output=True, text=True, timeout=10, check=False
    )
    return (completed.stdout or completed.stderr).splitlines()[0].split(" Copyright")[0].strip()


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
    server_before = cpu_times(server.pids())
    database_before = cpu_times(postgres_pids()) if watches_postgres else None
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
    server_cpu = cpu_used(server_before, cpu_times(server.pids()))
    database_cpu = (
        None if database_before is None else cpu_used(database_before, cpu_times(postgres_pids()))
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
        wall_s=wall,
        client_cpu_s=client_cpu,
        server_cpu=server_cpu,
        database_cpu=database_cpu,
        kinds={kind: summary[kind] for kind in MIX_KINDS if kind in summary},
    )


def _wrk_summary(output: str) -> dict[str, int] | None:
    for line in output.splitlines():
        if line.startswith("wallet-bench "):
            pairs = (item.partition("=") for item in line.split()[1:])
            return {key: int(value) for key, _, value in pairs}
    return None
