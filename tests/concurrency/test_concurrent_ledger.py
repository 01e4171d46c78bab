"""Holds, refunds, transfers and atomic batches (API-ledger.md) under many real clients at once on
PostgreSQL, with group commit off and on, in process and through `wallet serve` with two workers:
captures race releases of one hold (and its expiry), refunds race past their original, transfers
cross, holds expire while spends run, batches race single flows on the same users, and duplicates
of one key meet in flight. After each, no deadlock was rerun behind the scenes, the ledger
verifies, and every balance's `held` is the sum of its holds in status held."""

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from concurrent_load import (
    API,
    GOLD,
    GROUP_COMMIT,
    OWN_TRANSACTIONS,
    ConnectionPeak,
    FlowRequest,
    assert_ledger_verifies,
    balance_parts,
    create_key_with_cli,
    in_process_client,
    network_client,
    new_user,
    new_users,
    run_wallet_command,
    running_server,
    send,
    transactions_of,
    without_request_id,
)
from sqlalchemy import event

from wallet.settings import Settings
from wallet.store.database import Database, create_engine

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(240)]

DIAMONDS = "DIAMONDS"
SPEND = f"{API}/wallet/spend"
TRANSFER = f"{API}/wallet/transfer"
HOLDS = f"{API}/wallet/holds"
BATCH = f"{API}/wallet/batch"
# What a transaction does to the balance of the user whose list it is in (a transfer: by side).
SIGN = {"topup": 1, "bonus": 1, "refund": 1, "spend": -1, "reversal": -1}
# Bounds a whole concurrent load; far above what it takes on a loaded 2-core machine, so only a
# deadlock or a starved request reaches it.
LOAD_DEADLINE_S = 120


def _url(settings: Settings) -> str:
    return settings.database_url.get_secret_value()


def _runs_side_by_side(settings: Settings) -> bool:
    return settings.batch_max_size == 1


def _key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def _capture(hold_id: str) -> str:
    return f"{HOLDS}/{hold_id}/capture"


def _release(hold_id: str) -> str:
    return f"{HOLDS}/{hold_id}/release"


def _refund(transaction_id: str) -> str:
    return f"{API}/wallet/transactions/{transaction_id}/refund"


def _moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


# ---- requests and answers ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One POST as sent and as answered, with the moment the answer arrived."""

    path: str
    sent: dict[str, Any]
    status: int
    body: dict[str, Any]
    is_replayed: bool  # the Idempotent-Replayed: true header
    received_at: datetime

    @property
    def code(self) -> str | None:
        code: str | None = self.body.get("code")
        return code

    @property
    def key(self) -> str:
        key: str = self.sent["idempotencyKey"]
        return key

    def __str__(self) -> str:
        replayed = " (replayed)" if self.is_replayed else ""
        return f"POST {self.path} {self.sent}: {self.status}{replayed} {self.body}"


Call = tuple[str, dict[str, Any]]


async def post(client: httpx.AsyncClient, path: str, sent: dict[str, Any]) -> Answer:
    response = await client.post(path, json=sent)
    try:
        body = response.json()
    except ValueError:
        body = {"unparsed": response.text[:500]}
    return Answer(
        path=path,
        sent=sent,
        status=response.status_code,
        body=body if isinstance(body, dict) else {"unparsed": body},
        is_replayed=response.headers.get("Idempotent-Replayed") == "true",
        received_at=datetime.now(UTC),
    )


async def post_all(
    client: httpx.AsyncClient, calls: Sequence[Call], *, concurrency: int | None = None
) -> list[Answer]:
    """Send every call at once (or at most `concurrency` at a time), bounded by LOAD_DEADLINE_S
    so a deadlock fails the test instead of hanging it; answers in order. Under SERIALIZABLE,
    a request the engine gave up on after its retries (`is_starved`) is sent once more with its
    key, after the others, and that answer stands for it; at most 1 in 20 may starve."""
    semaphore = asyncio.Semaphore(concurrency or len(calls) or 1)

    async def bounded(path: str, sent: dict[str, Any]) -> Answer:
        async with semaphore:
            return await post(client, path, sent)

    answers = list(
        await asyncio.wait_for(
            asyncio.gather(*(bounded(path, sent) for path, sent in calls)), LOAD_DEADLINE_S
        )
    )
    starved = [a for a in answers if is_starved(a)]
    assert len(starved) * 20 <= len(answers), f"too many starved: {_show(starved)}"
    for index, answer in enumerate(answers):
        if is_starved(answer):
            answers[index] = await post(client, answer.path, answer.sent)
    return answers


def is_starved(answer: Answer) -> bool:
    """Under SERIALIZABLE the engine reruns a transaction the database aborted for up to 20 s,
    then answers 503 (docs/SCALING.md): nothing applied, and the client may retry with its key.
    A hot row under tens of concurrent transactions starves one now and then on a loaded
    machine; under READ COMMITTED nothing may starve."""
    return (
        Settings().database_isolation == "serializable"
        and answer.status == 503
        and answer.body.get("detail") == "the database kept aborting the transaction"
    )


def _show(answers: Sequence[Answer], limit: int = 6) -> str:
    shown = "\n  ".join(str(a) for a in answers[:limit])
    more = f"\n  ... and {len(answers) - limit} more" if len(answers) > limit else ""
    return f"{len(answers)} answers:\n  {shown}{more}"


def assert_no_server_errors(answers: Sequence[Answer]) -> None:
    failed = [a for a in answers if a.status >= 500]
    assert not failed, f"5xx answers: {_show(failed)}"


def assert_outcomes(answers: Sequence[Answer], *allowed: tuple[int, str | None]) -> None:
    """Every answer has one of the allowed (status, code) pairs (code None: a success)."""
    odd = [a for a in answers if (a.status, a.code) not in allowed]
    assert not odd, f"answers other than {allowed}: {_show(odd)}"


def by_key(answers: Sequence[Answer]) -> dict[str, list[Answer]]:
    grouped: dict[str, list[Answer]] = defaultdict(list)
    for answer in answers:
        grouped[answer.key].append(answer)
    return grouped


def assert_applied_once(answers: Sequence[Answer], *, first_status: int = 201) -> Answer:
    """Answers to one key that applied: exactly one first answer (`first_status`, no replay
    header), every other a 200 replay with the same body. Returns the first."""
    first = [a for a in answers if a.status == first_status and not a.is_replayed]
    replays = [a for a in answers if a.status == 200 and a.is_replayed]
    others = [a for a in answers if a not in first and a not in replays]
    assert len(first) == 1, _show(answers)
    assert not others, f"neither the first answer nor a replay: {_show(others)}"
    wrong = [a for a in replays if a.body != first[0].body]
    assert not wrong, f"replays differ from the first answer {first[0].body}: {_show(wrong)}"
    return first[0]


def assert_refused_once(answers: Sequence[Answer], *, status: int, code: str) -> Answer:
    """Answers to one key the ledger refused: one first refusal, the others its replay (same
    status and body but the request id, with Idempotent-Replayed). Returns the first."""
    assert_outcomes(answers, (status, code))
    first = [a for a in answers if not a.is_replayed]
    assert len(first) == 1, (
        f"refused {len(first)} times without the replay header: {_show(answers)}"
    )
    body = without_request_id(first[0].body)
    wrong = [a for a in answers if without_request_id(a.body) != body]
    assert not wrong, f"refusals differ from the first {body}: {_show(wrong)}"
    return first[0]


# ---- the database --------------------------------------------------------------------------


class DatabaseErrors(ConnectionPeak):
    """The pool's peak, and every error the app's database raised: the engine reruns a deadlock
    (40P01) silently, so only this shows one."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def watch(self, database: Database) -> None:
        super().watch(database)
        event.listen(database.engine.sync_engine, "handle_error", self._on_error)

    def _on_error(self, context: Any) -> None:
        original = context.original_exception
        self.seen.append(f"{getattr(original, 'sqlstate', None)}: {original!r}")

    def unexpected(self) -> list[str]:
        """The errors but the serialization failures SERIALIZABLE isolation makes (and reruns)."""
        if Settings().database_isolation == "serializable":
            return [e for e in self.seen if not e.startswith("40001")]
        return list(self.seen)


async def query(database_url: str, statement: str, **params: Any) -> list[sa.Row[Any]]:
    database = Database(create_engine(Settings(database_url=database_url, database_pool_size=2)))
    try:
        async with database.transaction(is_write=False) as connection:
            return list(await connection.execute(sa.text(statement), params))
    finally:
        await database.close()


async def assert_held_is_sum_of_holds(database_url: str) -> None:
    """Every balance row's `held` is the sum of its user's holds of the asset in status held
    (expired or not yet marked), and no such hold lacks a balance row."""
    wrong = await query(
        database_url,
        """
        SELECT b.account_id, b.asset_symbol, b.held, h.total
        FROM balances AS b
        FULL OUTER JOIN (
            SELECT user_id, asset_symbol, sum(amount) AS total FROM holds
            WHERE status = 'held' GROUP BY user_id, asset_symbol
        ) AS h ON h.user_id = b.account_id AND h.asset_symbol = b.asset_symbol
        WHERE b.held IS DISTINCT FROM coalesce(h.total, 0)
        """,
    )
    assert not wrong, f"(account, asset, held, sum of held holds): {[tuple(r) for r in wrong]}"


async def assert_ledger_sound(database_url: str) -> None:
    await assert_ledger_verifies(database_url)
    await assert_held_is_sum_of_holds(database_url)


async def system_balances(database_url: str) -> dict[tuple[str, str], tuple[int, int]]:
    """Each system account's balance of each asset and its paid part: the sums of its rows."""
    rows = await query(
        database_url,
        "SELECT account_id, asset_symbol, sum(balance) AS balance, sum(paid) AS paid"
        " FROM balances WHERE account_id LIKE 'system:%' GROUP BY account_id, asset_symbol",
    )
    return {(row.account_id, row.asset_symbol): (row.balance, row.paid) for row in rows}


async def swept_statuses(database_url: str, user: str, *, timeout_s: float = 30) -> dict[str, int]:
    """How many of the user's holds are in each status, once the sweeper has marked every one
    past its expiry (at most `timeout_s`; it runs every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await query(
            database_url,
            "SELECT status, count(*) AS n, count(*) FILTER (WHERE expires_at <= now()) AS due"
            " FROM holds WHERE user_id = :user GROUP BY status",
            user=user,
        )
        statuses = {row.status: row.n for row in rows}
        due = sum(row.due for row in rows if row.status == "held")
        if not due or time.monotonic() > deadline:
            assert not due, f"{due} holds past their expiry still held: {statuses}"
            return statuses
        await asyncio.sleep(0.1)


# ---- the wallet ----------------------------------------------------------------------------


async def fund(
    client: httpx.AsyncClient, user: str, amount: int, asset: str = GOLD, *, flow: str = "topup"
) -> None:
    """Give the user paid credits (a top-up) or free ones (`flow="bonus"`)."""
    reply = await send(client, FlowRequest(flow, user, asset, amount, _key("fund")))
    assert reply.status == 201, reply


async def standing(client: httpx.AsyncClient, user: str, asset: str = GOLD) -> dict[str, int]:
    """The user's balance, held and available of the asset (of which credits never expire
    here); its paid and free parts are never negative."""
    response = await client.get(f"{API}/wallet/balance/{user}/{asset}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["available"] == body["balance"] - body["held"], body
    assert body["paid"] + body["free"] == body["balance"], body
    assert min(body["paid"], body["free"]) >= 0, body
    return {name: body[name] for name in ("balance", "held", "available")}


def hold_call(user: str, amount: int, *, expires_in_s: int | None = None) -> Call:
    sent: dict[str, Any] = {
        "userId": user,
        "assetSymbol": GOLD,
        "amount": amount,
        "idempotencyKey": _key("hold"),
    }
    if expires_in_s is not None:
        sent["expiresInSeconds"] = expires_in_s
    return HOLDS, sent


def transfer_call(sender: str, receiver: str, amount: int, asset: str = GOLD) -> Call:
    return TRANSFER, {
        "fromUserId": sender,
        "toUserId": receiver,
        "assetSymbol": asset,
        "amount": amount,
        "idempotencyKey": _key("transfer"),
    }


async def check_balance_chains(client: httpx.AsyncClient, user: str) -> None:
    """For a user who started with nothing: per asset, read oldest first, the user's list of
    transactions replays its balanceAfter chain from zero (a transfer adds for its receiver and
    subtracts for its sender), so each list shows its own user's balance after every one."""
    running: Counter[str] = Counter()
    for item in reversed(await transactions_of(client, user)):
        if item["type"] == "transfer":
            sign = 1 if item["toUserId"] == user else -1
        else:
            sign = SIGN[item["type"]]
        running[item["assetSymbol"]] += sign * item["amount"]
        assert item["balanceAfter"] == running[item["assetSymbol"]], (
            f"{user}: {item} breaks the balanceAfter chain"
        )


# ---- 1. captures race releases ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HoldRace:
    """For each hold, a capture (all of it, or 7 of it) and a release, each sent twice."""

    holds: list[dict[str, Any]]
    captures: dict[str, dict[str, Any]]  # by hold id: the capture's body
    releases: dict[str, dict[str, Any]]  # by hold id: the release's body

    @classmethod
    def of(cls, holds: list[dict[str, Any]]) -> "HoldRace":
        return cls(
            holds=holds,
            captures={
                hold["holdId"]: {
                    "idempotencyKey": _key("capture"),
                    **({} if index % 2 else {"amount": 7}),
                }
                for index, hold in enumerate(holds)
            },
            releases={hold["holdId"]: {"idempotencyKey": _key("release")} for hold in holds},
        )

    def calls(self) -> list[Call]:
        return [
            call
            for hold_id in self.captures
            for call in [(_capture(hold_id), self.captures[hold_id])] * 2
            + [(_release(hold_id), self.releases[hold_id])] * 2
        ]

    def settle(
        self, answers: Sequence[Answer], *, can_expire: bool = False
    ) -> dict[str, tuple[int, str] | None]:
        """Check that per hold exactly one of its capture and release applied (once, its
        duplicate a replay), before the hold's expiry, and the other was refused with
        hold_not_active (once, its duplicate the refusal replayed); or, if the holds `can_expire`
        meanwhile, that both were refused. Returns the holds one applied to: a captured hold's
        amount and spend transaction, None for a released one."""
        assert_outcomes(answers, (201, None), (200, None), (409, "hold_not_active"))
        grouped = by_key(answers)
        ended: dict[str, tuple[int, str] | None] = {}
        for hold in self.holds:
            hold_id = hold["holdId"]
            capture = self.captures[hold_id]
            capture_answers = grouped[capture["idempotencyKey"]]
            release_answers = grouped[self.releases[hold_id]["idempotencyKey"]]
            capture_won = any(a.status in (200, 201) for a in capture_answers)
            release_won = any(a.status == 200 for a in release_answers)
            shown = f"{_show(capture_answers)}\n{_show(release_answers)}"
            assert not (capture_won and release_won), f"hold {hold_id}: both won:\n{shown}"
            if not (capture_won or release_won):
                assert can_expire, f"hold {hold_id}: neither capture nor release won:\n{shown}"
                assert_refused_once(capture_answers, status=409, code="hold_not_active")
                assert_refused_once(release_answers, status=409, code="hold_not_active")
                continue
            if release_won:
                first = assert_applied_once(release_answers, first_status=200)
                assert_refused_once(capture_answers, status=409, code="hold_not_active")
                after = first.body
                assert (after["status"], after["capturedAmount"]) == ("released", 0), first
                ended[hold_id] = None
            else:
                first = assert_applied_once(capture_answers)
                assert_refused_once(release_answers, status=409, code="hold_not_active")
                amount = capture.get("amount", hold["amount"])
                after, transaction = first.body["hold"], first.body["transaction"]
                assert (after["holdId"], after["status"], after["capturedAmount"]) == (
                    hold_id,
                    "captured",
                    amount,
                ), first
                assert (transaction["type"], transaction["amount"], transaction["holdId"]) == (
                    "spend",
                    amount,
                    hold_id,
                ), first
                assert transaction["createdAt"] == after["endedAt"], first
                ended[hold_id] = (amount, transaction["transactionId"])
            assert _moment(after["endedAt"]) < _moment(hold["expiresAt"]), (
                f"hold {hold_id} ended at or after its expiry: {first}"
            )
        return ended

    async def check_holds_now(
        self, client: httpx.AsyncClient, ended: dict[str, tuple[int, str] | None]
    ) -> None:
        """Each hold now says what its winner said; one that none won says it expired, at its
        expiry."""
        for hold in self.holds:
            response = await client.get(f"{HOLDS}/{hold['holdId']}")
            assert response.status_code == 200, response.text
            now = response.json()
            if hold["holdId"] not in ended:
                assert (now["status"], now["capturedAmount"]) == ("expired", 0), now
                assert now["endedAt"] == hold["expiresAt"], now
                continue
            captured = ended[hold["holdId"]]
            status, amount = ("released", 0) if captured is None else ("captured", captured[0])
            assert (now["status"], now["capturedAmount"]) == (status, amount), now


def captured_of(ended: dict[str, tuple[int, str] | None]) -> dict[str, tuple[int, str]]:
    """The captured holds of `HoldRace.settle`'s answer: amount and spend transaction."""
    return {hold_id: capture for hold_id, capture in ended.items() if capture is not None}


async def place_holds(
    client: httpx.AsyncClient, user: str, *, count: int, amount: int
) -> list[dict[str, Any]]:
    created = await post_all(client, [hold_call(user, amount) for _ in range(count)])
    assert_outcomes(created, (201, None))
    return [a.body for a in created]


async def test_capture_and_release_racing_on_one_hold_exactly_one_wins(
    app_settings: Settings, api_key: str
) -> None:
    holds_count, hold_amount, opening = 30, 20, 1000
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        user = await new_user(client, label="escrow")
        await fund(client, user, opening)
        holds = await place_holds(client, user, count=holds_count, amount=hold_amount)
        assert await standing(client, user) == {
            "balance": opening,
            "held": holds_count * hold_amount,
            "available": opening - holds_count * hold_amount,
        }

        race = HoldRace.of(holds)
        calls = race.calls()
        random.Random(1202).shuffle(calls)
        ended = race.settle(await post_all(client, calls))
        assert len(ended) == holds_count
        captured = captured_of(ended)

        # The money moved is what was captured, nothing is held any more.
        await race.check_holds_now(client, ended)
        spent = sum(amount for amount, _ in captured.values())
        assert await standing(client, user) == {
            "balance": opening - spent,
            "held": 0,
            "available": opening - spent,
        }
        history = await transactions_of(client, user, flow="spend")
        assert {t["transactionId"] for t in history} == {t for _, t in captured.values()}
        await check_balance_chains(client, user)
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    if _runs_side_by_side(app_settings):
        assert errors.highest > 10, "the captures and releases ran side by side"
    await assert_ledger_sound(_url(app_settings))


# ---- 2. refunds race past their original --------------------------------------------------


async def test_concurrent_refunds_never_exceed_the_original(
    app_settings: Settings, api_key: str
) -> None:
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        user = await new_user(client, label="refunded")
        await fund(client, user, 1000)
        spends = [
            await send(client, FlowRequest("spend", user, GOLD, 100, _key("spend")))
            for _ in range(2)
        ]
        assert [r.status for r in spends] == [201, 201], spends
        partial, whole = (r.body["transactionId"] for r in spends)

        # 20 refunds of 10 each of a spend of 100: exactly 10 fit.
        answers = await post_all(
            client,
            [
                (_refund(partial), {"idempotencyKey": _key("refund"), "amount": 10})
                for _ in range(20)
            ],
        )
        assert_no_server_errors(answers)
        assert Counter(a.status for a in answers) == {201: 10, 409: 10}, _show(answers)
        refused = [a for a in answers if a.status == 409]
        assert {a.code for a in refused} == {"refund_exceeds_original"}, _show(refused)
        assert not any(a.is_replayed for a in answers), "every key was answered for the first time"
        refunds = [a.body for a in answers if a.status == 201]
        assert all(
            (r["type"], r["refundOf"], r["amount"]) == ("refund", partial, 10) for r in refunds
        )
        assert sorted(r["balanceAfter"] for r in refunds) == list(range(810, 910, 10))

        # On the other spend: one refund of 30, then at once 5 refunds of 10 and (sent just
        # after them, so some of them tend to come first) 10 refunds of what is left (no
        # amount): exactly one default refund applies, taking exactly what the refunds of 10
        # before it left, so the refunds add up to exactly 100.
        first = await post(client, _refund(whole), {"idempotencyKey": _key("refund"), "amount": 30})
        assert first.status == 201, first
        racing = [
            (_refund(whole), {"idempotencyKey": _key("ten"), "amount": 10}) for _ in range(5)
        ] + [(_refund(whole), {"idempotencyKey": _key("rest")}) for _ in range(10)]
        answers_rest = await post_all(client, racing)
        assert_outcomes(answers_rest, (201, None), (409, "refund_exceeds_original"))
        applied = [a for a in answers_rest if a.status == 201]
        defaults = [a for a in applied if "amount" not in a.sent]
        assert len(defaults) == 1, f"not one refund of what was left: {_show(applied)}"
        assert sum(a.body["amount"] for a in applied) == 70, _show(applied)
        tens_before = [
            a
            for a in applied
            if "amount" in a.sent
            and _moment(a.body["createdAt"]) <= _moment(defaults[0].body["createdAt"])
        ]
        assert defaults[0].body["amount"] == 70 - 10 * len(tens_before), _show(applied)

        # Each original shows the refunds that applied, and no more.
        for original, made in (
            (partial, refunds),
            (whole, [first.body] + [a.body for a in applied]),
        ):
            response = await client.get(f"{API}/wallet/transactions/{user}/{original}")
            assert response.status_code == 200, response.text
            view = response.json()
            assert view["refundedAmount"] == 100, view
            assert sorted(view["refunds"]) == sorted(r["transactionId"] for r in made), view
        assert await standing(client, user) == {"balance": 1000, "held": 0, "available": 1000}
        await check_balance_chains(client, user)
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    await assert_ledger_sound(_url(app_settings))


async def test_concurrent_reversals_never_exceed_the_original_nor_the_available_coins(
    app_settings: Settings, api_key: str
) -> None:
    """Reversals of a top-up race each other and the user's own spends and holds: they add up to
    at most the top-up, and none takes coins the user spent or holds."""
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        user = await new_user(client, label="reversed")
        topup = await send(client, FlowRequest("topup", user, GOLD, 200, _key("topup")))
        assert topup.status == 201, topup
        original = topup.body["transactionId"]
        calls = (
            [
                (_refund(original), {"idempotencyKey": _key("reverse"), "amount": 10})
                for _ in range(20)
            ]
            + [
                (SPEND, FlowRequest("spend", user, GOLD, 10, _key("spend")).body())
                for _ in range(6)
            ]
            + [hold_call(user, 10) for _ in range(6)]
        )
        random.Random(11).shuffle(calls)
        answers = await post_all(client, calls)
        reversals = [a for a in answers if "/refund" in a.path]
        others = [a for a in answers if "/refund" not in a.path]
        assert_outcomes(
            reversals,
            (201, None),
            (409, "refund_exceeds_original"),
            (422, "insufficient_funds"),
        )
        assert_outcomes(others, (201, None), (422, "insufficient_funds"))
        applied = [a for a in reversals if a.status == 201]
        assert all(a.body["type"] == "reversal" for a in applied), _show(applied)
        reversed_total = sum(a.body["amount"] for a in applied)
        spent = sum(a.sent["amount"] for a in others if a.path == SPEND and a.status == 201)
        held = sum(a.sent["amount"] for a in others if a.path == HOLDS and a.status == 201)
        assert reversed_total + spent + held == 200, "every coin went somewhere, once"
        assert await standing(client, user) == {
            "balance": 200 - reversed_total - spent,
            "held": held,
            "available": 200 - reversed_total - spent - held,
        }
        response = await client.get(f"{API}/wallet/transactions/{user}/{original}")
        assert response.json()["refundedAmount"] == reversed_total, response.json()
        await check_balance_chains(client, user)
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    await assert_ledger_sound(_url(app_settings))


# ---- 3. crossing transfers -----------------------------------------------------------------


def crossing_transfers(
    rng: random.Random, pair: Sequence[str], ring: Sequence[str], assets: Sequence[str]
) -> list[Call]:
    """100 transfers each way between the pair, 20 each way between each ring member and both
    its neighbours (in random assets), and 20 each way between the pair and the ring, so locks
    are also taken across both groups; shuffled."""
    a, b = pair
    calls = [transfer_call(a, b, rng.randint(1, 25)) for _ in range(100)]
    calls += [transfer_call(b, a, rng.randint(1, 25)) for _ in range(100)]
    for index, user in enumerate(ring):
        after, before = ring[(index + 1) % len(ring)], ring[index - 1]
        for _ in range(20):
            asset = rng.choice(assets)
            calls.append(transfer_call(user, after, rng.randint(1, 60), asset))
            calls.append(transfer_call(user, before, rng.randint(1, 60), asset))
    calls += [transfer_call(rng.choice(pair), rng.choice(ring), 5) for _ in range(20)]
    calls += [transfer_call(rng.choice(ring), rng.choice(pair), 5) for _ in range(20)]
    rng.shuffle(calls)
    return calls


async def check_transfers(
    client: httpx.AsyncClient,
    answers: Sequence[Answer],
    *,
    users: Sequence[str],
    opening: dict[str, tuple[int, int]],
) -> None:
    """Every transfer applied (201, describing its request and the kinds it moved) or found the
    sender short; each user's balance of each asset, and its paid part, is their opening plus
    what the 201s say they received minus what they sent, so each asset's sum over the users is
    unchanged, per kind too; each applied transfer is listed by both its users, each list
    replaying its user's balanceAfter chain."""
    assert_outcomes(answers, (201, None), (422, "insufficient_funds"))
    applied = [a for a in answers if a.status == 201]
    assert len(applied) > len(answers) // 2, f"{len(applied)} of {len(answers)} applied"
    expected: Counter[tuple[str, str]] = Counter(
        {(user, asset): paid + free for user in users for asset, (paid, free) in opening.items()}
    )
    expected_paid: Counter[tuple[str, str]] = Counter(
        {(user, asset): paid for user in users for asset, (paid, _) in opening.items()}
    )
    for answer in applied:
        sent, body = answer.sent, answer.body
        assert (
            body["type"],
            body["userId"],
            body["toUserId"],
            body["assetSymbol"],
            body["amount"],
            body["idempotencyKey"],
        ) == (
            "transfer",
            sent["fromUserId"],
            sent["toUserId"],
            sent["assetSymbol"],
            sent["amount"],
            sent["idempotencyKey"],
        ), answer
        assert body["balanceAfter"] >= 0, answer
        assert body["paidAmount"] + body["freeAmount"] == body["amount"], answer
        for user, sign in ((sent["fromUserId"], -1), (sent["toUserId"], 1)):
            expected[(user, sent["assetSymbol"])] += sign * sent["amount"]
            expected_paid[(user, sent["assetSymbol"])] += sign * body["paidAmount"]
    for user in users:
        for asset in opening:
            got = await standing(client, user, asset)
            assert got["balance"] == expected[(user, asset)], (user, asset, got)
            assert got["held"] == 0, (user, asset, got)
            parts = await balance_parts(client, user, asset)
            assert parts == (expected[(user, asset)], expected_paid[(user, asset)]), (user, asset)
    for asset, (paid, free) in opening.items():
        assert sum(expected[(user, asset)] for user in users) == (paid + free) * len(users), asset
        assert sum(expected_paid[(user, asset)] for user in users) == paid * len(users), asset

    listed: Counter[str] = Counter()
    for user in users:
        history = await transactions_of(client, user, flow="transfer")
        listed.update(t["transactionId"] for t in history)
        await check_balance_chains(client, user)
    assert set(listed) == {a.body["transactionId"] for a in applied}
    assert set(listed.values()) == {2}, "every transfer is listed by its two users"


async def test_crossing_transfers_never_deadlock_and_conserve_every_coin(
    app_settings: Settings, api_key: str
) -> None:
    opening = {GOLD: (600, 400), DIAMONDS: (300, 200)}  # paid, free: transfers pass on both
    url = _url(app_settings)
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        pair = await new_users(client, label="crossing", count=2)
        ring = await new_users(client, label="ring", count=5)
        users = pair + ring
        await asyncio.gather(
            *(
                fund(client, user, amount, asset, flow=flow)
                for user in users
                for asset, parts in opening.items()
                for flow, amount in zip(("topup", "bonus"), parts, strict=True)
            )
        )
        system_before = await system_balances(url)

        calls = crossing_transfers(random.Random(2026), pair, ring, list(opening))
        # More clients than the pool's 30 connections add queueing in the pool, not contention
        # in the database; under SERIALIZABLE each aborted attempt queues for the pool again,
        # and with 64 a dozen transfers starved (see `is_starved`) on a loaded 2-core machine.
        answers = await post_all(client, calls, concurrency=32)

        await check_transfers(client, answers, users=users, opening=opening)
        assert await system_balances(url) == system_before, "transfers touch no system account"
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    if _runs_side_by_side(app_settings):
        assert errors.highest > 10, "the transfers ran side by side"
    await assert_ledger_sound(url)
    exit_code, output = await run_wallet_command("verify", database_url=url)
    assert exit_code == 0, output


# ---- 4. holds expire while spends run -----------------------------------------------------


async def test_holds_expiring_under_running_spends_never_lend_their_coins(
    app_settings: Settings, api_key: str
) -> None:
    opening, hold_amount, holds_count, spend_amount = 1000, 100, 9, 10
    held_total = hold_amount * holds_count
    url = _url(app_settings)
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        user = await new_user(client, label="expiring")
        await fund(client, user, opening)
        created = await post_all(
            client, [hold_call(user, hold_amount, expires_in_s=1) for _ in range(holds_count)]
        )
        assert_outcomes(created, (201, None))
        holds = [a.body for a in created]
        first_expiry = min(_moment(h["expiresAt"]) for h in holds)
        last_expiry = max(_moment(h["expiresAt"]) for h in holds)

        # Spenders of 10 coins at a time, without pause, until past the last expiry (+1 s) their
        # spend is refused, the balance used up; at most 30 s.
        spends: list[Answer] = []
        hard_stop = time.monotonic() + 30

        async def spender() -> None:
            while True:
                answer = await post(
                    client, SPEND, FlowRequest("spend", user, GOLD, spend_amount, _key("s")).body()
                )
                spends.append(answer)
                is_late = answer.received_at > last_expiry + timedelta(seconds=1)
                if (is_late and answer.status == 422) or time.monotonic() > hard_stop:
                    return

        await asyncio.wait_for(asyncio.gather(*(spender() for _ in range(8))), LOAD_DEADLINE_S)

        assert_outcomes(spends, (201, None), (422, "insufficient_funds"))
        applied = [a for a in spends if a.status == 201]
        refused = [a for a in spends if a.status != 201]

        # Exact, on the service's own clock: at the moment each spend applied (its createdAt,
        # taken under the lock), what all spends until then took plus the holds still active
        # then never exceeds the balance.
        def active_held(at: datetime) -> int:
            return sum(
                h["amount"]
                for h in holds
                if _moment(h["createdAt"]) <= at < _moment(h["expiresAt"])
            )

        moments = sorted({_moment(a.body["createdAt"]) for a in applied})
        for moment in moments:
            spent = sum(a.sent["amount"] for a in applied if _moment(a.body["createdAt"]) <= moment)
            assert spent + active_held(moment) <= opening, (
                f"at {moment.isoformat()} spends had taken {spent} while holds kept "
                f"{active_held(moment)} of {opening}"
            )
        # Conservative, on the client's clock: spends answered before the first hold expired
        # applied before it, so they used only the part not held.
        early = [a for a in applied if a.received_at < first_expiry]
        assert sum(a.sent["amount"] for a in early) <= opening - held_total, _show(early)
        answered_early = [a for a in spends if a.received_at < first_expiry]
        if len(answered_early) > (opening - held_total) // spend_amount:
            assert any(a.status == 422 for a in answered_early), "the holds kept their coins"
        # Once the holds expired, the rest became spendable: everything was spent.
        assert sum(a.sent["amount"] for a in applied) == opening, (
            f"{len(applied)} spends applied, {len(refused)} refused"
        )
        late = [a for a in applied if _moment(a.body["createdAt"]) >= first_expiry]
        assert sum(a.sent["amount"] for a in late) >= held_total
        assert await standing(client, user) == {"balance": 0, "held": 0, "available": 0}

        # The sweeper marks them expired by itself, at their expiry.
        assert await swept_statuses(url, user) == {"expired": holds_count}
        (row,) = await query(
            url,
            "SELECT held FROM balances WHERE account_id = :user AND asset_symbol = :asset",
            user=user,
            asset=GOLD,
        )
        assert row.held == 0
        response = await client.get(HOLDS, params={"userId": user, "status": "expired"})
        assert response.status_code == 200, response.text
        listed = response.json()["items"]
        assert {h["holdId"] for h in listed} == {h["holdId"] for h in holds}
        assert all(h["endedAt"] is not None for h in listed), listed
        assert all(_moment(h["endedAt"]) == _moment(h["expiresAt"]) for h in listed), listed

        # An expired hold can be neither captured nor released.
        late_calls = [(_capture(h["holdId"]), {"idempotencyKey": _key("late")}) for h in holds]
        late_calls += [(_release(h["holdId"]), {"idempotencyKey": _key("late")}) for h in holds]
        too_late = await post_all(client, late_calls)
        assert_outcomes(too_late, (409, "hold_not_active"))
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    await assert_ledger_sound(url)


async def test_captures_and_releases_racing_the_expiry_agree_with_the_clock(
    app_settings: Settings, api_key: str
) -> None:
    """Captures and releases of holds that expire meanwhile, sent in waves from before their
    expiry to after it: each hold is captured or released before its expiry, or by neither and
    then expired, marked by the sweeper at its expiry; the coins held come back either way."""
    holds_count, hold_amount, opening = 20, 20, 1000
    url = _url(app_settings)
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        user = await new_user(client, label="deadline")
        await fund(client, user, opening)
        created = await post_all(
            client, [hold_call(user, hold_amount, expires_in_s=1) for _ in range(holds_count)]
        )
        assert_outcomes(created, (201, None))
        race = HoldRace.of([a.body for a in created])
        calls = race.calls()
        random.Random(31).shuffle(calls)

        # 16 waves, evenly from 0.2 s before the first expiry to 0.6 s after the last (the
        # holds, applied one after the other, may expire up to a second apart).
        expiries = [_moment(h["expiresAt"]) for h in race.holds]
        first, last = min(expiries) - timedelta(seconds=0.2), max(expiries) + timedelta(seconds=0.6)

        async def wave(index: int, sent: list[Call]) -> list[Answer]:
            at = first + (last - first) * index / 15
            await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
            return await post_all(client, sent)

        waves = await asyncio.gather(*(wave(index, calls[index::16]) for index in range(16)))
        ended = race.settle([answer for answers in waves for answer in answers], can_expire=True)

        outcomes = Counter(
            "expired"
            if h["holdId"] not in ended
            else "captured"
            if ended[h["holdId"]]
            else "released"
            for h in race.holds
        )
        assert await swept_statuses(url, user) == outcomes
        await race.check_holds_now(client, ended)
        spent = sum(amount for amount, _ in captured_of(ended).values())
        assert await standing(client, user) == {
            "balance": opening - spent,
            "held": 0,
            "available": opening - spent,
        }
        await check_balance_chains(client, user)
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    await assert_ledger_sound(url)


# ---- 5. atomic batches race single flows --------------------------------------------------


async def test_batches_racing_single_flows_apply_whole_or_not_at_all(
    app_settings: Settings, api_key: str
) -> None:
    """Batches of a top-up, a spend and a transfer race single spends and transfers on the same
    users (and transfers to two newcomers without a balance row yet): each batch applies whole
    or records nothing."""
    rng = random.Random(55)
    opening = 1000
    url = _url(app_settings)
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        users = await new_users(client, label="batched", count=6)
        newcomers = await new_users(client, label="newcomer", count=2)
        await asyncio.gather(*(fund(client, user, opening) for user in users))

        def two_users() -> tuple[str, str]:
            sender, receiver = rng.sample(users, 2)
            return sender, rng.choice(newcomers) if rng.random() < 0.2 else receiver

        calls: list[Call] = []
        # 40 batches, every fifth of which asks far more than anyone has, at its spend or at
        # its transfer; the others fail only if the load has drained their users by then.
        for index in range(40):
            sender, receiver = two_users()
            spend, transfer = rng.randint(20, 200), rng.randint(20, 200)
            if index % 5 == 0:
                spend, transfer = (10**6, transfer) if index % 10 else (spend, 10**6)
            calls.append(
                (
                    BATCH,
                    {
                        "idempotencyKey": _key("batch"),
                        "operations": [
                            {
                                "type": "topup",
                                "userId": rng.choice(users),
                                "assetSymbol": GOLD,
                                "amount": rng.randint(1, 100),
                            },
                            {
                                "type": "spend",
                                "userId": rng.choice(users),
                                "assetSymbol": GOLD,
                                "amount": spend,
                            },
                            {
                                "type": "transfer",
                                "fromUserId": sender,
                                "toUserId": receiver,
                                "assetSymbol": GOLD,
                                "amount": transfer,
                            },
                        ],
                    },
                )
            )
        for _ in range(80):
            calls.append(
                (
                    SPEND,
                    FlowRequest(
                        "spend", rng.choice(users), GOLD, rng.randint(5, 80), _key("s")
                    ).body(),
                )
            )
            calls.append(transfer_call(*two_users(), rng.randint(5, 80)))
        rng.shuffle(calls)
        answers = await post_all(client, calls, concurrency=64)
        assert_no_server_errors(answers)

        expected: Counter[str] = Counter(dict.fromkeys(users, opening))
        expected.update(dict.fromkeys(newcomers, 0))
        applied_ids: set[str] = set()
        failed_keys: list[str] = []
        applied_batch_keys: list[str] = []
        for answer in answers:
            sent = answer.sent
            if answer.status != 201:
                assert (answer.status, answer.code) == (422, "insufficient_funds"), answer
                assert not answer.is_replayed, answer
                if answer.path == BATCH:
                    assert answer.body.get("operationIndex") in (1, 2), answer
                    failed_keys.append(answer.key)
                continue
            if answer.path != BATCH:
                made = [answer.body]
                operations = [{"type": "spend" if answer.path == SPEND else "transfer", **sent}]
            else:
                made = answer.body["transactions"]
                operations = sent["operations"]
                applied_batch_keys.append(answer.key)
                assert [t["idempotencyKey"] for t in made] == [
                    f"{answer.key}:{index}" for index in range(len(operations))
                ], answer
            assert len(made) == len(operations), answer
            for transaction, operation in zip(made, operations, strict=True):
                assert transaction["type"] == operation["type"], answer
                assert transaction["amount"] == operation["amount"], answer
                if operation["type"] == "transfer":
                    assert (transaction["userId"], transaction["toUserId"]) == (
                        operation["fromUserId"],
                        operation["toUserId"],
                    ), answer
                    expected[operation["fromUserId"]] -= operation["amount"]
                    expected[operation["toUserId"]] += operation["amount"]
                else:
                    assert transaction["userId"] == operation["userId"], answer
                    expected[operation["userId"]] += SIGN[operation["type"]] * operation["amount"]
                applied_ids.add(transaction["transactionId"])
        assert failed_keys, "some batches failed"
        assert applied_batch_keys, "some batches applied"

        # Balances are the replay of the successful answers; the users' lists hold exactly the
        # funding top-ups and what the 201s announced.
        assert any(expected[user] > 0 for user in newcomers), "transfers made balance rows"
        for user in users + newcomers:
            assert (await standing(client, user))["balance"] == expected[user], user
        listed: set[str] = set()
        for user in users + newcomers:
            history = await transactions_of(client, user)
            listed.update(
                t["transactionId"] for t in history if not t["idempotencyKey"].startswith("fund-")
            )
            await check_balance_chains(client, user)
        assert listed == applied_ids

    # A failed batch recorded nothing: none of its `<key>:<i>` transactions, no claim of its keys.
    failed_sub_keys = [f"{key}:{index}" for key in failed_keys for index in range(3)]
    left = await query(
        url,
        "SELECT idempotency_key FROM transactions"
        " WHERE idempotency_key = ANY(CAST(:keys AS text[]))",
        keys=failed_sub_keys,
    )
    assert left == [], f"failed batches left transactions: {[r[0] for r in left]}"
    claims = await query(
        url,
        "SELECT key FROM idempotency_keys WHERE key = ANY(CAST(:keys AS text[]))",
        keys=failed_keys + failed_sub_keys,
    )
    assert claims == [], f"failed batches left their keys claimed: {[r[0] for r in claims]}"
    applied_sub_keys = [f"{key}:{index}" for key in applied_batch_keys for index in range(3)]
    stored = await query(
        url,
        "SELECT idempotency_key, count(*) AS n FROM transactions"
        " WHERE idempotency_key = ANY(CAST(:keys AS text[])) GROUP BY idempotency_key",
        keys=applied_sub_keys,
    )
    assert {row.idempotency_key: row.n for row in stored} == dict.fromkeys(applied_sub_keys, 1)
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    await assert_ledger_sound(url)
    exit_code, output = await run_wallet_command("verify", database_url=url)
    assert exit_code == 0, output


# ---- 6. concurrent duplicates of every new write ------------------------------------------


async def test_concurrent_duplicates_of_every_new_write_apply_once(
    app_settings: Settings, api_key: str
) -> None:
    copies = 20
    url = _url(app_settings)
    errors = DatabaseErrors()
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        payer, payee = await new_users(client, label="duplicated", count=2)
        await fund(client, payer, 1000)

        # Round 1, all at once: two holds, a transfer, a batch, and a transfer that overdraws.
        hold_to_capture = hold_call(payer, 100)
        hold_to_release = hold_call(payer, 100)
        transfer = transfer_call(payer, payee, 50)
        overdraw = transfer_call(payer, payee, 1_000_000)
        batch: Call = (
            BATCH,
            {
                "idempotencyKey": _key("batch"),
                "operations": [
                    {"type": "topup", "userId": payee, "assetSymbol": GOLD, "amount": 10},
                    {"type": "spend", "userId": payee, "assetSymbol": GOLD, "amount": 5},
                    {
                        "type": "transfer",
                        "fromUserId": payee,
                        "toUserId": payer,
                        "assetSymbol": GOLD,
                        "amount": 3,
                    },
                ],
            },
        )
        failing: Call = (
            BATCH,
            {
                "idempotencyKey": _key("failing"),
                "operations": [
                    {"type": "topup", "userId": payee, "assetSymbol": GOLD, "amount": 1},
                    {"type": "spend", "userId": payee, "assetSymbol": GOLD, "amount": 10**6},
                ],
            },
        )
        round_1 = [hold_to_capture, hold_to_release, transfer, batch, overdraw, failing]
        answers = by_key(await post_all(client, [c for c in round_1 for _ in range(copies)]))
        # A failed batch records nothing, so no copy of it is a replay: each fails afresh.
        failures = answers[failing[1]["idempotencyKey"]]
        assert_outcomes(failures, (422, "insufficient_funds"))
        assert all(a.body["operationIndex"] == 1 and not a.is_replayed for a in failures), _show(
            failures
        )
        capture_hold = assert_applied_once(answers[hold_to_capture[1]["idempotencyKey"]]).body
        release_hold = assert_applied_once(answers[hold_to_release[1]["idempotencyKey"]]).body
        moved = assert_applied_once(answers[transfer[1]["idempotencyKey"]]).body
        batched = assert_applied_once(answers[batch[1]["idempotencyKey"]]).body
        assert len(batched["transactions"]) == 3, batched
        assert_refused_once(
            answers[overdraw[1]["idempotencyKey"]], status=422, code="insufficient_funds"
        )
        assert await standing(client, payer) == {"balance": 953, "held": 200, "available": 753}

        # Round 2: a capture of one hold and a release of the other.
        capture: Call = (
            _capture(capture_hold["holdId"]),
            {"idempotencyKey": _key("c"), "amount": 60},
        )
        release: Call = (_release(release_hold["holdId"]), {"idempotencyKey": _key("r")})
        answers = by_key(
            await post_all(client, [c for c in (capture, release) for _ in range(copies)])
        )
        captured = assert_applied_once(answers[capture[1]["idempotencyKey"]]).body
        assert (captured["hold"]["status"], captured["hold"]["capturedAmount"]) == ("captured", 60)
        released = assert_applied_once(answers[release[1]["idempotencyKey"]], first_status=200).body
        assert released["status"] == "released", released

        # Round 3: a refund of the capture, and a capture of the released hold (refused).
        refund: Call = (
            _refund(captured["transaction"]["transactionId"]),
            {"idempotencyKey": _key("rf"), "amount": 30},
        )
        too_late: Call = (_capture(release_hold["holdId"]), {"idempotencyKey": _key("late")})
        answers = by_key(
            await post_all(client, [c for c in (refund, too_late) for _ in range(copies)])
        )
        refunded = assert_applied_once(answers[refund[1]["idempotencyKey"]]).body
        assert (refunded["type"], refunded["amount"]) == ("refund", 30), refunded
        assert_refused_once(
            answers[too_late[1]["idempotencyKey"]], status=409, code="hold_not_active"
        )

        # 1000 - 50 (transfer) + 3 (batch) - 60 (capture) + 30 (refund); 50 + 10 - 5 - 3.
        assert await standing(client, payer) == {"balance": 923, "held": 0, "available": 923}
        assert await standing(client, payee) == {"balance": 52, "held": 0, "available": 52}
        applied_keys = [
            moved["idempotencyKey"],
            *(t["idempotencyKey"] for t in batched["transactions"]),
            captured["transaction"]["idempotencyKey"],
            refunded["idempotencyKey"],
        ]
        stored = await query(
            url,
            "SELECT idempotency_key, count(*) AS n FROM transactions"
            " WHERE idempotency_key = ANY(CAST(:keys AS text[])) GROUP BY idempotency_key",
            keys=applied_keys,
        )
        assert {row.idempotency_key: row.n for row in stored} == dict.fromkeys(applied_keys, 1)
        failing_keys = [failing[1]["idempotencyKey"] + suffix for suffix in ("", ":0", ":1")]
        claims = await query(
            url,
            "SELECT key FROM idempotency_keys WHERE key = ANY(CAST(:keys AS text[]))"
            " UNION ALL SELECT idempotency_key FROM transactions"
            " WHERE idempotency_key = ANY(CAST(:keys AS text[]))",
            keys=failing_keys,
        )
        assert claims == [], "the failed batch recorded nothing"
        holds = await query(
            url, "SELECT count(*) AS n FROM holds WHERE user_id = :user", user=payer
        )
        assert holds[0].n == 2
        await check_balance_chains(client, payer)
        await check_balance_chains(client, payee)
    assert errors.unexpected() == [], "no deadlock nor any other database error"
    await assert_ledger_sound(url)


# ---- the real server: two worker processes over real HTTP -----------------------------------


@pytest.mark.parametrize("batch_max_size", ["1", "128"], ids=[OWN_TRANSACTIONS, GROUP_COMMIT])
async def test_two_workers_racing_transfers_captures_and_releases_keep_every_invariant(
    postgres_database_url: str, tmp_path: Path, batch_max_size: str
) -> None:
    """`wallet serve` with two workers: their pools (and, with group commit, their batchers)
    are separate, so transactions of both cross on the same users and race for the same holds
    in the database itself."""
    rng = random.Random(1203)
    opening = {GOLD: (600, 400), DIAMONDS: (300, 200)}  # paid, free
    url = postgres_database_url
    key = await create_key_with_cli(url, label="ledger-race")
    async with (
        running_server(
            url,
            workers=2,
            log_path=tmp_path / "server.log",
            settings={"batch_max_size": batch_max_size, "database_pool_size": "10"},
        ) as server,
        network_client(server.base_url, key=key, connections=64) as client,
    ):
        pair = await new_users(client, label="served-pair", count=2)
        ring = await new_users(client, label="served-ring", count=4)
        users = pair + ring
        escrow = await new_user(client, label="served-escrow")
        await asyncio.gather(
            *(
                fund(client, user, amount, asset, flow=flow)
                for user in users
                for asset, parts in opening.items()
                for flow, amount in zip(("topup", "bonus"), parts, strict=True)
            ),
        )
        # Free credits first: the holds reserve the 400 free ones, so the paid ones stay put.
        await fund(client, escrow, 600)
        await fund(client, escrow, 400, flow="bonus")
        race = HoldRace.of(await place_holds(client, escrow, count=20, amount=20))
        calls = crossing_transfers(rng, pair, ring, list(opening)) + race.calls()
        rng.shuffle(calls)
        answers = await post_all(client, calls, concurrency=32)

        ended = race.settle([a for a in answers if a.path != TRANSFER])
        await race.check_holds_now(client, ended)
        captured = captured_of(ended)
        spent = sum(amount for amount, _ in captured.values())
        assert await standing(client, escrow) == {
            "balance": 1000 - spent,
            "held": 0,
            "available": 1000 - spent,
        }
        assert await balance_parts(client, escrow) == (1000 - spent, 600)
        transfers = [a for a in answers if a.path == TRANSFER]
        await check_transfers(client, transfers, users=users, opening=opening)

    assert not server.was_killed, f"the server ignored SIGTERM:\n{server.log_tail()}"
    assert server.process.returncode == 0, server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    await assert_ledger_sound(url)
