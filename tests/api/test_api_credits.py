"""Paid and free credits of API-credits.md, through the real app: a top-up gives paid credits and
a bonus free ones; spends, transfers and holds take them in the asset's spend order, soonest
expiring first within a kind; credits expire at their moment (the sweeper moves them out, free to
system:bonus_pool, paid to system:revenue) unless a hold keeps them; refunds and reversals give
back or take back by kind; assets carry the policy; the liability report adds it all up.

Tests that move time run the app on a clock they set (the engine's and the reads' `now`), with
the app's sweeper stopped: they sweep themselves with `expire_credits`."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, tzinfo
from itertools import combinations
from typing import Any

import httpx
import pytest
from api_checks import (
    API,
    BOB,
    TRANSACTION_FIELDS,
    assert_entry,
    assert_problem,
    assert_replayed,
    assert_rfc3339_utc,
    assert_validation_error,
    create_hold,
    create_user,
    created,
    flow_body,
    get_ok,
    new_key,
    post_flow,
    post_hold_action,
    post_refund,
    transaction_detail,
    transactions_of,
    transfer_body,
    walk,
    without,
)

from app_clients import app_client, bearer, create_key
from wallet.domain.access import Scope
from wallet.http import app as wallet_app
from wallet.service import posting
from wallet.service import wallet as wallet_service
from wallet.service.posting import expire_credits
from wallet.settings import Settings
from wallet.store.database import Database

MICROSECOND = timedelta(microseconds=1)
MINUTE = timedelta(minutes=1)
DAY = timedelta(days=1)
LONG_AGO = "2000-01-01T00:00:00Z"
BALANCE_FIELDS = {"balance", "paid", "free", "held", "available", "nextExpiry"}
PERIOD_FIELDS = {
    f"{name}{kind}"
    for name in ("issued", "spent", "refunded", "reversed", "expired")
    for kind in ("Paid", "Free")
}
NOT_ADMIN = [scope for scope in Scope if scope is not Scope.ADMIN]


# ---- the clock ----------------------------------------------------------------------------


class Clock:
    """The moment the engine and the reads take as now, set by the test."""

    def __init__(self) -> None:
        self.moment = datetime.now(UTC)

    def advance(self, by: timedelta = MINUTE) -> datetime:
        self.moment += by
        return self.moment


CLOCK = Clock()


class ClockedDatetime(datetime):
    """`datetime` whose `now()` is CLOCK's: patched into the modules that take the time."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:  # type: ignore[override]
        if tz is None:  # local and naive, as datetime.now() is
            return CLOCK.moment.astimezone().replace(tzinfo=None)
        return CLOCK.moment.astimezone(tz)


async def _no_sweeper(
    database: Database, *, every_s: float, limit: int, stop: asyncio.Event
) -> None:
    """Stands in for the app's sweeper: a test on the clock sweeps when it chooses."""
    await stop.wait()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    CLOCK.moment = datetime.now(UTC)
    for module in (posting, wallet_service):
        monkeypatch.setattr(module, "datetime", ClockedDatetime)
    monkeypatch.setattr(wallet_app, "sweep_expired", _no_sweeper)
    return CLOCK


@pytest.fixture
async def clocked(
    settings: Settings, admin_key: str, clock: Clock
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app on the test's clock, its sweeper stopped."""
    async with app_client(settings, key=admin_key) as http:
        yield http


async def sweep(database: Database) -> int:
    """One pass of the sweeper over expired credits: how many expiry transactions it made."""
    return await expire_credits(database, limit=100)


# ---- helpers ------------------------------------------------------------------------------


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def shown(
    paid: int,
    free: int,
    *,
    held: int = 0,
    expired: int = 0,
    next_expiry: tuple[int, datetime] | None = None,
) -> dict[str, Any]:
    """A balance as API-credits.md shows it (nextExpiry's moment as a datetime)."""
    return {
        "balance": paid + free,
        "paid": paid,
        "free": free,
        "held": held,
        "available": paid + free - held - expired,
        "nextExpiry": None
        if next_expiry is None
        else {"amount": next_expiry[0], "expiresAt": next_expiry[1]},
    }


def _standing(body: dict[str, Any]) -> dict[str, Any]:
    """A balance's fields, checked (balance = paid + free), its nextExpiry moment parsed."""
    assert set(body) == BALANCE_FIELDS, body
    assert body["balance"] == body["paid"] + body["free"], body
    standing = dict(body)
    if body["nextExpiry"] is not None:
        assert set(body["nextExpiry"]) == {"amount", "expiresAt"}, body
        moment = assert_rfc3339_utc(body["nextExpiry"]["expiresAt"])
        standing["nextExpiry"] = {"amount": body["nextExpiry"]["amount"], "expiresAt": moment}
    return standing


async def position(client: httpx.AsyncClient, user_id: str, asset: str) -> dict[str, Any]:
    """The user's balance of `asset`, on its own and as its row of the balances list."""
    body = await get_ok(client, f"{API}/wallet/balance/{user_id}/{asset}")
    assert (body.pop("userId"), body.pop("assetSymbol")) == (user_id, asset)
    single = _standing(body)
    assert (await positions(client, user_id))[asset] == single
    return single


async def positions(client: httpx.AsyncClient, user_id: str) -> dict[str, dict[str, Any]]:
    body = await get_ok(client, f"{API}/wallet/balances/{user_id}")
    assert body["userId"] == user_id
    return {row.pop("assetSymbol"): _standing(row) for row in body["balances"]}


def split_of(transaction: dict[str, Any]) -> tuple[str, int, int, int]:
    """A transaction's type, amount, paidAmount and freeAmount (their sum the amount)."""
    amount, paid, free = (transaction[n] for n in ("amount", "paidAmount", "freeAmount"))
    assert paid + free == amount, transaction
    assert paid >= 0, transaction
    assert free >= 0, transaction
    return transaction["type"], amount, paid, free


def moves(detail: dict[str, Any]) -> list[tuple[str, str, str, int]]:
    """A transaction's entries (their shape checked): account, direction, kind, amount."""
    for entry in detail["entries"]:
        assert entry["assetSymbol"] == detail["assetSymbol"]
        assert_entry({**entry, "assetSymbol": "GOLD_COINS"})  # it knows the seed's assets only
    return [(e["account"], e["direction"], e["kind"], e["amount"]) for e in detail["entries"]]


async def new_user(client: httpx.AsyncClient) -> str:
    user_id: str = (await create_user(client))["id"]
    return user_id


async def new_asset(client: httpx.AsyncClient, **fields: Any) -> str:
    """A new asset (free_first, no lifetimes unless told), its symbol fresh."""
    symbol = f"T_{new_key()[-10:].upper()}"
    body = {"symbol": symbol, "name": "Test credits", **fields}
    created(await client.post(f"{API}/assets", json=body))
    return symbol


async def patch_asset(client: httpx.AsyncClient, symbol: str, **fields: Any) -> dict[str, Any]:
    response = await client.patch(f"{API}/assets/{symbol}", json=fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def post_ok(client: httpx.AsyncClient, flow: str, **fields: Any) -> dict[str, Any]:
    return created(await post_flow(client, flow, flow_body(**fields)))


async def transfer_ok(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    return created(await post_flow(client, "transfer", transfer_body(**fields)))


async def refund_ok(
    client: httpx.AsyncClient, original: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    return created(await post_refund(client, original["transactionId"], **fields))


async def capture_ok(client: httpx.AsyncClient, hold_id: str, **fields: Any) -> dict[str, Any]:
    body = created(await post_hold_action(client, hold_id, "capture", **fields))
    transaction: dict[str, Any] = body["transaction"]
    return transaction


def moment_of(transaction: dict[str, Any]) -> datetime:
    return assert_rfc3339_utc(transaction["createdAt"])


async def splits_of(client: httpx.AsyncClient, user_id: str) -> list[tuple[str, int, int, int]]:
    """The user's transactions, newest first, as split_of shows them."""
    return [split_of(t) for t in await transactions_of(client, user_id)]


# ---- two kinds of credit ------------------------------------------------------------------


async def test_a_topup_gives_paid_credits_and_a_bonus_free_ones(client: httpx.AsyncClient) -> None:
    carol = await new_user(client)

    topup = await post_ok(client, "topup", user_id=carol, amount=300)
    bonus = await post_ok(client, "bonus", user_id=carol, amount=200)

    assert split_of(topup) == ("topup", 300, 300, 0)
    assert split_of(bonus) == ("bonus", 200, 0, 200)
    assert await position(client, carol, "GOLD_COINS") == shown(300, 200)
    assert await positions(client, carol) == {
        "DIAMONDS": shown(0, 0),
        "GOLD_COINS": shown(300, 200),
        "LOYALTY_POINTS": shown(0, 0),
    }


async def test_the_seeded_opening_balances_are_paid(client: httpx.AsyncClient) -> None:
    assert await positions(client, BOB) == {
        "DIAMONDS": shown(10, 0),
        "GOLD_COINS": shown(1000, 0),
        "LOYALTY_POINTS": shown(500, 0),
    }


async def test_a_balance_shows_what_is_held_available_and_expires_next(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)
    soon = await post_ok(client, "bonus", user_id=carol, amount=100, expiresInDays=10)
    await post_ok(client, "bonus", user_id=carol, amount=50, expiresInDays=20)
    await post_ok(client, "topup", user_id=carol, amount=200)

    await create_hold(client, user_id=carol, amount=30)

    assert await position(client, carol, "GOLD_COINS") == shown(
        200, 150, held=30, next_expiry=(100, moment_of(soon) + 10 * DAY)
    )


async def test_every_type_of_transaction_shows_its_paid_and_free_amounts(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    asset = await new_asset(clocked)
    carol, dave = await new_user(clocked), await new_user(clocked)
    await post_ok(clocked, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(clocked, "bonus", user_id=carol, asset=asset, amount=50, expiresInDays=1)
    spend = await post_ok(clocked, "spend", user_id=carol, asset=asset, amount=70)
    await transfer_ok(clocked, from_user=carol, to_user=dave, asset=asset, amount=30)
    reversed_bonus = await post_ok(clocked, "bonus", user_id=carol, asset=asset, amount=10)
    await refund_ok(clocked, reversed_bonus)
    await refund_ok(clocked, spend, amount=40)  # paid first: 20 paid, then 20 free
    clock.advance(DAY)  # the refunded free credits went back to the lot that expires now
    assert await sweep(database) == 1

    assert await splits_of(clocked, carol) == [
        ("expiry", 20, 0, 20),
        ("refund", 40, 20, 20),
        ("reversal", 10, 0, 10),
        ("bonus", 10, 0, 10),
        ("transfer", 30, 30, 0),
        ("spend", 70, 20, 50),
        ("bonus", 50, 0, 50),
        ("topup", 100, 100, 0),
    ]
    assert await splits_of(clocked, dave) == [("transfer", 30, 30, 0)]
    for transaction in await transactions_of(clocked, carol):
        detail = await transaction_detail(clocked, transaction["transactionId"], carol)
        assert split_of(detail) == split_of(transaction)
    assert await position(clocked, carol, asset) == shown(70, 0)
    assert await position(clocked, dave, asset) == shown(30, 0)


async def test_a_mixed_spend_has_four_entries_each_with_its_kind_and_paid_part_after(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)
    topup = await post_ok(client, "topup", user_id=carol, amount=70)
    bonus = await post_ok(client, "bonus", user_id=carol, amount=30)

    spend = await post_ok(client, "spend", user_id=carol, amount=100)

    assert split_of(spend) == ("spend", 100, 70, 30)
    detail = await transaction_detail(client, spend["transactionId"], carol)
    for entry in detail["entries"]:
        assert_entry(entry)
    assert [
        (e["account"], e["direction"], e["kind"], e["amount"], e["balanceAfter"], e["paidAfter"])
        for e in detail["entries"]
    ] == [  # free first, the GOLD_COINS default; the revenue account starts empty
        (carol, "debit", "free", 30, 70, 70),
        ("system:revenue", "credit", "free", 30, 30, 0),
        (carol, "debit", "paid", 70, 0, 0),
        ("system:revenue", "credit", "paid", 70, 100, 70),
    ]
    ledger = await get_ok(client, f"{API}/wallet/ledger/{carol}", limit=500)
    for entry in ledger["items"]:
        assert_entry(entry)
    assert [
        (e["transactionId"], e["direction"], e["kind"], e["amount"], e["paidAfter"])
        for e in ledger["items"]
    ] == [
        (spend["transactionId"], "debit", "paid", 70, 0),
        (spend["transactionId"], "debit", "free", 30, 70),
        (bonus["transactionId"], "credit", "free", 30, 70),
        (topup["transactionId"], "credit", "paid", 70, 70),
    ]


# ---- spend order --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "taken"),
    [(None, (50, 100)), ("free_first", (50, 100)), ("paid_first", (100, 50))],
)
@pytest.mark.parametrize("move", ["spend", "transfer", "hold"])
async def test_spends_transfers_and_holds_take_credits_in_the_assets_spend_order(
    client: httpx.AsyncClient, order: str | None, taken: tuple[int, int], move: str
) -> None:
    """150 of 100 paid and 100 free: free_first (the default) takes 100 free and 50 paid,
    paid_first 100 paid and 50 free."""
    asset = await new_asset(client, **({} if order is None else {"spendOrder": order}))
    carol, dave = await new_user(client), await new_user(client)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=100)
    paid, free = taken

    if move == "spend":
        made = await post_ok(client, "spend", user_id=carol, asset=asset, amount=150)
    elif move == "transfer":
        made = await transfer_ok(client, from_user=carol, to_user=dave, asset=asset, amount=150)
        assert await position(client, dave, asset) == shown(paid, free)
    else:
        hold = await create_hold(client, user_id=carol, asset=asset, amount=150)
        made = await capture_ok(client, hold["holdId"])

    assert split_of(made) == ("transfer" if move == "transfer" else "spend", 150, paid, free)
    assert await position(client, carol, asset) == shown(100 - paid, 100 - free)


@pytest.mark.parametrize(
    ("order", "spent", "captured"),
    [("free_first", (50, 0), (20, 100)), ("paid_first", (0, 50), (100, 20))],
)
async def test_a_hold_reserves_in_the_spend_order_and_its_capture_takes_exactly_that(
    client: httpx.AsyncClient, order: str, spent: tuple[int, int], captured: tuple[int, int]
) -> None:
    """A hold of 120 of 100 paid and 100 free reserves 100 of the first kind and 20 of the
    other: a spend of 50 meanwhile takes the second kind, and the capture what was reserved."""
    asset = await new_asset(client, spendOrder=order)
    carol = await new_user(client)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=100)
    hold = await create_hold(client, user_id=carol, asset=asset, amount=120)

    spend = await post_ok(client, "spend", user_id=carol, asset=asset, amount=50)
    capture = await capture_ok(client, hold["holdId"])

    assert split_of(spend) == ("spend", 50, *spent)
    assert split_of(capture) == ("spend", 120, *captured)
    left = 100 - spent[0] - captured[0], 100 - spent[1] - captured[1]
    assert await position(client, carol, asset) == shown(*left)


@pytest.mark.parametrize(
    ("order", "captured"), [("free_first", (20, 100)), ("paid_first", (100, 20))]
)
async def test_a_partial_capture_takes_the_first_kind_the_hold_reserved_first(
    client: httpx.AsyncClient, order: str, captured: tuple[int, int]
) -> None:
    asset = await new_asset(client, spendOrder=order)
    carol = await new_user(client)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=100)
    hold = await create_hold(client, user_id=carol, asset=asset, amount=150)

    capture = await capture_ok(client, hold["holdId"], amount=120)

    assert split_of(capture) == ("spend", 120, *captured)
    assert await position(client, carol, asset) == shown(100 - captured[0], 100 - captured[1])


async def test_a_changed_spend_order_applies_to_the_next_spend(client: httpx.AsyncClient) -> None:
    asset = await new_asset(client)
    carol = await new_user(client)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=100)
    first = await post_ok(client, "spend", user_id=carol, asset=asset, amount=30)

    changed = await patch_asset(client, asset, spendOrder="paid_first")

    assert changed["spendOrder"] == "paid_first"
    second = await post_ok(client, "spend", user_id=carol, asset=asset, amount=30)
    assert (split_of(first), split_of(second)) == (("spend", 30, 0, 30), ("spend", 30, 30, 0))
    assert await position(client, carol, asset) == shown(70, 70)


async def test_within_a_kind_the_soonest_expiring_credits_go_first_then_those_that_never_expire(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)
    await post_ok(client, "bonus", user_id=carol, amount=10)  # never expires: GOLD_COINS
    later = await post_ok(client, "bonus", user_id=carol, amount=20, expiresInDays=30)
    await post_ok(client, "bonus", user_id=carol, amount=30, expiresInDays=10)
    await post_ok(client, "topup", user_id=carol, amount=5)

    await post_ok(client, "spend", user_id=carol, amount=35)  # 30 of the 10 days, 5 of the 30
    after_first = await position(client, carol, "GOLD_COINS")
    await post_ok(client, "spend", user_id=carol, amount=20)  # 15 of the 30 days, 5 never

    assert after_first == shown(5, 25, next_expiry=(15, moment_of(later) + 30 * DAY))
    assert await position(client, carol, "GOLD_COINS") == shown(5, 5)


async def test_paid_credits_go_soonest_expiring_first_and_lifetimes_apply_to_later_top_ups(
    client: httpx.AsyncClient,
) -> None:
    asset = await new_asset(client, spendOrder="paid_first", paidLifetimeDays=30)
    carol = await new_user(client)
    later = await post_ok(client, "topup", user_id=carol, asset=asset, amount=20)  # 30 days
    await patch_asset(client, asset, paidLifetimeDays=10)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=30)  # 10 days
    await patch_asset(client, asset, paidLifetimeDays=None)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=10)  # never
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=7)

    spend = await post_ok(client, "spend", user_id=carol, asset=asset, amount=35)

    assert split_of(spend) == ("spend", 35, 35, 0)
    assert await position(client, carol, asset) == shown(
        25, 7, next_expiry=(15, moment_of(later) + 30 * DAY)
    )


# ---- expiry -------------------------------------------------------------------------------


async def test_a_bonus_expires_the_days_asked_for_after_it(client: httpx.AsyncClient) -> None:
    carol = await new_user(client)

    bonus = await post_ok(client, "bonus", user_id=carol, amount=100, expiresInDays=7)

    assert await position(client, carol, "GOLD_COINS") == shown(
        0, 100, next_expiry=(100, moment_of(bonus) + 7 * DAY)
    )


async def test_a_bonus_expires_at_the_moment_asked_for(client: httpx.AsyncClient) -> None:
    carol = await new_user(client)
    moment = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=3)

    await post_ok(client, "bonus", user_id=carol, amount=100, expiresAt=rfc3339(moment))

    assert await position(client, carol, "GOLD_COINS") == shown(0, 100, next_expiry=(100, moment))


async def test_a_bonus_without_an_expiry_takes_the_assets_free_lifetime(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)

    loyalty = await post_ok(client, "bonus", user_id=carol, asset="LOYALTY_POINTS", amount=40)
    await post_ok(client, "bonus", user_id=carol, asset="GOLD_COINS", amount=40)
    await post_ok(client, "bonus", user_id=carol, asset="DIAMONDS", amount=40)

    assert await positions(client, carol) == {
        "DIAMONDS": shown(0, 40),
        "GOLD_COINS": shown(0, 40),
        "LOYALTY_POINTS": shown(0, 40, next_expiry=(40, moment_of(loyalty) + 365 * DAY)),
    }


async def test_a_bonus_asking_for_an_expiry_overrides_the_assets_free_lifetime(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)

    bonus = await post_ok(
        client, "bonus", user_id=carol, asset="LOYALTY_POINTS", amount=40, expiresInDays=7
    )

    assert await position(client, carol, "LOYALTY_POINTS") == shown(
        0, 40, next_expiry=(40, moment_of(bonus) + 7 * DAY)
    )


async def test_top_ups_expire_only_on_an_asset_with_a_paid_lifetime(
    client: httpx.AsyncClient,
) -> None:
    asset = await new_asset(client, paidLifetimeDays=30)
    carol = await new_user(client)

    topup = await post_ok(client, "topup", user_id=carol, asset=asset, amount=60)
    await post_ok(client, "topup", user_id=carol, asset="LOYALTY_POINTS", amount=60)

    assert await position(client, carol, asset) == shown(
        60, 0, next_expiry=(60, moment_of(topup) + 30 * DAY)
    )
    assert await position(client, carol, "LOYALTY_POINTS") == shown(60, 0)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expiresInDays": 0}, "expiresInDays"),
        ({"expiresInDays": 3651}, "expiresInDays"),
        ({"expiresInDays": -1}, "expiresInDays"),
        ({"expiresInDays": "7"}, "expiresInDays"),
        ({"expiresInDays": 7.5}, "expiresInDays"),
        ({"expiresInDays": True}, "expiresInDays"),
        ({"expiresAt": LONG_AGO}, "expiresAt"),
        ({"expiresAt": "tomorrow"}, "expiresAt"),
        ({"expiresAt": 1_900_000_000}, "expiresAt"),
        ({"expiresInDays": 7, "expiresAt": "2999-01-01T00:00:00Z"}, None),
    ],
)
async def test_a_bonus_expiry_outside_the_rules_is_a_validation_error(
    client: httpx.AsyncClient, fields: dict[str, Any], field: str | None
) -> None:
    carol = await new_user(client)

    response = await post_flow(client, "bonus", flow_body(user_id=carol, amount=5, **fields))

    if field is None:
        assert_problem(response, 422, "validation_error")
    else:
        assert_validation_error(response, field)
    assert await position(client, carol, "GOLD_COINS") == shown(0, 0)
    assert await transactions_of(client, carol) == []


@pytest.mark.parametrize("days", [1, 3650])
async def test_a_bonus_may_expire_from_1_to_3650_days_after_it(
    client: httpx.AsyncClient, days: int
) -> None:
    carol = await new_user(client)

    bonus = await post_ok(client, "bonus", user_id=carol, amount=5, expiresInDays=days)

    assert await position(client, carol, "GOLD_COINS") == shown(
        0, 5, next_expiry=(5, moment_of(bonus) + days * DAY)
    )


async def test_a_top_up_takes_no_expiry(client: httpx.AsyncClient) -> None:
    carol = await new_user(client)

    response = await post_flow(client, "topup", flow_body(user_id=carol, expiresInDays=7))

    assert_validation_error(response, "expiresInDays")
    assert await position(client, carol, "GOLD_COINS") == shown(0, 0)


@pytest.mark.parametrize("other", [{"expiresInDays": 8}, {"expiresAt": "2999-01-01T00:00:00Z"}, {}])
async def test_a_bonus_key_reused_with_another_expiry_is_409(
    client: httpx.AsyncClient, other: dict[str, Any]
) -> None:
    carol = await new_user(client)
    body = flow_body(user_id=carol, amount=5, expiresInDays=7)
    created(await post_flow(client, "bonus", body))

    response = await post_flow(client, "bonus", {**without(body, "expiresInDays"), **other})

    assert_problem(response, 409, "idempotency_key_reused")
    assert len(await transactions_of(client, carol)) == 1


async def test_a_bonus_retried_with_its_expiry_written_at_another_offset_replays(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)
    body = flow_body(user_id=carol, amount=5, expiresAt="2999-01-01T00:00:00Z")
    first = await post_flow(client, "bonus", body)
    created(first)

    again = await post_flow(client, "bonus", {**body, "expiresAt": "2999-01-01T01:00:00+01:00"})

    assert_replayed(first, again)
    assert len(await transactions_of(client, carol)) == 1


async def test_an_expiry_must_be_after_the_moment_the_bonus_is_applied(
    clocked: httpx.AsyncClient, clock: Clock
) -> None:
    carol = await new_user(clocked)
    now = clock.moment

    at_now = flow_body(user_id=carol, amount=5, expiresAt=rfc3339(now))
    just_after = flow_body(user_id=carol, amount=5, expiresAt=rfc3339(now + MICROSECOND))

    assert_validation_error(await post_flow(clocked, "bonus", at_now), "expiresAt")
    created(await post_flow(clocked, "bonus", just_after))
    assert await position(clocked, carol, "GOLD_COINS") == shown(
        0, 5, next_expiry=(5, now + MICROSECOND)
    )


async def test_a_bonus_replays_after_its_expiry_has_passed(
    clocked: httpx.AsyncClient, clock: Clock
) -> None:
    carol = await new_user(clocked)
    body = flow_body(user_id=carol, amount=5, expiresAt=rfc3339(clock.moment + MINUTE))
    first = await post_flow(clocked, "bonus", body)
    created(first)
    clock.advance(2 * MINUTE)

    again = await post_flow(clocked, "bonus", body)

    assert_replayed(first, again)
    assert len(await transactions_of(clocked, carol)) == 1


async def test_credits_are_available_until_their_expiry_and_not_at_it_and_the_sweep_moves_them_out(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    asset = await new_asset(clocked, paidLifetimeDays=1)
    carol = await new_user(clocked)
    expiry = clock.moment + DAY
    await post_ok(clocked, "topup", user_id=carol, asset=asset, amount=50)  # a day: `expiry`
    await post_ok(
        clocked, "bonus", user_id=carol, asset=asset, amount=100, expiresAt=rfc3339(expiry)
    )
    await post_ok(clocked, "bonus", user_id=carol, asset=asset, amount=30)  # never expires

    clock.moment = expiry - MICROSECOND
    before = await position(clocked, carol, asset)
    clock.moment = expiry
    at_expiry = await position(clocked, carol, asset)
    refused = await post_flow(clocked, "spend", flow_body(user_id=carol, asset=asset, amount=31))

    assert before == shown(50, 130, next_expiry=(150, expiry))
    assert at_expiry == shown(50, 130, expired=150)  # the balance stays until the sweep
    assert_problem(refused, 422, "insufficient_funds")
    assert await sweep(database) == 1
    expired = (await transactions_of(clocked, carol))[0]
    assert set(expired) == TRANSACTION_FIELDS, expired
    assert without(expired, "transactionId", "idempotencyKey", "createdAt") == {
        "type": "expiry",
        "status": "completed",
        "userId": carol,
        "assetSymbol": asset,
        "amount": 150,
        "paidAmount": 50,
        "freeAmount": 100,
        "balanceAfter": 30,
        "createdBy": None,
    }
    assert expired["idempotencyKey"].startswith("expiry:")
    assert moment_of(expired) == expiry
    detail = await transaction_detail(clocked, expired["transactionId"], carol)
    assert moves(detail) == [
        (carol, "debit", "paid", 50),
        ("system:revenue", "credit", "paid", 50),
        (carol, "debit", "free", 100),
        ("system:bonus_pool", "credit", "free", 100),
    ]
    assert await position(clocked, carol, asset) == shown(0, 30)
    filtered = await transactions_of(clocked, carol, type="expiry")
    assert filtered == [expired]


async def test_expired_credits_cannot_be_spent_transferred_or_held(
    clocked: httpx.AsyncClient, clock: Clock
) -> None:
    carol = await new_user(clocked)
    expiry = clock.moment + MINUTE
    await post_ok(clocked, "bonus", user_id=carol, amount=100, expiresAt=rfc3339(expiry))
    await post_ok(clocked, "topup", user_id=carol, amount=20)
    clock.moment = expiry

    refusals = [
        await post_flow(clocked, "spend", flow_body(user_id=carol, amount=21)),
        await post_flow(clocked, "transfer", transfer_body(from_user=carol, amount=21)),
        await post_flow(clocked, "holds", flow_body(user_id=carol, amount=21)),
    ]
    hold = await create_hold(clocked, user_id=carol, amount=20)

    for refused in refusals:
        assert_problem(refused, 422, "insufficient_funds")
    assert hold["amount"] == 20
    assert await position(clocked, carol, "GOLD_COINS") == shown(20, 100, held=20, expired=100)


async def test_nothing_expires_twice(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    carol = await new_user(clocked)
    await post_ok(clocked, "bonus", user_id=carol, amount=100, expiresInDays=1)
    clock.advance(DAY)

    made = await asyncio.gather(sweep(database), sweep(database))
    again = await sweep(database)
    clock.advance(DAY)
    later = await sweep(database)

    assert (sum(made), again, later) == (1, 0, 0)
    assert await splits_of(clocked, carol) == [("expiry", 100, 0, 100), ("bonus", 100, 0, 100)]
    assert await position(clocked, carol, "GOLD_COINS") == shown(0, 0)


async def test_the_service_moves_expired_credits_out_by_itself(client: httpx.AsyncClient) -> None:
    carol = await new_user(client)
    expiry = datetime.now(UTC) + timedelta(seconds=2)
    await post_ok(client, "bonus", user_id=carol, amount=100, expiresAt=rfc3339(expiry))
    await post_ok(client, "topup", user_id=carol, amount=10)

    for _ in range(100):  # 10 s
        found = await splits_of(client, carol)
        if len(found) == 3:
            break
        await asyncio.sleep(0.1)

    assert found[0] == ("expiry", 100, 0, 100)
    assert await position(client, carol, "GOLD_COINS") == shown(10, 0)


# ---- holds and expiry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ending", "captured", "expired"),
    [("capture", 60, 20), ("release", 0, 80), ("its own expiry", 0, 80)],
)
async def test_an_active_hold_keeps_the_credits_it_reserved_from_expiring_until_it_ends(
    clocked: httpx.AsyncClient,
    clock: Clock,
    database: Database,
    ending: str,
    captured: int,
    expired: int,
) -> None:
    """100 free credits expire in 10 minutes; a hold of 80 (free first) lasts 15: the 20 it did
    not reserve expire at once, the rest of the 80 when the hold ends."""
    carol = await new_user(clocked)
    expiry = clock.moment + 10 * MINUTE
    await post_ok(clocked, "bonus", user_id=carol, amount=100, expiresAt=rfc3339(expiry))
    await post_ok(clocked, "topup", user_id=carol, amount=50)
    hold = await create_hold(clocked, user_id=carol, amount=80)
    clock.moment = expiry

    at_expiry = await position(clocked, carol, "GOLD_COINS")
    swept_while_held = await sweep(database)
    kept = await position(clocked, carol, "GOLD_COINS")
    swept_again_while_held = await sweep(database)
    if ending == "capture":
        assert split_of(await capture_ok(clocked, hold["holdId"], amount=60)) == (
            "spend",
            60,
            0,
            60,
        )
    elif ending == "release":
        released = await post_hold_action(clocked, hold["holdId"], "release")
        assert released.status_code == 200, released.text
    else:
        clock.advance(5 * MINUTE)
    ended = await position(clocked, carol, "GOLD_COINS")

    assert at_expiry == shown(50, 100, held=80, expired=20)  # 80 kept, 20 expired
    assert (swept_while_held, swept_again_while_held) == (1, 0)
    assert kept == shown(50, 80, held=80)
    assert ended == shown(50, 80 - captured, expired=expired)
    assert await sweep(database) == 1
    assert [split for split in await splits_of(clocked, carol) if split[0] == "expiry"] == [
        ("expiry", expired, 0, expired),
        ("expiry", 20, 0, 20),
    ]
    assert await position(clocked, carol, "GOLD_COINS") == shown(50, 0)


async def test_a_hold_keeps_only_the_kind_it_reserved_from_expiring(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    """A paid_first hold of 80 of 100 paid keeps no free credits: 50 that expire go out while
    the hold lasts."""
    asset, carol = await new_asset(clocked, spendOrder="paid_first"), await new_user(clocked)
    expiry = clock.moment + MINUTE
    await post_ok(clocked, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(
        clocked, "bonus", user_id=carol, asset=asset, amount=50, expiresAt=rfc3339(expiry)
    )
    hold = await create_hold(clocked, user_id=carol, asset=asset, amount=80)
    clock.moment = expiry

    while_held = await position(clocked, carol, asset)
    swept_while_held = await sweep(database)
    after_sweep = await position(clocked, carol, asset)
    swept = (await splits_of(clocked, carol))[0]
    capture = await capture_ok(clocked, hold["holdId"])

    assert while_held == shown(100, 50, held=80, expired=50)
    assert swept_while_held == 1
    assert swept == ("expiry", 50, 0, 50)
    assert after_sweep == shown(100, 0, held=80)
    assert split_of(capture) == ("spend", 80, 80, 0)
    assert await sweep(database) == 0
    assert await position(clocked, carol, asset) == shown(20, 0)


# ---- refunds and reversals by kind -------------------------------------------------------


async def _mixed_spend(client: httpx.AsyncClient, asset: str, user: str) -> datetime:
    """What a spend of 120 (free first) takes as 30 free credits that expire in 10 days, 20
    that never do and 70 paid: those, and 30 paid more. Returns the 30's expiry."""
    lot = await post_ok(client, "bonus", user_id=user, asset=asset, amount=30, expiresInDays=10)
    await post_ok(client, "bonus", user_id=user, asset=asset, amount=20)
    await post_ok(client, "topup", user_id=user, asset=asset, amount=100)
    return moment_of(lot) + 10 * DAY


async def test_a_full_refund_gives_back_the_kinds_the_spend_took_with_their_expiry(
    client: httpx.AsyncClient,
) -> None:
    asset, carol = await new_asset(client), await new_user(client)
    expiry = await _mixed_spend(client, asset, carol)
    spend = await post_ok(client, "spend", user_id=carol, asset=asset, amount=120)

    refund = await refund_ok(client, spend)

    assert split_of(spend) == ("spend", 120, 70, 50)
    assert split_of(refund) == ("refund", 120, 70, 50)
    assert await position(client, carol, asset) == shown(100, 50, next_expiry=(30, expiry))


async def test_partial_refunds_give_back_paid_first_then_free_last_taken_first(
    client: httpx.AsyncClient,
) -> None:
    asset, carol = await new_asset(client), await new_user(client)
    expiry = await _mixed_spend(client, asset, carol)
    spend = await post_ok(client, "spend", user_id=carol, asset=asset, amount=120)

    first = await refund_ok(client, spend, amount=60)
    after_first = await position(client, carol, asset)
    second = await refund_ok(client, spend, amount=30)
    after_second = await position(client, carol, asset)
    third = await refund_ok(client, spend, amount=30)

    assert split_of(first) == ("refund", 60, 60, 0)
    assert after_first == shown(90, 0)
    assert split_of(second) == ("refund", 30, 10, 20)
    assert after_second == shown(100, 20)  # the 20 that never expire came back first
    assert split_of(third) == ("refund", 30, 0, 30)
    assert await position(client, carol, asset) == shown(100, 50, next_expiry=(30, expiry))


async def test_partial_refunds_give_back_lot_credits_latest_expiry_first(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)
    sooner = await post_ok(client, "bonus", user_id=carol, amount=10, expiresInDays=5)
    later = await post_ok(client, "bonus", user_id=carol, amount=10, expiresInDays=10)
    await post_ok(client, "bonus", user_id=carol, amount=10)  # never expires
    spend = await post_ok(client, "spend", user_id=carol, amount=30)
    sooner_at, later_at = moment_of(sooner) + 5 * DAY, moment_of(later) + 10 * DAY

    await refund_ok(client, spend, amount=15)  # the 10 that never expire, 5 of `later`'s
    first = await position(client, carol, "GOLD_COINS")
    await refund_ok(client, spend, amount=10)  # the other 5 of `later`'s, 5 of `sooner`'s
    second = await position(client, carol, "GOLD_COINS")
    await refund_ok(client, spend, amount=5)

    assert first == shown(0, 15, next_expiry=(5, later_at))
    assert second == shown(0, 25, next_expiry=(5, sooner_at))
    assert await position(client, carol, "GOLD_COINS") == shown(0, 30, next_expiry=(10, sooner_at))


async def test_refunded_credits_whose_expiry_has_passed_expire_at_once(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    asset, carol = await new_asset(clocked), await new_user(clocked)
    expiry = await _mixed_spend(clocked, asset, carol)
    spend = await post_ok(clocked, "spend", user_id=carol, asset=asset, amount=120)
    clock.moment = expiry + MINUTE

    refund = await refund_ok(clocked, spend)

    assert split_of(refund) == ("refund", 120, 70, 50)
    assert await position(clocked, carol, asset) == shown(100, 50, expired=30)
    assert await sweep(database) == 1
    assert (await splits_of(clocked, carol))[0] == ("expiry", 30, 0, 30)
    assert await position(clocked, carol, asset) == shown(100, 20)


async def test_a_refunded_capture_gives_back_the_credits_its_hold_kept_and_they_expire_at_once(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    carol = await new_user(clocked)
    expiry = clock.moment + 10 * MINUTE
    await post_ok(clocked, "bonus", user_id=carol, amount=100, expiresAt=rfc3339(expiry))
    hold = await create_hold(clocked, user_id=carol, amount=80)
    clock.moment = expiry
    capture = await capture_ok(clocked, hold["holdId"], amount=60)  # of the credits it kept
    assert await sweep(database) == 1  # the other 40

    refund = await refund_ok(clocked, capture)

    assert split_of(refund) == ("refund", 60, 0, 60)
    assert await position(clocked, carol, "GOLD_COINS") == shown(0, 60, expired=60)
    assert await sweep(database) == 1
    assert await splits_of(clocked, carol) == [
        ("expiry", 60, 0, 60),
        ("refund", 60, 0, 60),
        ("expiry", 40, 0, 40),
        ("spend", 60, 0, 60),
        ("bonus", 100, 0, 100),
    ]
    assert await position(clocked, carol, "GOLD_COINS") == shown(0, 0)


async def test_reversing_a_top_up_takes_back_paid_credits_only(client: httpx.AsyncClient) -> None:
    asset, carol = await new_asset(client, spendOrder="paid_first"), await new_user(client)
    topup = await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=200)
    await post_ok(client, "spend", user_id=carol, asset=asset, amount=30)  # 30 paid

    whole = await post_refund(client, topup["transactionId"])
    after_refusal = await position(client, carol, asset)
    rest = await refund_ok(client, topup, amount=70)

    assert_problem(whole, 422, "insufficient_funds")  # 170 free are there, not 100 paid
    assert after_refusal == shown(70, 200)
    assert split_of(rest) == ("reversal", 70, 70, 0)
    assert await position(client, carol, asset) == shown(0, 200)


async def test_paid_credits_a_hold_reserves_cannot_be_reversed(client: httpx.AsyncClient) -> None:
    asset, carol = await new_asset(client, spendOrder="paid_first"), await new_user(client)
    topup = await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    await post_ok(client, "bonus", user_id=carol, asset=asset, amount=100)
    await create_hold(client, user_id=carol, asset=asset, amount=10)  # 10 paid

    refused = await post_refund(client, topup["transactionId"])
    reversal = await refund_ok(client, topup, amount=90)

    assert_problem(refused, 422, "insufficient_funds")
    assert split_of(reversal) == ("reversal", 90, 90, 0)
    assert await position(client, carol, asset) == shown(10, 100, held=10)


async def test_reversing_a_bonus_takes_back_free_credits_only(client: httpx.AsyncClient) -> None:
    asset, carol = await new_asset(client), await new_user(client)
    await post_ok(client, "topup", user_id=carol, asset=asset, amount=100)
    bonus = await post_ok(client, "bonus", user_id=carol, asset=asset, amount=200)
    await post_ok(client, "spend", user_id=carol, asset=asset, amount=150)  # 150 free

    whole = await post_refund(client, bonus["transactionId"], amount=100)
    after_refusal = await position(client, carol, asset)
    rest = await refund_ok(client, bonus, amount=50)

    assert_problem(whole, 422, "insufficient_funds")  # 100 paid are there, not 100 free
    assert after_refusal == shown(100, 50)
    assert split_of(rest) == ("reversal", 50, 0, 50)
    assert await position(client, carol, asset) == shown(100, 0)


async def test_a_reversal_takes_its_kind_soonest_expiring_first(client: httpx.AsyncClient) -> None:
    carol = await new_user(client)
    reversed_bonus = await post_ok(client, "bonus", user_id=carol, amount=30, expiresInDays=10)
    await post_ok(client, "bonus", user_id=carol, amount=20, expiresInDays=5)
    await post_ok(client, "bonus", user_id=carol, amount=40)  # never expires

    reversal = await refund_ok(client, reversed_bonus, amount=25)

    assert split_of(reversal) == ("reversal", 25, 0, 25)  # all 20 of `sooner`'s, 5 of its own
    assert await position(client, carol, "GOLD_COINS") == shown(
        0, 65, next_expiry=(25, moment_of(reversed_bonus) + 10 * DAY)
    )


# ---- transfers ----------------------------------------------------------------------------


async def test_a_transfer_passes_on_the_kinds_and_the_expiry_of_what_it_gives(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    asset = await new_asset(clocked)
    carol, dave = await new_user(clocked), await new_user(clocked)
    expiry = clock.moment + 5 * DAY
    await post_ok(
        clocked, "bonus", user_id=carol, asset=asset, amount=40, expiresAt=rfc3339(expiry)
    )
    await post_ok(clocked, "topup", user_id=carol, asset=asset, amount=60)

    transfer = await transfer_ok(clocked, from_user=carol, to_user=dave, asset=asset, amount=70)

    assert split_of(transfer) == ("transfer", 70, 30, 40)
    assert await splits_of(clocked, dave) == [("transfer", 70, 30, 40)]
    assert await position(clocked, carol, asset) == shown(30, 0)
    assert await position(clocked, dave, asset) == shown(30, 40, next_expiry=(40, expiry))
    clock.moment = expiry
    assert await position(clocked, dave, asset) == shown(30, 40, expired=40)
    assert await sweep(database) == 1
    assert (await splits_of(clocked, dave))[0] == ("expiry", 40, 0, 40)
    assert await position(clocked, dave, asset) == shown(30, 0)


# ---- batches ------------------------------------------------------------------------------


async def test_a_batch_bonus_may_carry_an_expiry(client: httpx.AsyncClient) -> None:
    asset = await new_asset(client, freeLifetimeDays=30, paidLifetimeDays=3)
    carol = await new_user(client)
    common = {"userId": carol, "assetSymbol": asset}
    body = {
        "idempotencyKey": new_key(),
        "operations": [
            {"type": "bonus", **common, "amount": 100, "expiresInDays": 3},
            {"type": "topup", **common, "amount": 50},  # the asset's 3 days
            {"type": "bonus", **common, "amount": 20},  # the asset's 30 days
        ],
    }

    made = created(await post_flow(client, "batch", body))["transactions"]

    assert [split_of(t) for t in made] == [
        ("bonus", 100, 0, 100),
        ("topup", 50, 50, 0),
        ("bonus", 20, 0, 20),
    ]
    moment = moment_of(made[0])
    assert await position(client, carol, asset) == shown(  # both kinds expire then: summed
        50, 120, next_expiry=(150, moment + 3 * DAY)
    )
    await post_ok(client, "spend", user_id=carol, asset=asset, amount=130)  # 100 + 20 free, 10 paid
    assert await position(client, carol, asset) == shown(40, 0, next_expiry=(40, moment + 3 * DAY))


async def test_a_batch_spend_takes_the_lot_an_earlier_operation_made(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    carol = await new_user(clocked)
    common = {"userId": carol, "assetSymbol": "GOLD_COINS"}
    body = {
        "idempotencyKey": new_key(),
        "operations": [
            {"type": "bonus", **common, "amount": 100, "expiresInDays": 3},
            {"type": "bonus", **common, "amount": 50},  # never expires
            {"type": "spend", **common, "amount": 120},  # the 100 first, 20 of the 50
        ],
    }
    spend = created(await post_flow(clocked, "batch", body))["transactions"][2]

    refund = await refund_ok(clocked, spend, amount=110)  # the 20, then 90 of the lot

    lot_expiry = moment_of(spend) + 3 * DAY
    assert split_of(refund) == ("refund", 110, 0, 110)
    assert await position(clocked, carol, "GOLD_COINS") == shown(
        0, 140, next_expiry=(90, lot_expiry)
    )
    clock.moment = lot_expiry
    assert await sweep(database) == 1
    assert (await splits_of(clocked, carol))[0] == ("expiry", 90, 0, 90)
    assert await position(clocked, carol, "GOLD_COINS") == shown(0, 50)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expiresInDays": 0}, "operations.1"),
        ({"expiresInDays": 3651}, "operations.1"),
        ({"expiresInDays": 1, "expiresAt": "2999-01-01T00:00:00Z"}, "operations.1"),
    ],
)
async def test_a_batch_bonus_with_a_bad_expiry_is_a_validation_error(
    client: httpx.AsyncClient, fields: dict[str, Any], field: str
) -> None:
    carol = await new_user(client)
    common = {"userId": carol, "assetSymbol": "GOLD_COINS", "amount": 5}
    body = {
        "idempotencyKey": new_key(),
        "operations": [{"type": "topup", **common}, {"type": "bonus", **common, **fields}],
    }

    assert_validation_error(await post_flow(client, "batch", body), field)
    assert await transactions_of(client, carol) == []


async def test_a_batch_bonus_expiring_in_the_past_fails_the_batch_naming_it(
    client: httpx.AsyncClient,
) -> None:
    carol = await new_user(client)
    common = {"userId": carol, "assetSymbol": "GOLD_COINS", "amount": 5}
    body = {
        "idempotencyKey": new_key(),
        "operations": [
            {"type": "topup", **common},
            {"type": "bonus", **common, "expiresAt": LONG_AGO},
        ],
    }

    problem = assert_validation_error(await post_flow(client, "batch", body), "expiresAt")
    assert problem["operationIndex"] == 1
    assert await transactions_of(client, carol) == []


# ---- assets -------------------------------------------------------------------------------


async def assets_listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    rows = await get_ok(client, f"{API}/assets")
    return {row["symbol"]: row for row in rows}


async def test_the_assets_list_shows_spend_order_and_lifetimes(client: httpx.AsyncClient) -> None:
    listed = await assets_listed(client)

    assert {
        symbol: (row["spendOrder"], row["freeLifetimeDays"], row["paidLifetimeDays"])
        for symbol, row in listed.items()
    } == {
        "DIAMONDS": ("free_first", None, None),
        "GOLD_COINS": ("free_first", None, None),
        "LOYALTY_POINTS": ("free_first", 365, None),
    }


async def test_a_new_asset_answers_201_with_it_is_listed_and_takes_credits(
    client: httpx.AsyncClient,
) -> None:
    symbol = "SEASON_2.GEMS:eu-1"
    body: dict[str, Any] = {
        "symbol": symbol,
        "name": "Season gems",
        "description": "Gems of season 2.",
        "spendOrder": "paid_first",
        "freeLifetimeDays": 30,
        "paidLifetimeDays": 3650,
    }

    response = await client.post(f"{API}/assets", json=body)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == body
    assert (await assets_listed(client))[symbol] == body
    carol = await new_user(client)
    topup = await post_ok(client, "topup", user_id=carol, asset=symbol, amount=9)
    assert await position(client, carol, symbol) == shown(
        9, 0, next_expiry=(9, moment_of(topup) + 3650 * DAY)
    )


async def test_a_new_assets_optional_fields_have_their_defaults(client: httpx.AsyncClient) -> None:
    response = await client.post(f"{API}/assets", json={"symbol": "PEBBLES", "name": "Pebbles"})

    assert created(response) == {
        "symbol": "PEBBLES",
        "name": "Pebbles",
        "description": "",
        "spendOrder": "free_first",
        "freeLifetimeDays": None,
        "paidLifetimeDays": None,
    }
    assert (await assets_listed(client))["PEBBLES"] == response.json()


async def test_a_new_asset_at_the_limits_of_its_fields_is_created(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "symbol": "A" * 32,
        "name": "n" * 100,
        "description": "d" * 500,
        "freeLifetimeDays": 1,
        "paidLifetimeDays": 1,
    }

    assert created(await client.post(f"{API}/assets", json=body)) == {
        **body,
        "spendOrder": "free_first",
    }


async def test_an_asset_whose_symbol_is_taken_is_409_and_stays_as_it_was(
    client: httpx.AsyncClient,
) -> None:
    before = await assets_listed(client)

    response = await client.post(
        f"{API}/assets", json={"symbol": "GOLD_COINS", "name": "Fool's gold", "paidLifetimeDays": 1}
    )

    assert_problem(response, 409, "asset_exists")
    assert await assets_listed(client) == before


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"symbol": ""}, "symbol"),
        ({"symbol": "A" * 33}, "symbol"),
        ({"symbol": "GOLD COINS"}, "symbol"),
        ({"symbol": "GOLD/COINS"}, "symbol"),
        ({"symbol": "ÄPFEL"}, "symbol"),
        ({"symbol": None}, "symbol"),
        ({"name": ""}, "name"),
        ({"name": "n" * 101}, "name"),
        ({"name": None}, "name"),
        ({"description": "d" * 501}, "description"),
        ({"spendOrder": "newest_first"}, "spendOrder"),
        ({"spendOrder": None}, "spendOrder"),
        ({"freeLifetimeDays": 0}, "freeLifetimeDays"),
        ({"freeLifetimeDays": 3651}, "freeLifetimeDays"),
        ({"freeLifetimeDays": "30"}, "freeLifetimeDays"),
        ({"freeLifetimeDays": 1.5}, "freeLifetimeDays"),
        ({"paidLifetimeDays": 0}, "paidLifetimeDays"),
        ({"paidLifetimeDays": 3651}, "paidLifetimeDays"),
        ({"colour": "gold"}, "colour"),
    ],
)
async def test_a_bad_new_asset_is_a_validation_error(
    client: httpx.AsyncClient, fields: dict[str, Any], field: str
) -> None:
    before = await assets_listed(client)
    body = {"symbol": "NEW_ONE", "name": "New one", **fields}

    assert_validation_error(await client.post(f"{API}/assets", json=body), field)
    assert await assets_listed(client) == before


async def test_a_new_asset_needs_a_symbol_and_a_name(client: httpx.AsyncClient) -> None:
    for body, field in (({"name": "x"}, "symbol"), ({"symbol": "X"}, "name")):
        assert_validation_error(await client.post(f"{API}/assets", json=body), field)


async def test_only_an_admin_key_creates_or_changes_an_asset(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    before = await assets_listed(client)

    for scope in NOT_ADMIN:
        headers = bearer(await create_key(url, scope))
        posted = await client.post(
            f"{API}/assets", json={"symbol": "MINE", "name": "Mine"}, headers=headers
        )
        patched = await client.patch(
            f"{API}/assets/GOLD_COINS", json={"name": "Mine"}, headers=headers
        )
        assert_problem(posted, 403, "insufficient_scope")
        assert_problem(patched, 403, "insufficient_scope")
    assert await assets_listed(client) == before


async def test_patching_an_asset_changes_the_fields_given_and_only_those(
    client: httpx.AsyncClient,
) -> None:
    asset = await new_asset(client, description="Before.", freeLifetimeDays=5)
    path = f"{API}/assets/{asset}"
    original = (await assets_listed(client))[asset]

    renamed = await client.patch(path, json={"name": "Renamed"})
    changed = await client.patch(
        path,
        json={
            "description": "After.",
            "spendOrder": "paid_first",
            "freeLifetimeDays": 7,
            "paidLifetimeDays": 9,
        },
    )
    cleared = await client.patch(path, json={"freeLifetimeDays": None})
    unchanged = await client.patch(path, json={})

    assert renamed.status_code == 200, renamed.text
    assert renamed.json() == {**original, "name": "Renamed"}
    assert changed.json() == {
        "symbol": asset,
        "name": "Renamed",
        "description": "After.",
        "spendOrder": "paid_first",
        "freeLifetimeDays": 7,
        "paidLifetimeDays": 9,
    }
    assert cleared.json() == {**changed.json(), "freeLifetimeDays": None}
    assert unchanged.json() == cleared.json()
    assert (await assets_listed(client))[asset] == cleared.json()


async def test_patching_an_unknown_asset_is_404(client: httpx.AsyncClient) -> None:
    response = await client.patch(f"{API}/assets/NO_SUCH_ASSET", json={"name": "Ghost"})

    assert_problem(response, 404, "asset_not_found")
    assert "NO_SUCH_ASSET" not in await assets_listed(client)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": None}, "name"),
        ({"description": None}, "description"),
        ({"spendOrder": None}, "spendOrder"),
        ({"name": ""}, "name"),
        ({"spendOrder": "newest_first"}, "spendOrder"),
        ({"freeLifetimeDays": 0}, "freeLifetimeDays"),
        ({"paidLifetimeDays": 3651}, "paidLifetimeDays"),
        ({"symbol": "OTHER"}, "symbol"),
    ],
)
async def test_a_bad_asset_change_is_a_validation_error_and_changes_nothing(
    client: httpx.AsyncClient, fields: dict[str, Any], field: str
) -> None:
    before = await assets_listed(client)

    response = await client.patch(f"{API}/assets/GOLD_COINS", json=fields)

    assert_validation_error(response, field)
    assert await assets_listed(client) == before


async def test_a_null_name_description_or_spend_order_in_a_change_is_refused_as_a_new_asset_is(
    client: httpx.AsyncClient,
) -> None:
    before = await assets_listed(client)

    for field in ("name", "description", "spendOrder"):
        patched = await client.patch(f"{API}/assets/GOLD_COINS", json={field: None})
        posted = await client.post(
            f"{API}/assets", json={"symbol": "NEW_ONE", "name": "New one", field: None}
        )

        refused = assert_validation_error(patched, field)
        assert refused["errors"] == assert_validation_error(posted, field)["errors"]
    assert await assets_listed(client) == before


async def test_a_changed_free_lifetime_applies_to_bonuses_granted_afterwards_only(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    asset = await new_asset(clocked, freeLifetimeDays=10)
    carol = await new_user(clocked)
    start = clock.moment
    await post_ok(clocked, "bonus", user_id=carol, asset=asset, amount=50)  # 10 days
    await patch_asset(clocked, asset, freeLifetimeDays=20)
    await post_ok(clocked, "bonus", user_id=carol, asset=asset, amount=30)  # 20 days
    await patch_asset(clocked, asset, freeLifetimeDays=None)
    await post_ok(clocked, "bonus", user_id=carol, asset=asset, amount=20)  # never

    before = await position(clocked, carol, asset)
    clock.moment = start + 10 * DAY
    first_swept = await sweep(database)
    after_first = await position(clocked, carol, asset)
    clock.moment = start + 20 * DAY
    second_swept = await sweep(database)

    assert before == shown(0, 100, next_expiry=(50, start + 10 * DAY))
    assert (first_swept, second_swept) == (1, 1)
    assert after_first == shown(0, 50, next_expiry=(30, start + 20 * DAY))
    assert [s for s in await splits_of(clocked, carol) if s[0] == "expiry"] == [
        ("expiry", 30, 0, 30),
        ("expiry", 50, 0, 50),
    ]
    assert await position(clocked, carol, asset) == shown(0, 20)


# ---- the liability report -----------------------------------------------------------------


async def liabilities(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    report: dict[str, Any] = await get_ok(
        client, f"{API}/reports/liabilities", assetSymbol="GOLD_COINS", **params
    )
    assert set(report) == {"assetSymbol", "at", "outstanding", "period"}, report
    assert set(report["outstanding"]) == {"paid", "free"}, report
    assert set(report["period"]) == PERIOD_FIELDS | {"from", "to"}, report
    return report


def owed(report: dict[str, Any]) -> tuple[int, int]:
    return report["outstanding"]["paid"], report["outstanding"]["free"]


async def held_by_users(client: httpx.AsyncClient, at: datetime) -> tuple[int, int]:
    """Every user's paid and free GOLD_COINS at `at`, summed one by one through the API."""
    paid = free = 0
    for user_id in await walk(client, f"{API}/users", "id", 100):
        body = await get_ok(client, f"{API}/wallet/balances/{user_id}", at=rfc3339(at))
        (row,) = (row for row in body["balances"] if row["assetSymbol"] == "GOLD_COINS")
        assert row["balance"] == row["paid"] + row["free"], row
        paid, free = paid + row["paid"], free + row["free"]
    return paid, free


async def _scripted_history(
    client: httpx.AsyncClient, clock: Clock, database: Database
) -> list[datetime]:
    """Top-ups, bonuses, spends, a transfer, a refund, reversals, a capture, a release and an
    expiry of both kinds, of GOLD_COINS, a minute apart; returns the moment before it and the
    moment of each step."""
    carol, dave = await new_user(client), await new_user(client)
    moments = [clock.moment]

    async def step(made: Any) -> Any:
        result = await made
        moments.append(clock.moment)
        clock.advance()
        return result

    clock.advance()
    await step(post_ok(client, "topup", user_id=carol, amount=500))
    await step(post_ok(client, "bonus", user_id=carol, amount=200, expiresInDays=1))
    dave_topup = await step(post_ok(client, "topup", user_id=dave, amount=300))
    await step(post_ok(client, "bonus", user_id=dave, amount=100))
    spend = await step(post_ok(client, "spend", user_id=carol, amount=250))  # 200 free, 50 paid
    await step(transfer_ok(client, from_user=dave, to_user=carol, amount=150))  # 100 free, 50 paid
    await step(refund_ok(client, spend, amount=100))  # 50 paid, 50 free back into the lot
    await step(refund_ok(client, dave_topup, amount=100))
    reversed_bonus = await step(post_ok(client, "bonus", user_id=dave, amount=40))
    await step(refund_ok(client, reversed_bonus))
    await patch_asset(client, "GOLD_COINS", paidLifetimeDays=1)
    paid_lot_moment = clock.moment
    await step(post_ok(client, "topup", user_id=carol, amount=40))  # expires in a day
    await patch_asset(client, "GOLD_COINS", paidLifetimeDays=None)
    hold = await create_hold(client, user_id=carol, amount=30)  # 30 free
    await step(capture_ok(client, hold["holdId"], amount=20))  # 20 free, of the lot
    released = await create_hold(client, user_id=carol, amount=10)
    assert (await step(post_hold_action(client, released["holdId"], "release"))).is_success
    clock.moment = paid_lot_moment + DAY
    assert await step(sweep(database)) == 1
    assert (await splits_of(client, carol))[0] == ("expiry", 70, 40, 30)
    await step(post_ok(client, "spend", user_id=dave, amount=20))  # 20 paid
    assert await position(client, carol, "GOLD_COINS") == shown(550, 100)
    assert await position(client, dave, "GOLD_COINS") == shown(130, 0)
    return moments


async def test_the_liability_report_adds_up_the_history_by_kind(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    await _scripted_history(clocked, clock, database)

    report = await liabilities(clocked)

    assert report["assetSymbol"] == "GOLD_COINS"
    assert assert_rfc3339_utc(report["at"]) == clock.moment
    assert owed(report) == (2680, 100)  # Alice's and Bob's 2000 paid, Carol's and Dave's rest
    assert report["period"] == {
        "from": "1970-01-01T00:00:00Z",
        "to": report["at"],
        "issuedPaid": 2840,
        "issuedFree": 340,
        "spentPaid": 70,
        "spentFree": 220,
        "refundedPaid": 50,
        "refundedFree": 50,
        "reversedPaid": 100,
        "reversedFree": 40,
        "expiredPaid": 40,
        "expiredFree": 30,
    }


async def test_the_liability_report_is_what_all_users_hold_at_every_moment(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    moments = await _scripted_history(clocked, clock, database)

    for moment in [*moments, clock.moment]:
        report = await liabilities(clocked, at=rfc3339(moment))
        assert assert_rfc3339_utc(report["at"]) == moment
        assert owed(report) == await held_by_users(clocked, moment), moment
    assert owed(await liabilities(clocked, at=LONG_AGO)) == (0, 0)


async def test_what_is_owed_changes_by_what_the_period_moved(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    moments = await _scripted_history(clocked, clock, database)
    owed_at = {m: owed(await liabilities(clocked, at=rfc3339(m))) for m in moments}

    for since, until in combinations(moments, 2):
        report = await liabilities(clocked, at=rfc3339(until), **{"from": rfc3339(since)})
        period = report["period"]
        for index, kind in enumerate(("Paid", "Free")):
            assert owed_at[until][index] == (
                owed_at[since][index]
                + period[f"issued{kind}"]
                - period[f"spent{kind}"]
                + period[f"refunded{kind}"]
                - period[f"reversed{kind}"]
                - period[f"expired{kind}"]
            ), (since, until, kind)


async def test_a_liability_period_runs_after_from_up_to_and_including_to(
    clocked: httpx.AsyncClient, clock: Clock, database: Database
) -> None:
    moments = await _scripted_history(clocked, clock, database)
    topup_moment, bonus_moment = moments[1], moments[2]

    report = await liabilities(
        clocked, **{"from": rfc3339(topup_moment), "to": rfc3339(bonus_moment)}
    )
    before = await liabilities(clocked, at=LONG_AGO)

    assert {name: report["period"][name] for name in PERIOD_FIELDS} == {
        name: 200 if name == "issuedFree" else 0 for name in PERIOD_FIELDS
    }
    assert (report["period"]["from"], report["period"]["to"]) == (
        rfc3339(topup_moment),
        rfc3339(bonus_moment),
    )
    assert assert_rfc3339_utc(report["at"]) == clock.moment  # `at` stays now
    assert {name: before["period"][name] for name in PERIOD_FIELDS} == dict.fromkeys(
        PERIOD_FIELDS, 0
    )


async def test_a_bad_liability_request_is_refused(client: httpx.AsyncClient) -> None:
    path = f"{API}/reports/liabilities"

    later_from = await client.get(
        path,
        params={
            "assetSymbol": "GOLD_COINS",
            "from": "2024-01-02T00:00:00Z",
            "to": "2024-01-01T00:00:00Z",
        },
    )
    unknown = await client.get(path, params={"assetSymbol": "NO_SUCH_ASSET"})
    missing = await client.get(path)

    assert_validation_error(later_from, "from")
    assert_problem(unknown, 404, "asset_not_found")
    assert_validation_error(missing, "assetSymbol")


async def test_the_liability_report_needs_the_scope_wallet_read(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    path = f"{API}/reports/liabilities"
    params = {"assetSymbol": "GOLD_COINS"}

    for scope in Scope:
        response = await client.get(
            path, params=params, headers=bearer(await create_key(url, scope))
        )
        if scope in (Scope.WALLET_READ, Scope.ADMIN):
            assert response.status_code == 200, response.text
        else:
            assert_problem(response, 403, "insufficient_scope")


# ---- balances at a moment -----------------------------------------------------------------


async def test_a_balance_at_a_moment_shows_paid_and_free_as_they_were(
    clocked: httpx.AsyncClient, clock: Clock
) -> None:
    carol = await new_user(clocked)
    clock.advance()
    topup = await post_ok(clocked, "topup", user_id=carol, amount=100)
    clock.advance()
    bonus = await post_ok(clocked, "bonus", user_id=carol, amount=50)
    clock.advance()
    spend = await post_ok(clocked, "spend", user_id=carol, amount=120)  # 50 free, 70 paid

    expected = [
        (moment_of(topup) - MICROSECOND, (0, 0, 0)),
        (moment_of(topup), (100, 100, 0)),
        (moment_of(bonus) - MICROSECOND, (100, 100, 0)),
        (moment_of(bonus), (150, 100, 50)),
        (moment_of(spend), (30, 30, 0)),
    ]
    for moment, (balance, paid, free) in expected:
        at = rfc3339(moment)
        one = await get_ok(clocked, f"{API}/wallet/balance/{carol}/GOLD_COINS", at=at)
        every = await get_ok(clocked, f"{API}/wallet/balances/{carol}", at=at)
        assert without(one, "at") == {
            "userId": carol,
            "assetSymbol": "GOLD_COINS",
            "balance": balance,
            "paid": paid,
            "free": free,
        }, moment
        assert assert_rfc3339_utc(one["at"]) == moment
        (row,) = (row for row in every["balances"] if row["assetSymbol"] == "GOLD_COINS")
        assert row == {"assetSymbol": "GOLD_COINS", "balance": balance, "paid": paid, "free": free}
