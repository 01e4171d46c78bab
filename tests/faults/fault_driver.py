"""The fault driver: a throwaway PostgreSQL cluster of the suite's own, the real `wallet serve` as
a process group, clients that retry every request with its idempotency key and record each
attempt, and the means of the faults (fault_checks judges what a run left behind).

Nothing here touches the machine's shared PostgreSQL: the cluster is made with initdb in a
temporary directory, on a free port of 127.0.0.1, and deleted at the end."""

import asyncio
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx

API = "/api/v1"
ASSETS = ("GOLD_COINS", "DIAMONDS", "LOYALTY_POINTS")
TREASURY = "system:treasury"
BONUS_POOL = "system:bonus_pool"
REVENUE = "system:revenue"
# What a client asks for. The ones that move money answer with a transaction; a hold and a
# release with the hold; a capture with both.
KINDS = ("topup", "bonus", "spend", "transfer", "hold", "capture", "release", "refund")
# The request field that carries an operation's free text.
FREE_TEXT_FIELD = {
    "topup": "metadata",
    "bonus": "reason",
    "spend": "description",
    "transfer": "description",
    "hold": "description",
    "capture": "description",
    "refund": "reason",
}
# The refusals by the ledger's state (API-operations.md, API-ledger.md) each kind may meet:
# final, stored under the key like a success, so a retry replays them.
REFUSAL_CODES: dict[str, tuple[str, ...]] = {
    "topup": (),
    "bonus": (),
    "spend": ("insufficient_funds",),
    "transfer": ("insufficient_funds",),
    "hold": ("insufficient_funds",),
    "capture": ("hold_not_active", "capture_exceeds_hold"),
    "release": ("hold_not_active",),
    "refund": ("refund_exceeds_original", "insufficient_funds", "not_refundable"),
}
HOLD_SECONDS = (2, 600, 600, 600)  # short holds expire during the run; the others outlast it
WALLET_COMMAND = Path(sys.executable).parent / "wallet"
DATABASE_NAME = "wallet_faults"
KEY_PREFIX = "fault-"
POSTGRES_BIN_ENV = "WALLET_TEST_POSTGRES_BIN"
OS_USER = "postgres"  # initdb and postgres refuse to run as root
CLOCK_ORIGIN = time.monotonic()  # reports give times in seconds since the driver was loaded

# What can go wrong: the categories a violation is filed under (see fault_checks).
ANSWERS = "answers"  # a 5xx other than 503 database_unavailable, or an answer out of contract
HANGS = "hangs"  # no answer within the client timeout
IDEMPOTENCY = "idempotency"
REFUSALS = "refusals"  # a refusal not final: made twice, then applied, or not replayed as it was
LEDGER = "ledger"
BALANCES = "balances"
HOLDS = "holds"  # a hold ended twice, or not as acknowledged; `held` not the holds' sum
VERIFY = "verify"
OUTAGES = "outages"
RECOVERY = "recovery"
CATEGORIES = (
    ANSWERS,
    HANGS,
    IDEMPOTENCY,
    REFUSALS,
    LEDGER,
    BALANCES,
    HOLDS,
    VERIFY,
    OUTAGES,
    RECOVERY,
)


# ---- a throwaway PostgreSQL cluster --------------------------------------------------------


class ClusterUnavailable(Exception):
    """No PostgreSQL server binaries to make a cluster with."""


def postgres_bin() -> Path:
    """The directory of initdb and pg_ctl: $WALLET_TEST_POSTGRES_BIN, or the newest
    /usr/lib/postgresql/<version>/bin."""
    configured = os.environ.get(POSTGRES_BIN_ENV)
    if configured:
        candidates = [Path(configured)]
    else:
        found = Path("/usr/lib/postgresql").glob("*/bin")
        candidates = sorted(
            (p for p in found if p.parent.name.isdigit()),
            key=lambda p: int(p.parent.name),
            reverse=True,
        )
    for candidate in candidates:
        if (candidate / "initdb").is_file() and (candidate / "pg_ctl").is_file():
            return candidate
    raise ClusterUnavailable(
        f"no initdb and pg_ctl in {[str(c) for c in candidates]} (set {POSTGRES_BIN_ENV})"
    )


class PortReservation:
    """A free port of 127.0.0.1 kept from being handed to anyone else while its server is down.

    Other suites on this machine start servers on free ports too. This socket is bound with
    SO_REUSEADDR and never listens: connections to the port are refused while nothing else
    listens there, as they would be anyway, and a server that binds with SO_REUSEADDR too
    (uvicorn and PostgreSQL do) can bind and listen beside it, again and again."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port: int = self._socket.getsockname()[1]

    def release(self) -> None:
        self._socket.close()


class Cluster:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:`port` (and on a
    socket in its own directory), owned by the `postgres` OS user when the suite runs as root."""

    def __init__(self, *, bin_dir: Path, root: Path) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self._reservation = PortReservation()
        self.port = self._reservation.port
        self._as_root = os.geteuid() == 0

    @classmethod
    def create(cls) -> "Cluster":
        """initdb, start, and an empty database named DATABASE_NAME."""
        bin_dir = postgres_bin()
        root = Path(tempfile.mkdtemp(prefix="wallet-faults-"))
        cluster = cls(bin_dir=bin_dir, root=root)
        try:
            if cluster._as_root:
                try:
                    owner = pwd.getpwnam(OS_USER)
                except KeyError:
                    raise ClusterUnavailable(
                        f"running as root, and there is no {OS_USER!r} OS user to run initdb as"
                    ) from None
                os.chown(root, owner.pw_uid, owner.pw_gid)
            cluster._run("initdb", "-D", str(cluster.data), "-A", "trust", "-U", "postgres")
            cluster._run(*cluster._pg_ctl_start())
            cluster._run(
                "createdb", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
                DATABASE_NAME,
            )  # fmt: skip
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    @property
    def url(self) -> str:
        """The service's SQLAlchemy URL of the database."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{DATABASE_NAME}"

    async def connect(self) -> asyncpg.Connection:
        """A direct connection of the test to the database, for faults and checks."""
        return await asyncpg.connect(
            host="127.0.0.1", port=self.port, user="postgres", database=DATABASE_NAME, timeout=5
        )

    def _command(self, tool: str, *args: str) -> list[str]:
        command = [str(self.bin_dir / tool), *args]
        return ["runuser", "-u", OS_USER, "--", *command] if self._as_root else command

    def _options(self) -> list[str]:
        server_options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        return ["-D", str(self.data), "-o", server_options, "-l", str(self.log_path)]

    def _pg_ctl_start(self) -> list[str]:
        return ["pg_ctl", "start", *self._options(), "-w", "-t", "60"]

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            self._command(tool, *args), capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    async def _pg_ctl(self, *args: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *self._command("pg_ctl", *args),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), 90)
        if process.returncode != 0:
            raise RuntimeError(f"pg_ctl {' '.join(args)} failed:\n{output.decode()}")

    async def restart_fast(self) -> None:
        """Stop (disconnecting every session, rolling back what is open) and start again."""
        await self._pg_ctl("restart", *self._options(), "-m", "fast", "-w", "-t", "60")

    async def stop_immediately(self) -> None:
        """Stop as a crash would: no shutdown checkpoint, crash recovery at the next start."""
        await self._pg_ctl("stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60")

    async def start(self) -> None:
        await self._pg_ctl(*self._pg_ctl_start()[1:])

    def _postmaster_pid(self) -> int | None:
        with suppress(OSError, ValueError, IndexError):
            return int((self.data / "postmaster.pid").read_text().split()[0])
        return None

    def destroy(self) -> None:
        """Stop the cluster, whatever its state, and delete its directory."""
        for pid in self.processes():  # a frozen cluster could neither stop nor be reaped
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGCONT)
        if (self.data / "postmaster.pid").exists():
            with suppress(subprocess.SubprocessError, OSError):
                subprocess.run(
                    self._command("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w"),
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            postmaster = self._postmaster_pid()
            if postmaster is not None:  # pg_ctl could not stop the postmaster this suite started
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(postmaster, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        self._reservation.release()

    def processes(self) -> list[int]:
        """The postmaster and every process it runs (backends and background workers)."""
        postmaster = self._postmaster_pid()
        if postmaster is None:
            return []
        return [postmaster, *live_processes(parent=postmaster)]

    def log_tail(self, size: int = 3000) -> str:
        with suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""


def run_wallet_command(*args: str, database_url: str, timeout_s: float = 120) -> tuple[int, str]:
    """The real `wallet` command against `database_url`: its exit code and output."""
    done = subprocess.run(
        [str(WALLET_COMMAND), *args],
        env={**os.environ, "WALLET_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


API_KEY = re.compile(r"wk_[A-Za-z0-9_-]{43}")
# The clients' key budget: rate limiting stays on, as in production, but never refuses this load
# (a 429 would be an answer out of contract here).
CLIENT_BUDGET_PER_S = 1_000_000


def create_api_key(database_url: str, *, label: str) -> str:
    """A key for the run's clients, made as an operator makes one: `wallet keys create`, which
    prints the key alone on its last line."""
    code, output = run_wallet_command(
        *("keys", "create", "--label", label, "--scope", "admin"),
        *("--reads-per-second", str(CLIENT_BUDGET_PER_S)),
        *("--writes-per-second", str(CLIENT_BUDGET_PER_S)),
        database_url=database_url,
    )
    lines = output.splitlines()
    if code != 0 or not lines or not API_KEY.fullmatch(lines[-1]):
        raise AssertionError(f"wallet keys create exited {code}:\n{output}")
    return lines[-1]


# ---- the server as a process group ---------------------------------------------------------


def _process_stat(pid_dir: Path) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a /proc/<pid> entry, or None if it is gone."""
    with suppress(OSError, ValueError):
        # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after its ')'
        state, parent, group = (pid_dir / "stat").read_text().rpartition(")")[2].split()[:3]
        return state, int(parent), int(group)
    return None


def live_processes(*, parent: int | None = None, group: int | None = None) -> list[int]:
    """Running processes (zombies excluded) with this parent, or in this process group."""
    found = []
    for pid_dir in Path("/proc").glob("[0-9]*"):
        stat = _process_stat(pid_dir)
        if stat is None or stat[0] == "Z":
            continue
        if (parent is not None and stat[1] == parent) or (group is not None and stat[2] == group):
            found.append(int(pid_dir.name))
    return sorted(found)


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on 127.0.0.1:`port` or on any address, from /proc."""
    inodes = set()
    with suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            address, local_port = fields[1].split(":")
            if (
                int(local_port, 16) == port
                and fields[3] == "0A"  # LISTEN
                and address in ("0100007F", "00000000")
            ):
                inodes.add(fields[9])
    return inodes


def _socket_links(pid: int) -> set[str]:
    links = set()
    for descriptor in Path(f"/proc/{pid}/fd").glob("*"):
        with suppress(OSError):
            links.add(os.readlink(descriptor))
    return links


def _is_spawned_worker(pid: int) -> bool:
    with suppress(OSError):
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


class WalletServer:
    """`wallet serve --workers N` on 127.0.0.1:`port`, in a session (and process group) of its
    own, so the parent and its workers can be killed together; restartable on the same port."""

    def __init__(
        self, *, database_url: str, log_path: Path, workers: int, settings: dict[str, str]
    ) -> None:
        self._reservation = PortReservation()  # the port stays ours while the server is killed
        self.port = self._reservation.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.workers_wanted = workers
        self.environment = {**os.environ, "WALLET_DATABASE_URL": database_url, **settings}
        self.process: asyncio.subprocess.Process | None = None
        self.groups: list[int] = []  # the process group of each start

    @property
    def parent_pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self, *, timeout_s: float = 30) -> None:
        """Start the server and wait until it answers a health check with 200."""
        log = _open_log(self.log_path)
        try:
            self.process = await asyncio.create_subprocess_exec(
                *(str(WALLET_COMMAND), "serve", "--host", "127.0.0.1", "--port", str(self.port)),
                *("--workers", str(self.workers_wanted)),
                env=self.environment,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.groups.append(self.process.pid)
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(base_url=self.base_url, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise AssertionError(f"the server exited at start:\n{self.log_tail()}")
                with suppress(httpx.TransportError):
                    response = await client.get(f"{API}/health", timeout=2)
                    if response.status_code == 200 and len(self.workers()) == self.workers_wanted:
                        self._check_it_listens()
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"no healthy server within {timeout_s} s:\n{self.log_tail()}")

    def _check_it_listens(self) -> None:
        """The socket listening on the port is this server's, not another process's."""
        inodes = _listening_inodes(self.port)
        ours = {link for pid in (self.parent_pid, *self.workers()) for link in _socket_links(pid)}
        if not inodes or not {f"socket:[{inode}]" for inode in inodes} <= ours:
            raise AssertionError(
                f"127.0.0.1:{self.port} is served by another process (listening sockets "
                f"{inodes}, this server's {sorted(ours)})"
            )

    def workers(self) -> list[int]:
        """The worker processes the server's parent runs now (multiprocessing's resource
        tracker, its other child, excluded)."""
        if self.process is None or self.process.returncode is not None:
            return []
        return [pid for pid in live_processes(parent=self.parent_pid) if _is_spawned_worker(pid)]

    async def wait_for_workers(self, *, without: int, timeout_s: float) -> list[int]:
        """The workers once there are as many as wanted and `without` is not among them."""
        deadline = time.monotonic() + timeout_s
        workers = self.workers()
        while time.monotonic() < deadline:
            workers = self.workers()
            if len(workers) == self.workers_wanted and without not in workers:
                break
            await asyncio.sleep(0.1)
        return workers

    async def kill_everything(self) -> None:
        """SIGKILL the parent and every worker at once; return when none is left."""
        assert self.process is not None
        group = self.parent_pid
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        await self.process.wait()
        for _ in range(100):
            if not live_processes(group=group):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"processes of the killed server live on: {live_processes(group=group)}"
        )

    async def stop(self) -> None:
        """SIGTERM and up to 15 s to exit, then SIGKILL for the whole group: nothing outlives."""
        if self.process is None:
            self._reservation.release()
            return
        group = self.parent_pid
        if self.process.returncode is None:
            self.process.terminate()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), 15)
        for _ in range(50):
            if not live_processes(group=group):
                break
            await asyncio.sleep(0.1)
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        await self.process.wait()
        self._reservation.release()

    def kill_leftovers(self) -> None:
        """SIGKILL whatever is left of any start of this server (for teardown after a run that
        was cut short, when `stop` may not have run), and give up its port."""
        for group in self.groups:
            if live_processes(group=group):
                with suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        self._reservation.release()

    def log_tail(self, size: int = 3000) -> str:
        with suppress(OSError):
            return self.log_path.read_text(errors="replace")[-size:]
        return ""


# ---- clients that retry with the same key --------------------------------------------------

CLIENT_TIMEOUT_S = 10.0  # per request: five times the service's database timeout
MAX_ATTEMPTS = 12
OPERATION_DEADLINE_S = 30.0


@dataclass(slots=True)
class Attempt:
    """One HTTP request of an operation and what came of it."""

    phase: str  # load, settle (a last try for an answer) or replay (a check afterwards)
    started_at: float
    ended_at: float
    status: int | None  # None: no answer
    body: dict[str, Any] | None = None
    is_replayed: bool = False  # the Idempotent-Replayed: true header
    error: str | None = None  # when there was no answer: "timeout: ..." or "connection: ..."

    @property
    def is_success(self) -> bool:
        return self.status in (200, 201)

    @property
    def is_retryable(self) -> bool:
        return self.status is None or self.status == 503

    @property
    def code(self) -> str | None:
        return None if self.body is None else self.body.get("code")

    def describe(self) -> str:
        answer = f"{self.status} {self.body}" if self.status is not None else self.error
        replayed = " (Idempotent-Replayed)" if self.is_replayed else ""
        took = self.ended_at - self.started_at
        return f"[{self.phase} at {self.started_at - CLOCK_ORIGIN:.2f} s, took {took:.2f} s] " + (
            f"{answer}{replayed}"
        )


@dataclass(slots=True)
class Operation:
    """One request as its client means it: one key, sent until it has an answer."""

    key: str
    flow: str  # one of KINDS
    user_id: str  # the user it concerns (a transfer's sender; a hold's, an original's user)
    asset: str
    amount: int | None  # None: a capture's or a refund's default (all of it, what is left)
    free_text: Any = None  # metadata (top-up), reason (bonus, refund) or description
    to_user_id: str | None = None  # a transfer's receiver
    # What a capture, release or refund names: the acknowledged answer that made the hold (a
    # hold's body) or the original (a transaction's body).
    reference: dict[str, Any] | None = None
    expires_in_s: int | None = None  # a hold's
    is_duplicated: bool = False  # sent twice at once by its client
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def reference_id(self) -> str:
        assert self.reference is not None
        return str(
            self.reference["holdId" if self.flow in ("capture", "release") else "transactionId"]
        )

    @property
    def path(self) -> str:
        match self.flow:
            case "hold":
                return f"{API}/wallet/holds"
            case "capture" | "release":
                return f"{API}/wallet/holds/{self.reference_id}/{self.flow}"
            case "refund":
                return f"{API}/wallet/transactions/{self.reference_id}/refund"
        return f"{API}/wallet/{self.flow}"

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"idempotencyKey": self.key}
        match self.flow:
            case "transfer":
                body |= {"fromUserId": self.user_id, "toUserId": self.to_user_id}
                body |= {"assetSymbol": self.asset, "amount": self.amount}
            case "topup" | "bonus" | "spend" | "hold":
                body |= {"userId": self.user_id, "assetSymbol": self.asset, "amount": self.amount}
            case "capture" | "refund" if self.amount is not None:
                body["amount"] = self.amount
        if self.expires_in_s is not None:
            body["expiresInSeconds"] = self.expires_in_s
        if self.free_text is not None:
            body[FREE_TEXT_FIELD[self.flow]] = self.free_text
        return body

    def answers(self, *, phases: Sequence[str] = ("load", "settle")) -> list[Attempt]:
        """The attempts of these phases, in order, whether answered or not."""
        return [a for a in self.attempts if a.phase in phases]

    @property
    def successes(self) -> list[Attempt]:
        return [a for a in self.answers() if a.is_success]

    @property
    def refusals(self) -> list[Attempt]:
        """The refusals by the ledger's state: final, stored under the key like a success
        (API-operations.md), so a retry replays them."""
        return [a for a in self.answers() if self.is_refusal(a)]

    def is_refusal(self, attempt: Attempt) -> bool:
        return attempt.status in (409, 422) and attempt.code in REFUSAL_CODES[self.flow]

    def is_made(self, attempt: Attempt) -> bool:
        """The attempt that applied the request or made its refusal (not a replay of it): a
        release answers 200 either way, without Idempotent-Replayed the first time."""
        return (attempt.is_success or self.is_refusal(attempt)) and not attempt.is_replayed

    @property
    def has_definite_answer(self) -> bool:
        """Answered with anything but a 503 or a 5xx: applied, or refused for good."""
        return any(a.status is not None and a.status < 500 for a in self.answers())

    @property
    def transaction(self) -> dict[str, Any] | None:
        """The transaction its first success made, if it makes one."""
        successes = self.successes
        if not successes or self.flow in ("hold", "release") or successes[0].body is None:
            return None
        body = successes[0].body
        return body.get("transaction") if self.flow == "capture" else body

    @property
    def hold(self) -> dict[str, Any] | None:
        """The hold its first success made or ended, if it concerns one."""
        successes = self.successes
        if not successes or self.flow not in ("hold", "capture", "release"):
            return None
        body = successes[0].body or {}
        return body.get("hold") if self.flow == "capture" else body

    def describe(self) -> str:
        attempts = self.attempts
        if len(attempts) > 10:  # the first (often the one a fault met) and the last ones
            attempts = [attempts[0], *attempts[-9:]]
        shown = "\n    ".join(a.describe() for a in attempts)
        what = {
            "transfer": f" to {self.to_user_id}",
            "capture": f" of hold {self.reference_id if self.reference else ''}",
            "release": f" of hold {self.reference_id if self.reference else ''}",
            "refund": f" of {self.reference_id if self.reference else ''}",
        }.get(self.flow, "")
        return (
            f"{self.flow} {self.amount} {self.asset} of {self.user_id}{what} key {self.key} "
            f"({len(self.attempts)} attempts):\n    {shown}"
        )


@dataclass
class Recorder:
    """Every operation and attempt of a run, the moments requests succeeded, the holds and
    transactions acknowledged so far (what later captures, releases and refunds name), and the
    balances read once the load was over."""

    operations: list[Operation] = field(default_factory=list)
    in_flight: int = 0
    success_times: list[tuple[float, float]] = field(default_factory=list)  # (started, ended)
    holds: list[dict[str, Any]] = field(default_factory=list)
    ended_holds: set[str] = field(default_factory=set)  # captured or released, as acknowledged
    transactions: list[dict[str, Any]] = field(default_factory=list)
    # (user, started, ended (wall time), GET /wallet/balances/{user}'s body), read at the end
    standings: list[tuple[str, float, float, dict[str, Any]]] = field(default_factory=list)

    def acknowledge(self, operation: Operation) -> None:
        """Keep what the operation's first success made, for later operations to name."""
        if operation.flow == "hold" and operation.hold is not None:
            self.holds.append(operation.hold)
        if operation.flow in ("capture", "release") and operation.successes:
            self.ended_holds.add(operation.reference_id)
        if operation.transaction is not None:
            self.transactions.append(operation.transaction)

    def first_success_after(self, moment: float) -> float | None:
        """When the first flow request sent after `moment` succeeded, if one has."""
        ended = [e for s, e in self.success_times if s >= moment]
        return min(ended) if ended else None

    def attempts(self, *, phases: Sequence[str] = ("load",)) -> list[Attempt]:
        return [a for op in self.operations for a in op.attempts if a.phase in phases]


def network_client(base_url: str, *, key: str | None, connections: int = 64) -> httpx.AsyncClient:
    """A client of the server on 127.0.0.1 sending the API key `key` (None: none, for the
    public health check); proxy variables are ignored."""
    return httpx.AsyncClient(
        base_url=base_url,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(CLIENT_TIMEOUT_S),
        trust_env=False,
        headers=None if key is None else {"Authorization": f"Bearer {key}"},
    )


async def send(
    client: httpx.AsyncClient, recorder: Recorder, operation: Operation, *, phase: str
) -> Attempt:
    """Send the operation's request once, bounded by the client timeout, and record it."""
    started = time.monotonic()
    recorder.in_flight += 1
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S + 1):
            response = await client.post(operation.path, json=operation.body())
    except (httpx.TimeoutException, TimeoutError) as error:
        attempt = Attempt(phase, started, time.monotonic(), None, error=f"timeout: {error!r}")
    except httpx.TransportError as error:
        attempt = Attempt(phase, started, time.monotonic(), None, error=f"connection: {error!r}")
    else:
        try:
            body = response.json()
        except ValueError:
            body = {"unparsed": response.text[:500]}
        attempt = Attempt(
            phase,
            started,
            time.monotonic(),
            response.status_code,
            body if isinstance(body, dict) else {"unparsed": body},
            response.headers.get("Idempotent-Replayed") == "true",
        )
    finally:
        recorder.in_flight -= 1
    operation.attempts.append(attempt)
    if attempt.is_success:
        recorder.success_times.append((attempt.started_at, attempt.ended_at))
    return attempt


def backoff_s(attempt: int, rng: random.Random) -> float:
    return min(1.0, 0.1 * 2.0**attempt) * rng.uniform(0.5, 1.5)


async def run_operation(
    client: httpx.AsyncClient,
    recorder: Recorder,
    operation: Operation,
    rng: random.Random,
    *,
    phase: str,
    max_attempts: int = MAX_ATTEMPTS,
) -> Attempt:
    """Send until answered (anything but a 503), retrying the same key after a timeout, a
    connection error or a 503; bounded in attempts and time. The last attempt."""
    deadline = time.monotonic() + OPERATION_DEADLINE_S
    attempt = await send(client, recorder, operation, phase=phase)
    for number in range(1, max_attempts):
        if not attempt.is_retryable or time.monotonic() > deadline:
            break
        await asyncio.sleep(backoff_s(number, rng))
        attempt = await send(client, recorder, operation, phase=phase)
    return attempt


@dataclass(frozen=True, slots=True)
class LoadPlan:
    clients: int = 32
    max_operations: int = 3000
    deadline_s: float = 150.0
    think_s: tuple[float, float] = (0.1, 0.5)
    duplicate_share: float = 0.05  # operations a client sends twice at once


def new_operation(
    rng: random.Random,
    users: Sequence[str],
    recorder: Recorder,
    *,
    client: int,
    number: int,
    duplicate_share: float,
) -> Operation:
    """A random request: a flow or a transfer; a hold; or a capture, release or refund of a hold
    or transaction acknowledged earlier in the run (by any client, so some race), now and then
    of more than there is (a capture over the hold, a refund over what is left) or of one that
    cannot be (an ended hold, a transfer)."""
    holds, transactions = recorder.holds[-40:], recorder.transactions[-60:]
    kinds = ("topup", "bonus", "spend", "transfer", "hold", "capture", "release", "refund")
    weights = (4, 1, 3, 2, 2, 2 if holds else 0, 1 if holds else 0, 2 if transactions else 0)
    flow = rng.choices(kinds, weights=weights)[0]
    key = f"{KEY_PREFIX}{client:02d}-{number:05d}-{uuid.uuid4().hex[:10]}"
    free_text: Any = None
    if rng.random() < 0.3:
        free_text = {"source": "faults", "n": str(number)} if flow == "topup" else f"fault {number}"
    duplicated = rng.random() < duplicate_share
    if flow in ("capture", "release"):
        held = [h for h in holds if h["holdId"] not in recorder.ended_holds]
        hold = rng.choice(held if held and rng.random() < 0.8 else holds)
        amount = None
        if flow == "capture":
            amount = rng.choice([None, rng.randint(1, hold["amount"]), hold["amount"] + 1])
        return Operation(
            key=key,
            flow=flow,
            user_id=hold["userId"],
            asset=hold["assetSymbol"],
            amount=amount,
            free_text=None if flow == "release" else free_text,
            reference=hold,
            is_duplicated=duplicated,
        )
    if flow == "refund":
        original = rng.choice(transactions)
        amount = rng.choice([None, rng.randint(1, original["amount"]), original["amount"] + 1])
        return Operation(
            key=key,
            flow=flow,
            user_id=original["userId"],
            asset=original["assetSymbol"],
            amount=amount,
            free_text=free_text,
            reference=original,
            is_duplicated=duplicated,
        )
    user_id = rng.choice(users)
    return Operation(
        key=key,
        flow=flow,
        user_id=user_id,
        asset=rng.choice(ASSETS),
        amount=rng.randint(*{"topup": (1, 500), "bonus": (1, 100)}.get(flow, (1, 400))),
        free_text=free_text,
        to_user_id=rng.choice([u for u in users if u != user_id]) if flow == "transfer" else None,
        expires_in_s=rng.choice(HOLD_SECONDS) if flow == "hold" else None,
        is_duplicated=duplicated,
    )


async def run_clients(
    client: httpx.AsyncClient,
    recorder: Recorder,
    users: Sequence[str],
    *,
    plan: LoadPlan,
    stop: asyncio.Event,
    seed: int,
) -> None:
    """`plan.clients` clients, each sending random requests one after another until `stop` is
    set (or the plan's bounds are reached); each operation is seen through to an answer, and
    what it made is kept for later captures, releases and refunds to name."""
    deadline = time.monotonic() + plan.deadline_s

    async def one_client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        number = 0
        while not stop.is_set() and time.monotonic() < deadline:
            if len(recorder.operations) >= plan.max_operations:
                return
            operation = new_operation(
                rng,
                users,
                recorder,
                client=index,
                number=number,
                duplicate_share=plan.duplicate_share,
            )
            recorder.operations.append(operation)
            number += 1
            copies = 2 if operation.is_duplicated else 1
            await asyncio.gather(
                *(
                    run_operation(client, recorder, operation, rng, phase="load")
                    for _ in range(copies)
                )
            )
            recorder.acknowledge(operation)
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(*plan.think_s))

    await asyncio.gather(*(one_client(i) for i in range(plan.clients)))


async def create_users(client: httpx.AsyncClient, *, count: int) -> list[str]:
    users = []
    for index in range(count):
        user_id = f"fault-user-{index:02d}-{uuid.uuid4().hex[:8]}"
        response = await client.post(
            f"{API}/users", json={"id": user_id, "email": f"{user_id}@example.com", "name": user_id}
        )
        assert response.status_code == 201, f"creating {user_id}: {response.text}"
        users.append(user_id)
    return users


async def _resend(
    client: httpx.AsyncClient,
    recorder: Recorder,
    operations: Sequence[Operation],
    *,
    phase: str,
    seed: int,
    within_s: float,
    concurrency: int = 32,
) -> None:
    """Send each operation again (with retries), `concurrency` at a time; none is begun after
    `within_s` (those left out show up in the checks as keys without their answer)."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + within_s

    async def resend(operation: Operation) -> None:
        async with semaphore:
            if time.monotonic() < deadline:
                await run_operation(client, recorder, operation, rng, phase=phase, max_attempts=5)

    await asyncio.gather(*(resend(op) for op in operations))


async def settle(client: httpx.AsyncClient, recorder: Recorder, *, seed: int) -> None:
    """Send once more every operation left without a definite answer: the contract says a
    retry with the same key gives the definite answer."""
    pending = [op for op in recorder.operations if not op.has_definite_answer]
    await _resend(client, recorder, pending, phase="settle", seed=seed, within_s=30)


async def read_standings(
    client: httpx.AsyncClient, recorder: Recorder, users: Sequence[str]
) -> None:
    """Every user's balance, held and available amounts, read once the requests are over (the
    checks hold `held` to the holds acknowledged and not ended, nor expired at that moment)."""
    for user_id in users:
        started = time.time()  # wall time, as a hold's expiresAt is
        response = await client.get(f"{API}/wallet/balances/{user_id}")
        assert response.status_code == 200, f"balances of {user_id}: {response.text}"
        recorder.standings.append((user_id, started, time.time(), response.json()))


async def replay_every_final_answer(
    client: httpx.AsyncClient, recorder: Recorder, *, seed: int
) -> None:
    """Send every request that was answered 2xx or 422 again, with its key: each must be a
    replay of that answer (a refusal is as final as a success)."""
    decided = [op for op in recorder.operations if op.successes or op.refusals]
    await _resend(client, recorder, decided, phase="replay", seed=seed + 1, within_s=60)


# ---- faults --------------------------------------------------------------------------------


@dataclass
class Fault:
    """One fault injected during the load, and what the service did about it."""

    name: str
    injected_at: float
    lifted_at: float | None = None  # from here on the service's surroundings are whole again
    recovered_at: float | None = None  # the first success of a request sent after `lifted_at`
    in_flight: int = 0  # requests in flight when it was injected
    # While the database was away or stalled: flows sent and answered in this window.
    outage: tuple[float, float] | None = None
    is_outage_total: bool = False  # every flow answered in the window must be a 503
    # May cut the service's database connections, so a commit may apply unheard (a 503 for a
    # request that was in fact applied is then allowed: the contract's "commit broke" case).
    may_break_commits: bool = False
    effect: str = ""
    problems: list[tuple[str, str]] = field(default_factory=list)  # (category, what went wrong)

    def problem(self, category: str, message: str) -> None:
        self.problems.append((category, message))

    @property
    def recovery_s(self) -> float | None:
        if self.lifted_at is None or self.recovered_at is None:
            return None
        return self.recovered_at - self.lifted_at


async def wait_for_in_flight(recorder: Recorder, *, at_least: int, timeout_s: float = 3) -> int:
    """Wait (bounded) until some requests are in flight, so a fault lands on them."""
    for _ in range(int(timeout_s / 0.002)):
        if recorder.in_flight >= at_least:
            break
        await asyncio.sleep(0.002)
    return recorder.in_flight


async def wait_for_recovery(fault: Fault, recorder: Recorder, *, within_s: float) -> None:
    """Wait until a flow request sent after the fault was lifted succeeds."""
    assert fault.lifted_at is not None
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        fault.recovered_at = recorder.first_success_after(fault.lifted_at)
        if fault.recovered_at is not None:
            return
        await asyncio.sleep(0.05)
    fault.problem(RECOVERY, f"no flow succeeded within {within_s} s of lifting the fault")


async def check_health_while_away(server: WalletServer, fault: Fault) -> None:
    """Health answers 503 in plain JSON while the database is away."""
    async with network_client(server.base_url, key=None, connections=1) as client:
        try:
            response = await client.get(f"{API}/health")
        except httpx.TransportError as error:
            fault.problem(OUTAGES, f"health while the database was away: no answer: {error!r}")
            return
    expected = {"status": "unavailable", "database": "unavailable"}
    if response.status_code != 503 or response.json() != expected:
        fault.problem(
            OUTAGES, f"health while the database was away: {response.status_code} {response.text}"
        )


async def terminate_service_backends(cluster: Cluster) -> int:
    """pg_terminate_backend of every other session of the database; how many there were."""
    connection = await cluster.connect()
    try:
        terminated: int = await connection.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            DATABASE_NAME,
        )
    finally:
        await connection.close()
    return terminated
