"""The servers `wallet bench` loads, each started on a free loopback port and stopped whatever
happens (`wallet serve` for a configuration, or the bare ASGI app that calibrates the run), and
what their processes and PostgreSQL's use, read from /proc."""

import http.client
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from wallet.bench.plan import BenchRefused, Configuration

HEALTH_PATH = "/api/v1/health"
STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 15.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CALIBRATION_APP = "wallet.bench.calibration:app"


@dataclass
class Server:
    """A server started for one configuration."""

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


@dataclass(frozen=True, slots=True)
class CpuUse:
    """CPU seconds some processes used between two readings, and how many of them ran meanwhile:
    /proc counts in clock ticks, so the figure of each that ran may be a tick off."""

    seconds: float
    processes: int

    @property
    def resolution_s(self) -> float:
        return self.processes / CLOCK_TICKS

    def __add__(self, other: "CpuUse") -> "CpuUse":
        return CpuUse(self.seconds + other.seconds, self.processes + other.processes)


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


def cpu_times(pids: Sequence[int]) -> dict[int, float]:
    """User plus system CPU seconds each process has used so far."""
    times = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if len(fields) > 12:
            times[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
    return times


def cpu_used(before: Mapping[int, float], after: Mapping[int, float]) -> CpuUse:
    """CPU used between two readings; processes that ended in between are missed."""
    used = [seconds - before.get(pid, 0.0) for pid, seconds in after.items()]
    return CpuUse(sum(used), sum(1 for seconds in used if seconds))


def memory_mb(pid: int, field_name: str) -> float:
    for line in _read_bytes(f"/proc/{pid}/status").decode().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return math.nan


def postgres_pids() -> list[int]:
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


def running_server(
    configuration: Configuration, *, database_url: str, workdir: Path
) -> AbstractContextManager[Server]:
    """`wallet serve` for `configuration`, on the run's database."""
    # The server inherits this environment; the run's database and the configuration win.
    environment = {
        **os.environ,
        "WALLET_DATABASE_URL": database_url,
        **configuration.environment,
    }
    return _running([*_wallet_command(), "serve"], configuration, environment, workdir)


def running_calibration(
    configuration: Configuration, *, workdir: Path
) -> AbstractContextManager[Server]:
    """The bare ASGI app under uvicorn, as `wallet serve` runs the service: the same default
    event loop and HTTP parser, no access log."""
    command = [sys.executable, "-m", "uvicorn", CALIBRATION_APP]
    options = ["--lifespan", "off", "--no-access-log", "--log-level", "warning"]
    return _running([*command, *options], configuration, dict(os.environ), workdir)


@contextmanager
def _running(
    command: Sequence[str],
    configuration: Configuration,
    environment: dict[str, str],
    workdir: Path,
) -> Iterator[Server]:
    """`command --host 127.0.0.1 --port P --workers N` on a free loopback port, healthy;
    stopped (SIGTERM, then SIGKILL of its process group after STOP_GRACE_S) whatever happens in
    the block."""
    port = _free_port()
    log_path = workdir / f"server-{port}.log"
    options = ["--host", "127.0.0.1", "--port", str(port), "--workers", str(configuration.workers)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603 (this package's own command, or uvicorn)
            [*command, *options],
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
