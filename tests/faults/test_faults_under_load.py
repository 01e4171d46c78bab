"""Money under faults: the real server (two workers) on a PostgreSQL cluster of the suite's own,
32 clients moving money (top-ups, bonuses, spends, transfers), placing holds and capturing or
releasing them, and refunding what was acknowledged, each retrying every request with its key,
while workers, the whole server and the database are killed, restarted and stalled in turn.
Afterwards nothing may have been lost, applied twice or created, every refusal must have stayed
final (stored under its key, so a retry replays it), and each hold ended at most once, as
announced: every check below reads the record of that one run."""

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from fault_checks import (
    Violations,
    check_503s_were_not_applied,
    check_answers,
    check_faults,
    check_ledger,
    check_undetermined,
    check_verify,
    summary,
)
from fault_driver import (
    ANSWERS,
    BALANCES,
    HANGS,
    HOLDS,
    IDEMPOTENCY,
    KINDS,
    LEDGER,
    OUTAGES,
    RECOVERY,
    REFUSALS,
    VERIFY,
    Cluster,
    ClusterUnavailable,
    Fault,
    LoadPlan,
    Recorder,
    WalletServer,
    check_health_while_away,
    create_api_key,
    create_users,
    network_client,
    read_standings,
    replay_every_final_answer,
    run_clients,
    run_wallet_command,
    settle,
    terminate_service_backends,
    wait_for_in_flight,
    wait_for_recovery,
)

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(300)]

SEED = 4
USERS = 20
WORKERS = 2
DATABASE_TIMEOUT_S = 2.0
STEADY_S = 1.5  # load with no fault between two faults
AWAY_S = 3.0  # how long the database stays stopped, or a lock is held
FROZEN_S = 8.0  # a frozen database takes the service about 3 timeouts to answer 503
RECOVERY_WITHIN_S = 20.0
FAULT_COUNT = 8


@dataclass
class Run:
    """A run's record: what was sent and answered, the faults, and the violations found."""

    recorder: Recorder
    faults: list[Fault]
    violations: Violations
    server_log: str
    postgres_log: str

    def assert_clean(self, *categories: str) -> None:
        found = self.violations.report(*categories)
        if found and {ANSWERS, OUTAGES, RECOVERY} & set(categories):
            found += f"\n--- server log (tail) ---\n{self.server_log}"
            found += f"\n--- PostgreSQL log (tail) ---\n{self.postgres_log}"
        assert not found, found


@dataclass
class Stage:
    """What the faults act on."""

    cluster: Cluster
    server: WalletServer
    recorder: Recorder
    rng: random.Random


# ---- the faults, in the order they are injected --------------------------------------------


def _worker_death_check(stage: Stage, fault: Fault, workers_before: list[int]) -> None:
    """Faults of the database must not cost a worker its life (uvicorn would hide it)."""
    if stage.server.workers() != workers_before:
        fault.problem(
            RECOVERY, f"workers {workers_before} became {stage.server.workers()} during the fault"
        )


async def kill_a_worker(stage: Stage) -> Fault:
    workers = stage.server.workers()
    victim = stage.rng.choice(workers)
    in_flight = await wait_for_in_flight(stage.recorder, at_least=3)
    fault = Fault("SIGKILL of one worker", injected_at=time.monotonic(), in_flight=in_flight)
    os.kill(victim, signal.SIGKILL)
    fault.lifted_at = time.monotonic()  # uvicorn's supervisor is to replace it by itself
    now = await stage.server.wait_for_workers(without=victim, timeout_s=RECOVERY_WITHIN_S)
    if victim in now or len(now) != WORKERS:
        fault.problem(RECOVERY, f"uvicorn did not replace worker {victim}: workers are {now}")
    fault.effect = f"worker {victim} replaced by {sorted(set(now) - set(workers))}"
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    return fault


async def restart_postgres_fast(stage: Stage) -> Fault:
    workers = stage.server.workers()
    in_flight = await wait_for_in_flight(stage.recorder, at_least=3)
    fault = Fault(
        "PostgreSQL restart -m fast",
        injected_at=time.monotonic(),
        in_flight=in_flight,
        may_break_commits=True,
    )
    await stage.cluster.restart_fast()
    fault.lifted_at = time.monotonic()
    fault.effect = f"down and up in {fault.lifted_at - fault.injected_at:.1f} s"
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    _worker_death_check(stage, fault, workers)
    return fault


async def stop_postgres_immediately(stage: Stage) -> Fault:
    workers = stage.server.workers()
    in_flight = await wait_for_in_flight(stage.recorder, at_least=3)
    fault = Fault(
        "PostgreSQL stop -m immediate, start",
        injected_at=time.monotonic(),
        in_flight=in_flight,
        may_break_commits=True,
    )
    await stage.cluster.stop_immediately()
    away_from = time.monotonic()
    await asyncio.sleep(AWAY_S / 2)
    await check_health_while_away(stage.server, fault)
    await asyncio.sleep(AWAY_S / 2)
    away_until = time.monotonic()
    await stage.cluster.start()
    fault.lifted_at = time.monotonic()
    fault.outage, fault.is_outage_total = (away_from, away_until), True
    fault.effect = f"away {away_until - away_from:.1f} s, crash recovery at start"
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    _worker_death_check(stage, fault, workers)
    return fault


async def terminate_service_sessions(stage: Stage) -> Fault:
    workers = stage.server.workers()
    in_flight = await wait_for_in_flight(stage.recorder, at_least=3)
    fault = Fault(
        "pg_terminate_backend of the service",
        injected_at=time.monotonic(),
        in_flight=in_flight,
        may_break_commits=True,
    )
    terminated = await terminate_service_backends(stage.cluster)
    fault.lifted_at = time.monotonic()
    fault.effect = f"{terminated} sessions terminated"
    if terminated == 0:
        fault.problem(RECOVERY, "the service held no session to terminate: nothing was tried")
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    _worker_death_check(stage, fault, workers)
    return fault


async def _hold_lock(stage: Stage, name: str, statement: str, *, is_total: bool) -> Fault:
    """A test session takes a lock the flows need and holds it past the service's timeout."""
    workers = stage.server.workers()
    connection = await stage.cluster.connect()
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(statement)
        fault = Fault(name, injected_at=time.monotonic(), in_flight=stage.recorder.in_flight)
        await asyncio.sleep(AWAY_S + DATABASE_TIMEOUT_S)
        held_until = time.monotonic()
        await transaction.rollback()
    finally:
        await connection.close()
    fault.lifted_at = time.monotonic()
    fault.outage, fault.is_outage_total = (fault.injected_at, held_until), is_total
    fault.effect = f"held {held_until - fault.injected_at:.1f} s"
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    _worker_death_check(stage, fault, workers)
    return fault


async def lock_the_balances_table(stage: Stage) -> Fault:
    # Every flow reads and writes balances: while this is held, each must time out into a 503.
    return await _hold_lock(
        stage,
        "LOCK TABLE balances IN ACCESS EXCLUSIVE MODE",
        "LOCK TABLE balances IN ACCESS EXCLUSIVE MODE",
        is_total=True,
    )


async def lock_the_revenue_rows(stage: Stage) -> Fault:
    # Only batches with a spend wait on these rows; the others may still go through.
    return await _hold_lock(
        stage,
        "system:revenue rows FOR UPDATE",
        "SELECT balance FROM balances WHERE account_id = 'system:revenue' FOR UPDATE",
        is_total=False,
    )


async def freeze_postgres(stage: Stage) -> Fault:
    """Every process of the cluster stopped (SIGSTOP): connections stay open and silent, as
    with a hung database host; then continued (SIGCONT)."""
    workers = stage.server.workers()
    in_flight = await wait_for_in_flight(stage.recorder, at_least=3)
    frozen = stage.cluster.processes()
    # A statement timeout that strikes during COMMIT leaves the commit to the frozen server,
    # which applies it once it runs again: the contract's "connection broke during the commit".
    fault = Fault(
        "PostgreSQL frozen (SIGSTOP)",
        injected_at=time.monotonic(),
        in_flight=in_flight,
        may_break_commits=True,
    )
    try:
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(FROZEN_S)
        frozen_until = time.monotonic()
    finally:
        for pid in frozen:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    fault.lifted_at = time.monotonic()
    fault.outage, fault.is_outage_total = (fault.injected_at, frozen_until), True
    fault.effect = f"{len(frozen)} processes frozen {frozen_until - fault.injected_at:.1f} s"
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    _worker_death_check(stage, fault, workers)
    return fault


async def kill_the_server(stage: Stage) -> Fault:
    in_flight = await wait_for_in_flight(stage.recorder, at_least=3)
    fault = Fault("SIGKILL of the whole server", injected_at=time.monotonic(), in_flight=in_flight)
    await stage.server.kill_everything()
    await asyncio.sleep(0.5)
    await stage.server.start()
    fault.lifted_at = time.monotonic()
    fault.effect = f"down {fault.lifted_at - fault.injected_at:.1f} s, restarted on its port"
    await wait_for_recovery(fault, stage.recorder, within_s=RECOVERY_WITHIN_S)
    return fault


SCHEDULE: list[Callable[[Stage], Awaitable[Fault]]] = [
    kill_a_worker,
    restart_postgres_fast,
    stop_postgres_immediately,
    terminate_service_sessions,
    lock_the_balances_table,
    lock_the_revenue_rows,
    freeze_postgres,
    kill_the_server,
]


async def inject_in_turn(stage: Stage, faults: list[Fault]) -> None:
    await asyncio.sleep(STEADY_S)
    for inject in SCHEDULE:
        faults.append(await inject(stage))
        await asyncio.sleep(STEADY_S)


# ---- the run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A PostgreSQL cluster of this suite's own, migrated and seeded; deleted at the end."""
    try:
        cluster = Cluster.create()
    except ClusterUnavailable as reason:
        pytest.skip(f"no throwaway PostgreSQL cluster: {reason}")
    try:
        for command in ("migrate", "seed"):
            code, output = run_wallet_command(command, database_url=cluster.url)
            assert code == 0, f"wallet {command}: {output}"
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def api_key(cluster: Cluster) -> str:
    """The clients' API key, made with `wallet keys create` as an operator would."""
    return create_api_key(cluster.url, label="fault-clients")


@pytest.fixture(scope="module")
def server(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WalletServer]:
    """The server the run starts (and restarts); nothing of it outlives the module, even when
    the run is cut short (a timeout leaves the run's own clean-up undone)."""
    server = WalletServer(
        database_url=cluster.url,
        log_path=Path(tmp_path_factory.mktemp("faults")) / "server.log",
        workers=WORKERS,
        settings={
            "WALLET_DATABASE_TIMEOUT_S": str(DATABASE_TIMEOUT_S),
            "WALLET_LOG_LEVEL": "info",  # uvicorn's lines on workers dying and starting
        },
    )
    try:
        yield server
    finally:
        server.kill_leftovers()


@pytest.fixture(scope="module")
async def run(cluster: Cluster, server: WalletServer, api_key: str) -> Run:
    """Load the server, inject every fault in turn, settle and replay every key, then check."""
    started = time.monotonic()
    recorder = Recorder()
    faults: list[Fault] = []
    try:
        await server.start()
        async with network_client(server.base_url, key=api_key) as client:
            users = await create_users(client, count=USERS)
            stage = Stage(cluster, server, recorder, random.Random(SEED))
            stop = asyncio.Event()
            load = asyncio.create_task(
                run_clients(client, recorder, users, plan=LoadPlan(), stop=stop, seed=SEED)
            )
            try:
                await inject_in_turn(stage, faults)
            finally:
                stop.set()
                await load
            await settle(client, recorder, seed=SEED)
            await replay_every_final_answer(client, recorder, seed=SEED)
            await read_standings(client, recorder, users)
    finally:
        await server.stop()

    violations = Violations()
    check_answers(recorder, violations)
    check_undetermined(recorder, violations)
    check_faults(faults, recorder, violations)
    check_503s_were_not_applied(recorder, faults, violations)
    await check_ledger(cluster, recorder, violations)
    check_verify(cluster, violations)
    lines = summary(recorder, faults, violations, seconds=time.monotonic() - started)
    print("\n" + "\n".join([*lines, f"faults: server log {server.log_path}"]))
    return Run(recorder, faults, violations, server.log_tail(), cluster.log_tail())


# ---- what the run must have left -----------------------------------------------------------


def test_every_fault_was_injected_and_lifted_under_load(run: Run) -> None:
    assert len(run.faults) == FAULT_COUNT, [f.name for f in run.faults]
    assert all(f.lifted_at is not None for f in run.faults), run.faults
    operations = len(run.recorder.operations)
    assert 500 <= operations <= LoadPlan().max_operations, operations
    attempts = run.recorder.attempts()
    for fault in run.faults:
        assert fault.lifted_at is not None
        during = [
            a
            for a in attempts
            if a.started_at <= fault.lifted_at and a.ended_at >= fault.injected_at
        ]
        assert during, f"{fault.name}: no request was under way while it lasted"
    assert any(a.status == 503 for a in attempts), "no request met a fault"


def test_every_success_is_in_the_ledger_once_with_the_amounts_sent(run: Run) -> None:
    run.assert_clean(LEDGER)


def test_no_key_is_applied_twice_and_every_retry_gets_the_first_transaction(run: Run) -> None:
    run.assert_clean(IDEMPOTENCY)


def test_every_refusal_is_final_and_every_retry_gets_it_again(run: Run) -> None:
    """API-operations.md: a refusal by the ledger's state (insufficient_funds, hold_not_active,
    capture_exceeds_hold, refund_exceeds_original, not_refundable) is stored under its key like
    a success, so a retry (after a 503, a lost answer or the run) replays it, and the key never
    applies."""
    refused = [op for op in run.recorder.operations if op.refusals]
    assert refused, "no request of the run was refused: the rule went untested"
    run.assert_clean(REFUSALS)


def test_every_kind_of_request_met_the_faults(run: Run) -> None:
    """Each kind of request was sent, some of each applied and some met a fault (and were
    retried with their key); captures, releases and refunds were also refused for the state
    of the hold or transaction they name."""
    operations = run.recorder.operations
    for kind in KINDS:
        of_kind = [op for op in operations if op.flow == kind]
        assert any(op.successes for op in of_kind), f"no {kind} applied"
        assert any(a.status is None or a.status == 503 for op in of_kind for a in op.answers()), (
            f"no {kind} met a fault"
        )
    for kind in ("capture", "release", "refund"):
        assert any(op.refusals for op in operations if op.flow == kind), f"no {kind} refused"
    # Bonuses give free credits, top-ups paid ones: some spends and transfers took both.
    moved = [op.transaction for op in operations if op.flow in ("spend", "transfer")]
    assert any(t is not None and 0 < t["paidAmount"] < t["amount"] for t in moved)


def test_each_hold_ends_once_as_announced_and_held_is_what_the_holds_reserve(run: Run) -> None:
    """Of the captures and releases of one hold at most one applies; a hold is captured (of
    the amount announced), released, or still held or expired as the answers said; each
    balance's `held` is the sum of the holds announced and not ended, read back as held and
    available at the end."""
    run.assert_clean(HOLDS)


def test_assets_sum_to_zero_per_kind_and_no_user_balance_nor_paid_part_is_negative(
    run: Run,
) -> None:
    run.assert_clean(BALANCES)


def test_wallet_verify_finds_every_balance_equal_to_its_ledger_replay(run: Run) -> None:
    run.assert_clean(VERIFY)


def test_the_service_answers_503_never_500_and_never_hangs(run: Run) -> None:
    run.assert_clean(ANSWERS, HANGS, OUTAGES)


def test_the_service_recovers_by_itself_after_each_fault(run: Run) -> None:
    run.assert_clean(RECOVERY)
