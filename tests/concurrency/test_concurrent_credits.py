"""Paid and free credits (API-credits.md) under many real clients at once on PostgreSQL, with group
commit off and on: spends race the expiry of the credits they would take while several sweepers
move them out, partial refunds of mixed spends race new spends, transfers of expiring credits
cross while they expire, and an asset's lifetimes change while credits are granted. After each, a
replay of the stored transactions by the rules of API-credits.md accounts for every credit of
every kind and lot once, no deadlock was rerun behind the scenes, and the ledger verifies."""

import asyncio
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from concurrent_load import API, GOLD, assert_ledger_verifies, in_process_client, new_users
from sqlalchemy import text
from test_concurrent_ledger import (
    LOAD_DEADLINE_S,
    SPEND,
    Answer,
    Call,
    DatabaseErrors,
    assert_no_server_errors,
    assert_outcomes,
    fund,
    is_starved,
    post,
    post_all,
    query,
    transfer_call,
)

from wallet.service.posting import expire_credits
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(240)]

BONUS = f"{API}/wallet/bonus"
BATCH = f"{API}/wallet/batch"
ASSETS = f"{API}/assets"
# Far from any lot that expires during a test: credits granted to last through it.
LATER = timedelta(days=1)


def _url(settings: Settings) -> str:
    return settings.database_url.get_secret_value()


def _key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


def _refund(transaction_id: str) -> str:
    return f"{API}/wallet/transactions/{transaction_id}/refund"


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def answered(client: httpx.AsyncClient, path: str, sent: dict[str, Any]) -> Answer:
    """The answer to a POST; under SERIALIZABLE a request the engine gave up on (`is_starved`)
    applied nothing, and is sent again with its key."""
    answer = await post(client, path, sent)
    while is_starved(answer):
        answer = await post(client, path, sent)
    return answer


async def grant_at_once(
    client: httpx.AsyncClient, grants: Sequence[tuple[str, int]], *, expires_at: datetime
) -> None:
    """Bonuses of (user, amount) that expire at `expires_at`, in one atomic batch: one
    transaction, so they apply well before it even when single bonuses would queue."""
    operations = [
        {
            "type": "bonus",
            "userId": user,
            "assetSymbol": GOLD,
            "amount": amount,
            "expiresAt": _rfc3339(expires_at),
        }
        for user, amount in grants
    ]
    answer = await answered(client, BATCH, {"idempotencyKey": _key("b"), "operations": operations})
    assert answer.status == 201, answer


async def grant(
    client: httpx.AsyncClient, user: str, amount: int, *, expiry: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A bonus of `amount`, with `expiresAt` or `expiresInDays` if given; its transaction."""
    sent = {
        "userId": user,
        "assetSymbol": GOLD,
        "amount": amount,
        "idempotencyKey": _key("bonus"),
        **(expiry or {}),
    }
    answer = await answered(client, BONUS, sent)
    assert answer.status == 201, answer
    return answer.body


async def spend(client: httpx.AsyncClient, user: str, amount: int) -> dict[str, Any]:
    answer = await answered(client, SPEND, spend_body(user, amount))
    assert answer.status == 201, answer
    return answer.body


def spend_body(user: str, amount: int) -> dict[str, Any]:
    return {"userId": user, "assetSymbol": GOLD, "amount": amount, "idempotencyKey": _key("s")}


# ---- the ledger as stored ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """A transaction of the users' asset as the engine stored it."""

    id: str
    seq: int
    type: str
    user_id: str
    to_user_id: str | None
    amount: int
    paid: int
    created_at: datetime
    refund_of: str | None

    @property
    def free(self) -> int:
        return self.amount - self.paid


LotMoves = Counter[tuple[str, str, datetime]]  # (account, kind, expires_at): amount


@dataclass(frozen=True, slots=True)
class StoredLedger:
    """What the database holds of some users' asset: their transactions in the order they
    applied, each one's lot moves, their lots and their balance rows."""

    transactions: list[Stored]
    lot_moves: dict[str, LotMoves]  # by transaction
    lots: dict[tuple[str, str, datetime], int]  # (account, kind, expires_at): remaining
    balances: dict[str, tuple[int, int, int, int]]  # balance, paid, held, expiring

    def of_type(self, kind: str) -> list[Stored]:
        return [t for t in self.transactions if t.type == kind]

    def lot_take(self, transaction: Stored, expires_at: datetime) -> int:
        """What the transaction took from (negative) or gave to its user's free lot."""
        return self.lot_moves.get(transaction.id, Counter())[
            (transaction.user_id, "free", expires_at)
        ]


async def read_ledger(url: str, users: Sequence[str], asset: str = GOLD) -> StoredLedger:
    """The users' transactions, lot moves, lots and balances of `asset`, read in one snapshot."""
    params = {"users": list(users), "asset": asset}
    database = Database(create_engine(Settings(database_url=url, database_pool_size=2)))
    try:
        async with database.transaction(is_write=False, is_snapshot=True) as connection:
            transactions = await connection.execute(
                text(
                    "SELECT id, seq, type, user_id, to_user_id, amount, paid_amount, created_at,"
                    " refund_of FROM transactions WHERE asset_symbol = :asset"
                    " AND (user_id = ANY(CAST(:users AS text[]))"
                    " OR to_user_id = ANY(CAST(:users AS text[]))) ORDER BY seq"
                ),
                params,
            )
            moves = await connection.execute(
                text(
                    "SELECT transaction_id, account_id, kind, expires_at, amount FROM lot_moves"
                    " WHERE asset_symbol = :asset AND account_id = ANY(CAST(:users AS text[]))"
                ),
                params,
            )
            lots = await connection.execute(
                text(
                    "SELECT account_id, kind, expires_at, remaining FROM lots"
                    " WHERE asset_symbol = :asset AND account_id = ANY(CAST(:users AS text[]))"
                ),
                params,
            )
            balances = await connection.execute(
                text(
                    "SELECT account_id, balance, paid, held, expiring FROM balances"
                    " WHERE asset_symbol = :asset AND account_id = ANY(CAST(:users AS text[]))"
                ),
                params,
            )
    finally:
        await database.close()
    lot_moves: dict[str, LotMoves] = defaultdict(Counter)
    for move in moves:
        lot_moves[move.transaction_id][(move.account_id, move.kind, move.expires_at)] += move.amount
    return StoredLedger(
        transactions=[
            Stored(
                t.id,
                t.seq,
                t.type,
                t.user_id,
                t.to_user_id,
                t.amount,
                t.paid_amount,
                t.created_at,
                t.refund_of,
            )
            for t in transactions
        ],
        lot_moves=dict(lot_moves),
        lots={(lot.account_id, lot.kind, lot.expires_at): lot.remaining for lot in lots},
        balances={b.account_id: (b.balance, b.paid, b.held, b.expiring) for b in balances},
    )


# ---- the rules, replayed -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Take:
    """Credits one transaction moves: paid, and free by lot (None: free credits that never
    expire), in the order taken."""

    paid: int = 0
    free: tuple[tuple[datetime | None, int], ...] = ()

    def lot_moves(self, account: str, sign: int) -> LotMoves:
        moved: LotMoves = Counter()
        for expires_at, amount in self.free:
            if expires_at is not None:
                moved[(account, "free", expires_at)] += sign * amount
        return moved


@dataclass(slots=True)
class Purse:
    """A user's credits of a free_first asset without holds, as API-credits.md moves them."""

    paid: int = 0
    lasting: int = 0  # free credits that never expire
    lots: Counter[datetime] = field(default_factory=Counter)  # free credits by expiry

    @property
    def balance(self) -> int:
        return self.paid + self.lasting + sum(self.lots.values())

    def add(self, take: Take) -> None:
        self.paid += take.paid
        for expires_at, amount in take.free:
            if expires_at is None:
                self.lasting += amount
            else:
                self.lots[expires_at] += amount

    def take(self, amount: int, at: datetime) -> Take:
        """Free credits first, the lots still in the future soonest first, then those that
        never expire; then paid credits."""
        free: list[tuple[datetime | None, int]] = []
        left = amount
        for expires_at in sorted(self.lots):
            part = min(left, self.lots[expires_at])
            if expires_at > at and part > 0:
                free.append((expires_at, part))
                self.lots[expires_at] -= part
                left -= part
        if part := min(left, self.lasting):
            free.append((None, part))
            self.lasting -= part
            left -= part
        paid = min(left, self.paid)
        self.paid -= paid
        assert left == paid, f"{amount} taken at {at.isoformat()} of less available: {self}"
        return Take(paid, tuple(free))

    def expire(self, at: datetime) -> Take:
        expired = tuple(
            (expires_at, left)
            for expires_at, left in sorted(self.lots.items())
            if expires_at <= at and left > 0
        )
        for expires_at, _ in expired:
            self.lots[expires_at] = 0
        return Take(0, expired)


def returned(original: Take, *, before: int, amount: int) -> Take:
    """What a refund of `amount` of a spend that took `original` gives back, `before` having been
    refunded already: paid first; free credits last taken first returned."""
    paid_before = min(original.paid, before)
    paid = min(original.paid - paid_before, amount)
    skip, left = before - paid_before, amount - paid
    free: list[tuple[datetime | None, int]] = []
    for expires_at, taken in reversed(original.free):
        gone = min(skip, taken)
        skip -= gone
        part = min(left, taken - gone)
        if part > 0:
            free.append((expires_at, part))
            left -= part
    return Take(paid, tuple(free))


def replay(ledger: StoredLedger) -> dict[str, Purse]:
    """Replay the users' transactions in the order they applied (each locks its users, so their
    seq follows it), each at its createdAt, the moment the engine judged expiry by; check that
    each took and gave the kinds and lots the rules say. The users' purses after them all."""
    purses: dict[str, Purse] = defaultdict(Purse)
    spends: dict[str, Take] = {}
    refunded: Counter[str] = Counter()
    for t in ledger.transactions:
        purse = purses[t.user_id]
        moved = ledger.lot_moves.get(t.id, Counter())
        match t.type:
            case "topup":
                take = Take(paid=t.amount)
                purse.add(take)
            case "bonus":
                lots = [expires_at for (_, _, expires_at) in moved]
                take = Take(free=((lots[0] if lots else None, t.amount),))
                purse.add(take)
            case "spend" | "transfer":
                take = purse.take(t.amount, t.created_at)
                spends[t.id] = take
                if t.to_user_id is not None:
                    purses[t.to_user_id].add(take)
            case "expiry":
                take = purse.expire(t.created_at)
            case "refund":
                assert t.refund_of is not None
                take = returned(spends[t.refund_of], before=refunded[t.refund_of], amount=t.amount)
                refunded[t.refund_of] += t.amount
                purse.add(take)
            case _:
                raise AssertionError(f"no rule replays {t}")
        sign = 1 if t.type in ("topup", "bonus", "refund") else -1
        expected = take.lot_moves(t.user_id, sign)
        if t.to_user_id is not None:
            expected.update(take.lot_moves(t.to_user_id, 1))
        assert (t.paid, t.amount) == (take.paid, take.paid + sum(n for _, n in take.free)), (
            f"{t} moved paid {t.paid}, the rules {take}"
        )
        assert moved == expected, f"{t} moved lots {dict(moved)}, the rules {take}"
    return purses


def check_rows(ledger: StoredLedger, purses: Mapping[str, Purse], users: Sequence[str]) -> None:
    """Each user's balance row, paid part and lots are the replay's; nothing is held."""
    for user in users:
        purse = purses[user]
        lots = {
            expires_at: remaining
            for (account, kind, expires_at), remaining in ledger.lots.items()
            if account == user and (kind, remaining) != ("free", 0)
        }
        assert lots == {at: left for at, left in purse.lots.items() if left}, (user, purse)
        row = ledger.balances.get(user, (0, 0, 0, 0))
        assert row == (purse.balance, purse.paid, 0, sum(purse.lots.values())), (
            f"{user}: balance, paid, held, expiring {row}; the replay {purse}"
        )


async def check_balances_read(
    client: httpx.AsyncClient, purses: Mapping[str, Purse], users: Sequence[str]
) -> None:
    """Once nothing past its expiry is left, each balance read says what the replay does."""
    now = datetime.now(UTC)
    for user in users:
        response = await client.get(f"{API}/wallet/balance/{user}/{GOLD}")
        assert response.status_code == 200, response.text
        body = response.json()
        purse = purses[user]
        upcoming = sorted((at, left) for at, left in purse.lots.items() if at > now and left)
        soonest = body.pop("nextExpiry")
        assert body == {
            "userId": user,
            "assetSymbol": GOLD,
            "balance": purse.balance,
            "paid": purse.paid,
            "free": purse.balance - purse.paid,
            "held": 0,
            "available": purse.balance,
        }, (body, purse)
        if not upcoming:
            assert soonest is None, (user, soonest)
            continue
        assert soonest is not None, (user, purse)
        assert (soonest["amount"], datetime.fromisoformat(soonest["expiresAt"])) == (
            upcoming[0][1],
            upcoming[0][0],
        ), (user, soonest, purse)


def assert_no_database_errors(errors: DatabaseErrors) -> None:
    """No deadlock (the engine reruns one silently) nor any other database error. Checked while
    the app runs: at shutdown it cancels its sweeper, whose query in flight then records a
    CancelledError."""
    assert errors.unexpected() == [], "no deadlock nor any other database error"


async def assert_kinds_sum_to_zero(url: str) -> None:
    """Per asset and per kind all balances, system accounts' included, sum to zero."""
    rows = await query(
        url,
        "SELECT asset_symbol, sum(balance) AS total, sum(paid) AS paid FROM balances"
        " GROUP BY asset_symbol HAVING sum(balance) <> 0 OR sum(paid) <> 0",
    )
    assert rows == [], f"(asset, balances, paid parts) not summing to zero: {rows}"


async def assert_verifies(url: str) -> None:
    await assert_kinds_sum_to_zero(url)
    await assert_ledger_verifies(url)


# ---- sweepers ------------------------------------------------------------------------------


@asynccontextmanager
async def own_pool(url: str, errors: DatabaseErrors, *, size: int) -> AsyncIterator[Database]:
    """A pool of its own, as another process's sweeper has; its database errors go to
    `errors`."""
    database = Database(create_engine(Settings(database_url=url, database_pool_size=size)))
    errors.watch(database)
    try:
        yield database
    finally:
        await database.close()


async def sweep_until(url: str, errors: DatabaseErrors, *, until: datetime, sweepers: int) -> int:
    """`sweepers` loops of `expire_credits` side by side (each pass a few balances, so they go
    for the same ones), beside the app's own sweeper, until `until`; how many expiry
    transactions they made."""
    made = 0

    async def sweeper(database: Database) -> None:
        nonlocal made
        while datetime.now(UTC) < until:
            count = await expire_credits(database, limit=4)  # awaited before `made` is read
            made += count
            await asyncio.sleep(0.01)

    async with own_pool(url, errors, size=sweepers) as database:
        await asyncio.gather(*(sweeper(database) for _ in range(sweepers)))
    return made


async def drain_expired(url: str, errors: DatabaseErrors) -> None:
    """Sweep until no credits past their expiry are left in any lot."""
    async with own_pool(url, errors, size=1) as database:
        while await expire_credits(database, limit=100):
            pass
    due = await query(
        url, "SELECT account_id, expires_at FROM lots WHERE remaining > 0 AND expires_at <= now()"
    )
    assert due == [], f"lots past their expiry left after the sweep: {due}"


def expiries_by_user(ledger: StoredLedger) -> Counter[str]:
    return Counter(t.user_id for t in ledger.of_type("expiry"))


# ---- 1. spends race the expiry -------------------------------------------------------------


async def test_spends_racing_the_expiry_sweepers_never_take_expired_credits_nor_expire_any_twice(
    app_settings: Settings, api_key: str
) -> None:
    """Users hold free credits expiring at one moment, free credits that last, and paid ones;
    clients keep spending across that moment while several sweepers (and the app's own) move the
    expired credits out: before it spends take the expiring lot first, from it on never; each
    lot is spent or expired once."""
    users_count, expiring, lasting, paid = 16, 1000, 100, 400
    url = _url(app_settings)
    errors, sweeper_errors = DatabaseErrors(), DatabaseErrors()
    rng = random.Random(1301)
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        users = await new_users(client, label="expiring", count=users_count)
        later = datetime.now(UTC) + LATER
        await asyncio.gather(
            *(fund(client, user, paid) for user in users),
            *(
                grant(client, user, lasting, expiry={"expiresAt": _rfc3339(later)})
                for user in users
            ),
        )
        # Two bonuses a user, both into the one lot that expires at `expiry`.
        expiry = datetime.now(UTC) + timedelta(seconds=2.5)
        await grant_at_once(
            client, [(user, expiring // 2) for user in users for _ in range(2)], expires_at=expiry
        )

        # Spenders without pause, from now until 1.5 s past the expiry; at most 30 s.
        spends: list[Answer] = []
        stop_at, hard_stop = expiry + timedelta(seconds=1.5), time.monotonic() + 30

        async def spender() -> None:
            while datetime.now(UTC) < stop_at and time.monotonic() < hard_stop:
                body = spend_body(rng.choice(users), rng.randint(1, 20))
                spends.append(await answered(client, SPEND, body))

        made, _ = await asyncio.wait_for(
            asyncio.gather(
                sweep_until(url, sweeper_errors, until=expiry + timedelta(seconds=2), sweepers=4),
                asyncio.gather(*(spender() for _ in range(12))),
            ),
            LOAD_DEADLINE_S,
        )
        await drain_expired(url, sweeper_errors)

        assert_no_server_errors(spends)
        assert_outcomes(spends, (201, None), (422, "insufficient_funds"))
        ledger = await read_ledger(url, users)
        purses = replay(ledger)
        check_rows(ledger, purses, users)
        await check_balances_read(client, purses, users)

        # Every 201 is the stored spend.
        stored = {t.id: t for t in ledger.of_type("spend")}
        applied = [a.body for a in spends if a.status == 201]
        assert {b["transactionId"] for b in applied} == stored.keys()
        for body in applied:
            t = stored[body["transactionId"]]
            assert (body["paidAmount"], body["freeAmount"]) == (t.paid, t.free), body
        assert_no_database_errors(errors)

    # Nothing expired twice: one expiry per user at most, at or after the expiry, of that lot;
    # per user the lot's credits were spent or expired, once.
    expiries = ledger.of_type("expiry")
    assert max(expiries_by_user(ledger).values(), default=0) == 1, expiries_by_user(ledger)
    assert all(t.created_at >= expiry and t.paid == 0 for t in expiries), expiries
    for user in users:
        taken = [
            ledger.lot_take(t, expiry)
            for t in ledger.transactions
            if t.user_id == user and t.type in ("spend", "expiry")
        ]
        assert -sum(taken) == expiring, f"{user}: of {expiring} spent or expired {-sum(taken)}"
        assert ledger.lots[(user, "free", expiry)] == 0
    # Nothing expired was spent: no spend at or after the expiry took from that lot.
    late_takes = [
        t for t in ledger.of_type("spend") if t.created_at >= expiry and ledger.lot_take(t, expiry)
    ]
    assert late_takes == [], f"spends took expired credits: {late_takes[:5]}"
    # Per user, spent free + expired free + free left = granted free.
    for user in users:
        moved = [t for t in ledger.transactions if t.user_id == user]
        out = sum(t.free for t in moved if t.type in ("spend", "expiry"))
        purse = purses[user]
        assert out + purse.balance - purse.paid == expiring + lasting, user

    # The load crossed the expiry: spends took the lot before it and others applied after it,
    # and credits were left to expire.
    assert any(t.created_at < expiry and ledger.lot_take(t, expiry) for t in stored.values())
    assert any(t.created_at >= expiry for t in stored.values()), "no spend applied after expiry"
    assert sum(t.amount for t in expiries) > 0
    assert made <= len(expiries), "each expiry a sweeper counted is in the ledger"
    assert sweeper_errors.unexpected() == [], "no deadlock nor any error in the sweepers"
    await assert_verifies(url)


# ---- 2. refunds race spends ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MixedSpend:
    """A spend of 100 that took `free` of free credits (from the bonuses granted just before it,
    with these lifetimes in days: None never expires) and the rest paid."""

    lifetimes: tuple[tuple[int | None, int], ...]  # (expiresInDays, amount) of its bonuses

    @property
    def free(self) -> int:
        return sum(amount for _, amount in self.lifetimes)


MIXED = (
    MixedSpend(((None, 40),)),
    MixedSpend(((2, 30), (1, 20))),
    MixedSpend(((3, 50), (None, 20))),
)
SPENT = 100
PIECE = 15  # does not divide SPENT, so pieces alone never refund a spend whole


async def make_mixed_spends(client: httpx.AsyncClient, user: str) -> list[dict[str, Any]]:
    """The MIXED spends of `user`, one after another: each takes its bonuses, then paid."""
    made = []
    for mixed in MIXED:
        for days, amount in mixed.lifetimes:
            await grant(
                client, user, amount, expiry=None if days is None else {"expiresInDays": days}
            )
        body = await spend(client, user, SPENT)
        assert (body["freeAmount"], body["paidAmount"]) == (mixed.free, SPENT - mixed.free), body
        made.append(body)
    return made


async def test_partial_refunds_of_mixed_spends_racing_new_spends_give_back_each_kind_once(
    app_settings: Settings, api_key: str
) -> None:
    """Per mixed spend, refunds of 15 and refunds of what is left race each other and new spends
    of the same user: the refunds add up to exactly the spend, paid first, each kind (and lot)
    given back what the spend took of it; the new spends take free credits first, refunded ones
    included; the balances per kind are exact."""
    users_count, opening, new_spends = 4, 1000, 10
    url = _url(app_settings)
    errors = DatabaseErrors()
    rng = random.Random(1302)
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        users = await new_users(client, label="mixed", count=users_count)
        await asyncio.gather(*(fund(client, user, opening) for user in users))
        originals = [
            body
            for made in await asyncio.gather(*(make_mixed_spends(client, u) for u in users))
            for body in made
        ]

        calls: list[Call] = []
        for original in originals:
            path = _refund(original["transactionId"])
            calls += [(path, {"idempotencyKey": _key("piece"), "amount": PIECE}) for _ in range(8)]
            # One refund of what is left: it tends to come after pieces that gave back the paid
            # part, so refunds of part of the free credits show which credits come back first.
            calls.append((path, {"idempotencyKey": _key("rest")}))
        calls += [
            (SPEND, spend_body(user, rng.randint(20, 60)))
            for user in users
            for _ in range(new_spends)
        ]
        rng.shuffle(calls)
        answers = await post_all(client, calls, concurrency=16)
        assert_no_server_errors(answers)
        refunds = [a for a in answers if a.path != SPEND]
        assert_outcomes(refunds, (201, None), (409, "refund_exceeds_original"))
        assert_outcomes(
            [a for a in answers if a.path == SPEND], (201, None), (422, "insufficient_funds")
        )

        ledger = await read_ledger(url, users)
        purses = replay(ledger)
        check_rows(ledger, purses, users)
        await check_balances_read(client, purses, users)

        stored = {t.id: t for t in ledger.transactions}
        for original in originals:
            made = [
                a
                for a in refunds
                if a.status == 201 and a.body["refundOf"] == original["transactionId"]
            ]
            mine = sorted((stored[a.body["transactionId"]] for a in made), key=lambda t: t.seq)
            where = f"refunds of {original}: {mine}"
            # Pieces of 15 never empty it, so the refund of what was left applied.
            assert sum(t.amount for t in mine) == SPENT, where
            assert sum("amount" not in a.sent for a in made) == 1, where
            # Paid first: once the paid part is back, every later refund is free only.
            assert sum(t.paid for t in mine) == original["paidAmount"], where
            assert sum(t.free for t in mine) == original["freeAmount"], where
            paid_back = 0
            for t in mine:
                assert t.paid == min(original["paidAmount"] - paid_back, t.amount), where
                paid_back += t.paid
            # Each lot got back what the spend took of it.
            given: LotMoves = Counter()
            for t in mine:
                given.update(ledger.lot_moves.get(t.id, Counter()))
            taken = ledger.lot_moves.get(original["transactionId"], Counter())
            assert given == Counter({lot: -n for lot, n in taken.items()}), where
            for answer in made:
                t = stored[answer.body["transactionId"]]
                assert (answer.body["paidAmount"], answer.body["freeAmount"]) == (t.paid, t.free)
            response = await client.get(
                f"{API}/wallet/transactions/{original['userId']}/{original['transactionId']}"
            )
            assert response.json()["refundedAmount"] == SPENT, response.json()
        assert_no_database_errors(errors)
    # The new spends took free credits some refunds gave back.
    racing = [
        t for t in ledger.of_type("spend") if t.id not in {o["transactionId"] for o in originals}
    ]
    assert any(t.free for t in racing), "no new spend found free credits"
    await assert_verifies(url)


# ---- 3. transfers of expiring credits cross while they expire -----------------------------


async def test_crossing_transfers_of_expiring_credits_conserve_every_kind_and_lot(
    app_settings: Settings, api_key: str
) -> None:
    """Transfers between a pair and around a ring (and across both) of users whose free credits
    expire at one moment, sent in waves from before it to after it, while sweepers run: no
    deadlock; the receivers' credits keep their expiry; per kind all balances sum to zero; each
    lot's credits are where transfers took them, or expired once."""
    expiring, lasting, paid = 300, 100, 300
    url = _url(app_settings)
    errors, sweeper_errors = DatabaseErrors(), DatabaseErrors()
    rng = random.Random(1303)
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        pair = await new_users(client, label="pair", count=2)
        ring = await new_users(client, label="ring", count=4)
        users = pair + ring
        later = datetime.now(UTC) + LATER
        await asyncio.gather(
            *(fund(client, user, paid) for user in users),
            *(
                grant(client, user, lasting, expiry={"expiresAt": _rfc3339(later)})
                for user in users
            ),
        )
        expiry = datetime.now(UTC) + timedelta(seconds=2.5)
        await grant_at_once(client, [(user, expiring) for user in users], expires_at=expiry)

        a, b = pair
        calls = [transfer_call(a, b, rng.randint(1, 40)) for _ in range(40)]
        calls += [transfer_call(b, a, rng.randint(1, 40)) for _ in range(40)]
        for index, user in enumerate(ring):
            after, before = ring[(index + 1) % len(ring)], ring[index - 1]
            calls += [transfer_call(user, after, rng.randint(1, 40)) for _ in range(8)]
            calls += [transfer_call(user, before, rng.randint(1, 40)) for _ in range(8)]
        calls += [transfer_call(rng.choice(pair), rng.choice(ring), 10) for _ in range(8)]
        calls += [transfer_call(rng.choice(ring), rng.choice(pair), 10) for _ in range(8)]
        rng.shuffle(calls)

        # 12 waves, evenly from 1.5 s before the expiry to 1 s after it; each all at once, but
        # one wave at a time: on a loaded machine more in flight only queue for the pool.
        first, waves = expiry - timedelta(seconds=1.5), 12
        one_at_a_time = asyncio.Lock()

        async def wave(index: int) -> list[Answer]:
            at = first + timedelta(seconds=2.5) * index / (waves - 1)
            await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
            async with one_at_a_time:
                return await post_all(client, calls[index::waves])

        made, sent = await asyncio.wait_for(
            asyncio.gather(
                sweep_until(url, sweeper_errors, until=expiry + timedelta(seconds=1.5), sweepers=3),
                asyncio.gather(*(wave(index) for index in range(waves))),
            ),
            LOAD_DEADLINE_S,
        )
        await drain_expired(url, sweeper_errors)
        answers = [answer for answers in sent for answer in answers]
        assert_no_server_errors(answers)
        assert_outcomes(answers, (201, None), (422, "insufficient_funds"))

        ledger = await read_ledger(url, users)
        purses = replay(ledger)
        check_rows(ledger, purses, users)
        await check_balances_read(client, purses, users)
        transfers = ledger.of_type("transfer")
        assert {t.id for t in transfers} == {
            a.body["transactionId"] for a in answers if a.status == 201
        }
        assert_no_database_errors(errors)

    # Per kind: the users' paid credits only changed hands; their free credits, less what
    # expired, too; both kinds sum to zero over every account.
    expiries = ledger.of_type("expiry")
    expired = sum(t.amount for t in expiries)
    assert sum(purses[user].paid for user in users) == paid * len(users)
    free_left = sum(purses[user].balance - purses[user].paid for user in users)
    assert free_left == (expiring + lasting) * len(users) - expired
    assert all(t.paid == 0 for t in expiries), expiries
    # Per lot: what is left in the users' lots and what expired of them is what was granted.
    assert sum(ledger.lots.get((user, "free", later), 0) for user in users) == lasting * len(users)
    assert sum(ledger.lots.get((user, "free", expiry), 0) for user in users) == 0
    assert -sum(ledger.lot_take(t, expiry) for t in expiries) == expiring * len(users)
    for user in users:
        # The user's lot at the expiry: granted, plus what transfers before it brought or took.
        moved = sum(
            amount
            for t in transfers
            if t.created_at < expiry
            for (account, _, at), amount in ledger.lot_moves.get(t.id, Counter()).items()
            if account == user and at == expiry
        )
        lost = sum(t.amount for t in expiries if t.user_id == user)
        assert lost == expiring + moved, f"{user}: expired {lost} of a lot of {expiring + moved}"
    # No transfer at or after the expiry moved credits of that lot; each user's lot expired once.
    late = [
        t
        for t in transfers
        if t.created_at >= expiry
        and any(at == expiry for (_, _, at) in ledger.lot_moves.get(t.id, Counter()))
    ]
    assert late == [], f"transfers moved expired credits: {late[:5]}"
    assert max(expiries_by_user(ledger).values(), default=0) == 1, expiries_by_user(ledger)
    assert any(t.created_at < expiry for t in transfers), "transfers before the expiry applied"
    assert any(t.created_at >= expiry for t in transfers), "transfers after the expiry applied"
    assert made <= len(expiries)
    assert sweeper_errors.unexpected() == [], "no deadlock nor any error in the sweepers"
    await assert_verifies(url)


# ---- 4. an asset's lifetimes change while credits are granted ------------------------------


# The lifetimes in days the asset is given in turn, free and paid; each PATCH sets both.
FREE_DAYS = tuple(range(1, 13))
PAID_DAYS = tuple(days + 100 for days in FREE_DAYS)


@dataclass(frozen=True, slots=True)
class Timed:
    """A request with the moments (client clock) it was sent and answered."""

    sent_at: datetime
    answered_at: datetime
    body: dict[str, Any]


async def test_lifetime_changes_racing_grants_give_each_credit_a_whole_lifetime(
    app_settings: Settings, api_key: str
) -> None:
    """An asset's free and paid lifetimes change together, PATCH after PATCH, while bonuses and
    atomic batches of a top-up and a bonus are granted: each credit's lot expires exactly one
    lifetime of the asset after it was granted, one in force while its request was in flight
    (never one replaced before it was sent, nor one set after it was answered), and the two
    credits of one batch have the lifetimes of the same PATCH."""
    asset = f"SEASON_{uuid.uuid4().hex[:8].upper()}"
    url = _url(app_settings)
    errors = DatabaseErrors()
    rng = random.Random(1304)
    async with in_process_client(app_settings, key=api_key, peak=errors) as client:
        created = await client.post(
            ASSETS,
            json={
                "symbol": asset,
                "name": "Season points",
                "freeLifetimeDays": FREE_DAYS[0],
                "paidLifetimeDays": PAID_DAYS[0],
            },
        )
        assert created.status_code == 201, created.text
        users = await new_users(client, label="season", count=8)
        patches: list[Timed] = []
        grants: list[Timed] = []
        is_patching = True
        granted = asyncio.Event()  # set as each grant is answered

        async def granted_since(moment: datetime) -> None:
            while not any(g.sent_at > moment for g in grants):
                granted.clear()
                await granted.wait()

        async def patcher() -> None:
            # Each PATCH waits for a grant sent after the one before it was answered: that grant
            # can only have the lifetimes in force between the two.
            nonlocal is_patching
            in_force_since = datetime.now(UTC)
            for free_days, paid_days in zip(FREE_DAYS[1:], PAID_DAYS[1:], strict=True):
                await granted_since(in_force_since)
                sent_at = datetime.now(UTC)
                change = {"freeLifetimeDays": free_days, "paidLifetimeDays": paid_days}
                response = await client.patch(f"{ASSETS}/{asset}", json=change)
                assert response.status_code == 200, response.text
                in_force_since = datetime.now(UTC)
                patches.append(Timed(sent_at, in_force_since, response.json()))
            is_patching = False

        async def granter() -> None:
            # Until the last PATCH is answered, and once more after it.
            while True:
                was_patching = is_patching
                user = rng.choice(users)
                sent: Call
                if rng.random() < 0.5:
                    sent = (
                        BONUS,
                        {
                            "userId": user,
                            "assetSymbol": asset,
                            "amount": rng.randint(1, 9),
                            "idempotencyKey": _key("bonus"),
                        },
                    )
                else:
                    sent = (
                        BATCH,
                        {
                            "idempotencyKey": _key("batch"),
                            "operations": [
                                {"type": kind, "userId": user, "assetSymbol": asset, "amount": n}
                                for kind, n in (("topup", 5), ("bonus", 3))
                            ],
                        },
                    )
                sent_at = datetime.now(UTC)
                answer = await answered(client, *sent)
                assert answer.status == 201, answer
                grants.append(Timed(sent_at, answer.received_at, answer.body))
                granted.set()
                if not was_patching:
                    return

        await asyncio.wait_for(
            asyncio.gather(patcher(), *(granter() for _ in range(10))), LOAD_DEADLINE_S
        )
        assert [p.body["freeLifetimeDays"] for p in patches] == list(FREE_DAYS[1:])
        response = await client.get(ASSETS)
        (row,) = [a for a in response.json() if a["symbol"] == asset]
        assert (row["freeLifetimeDays"], row["paidLifetimeDays"]) == (FREE_DAYS[-1], PAID_DAYS[-1])
        assert_no_database_errors(errors)

    moves = await query(
        url,
        "SELECT transaction_id, kind, expires_at, amount FROM lot_moves WHERE asset_symbol = :a",
        a=asset,
    )
    lot_of = {m.transaction_id: m for m in moves}
    assert len(lot_of) == len(moves), "each grant gave to one lot"
    seen: set[int] = set()
    for grant_ in grants:
        made = grant_.body.get("transactions", [grant_.body])
        versions = set()
        for transaction in made:
            lot = lot_of[transaction["transactionId"]]
            kind = "paid" if transaction["type"] == "topup" else "free"
            assert (lot.kind, lot.amount) == (kind, transaction["amount"]), (lot, transaction)
            lifetime = lot.expires_at - datetime.fromisoformat(transaction["createdAt"])
            lifetimes = PAID_DAYS if kind == "paid" else FREE_DAYS
            assert lifetime in [timedelta(days=d) for d in lifetimes], (lifetime, transaction)
            versions.add(lifetimes.index(lifetime.days))
        # The PATCHes answered before it was sent are in force for it; those sent after it was
        # answered are not.
        (version,) = versions  # a batch's two credits, of one PATCH
        answered_before = sum(p.answered_at < grant_.sent_at for p in patches)
        sent_before = sum(p.sent_at < grant_.answered_at for p in patches)
        assert answered_before <= version <= sent_before, (
            f"{grant_} has the lifetimes of version {version}, not one of"
            f" {answered_before}..{sent_before}"
        )
        seen.add(version)
    assert seen == set(range(len(FREE_DAYS))), f"grants in force of each PATCH: {seen}"
    await assert_verifies(url)


async def wait_for_a_lock_wait(url: str, *, timeout_s: float = 10) -> None:
    """Until a session of the database waits on a lock: the request sent is blocked there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        waiting = await query(
            url,
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        if waiting:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no session waited on a lock within {timeout_s} s")


async def test_a_lifetime_change_waiting_on_another_change_of_the_asset_keeps_both(
    app_settings: Settings, api_key: str
) -> None:
    """Only the fields a PATCH gives change, even when another change of the asset commits while
    it runs: here the paid lifetime set by a transaction holding the asset's row (as another
    worker's PATCH does) until the PATCH of the free lifetime waits on it."""
    asset = f"SEASON_{uuid.uuid4().hex[:8].upper()}"
    url = _url(app_settings)
    async with in_process_client(app_settings, key=api_key) as client:
        created = await client.post(ASSETS, json={"symbol": asset, "name": "Season points"})
        assert created.status_code == 201, created.text
        other = Database(create_engine(Settings(database_url=url, database_pool_size=1)))
        try:
            async with other.transaction(is_write=True) as connection:
                await connection.execute(
                    text("UPDATE assets SET paid_lifetime_days = 30 WHERE symbol = :symbol"),
                    {"symbol": asset},
                )
                patching = asyncio.create_task(
                    client.patch(f"{ASSETS}/{asset}", json={"freeLifetimeDays": 9})
                )
                await wait_for_a_lock_wait(url)
            response = await asyncio.wait_for(patching, LOAD_DEADLINE_S)
        finally:
            await other.close()
        assert response.status_code == 200, response.text
        listed = await client.get(ASSETS)
        (row,) = [a for a in listed.json() if a["symbol"] == asset]
        for shown in (response.json(), row):
            assert (shown["freeLifetimeDays"], shown["paidLifetimeDays"]) == (9, 30), shown
