"""SIGTERM under load: the real `wallet serve --workers 2`, driven by 32 concurrent clients over
real HTTP on 127.0.0.1, is told to stop mid-load. It must exit by itself, with status 0, after
answering the requests in flight; no answer may be lost or made up: every 2xx is in the ledger
exactly once, and a retry of every request that got no answer, against the server started again,
gets the stored transaction if the first attempt applied and a new one if it did not."""

import asyncio
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from concurrent_load import (
    API,
    GOLD,
    FlowRequest,
    assert_ledger_verifies,
    run_wallet_command,
    running_server,
    wait_for_group_to_end,
)
from sqlalchemy.ext.asyncio import create_async_engine

from app_clients import bearer, create_key
from wallet.store.tables import transactions

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(240)]

ALICE = "550e8400-e29b-41d4-a716-446655440000"
BOB = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
CLIENTS = 32
LOAD_BEFORE_SIGTERM_S = 1.5
MIN_ANSWERS_BEFORE_SIGTERM = 64  # the load is under way, even on a slow machine
WARM_UP_LIMIT_S = 20
CLIENT_DEADLINE_S = 15
MAX_REQUESTS = 4000
REQUEST_TIMEOUT_S = 20
EXIT_LIMIT_S = 30
# Enough that the spends (at most MAX_REQUESTS of at most 5) never overdraw: every answer is 201.
PREFUND = 1_000_000


@dataclass
class Attempt:
    """One request of the load and what came of it: a status and body, or an exception."""

    request: FlowRequest
    started: float
    finished: float = 0.0
    status: int | None = None
    body: dict[str, Any] | None = None
    error: str | None = None

    @property
    def is_2xx(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    def __str__(self) -> str:
        r = self.request
        outcome = f"{self.status} {self.body}" if self.error is None else self.error
        return f"{r.flow} {r.amount} {r.asset} of {r.user_id} key {r.key}: {outcome}"


class Budget:
    """At most MAX_REQUESTS requests across every client."""

    def __init__(self, total: int) -> None:
        self.left = total

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _client(base_url: str, key: str) -> httpx.AsyncClient:
    """One client: one connection, kept alive between its requests, as a real client keeps it."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers=bearer(key),
        limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
        timeout=httpx.Timeout(REQUEST_TIMEOUT_S),
        trust_env=False,
    )


async def _attempt(client: httpx.AsyncClient, request: FlowRequest) -> Attempt:
    attempt = Attempt(request=request, started=time.monotonic())
    try:
        response = await client.post(f"{API}/wallet/{request.flow}", json=request.body())
    except httpx.HTTPError as error:
        attempt.error = f"{type(error).__name__}: {error}"
    else:
        attempt.status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = {"unparsed": response.text[:300]}
        attempt.body = body if isinstance(body, dict) else {"unparsed": body}
    attempt.finished = time.monotonic()
    return attempt


async def _drive(
    index: int, client: httpx.AsyncClient, run: str, budget: Budget, attempts: list[Attempt]
) -> None:
    """Top-ups and spends with fresh idempotency keys, until the server refuses connections,
    the budget is spent or CLIENT_DEADLINE_S have passed."""
    rng = random.Random(index)
    deadline = time.monotonic() + CLIENT_DEADLINE_S
    for sequence in range(MAX_REQUESTS):
        if time.monotonic() > deadline or not budget.take():
            return
        flow = rng.choice(("topup", "spend"))
        request = FlowRequest(
            flow=flow,
            user_id=(ALICE, BOB)[index % 2],
            asset=GOLD,
            amount=rng.randint(1, 50) if flow == "topup" else rng.randint(1, 5),
            key=f"{run}-{index}-{sequence}",
        )
        attempt = await _attempt(client, request)
        attempts.append(attempt)
        if attempt.error is not None and attempt.error.startswith("ConnectError"):
            return  # the server is gone


def _describe(attempts: Sequence[Attempt], limit: int = 8) -> str:
    shown = "\n  ".join(str(a) for a in attempts[:limit])
    more = f"\n  ... and {len(attempts) - limit} more" if len(attempts) > limit else ""
    return f"{len(attempts)}:\n  {shown}{more}"


async def _ledger_rows(database_url: str, run: str) -> dict[str, dict[str, Any]]:
    """The run's transactions in the ledger, read directly, by idempotency key (a key is
    unique in the table, so one row per key)."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    sa.select(
                        transactions.c.id,
                        transactions.c.idempotency_key.label("key"),
                        transactions.c.type,
                        transactions.c.user_id,
                        transactions.c.asset_symbol,
                        transactions.c.amount,
                    ).where(transactions.c.idempotency_key.like(f"{run}-%"))
                )
            ).all()
    finally:
        await engine.dispose()
    return {row.key: dict(row._mapping) for row in rows}


def _matches(request: FlowRequest, row: dict[str, Any]) -> bool:
    sent = (request.flow, request.user_id, request.asset, request.amount, request.key)
    return sent == tuple(row[c] for c in ("type", "user_id", "asset_symbol", "amount", "key"))


async def test_sigterm_under_load_answers_what_was_accepted_and_loses_nothing(
    postgres_database_url: str, tmp_path: Path
) -> None:
    url = postgres_database_url
    key = await create_key(url)
    run = f"shutdown-{uuid.uuid4().hex[:12]}"
    phases: dict[str, float] = {}
    began = time.monotonic()

    attempts, sigterm_at, exited_after_s = await _load_and_terminate(url, key, run, tmp_path)
    phases["serve, load, SIGTERM, exit"] = time.monotonic() - began

    # The answers: requests in flight at SIGTERM were answered; nothing failed on the server.
    in_flight_answered = [a for a in attempts if a.started < sigterm_at <= a.finished and a.is_2xx]
    assert in_flight_answered, (
        f"no request in flight at SIGTERM got a 2xx (exit after {exited_after_s:.2f} s): "
        f"{Counter(a.status or a.error for a in attempts if a.finished >= sigterm_at)}"
    )
    not_201 = [a for a in attempts if a.status is not None and a.status != 201]
    assert not not_201, f"answers other than 201 (new keys, no overdraft) {_describe(not_201)}"
    unanswered = [a for a in attempts if a.status is None]
    failed_before = [a for a in unanswered if a.finished < sigterm_at]
    assert not failed_before, f"requests failed before SIGTERM {_describe(failed_before)}"

    # The ledger: every 2xx in it exactly once, as answered; nothing the run did not send.
    rows = await _ledger_rows(url, run)
    created = [a for a in attempts if a.is_2xx]
    _check_answers_in_ledger(created, rows)
    sent_keys = {a.request.key for a in attempts} | {_prefund_key(run, u) for u in (ALICE, BOB)}
    foreign = sorted(rows.keys() - sent_keys)
    assert not foreign, f"ledger rows of keys never sent: {foreign[:10]}"
    # Graceful: a request the server applied was answered, so no applied request went unanswered.
    applied_unanswered = [a for a in unanswered if a.request.key in rows]
    assert not applied_unanswered, f"applied, never answered {_describe(applied_unanswered)}"

    # A retry of each request that got no answer, against the server started again.
    began = time.monotonic()
    retries = await _retry_on_a_new_server(url, key, unanswered, tmp_path)
    problems = []
    for first, retried in zip(unanswered, retries, strict=True):
        row = rows.get(first.request.key)
        if row is not None:
            stored = retried.body.get("transactionId") if retried.body else None
            if retried.status != 200 or stored != row["id"]:
                problems.append(f"applied at first, not replayed: {retried} (ledger: {row})")
        elif retried.status != 201:
            problems.append(f"not applied at first, retry not created: {retried}")
    assert not problems, "\n".join(problems[:10]) + f"\n({len(problems)} problems)"
    after = await _ledger_rows(url, run)
    _check_answers_in_ledger([r for r in retries if r.status == 201], after)
    assert len(after) == len(rows) + sum(r.status == 201 for r in retries)
    phases["serve again, retry"] = time.monotonic() - began

    began = time.monotonic()
    await assert_ledger_verifies(url)
    exit_code, output = await run_wallet_command("verify", database_url=url)
    assert exit_code == 0, output
    phases["verify"] = time.monotonic() - began

    print(
        f"\n{len(attempts)} requests, {len(created)} answered 2xx, "
        f"{len(in_flight_answered)} of them in flight at SIGTERM; {len(unanswered)} unanswered "
        f"({len(applied_unanswered)} applied anyway); exit {exited_after_s:.2f} s after SIGTERM; "
        f"errors: {Counter((a.error or '').split(':')[0] for a in unanswered)}; "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
    )


def _prefund_key(run: str, user: str) -> str:
    return f"{run}-prefund-{user}"


async def _load_and_terminate(
    url: str, key: str, run: str, tmp_path: Path
) -> tuple[list[Attempt], float, float]:
    """Serve, load, SIGTERM the supervisor mid-load and wait for it to exit by itself: every
    attempt, when SIGTERM was sent and how long the server took to exit after it."""
    attempts: list[Attempt] = []
    budget = Budget(MAX_REQUESTS)
    drivers: list[asyncio.Task[None]] = []
    async with (
        running_server(url, workers=2, log_path=tmp_path / "server.log") as server,
        AsyncExitStack() as stack,
    ):
        # Every client made before the load starts (each builds its TLS context, which takes a
        # while on a busy machine), so the load starts at once.
        clients = [
            await stack.enter_async_context(_client(server.base_url, key)) for _ in range(CLIENTS)
        ]
        try:
            for user in (ALICE, BOB):
                prefund = FlowRequest("topup", user, GOLD, PREFUND, _prefund_key(run, user))
                funded = await _attempt(clients[0], prefund)
                assert funded.status == 201, funded

            drivers = [
                asyncio.create_task(_drive(i, client, run, budget, attempts))
                for i, client in enumerate(clients)
            ]
            for _ in range(int(WARM_UP_LIMIT_S / 0.05)):  # until the first answers come
                if attempts:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(LOAD_BEFORE_SIGTERM_S)
            for _ in range(int(WARM_UP_LIMIT_S / 0.1)):
                if sum(a.is_2xx for a in attempts) >= MIN_ANSWERS_BEFORE_SIGTERM:
                    break
                await asyncio.sleep(0.1)
            assert sum(a.is_2xx for a in attempts) >= MIN_ANSWERS_BEFORE_SIGTERM, (
                f"the load never got going: {Counter(a.status for a in attempts)}\n"
                f"{server.log_tail()}"
            )
            assert server.process.returncode is None, server.log_tail()

            sigterm_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)  # to the uvicorn supervisor alone
            try:
                await asyncio.wait_for(server.process.wait(), EXIT_LIMIT_S)
            except TimeoutError:
                pytest.fail(f"still running {EXIT_LIMIT_S} s after SIGTERM:\n{server.log_tail()}")
            exited_after_s = time.monotonic() - sigterm_at
            await asyncio.wait_for(asyncio.gather(*drivers), REQUEST_TIMEOUT_S * 2)
        finally:
            for driver in drivers:
                driver.cancel()
            await asyncio.gather(*drivers, return_exceptions=True)

    log = server.log_path.read_text(errors="replace")
    assert server.process.returncode == 0, f"exit {server.process.returncode}:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-3000:]
    outliving = await wait_for_group_to_end(server.process.pid, timeout_s=5)
    assert not outliving, f"processes of the server outlived it: {outliving}"
    return attempts, sigterm_at, exited_after_s


def _check_answers_in_ledger(answers: Sequence[Attempt], rows: dict[str, dict[str, Any]]) -> None:
    """Each answer's transaction is its key's row of the ledger (a key is unique there, a
    transaction id too), with the amount, flow, user and asset that were sent."""
    ids = Counter(row["id"] for row in rows.values())
    problems = []
    for answer in answers:
        transaction_id = answer.body.get("transactionId") if answer.body else None
        row = rows.get(answer.request.key)
        if row is None or row["id"] != transaction_id or ids[transaction_id] != 1:
            problems.append(f"not in the ledger exactly once as answered: {answer} / {row}")
        elif not _matches(answer.request, row):
            problems.append(f"the ledger's row differs from the request: {answer} / {row}")
    assert not problems, "\n".join(problems[:10]) + f"\n({len(problems)} problems)"


async def _retry_on_a_new_server(
    url: str, key: str, unanswered: Sequence[Attempt], tmp_path: Path
) -> list[Attempt]:
    async with (
        running_server(url, workers=2, log_path=tmp_path / "server-again.log") as server,
        _client(server.base_url, key) as client,
    ):
        limit = asyncio.Semaphore(16)

        async def retry(attempt: Attempt) -> Attempt:
            async with limit:
                return await _attempt(client, attempt.request)

        retries = await asyncio.gather(*(retry(a) for a in unanswered))
    assert server.process.returncode == 0, server.log_tail()
    return list(retries)
