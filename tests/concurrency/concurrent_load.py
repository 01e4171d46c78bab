"""What the concurrency tests share: the app in process or the real server over HTTP, new users,
flows fired concurrently (with concurrent duplicates), a TCP proxy that can cut the database off,
and the invariants a load must leave behind in the ledger."""

import asyncio
import itertools
import json
import os
import random
import re
import signal
import socket
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import httpx
import sqlalchemy as sa
from sqlalchemy import event

from app_clients import bearer
from wallet.http.app import create_app
from wallet.service.audit import verify
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

API = "/api/v1"
GOLD = "GOLD_COINS"
ASSETS = ("GOLD_COINS", "DIAMONDS", "LOYALTY_POINTS")
SIGN = {"topup": 1, "bonus": 1, "spend": -1}
WALLET_COMMAND = Path(sys.executable).parent / "wallet"
MAX_PAGES = 100

# The two modes of the app the concurrency tests run in.
OWN_TRANSACTIONS = "own-transactions"
GROUP_COMMIT = "group-commit"


# ---- clients -------------------------------------------------------------------------------


class ConnectionPeak:
    """The most pooled connections the app held at one moment: proof that requests ran their
    transactions side by side rather than one after another."""

    def __init__(self) -> None:
        self.current = 0
        self.highest = 0

    def watch(self, database: Database) -> None:
        pool = database.engine.sync_engine.pool
        event.listen(pool, "checkout", self._checked_out)
        event.listen(pool, "checkin", self._checked_in)

    def _checked_out(self, *_: Any) -> None:
        self.current += 1
        self.highest = max(self.highest, self.current)

    def _checked_in(self, *_: Any) -> None:
        self.current -= 1


@asynccontextmanager
async def in_process_client(
    settings: Settings, *, key: str, peak: ConnectionPeak | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of one app made from `settings`, its lifespan running throughout, sending
    the API key `key` with every request."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        if peak is not None:
            peak.watch(app.state.wallet.database)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://wallet.test",
            timeout=60,
            headers=bearer(key),
        ) as client:
            yield client


def network_client(base_url: str, *, key: str | None, connections: int = 64) -> httpx.AsyncClient:
    """A client of a server on 127.0.0.1 over real HTTP, sending the API key `key` (None: no
    key, for the public health check); proxy variables are ignored."""
    return httpx.AsyncClient(
        base_url=base_url,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        timeout=httpx.Timeout(30.0),
        trust_env=False,
        headers=None if key is None else bearer(key),
    )


async def new_user(client: httpx.AsyncClient, *, label: str) -> str:
    """Create a user with a fresh id and return the id."""
    user_id = f"{label}-{uuid.uuid4().hex[:12]}"
    response = await client.post(
        f"{API}/users", json={"id": user_id, "email": f"{user_id}@example.com", "name": label}
    )
    assert response.status_code == 201, f"creating user {user_id}: {response.text}"
    return user_id


async def new_users(client: httpx.AsyncClient, *, label: str, count: int) -> list[str]:
    return list(await asyncio.gather(*(new_user(client, label=label) for _ in range(count))))


async def balance(client: httpx.AsyncClient, user_id: str, asset: str = GOLD) -> int:
    return (await balance_parts(client, user_id, asset))[0]


async def balance_parts(
    client: httpx.AsyncClient, user_id: str, asset: str = GOLD
) -> tuple[int, int]:
    """The user's balance of the asset and its paid part; neither part is ever negative."""
    response = await client.get(f"{API}/wallet/balance/{user_id}/{asset}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["paid"] + body["free"] == body["balance"], body
    assert min(body["paid"], body["free"]) >= 0, body
    return body["balance"], body["paid"]


async def _all_pages(
    client: httpx.AsyncClient, path: str, params: dict[str, str | int]
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params = {"limit": 500, **params}
    for _ in range(MAX_PAGES):
        response = await client.get(path, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        if page["nextCursor"] is None:
            return items
        params["cursor"] = page["nextCursor"]
    raise AssertionError(f"{path} has more than {MAX_PAGES} pages")


async def transactions_of(
    client: httpx.AsyncClient, user_id: str, *, flow: str | None = None
) -> list[dict[str, Any]]:
    """Every transaction of the user, newest first, read page by page."""
    params: dict[str, str | int] = {} if flow is None else {"type": flow}
    return await _all_pages(client, f"{API}/wallet/transactions/{user_id}", params)


async def entries_of(client: httpx.AsyncClient, user_id: str) -> list[dict[str, Any]]:
    """Every ledger entry of the user, newest first, read page by page."""
    return await _all_pages(client, f"{API}/wallet/ledger/{user_id}", {})


# ---- flows ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowRequest:
    """One flow request as a client sends it."""

    flow: str
    user_id: str
    asset: str
    amount: int
    key: str

    def body(self) -> dict[str, Any]:
        return {
            "userId": self.user_id,
            "assetSymbol": self.asset,
            "amount": self.amount,
            "idempotencyKey": self.key,
        }


@dataclass(frozen=True, slots=True)
class Reply:
    request: FlowRequest
    status: int
    body: dict[str, Any]
    is_replayed: bool  # the Idempotent-Replayed: true header

    @property
    def code(self) -> str | None:
        code: str | None = self.body.get("code")
        return code

    def __str__(self) -> str:
        r = self.request
        return (
            f"{r.flow} {r.amount} {r.asset} of {r.user_id} key {r.key}: {self.status} {self.body}"
        )


async def send(client: httpx.AsyncClient, request: FlowRequest) -> Reply:
    response = await client.post(f"{API}/wallet/{request.flow}", json=request.body())
    try:
        body = response.json()
    except ValueError:
        body = {"unparsed": response.text[:500]}
    if not isinstance(body, dict):
        body = {"unparsed": body}
    return Reply(
        request=request,
        status=response.status_code,
        body=body,
        is_replayed=response.headers.get("Idempotent-Replayed") == "true",
    )


async def send_all(
    client: httpx.AsyncClient,
    requests: Sequence[FlowRequest],
    *,
    concurrency: int | None = None,
    retries_when_unavailable: int = 0,
) -> list[Reply]:
    """Send every request at once (or at most `concurrency` at a time), replies in order. A
    request answered 503 is sent again with its key up to `retries_when_unavailable` times, as
    the contract tells a client to: its reply is the last answer."""
    if concurrency is None:
        return list(await asyncio.gather(*(send(client, r) for r in requests)))
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(request: FlowRequest) -> Reply:
        async with semaphore:
            reply = await send(client, request)
            for _ in range(retries_when_unavailable):
                if reply.status != 503:
                    break
                reply = await send(client, request)
            return reply

    return list(await asyncio.gather(*(bounded(r) for r in requests)))


def mixed_requests(
    rng: random.Random,
    users: Sequence[str],
    *,
    count: int,
    duplicate_share: float,
    assets: Sequence[str] = (GOLD, "DIAMONDS"),
) -> list[FlowRequest]:
    """`count` random top-ups, bonuses and spends (spends large enough to overdraw at times);
    about `duplicate_share` of them appear again, once or twice, right after the original, so
    the copies are in flight together."""
    amounts = {"topup": (1, 300), "bonus": (1, 100), "spend": (1, 250)}
    flows = rng.choices(("topup", "bonus", "spend"), weights=(4, 2, 5), k=count)
    sent: list[FlowRequest] = []
    for index, flow in enumerate(flows):
        request = FlowRequest(
            flow=flow,
            user_id=rng.choice(users),
            asset=rng.choice(assets),
            amount=rng.randint(*amounts[flow]),
            key=f"load-{index}-{uuid.uuid4().hex[:16]}",
        )
        copies = 1 + (rng.randint(1, 2) if rng.random() < duplicate_share else 0)
        sent.extend([request] * copies)
    return sent


# ---- invariants ----------------------------------------------------------------------------


@dataclass
class LoadReport:
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    applied: int = 0
    duplicated_keys: int = 0
    refusals_replayed: int = 0  # refused keys sent again after the load, each a replay


def _describe(replies: Sequence[Reply], limit: int = 8) -> str:
    shown = "\n  ".join(str(r) for r in replies[:limit])
    more = f"\n  ... and {len(replies) - limit} more" if len(replies) > limit else ""
    return f"{len(replies)} replies:\n  {shown}{more}"


def without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    """A problem body but its requestId, which names the one request answered."""
    return {name: value for name, value in body.items() if name != "requestId"}


def _has_its_kinds(body: dict[str, Any]) -> bool:
    """A transaction's paid and free amounts make its amount; a top-up's are all paid, a
    bonus's all free."""
    paid: int = body.get("paidAmount", -1)
    free: int = body.get("freeAmount", -1)
    issued = {"topup": free == 0, "bonus": paid == 0}.get(body.get("type", ""), True)
    return min(paid, free) >= 0 and paid + free == body.get("amount") and issued


def check_replies(replies: Sequence[Reply]) -> dict[str, Reply]:
    """Check every key's replies against the idempotency contract; return the applied (201)
    reply of each key that was applied. A refusal by the ledger's state (422
    insufficient_funds) is final, as a success is (API-operations.md): it is made once and its
    key's other requests replay it, never apply."""
    server_errors = [r for r in replies if r.status >= 500]
    assert not server_errors, f"5xx answers: {_describe(server_errors)}"
    by_key: dict[str, list[Reply]] = defaultdict(list)
    for reply in replies:
        by_key[reply.request.key].append(reply)
    problems: list[str] = []
    applied: dict[str, Reply] = {}
    for key, group in by_key.items():
        request = group[0].request
        created = [r for r in group if r.status == 201]
        replayed = [r for r in group if r.status == 200]
        refused = [r for r in group if r.status == 422]
        unexpected = [r for r in group if r.status not in (200, 201, 422)]
        problems += [f"unexpected status: {r}" for r in unexpected]
        if len(created) > 1:
            problems.append(f"key {key} applied {len(created)} times: {_describe(created)}")
        if request.flow != "spend" and len(created) != 1:
            problems.append(f"{request.flow} key {key} not applied once: {_describe(group)}")
        problems += [
            f"refused for another reason than insufficient funds: {r}"
            for r in refused
            if request.flow != "spend" or r.code != "insufficient_funds"
        ]
        if replayed and not created:
            problems.append(f"key {key} replayed but never applied: {_describe(group)}")
        if refused and (created or replayed):
            problems.append(f"key {key} both refused and applied: {_describe(group)}")
        first_refusals = [r for r in refused if not r.is_replayed]
        if refused and len(first_refusals) != 1:
            problems.append(
                f"key {key} refused {len(first_refusals)} times without Idempotent-Replayed, "
                f"not once and then replayed: {_describe(refused)}"
            )
        if len({json.dumps(without_request_id(r.body), sort_keys=True) for r in refused}) > 1:
            problems.append(f"key {key} refused with different answers: {_describe(refused)}")
        for reply in created:
            body = reply.body
            sent = (request.flow, request.user_id, request.asset, request.amount, key)
            got = (
                body.get("type"),
                body.get("userId"),
                body.get("assetSymbol"),
                body.get("amount"),
                body.get("idempotencyKey"),
            )
            if (
                sent != got
                or reply.is_replayed
                or body.get("balanceAfter", -1) < 0
                or not _has_its_kinds(body)
            ):
                problems.append(f"201 does not describe its request: {reply}")
            applied[key] = reply
        for reply in replayed:
            if not reply.is_replayed or (
                created and reply.body.get("transactionId") != created[0].body["transactionId"]
            ):
                problems.append(f"200 is not a replay of the applied request: {reply}")
    # Every transaction names the API key that made it: here the one key the load was sent with.
    makers = {r.body.get("createdBy") for r in applied.values()}
    if applied and (len(makers) != 1 or not all(isinstance(m, str) and m for m in makers)):
        problems.append(f"201s made by {makers}, not by the one key the load was sent with")
    assert not problems, "\n".join(problems[:20]) + f"\n({len(problems)} problems)"
    return applied


async def check_refusals_are_final(
    client: httpx.AsyncClient, replies: Sequence[Reply], *, concurrency: int = 32
) -> int:
    """Send the request of every refused key once more: each must get its first refusal again,
    with Idempotent-Replayed, whatever the balance is now (API-operations.md: a refusal is
    final). How many keys were checked."""
    first: dict[str, Reply] = {}
    for reply in replies:
        if reply.status == 422 and not reply.is_replayed:
            first.setdefault(reply.request.key, reply)
    again = await send_all(client, [r.request for r in first.values()], concurrency=concurrency)
    wrong = [
        f"{reply} (first: {earlier.status} {earlier.body})"
        for earlier, reply in zip(first.values(), again, strict=True)
        if reply.status != 422
        or not reply.is_replayed
        or without_request_id(reply.body) != without_request_id(earlier.body)
    ]
    assert not wrong, f"{len(wrong)} refusals not replayed as they were:\n  " + "\n  ".join(
        wrong[:10]
    )
    return len(first)


def _by_asset(items: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        grouped[item["assetSymbol"]].append(item)
    return grouped


def _out_of_order(listed: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], ...]]:
    """Neighbours of a newest-first list whose createdAt goes the other way."""
    return [
        (newer, older)
        for newer, older in itertools.pairwise(listed)
        if datetime.fromisoformat(newer["createdAt"]) < datetime.fromisoformat(older["createdAt"])
    ]


async def check_order_of_application(client: httpx.AsyncClient, user_id: str) -> None:
    """Per asset, for a user who started with nothing: read oldest first, the user's entries and
    transactions replay the balanceAfter chain (and the entries the paidAfter chain, never
    below zero nor above the balance) from zero, in the same order, each transaction's entries
    (one per kind) stating its paid and free amounts, and createdAt never goes back. (Two
    transactions of different assets share no row, so they may apply side by side; their
    relative order is not checked.)"""
    entries = _by_asset(await entries_of(client, user_id))
    history = _by_asset(await transactions_of(client, user_id))
    assert entries.keys() == history.keys(), f"{user_id}: entries and transactions disagree"
    for asset, listed in entries.items():
        where = f"{user_id} {asset}"
        running = running_paid = 0
        for entry in reversed(listed):
            signed = entry["amount"] if entry["direction"] == "credit" else -entry["amount"]
            running += signed
            running_paid += signed if entry["kind"] == "paid" else 0
            assert entry["balanceAfter"] == running, f"{where}: {entry} breaks the chain"
            assert entry["paidAfter"] == running_paid, f"{where}: {entry} breaks the paid chain"
            assert 0 <= running_paid <= running, f"{where}: {entry} leaves a paid part out of range"
        transactions = history[asset]
        listed_ids = list(dict.fromkeys(e["transactionId"] for e in listed))
        assert listed_ids == [t["transactionId"] for t in transactions], (
            f"{where}: entries and transactions listed in different orders"
        )
        moved: dict[str, dict[str, int]] = defaultdict(dict)
        for entry in listed:
            moved[entry["transactionId"]][entry["kind"]] = entry["amount"]
        for transaction in transactions:
            stated = {"paid": transaction["paidAmount"], "free": transaction["freeAmount"]}
            kinds = moved[transaction["transactionId"]]
            assert kinds == {kind: amount for kind, amount in stated.items() if amount}, (
                f"{where}: {transaction} has entries of {kinds}"
            )
        running = 0
        for transaction in reversed(transactions):
            running += SIGN[transaction["type"]] * transaction["amount"]
            assert transaction["balanceAfter"] == running, (
                f"{where}: {transaction} breaks the chain"
            )
        for name, items in (("entries", listed), ("transactions", transactions)):
            swapped = _out_of_order(items)
            assert not swapped, f"{where}: {name}' createdAt out of order: {swapped[:3]}"


async def check_load(
    client: httpx.AsyncClient,
    replies: Sequence[Reply],
    *,
    users: Sequence[str],
    assets: Sequence[str],
) -> LoadReport:
    """The replies keep the idempotency contract; every 201 is in the ledger exactly once and
    nothing else is; each (new) user's balances equal the sum of their applied flows; every
    refused request, sent again, is refused again as a replay and moves nothing."""
    applied = check_replies(replies)
    refusals_replayed = await check_refusals_are_final(client, replies)

    expected: Counter[tuple[str, str]] = Counter()
    expected_paid: Counter[tuple[str, str]] = Counter()
    for reply in applied.values():
        r = reply.request
        expected[(r.user_id, r.asset)] += SIGN[r.flow] * r.amount
        expected_paid[(r.user_id, r.asset)] += SIGN[r.flow] * reply.body["paidAmount"]

    histories = await asyncio.gather(*(transactions_of(client, user) for user in users))
    in_ledger = [t for history in histories for t in history]
    counts = Counter(t["transactionId"] for t in in_ledger)
    key_counts = Counter(t["idempotencyKey"] for t in in_ledger)
    applied_ids = {reply.body["transactionId"] for reply in applied.values()}
    twice = {i: c for i, c in counts.items() if c != 1}
    keys_twice = {k: c for k, c in key_counts.items() if c != 1}
    assert not twice, f"transactions listed more than once: {twice}"
    assert not keys_twice, f"keys applied more than once in the ledger: {keys_twice}"
    missing = applied_ids - counts.keys()
    unanswered = counts.keys() - applied_ids
    assert not missing, f"201 transactions missing from the ledger: {sorted(missing)[:10]}"
    assert not unanswered, f"ledger transactions no 201 announced: {sorted(unanswered)[:10]}"

    await asyncio.gather(*(check_order_of_application(client, user) for user in users))

    pairs = [(user, asset) for user in users for asset in assets]
    actual = await asyncio.gather(*(balance_parts(client, user, asset) for user, asset in pairs))
    wrong = {
        pair: (got, (expected[pair], expected_paid[pair]))
        for pair, got in zip(pairs, actual, strict=True)
        if got != (expected[pair], expected_paid[pair])
    }
    assert not wrong, f"(user, asset): ((balance, paid), sum of applied flows): {wrong}"

    duplicated = Counter(r.request.key for r in replies)
    return LoadReport(
        statuses=Counter(r.status for r in replies),
        codes=Counter(r.code for r in replies if r.code),
        applied=len(applied),
        duplicated_keys=sum(1 for c in duplicated.values() if c > 1),
        refusals_replayed=refusals_replayed,
    )


async def assert_ledger_verifies(database_url: str) -> None:
    """`wallet.service.audit.verify` finds every invariant intact."""
    database = Database(create_engine(Settings(database_url=database_url, database_pool_size=2)))
    try:
        checks = await verify(database)
    finally:
        await database.close()
    failures = {check.name: check.failures[:10] for check in checks if not check.is_clean}
    assert checks, "verify ran no checks"
    assert not failures, f"ledger verification failed: {failures}"


# ---- processes -----------------------------------------------------------------------------


def wallet_environment(database_url: str, **settings: str) -> dict[str, str]:
    """This environment with the database URL and any other setting (by field name) set."""
    extra = {f"WALLET_{name.upper()}": value for name, value in settings.items()}
    return {**os.environ, "WALLET_DATABASE_URL": database_url, **extra}


async def run_wallet_command(
    *args: str, database_url: str, timeout_s: float = 60
) -> tuple[int, str]:
    """Run the real `wallet` command; its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        str(WALLET_COMMAND),
        *args,
        env=wallet_environment(database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


KEY_LINE = re.compile(r"wk_[A-Za-z0-9_-]{43}")
# Budgets of the keys of the load: high enough that the rate limiter, on as in production,
# never refuses a request of these tests.
LOAD_BUDGET_PER_S = 1_000_000


async def create_key_with_cli(database_url: str, *, label: str) -> str:
    """A new admin key from `wallet keys create`, as an operator makes one for a client of a
    server started with the CLI: the key is alone on the last line of its output."""
    exit_code, output = await run_wallet_command(
        *("keys", "create", "--label", label, "--scope", "admin"),
        *("--reads-per-second", str(LOAD_BUDGET_PER_S)),
        *("--writes-per-second", str(LOAD_BUDGET_PER_S)),
        database_url=database_url,
    )
    assert exit_code == 0, output
    key = output.splitlines()[-1]
    assert KEY_LINE.fullmatch(key), output
    return key


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def live_processes_in_group(group: int) -> list[int]:
    """Processes of this process group that are still running (zombies excluded), from /proc."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):
            # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after its ')'
            state, _parent, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
            if int(pgrp) == group and state != "Z":
                live.append(int(stat.parent.name))
    return live


async def wait_for_group_to_end(group: int, *, timeout_s: float) -> list[int]:
    """The group's live processes once none are left or `timeout_s` has passed."""
    for _ in range(int(timeout_s / 0.1)):
        if not (live := live_processes_in_group(group)):
            return live
        await asyncio.sleep(0.1)
    return live_processes_in_group(group)


def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


@dataclass
class Server:
    base_url: str
    log_path: Path
    process: asyncio.subprocess.Process
    was_killed: bool = False

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


async def _wait_healthy(server: Server, *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with network_client(server.base_url, key=None, connections=1) as client:
        for _ in range(int(timeout_s / 0.1)):
            if time.monotonic() > deadline:
                break
            if server.process.returncode is not None:
                raise AssertionError(f"the server exited early:\n{server.log_tail()}")
            with suppress(httpx.TransportError):
                response = await client.get(f"{API}/health", timeout=1.0)
                if response.status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"no healthy server within {timeout_s} s:\n{server.log_tail()}")


@asynccontextmanager
async def running_server(
    database_url: str,
    *,
    workers: int,
    log_path: Path,
    settings: dict[str, str] | None = None,
    startup_s: float = 20,
) -> AsyncIterator[Server]:
    """`wallet serve` on a free port of 127.0.0.1, healthy; terminated when the block ends
    (killed, with `was_killed` set, if it does not exit within 15 s of SIGTERM)."""
    port = free_port()
    log = _open_log(log_path)
    process = await asyncio.create_subprocess_exec(
        *(str(WALLET_COMMAND), "serve", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", str(workers)),
        env=wallet_environment(database_url, **(settings or {})),
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its workers share its process group, to kill them if need be
    )
    server = Server(base_url=f"http://127.0.0.1:{port}", log_path=log_path, process=process)
    try:
        await _wait_healthy(server, timeout_s=startup_s)
        yield server
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            server.was_killed = True
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        log.close()


# ---- a TCP proxy in front of PostgreSQL ----------------------------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream_port>; `close` refuses new connections
    and aborts the open ones, as a database that went away would; `start` again on the same port
    brings it back."""

    def __init__(self, *, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def url_for(self, database_url: str) -> str:
        """`database_url` with its host and port replaced by the proxy's."""
        return (
            sa.make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    @property
    def open_connections(self) -> int:
        return len(self._clients)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.accepted += 1
        self._writers.add(writer)
        self._clients.add(writer)
        upstream_writer: asyncio.StreamWriter | None = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.upstream_port
            )
            self._writers.add(upstream_writer)
            await asyncio.gather(
                _pipe(reader, upstream_writer),
                _pipe(upstream_reader, writer),
                return_exceptions=True,
            )
        except OSError:
            pass
        finally:
            for side in (writer, upstream_writer):
                if side is not None:
                    side.transport.abort()
                    self._writers.discard(side)
            self._clients.discard(writer)
            self._handlers.discard(handler)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side ends, then abort the writer so the other direction ends too."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    finally:
        writer.transport.abort()
