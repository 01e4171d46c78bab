"""Reading the past (API-ledger.md): a balance, and every balance, as it was at a moment (right
after the last entry at or before it); transactions between two moments, inclusive on
`createdAt`, combined with the type filter (new types included) and cursor paging."""

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    API,
    ASSET_NAMES,
    BOB,
    assert_problem,
    assert_rfc3339_utc,
    assert_validation_error,
    create_hold,
    create_user,
    created,
    flow_body,
    get_ok,
    new_key,
    post_flow,
    post_refund,
    transactions_of,
    transfer_body,
    walk,
)

MICROSECOND = timedelta(microseconds=1)
LONG_AGO = "2000-01-01T00:00:00Z"


def rfc3339(moment: datetime, offset: timedelta = timedelta(0)) -> str:
    """`moment` in RFC 3339, at the UTC `offset` given ("Z" for UTC)."""
    text = moment.astimezone(timezone(offset)).isoformat()
    return text.replace("+00:00", "Z")


def created_at(transaction: dict[str, Any]) -> datetime:
    return assert_rfc3339_utc(transaction["createdAt"])


async def balance_at(
    client: httpx.AsyncClient, at: str, user_id: str = ALICE, asset: str = "GOLD_COINS"
) -> int:
    body = await parts_at(client, at, user_id, asset)
    return body["balance"]


async def parts_at(
    client: httpx.AsyncClient, at: str, user_id: str = ALICE, asset: str = "GOLD_COINS"
) -> dict[str, int]:
    """A balance at `at`, and its paid and free parts then (API-credits.md)."""
    body = await get_ok(client, f"{API}/wallet/balance/{user_id}/{asset}", at=at)
    assert set(body) == {"userId", "assetSymbol", "balance", "paid", "free", "at"}, body
    assert (body["userId"], body["assetSymbol"]) == (user_id, asset)
    assert datetime.fromisoformat(body["at"]) == datetime.fromisoformat(at)  # the same instant
    assert body["balance"] == body["paid"] + body["free"], body
    return {name: body[name] for name in ("balance", "paid", "free")}


async def some_history(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Alice's transactions of several types, oldest first: GOLD_COINS 1100, 800, (a DIAMONDS
    bonus), 750 (a transfer to Bob), 800 (a refund), 700 (a reversal)."""
    topup = created(await post_flow(client, "topup", flow_body(amount=100)))
    spend = created(await post_flow(client, "spend", flow_body(amount=300)))
    bonus = created(await post_flow(client, "bonus", flow_body(asset="DIAMONDS", amount=4)))
    transfer = created(await post_flow(client, "transfer", transfer_body(amount=50)))
    refund = created(await post_refund(client, spend["transactionId"], amount=50))
    reversal = created(await post_refund(client, topup["transactionId"]))
    return [topup, spend, bonus, transfer, refund, reversal]


async def test_a_balance_before_any_entry_is_zero(client: httpx.AsyncClient) -> None:
    carol = await create_user(client)
    now = rfc3339(datetime.now(UTC))

    body = await get_ok(client, f"{API}/wallet/balance/{ALICE}/GOLD_COINS", at=LONG_AGO)

    assert body == {
        "userId": ALICE,
        "assetSymbol": "GOLD_COINS",
        "balance": 0,
        "paid": 0,
        "free": 0,
        "at": LONG_AGO,
    }
    for symbol in ASSET_NAMES:
        assert await balance_at(client, now, carol["id"], symbol) == 0


async def test_a_balance_at_a_moment_is_the_balance_right_after_the_last_entry_until_then(
    client: httpx.AsyncClient,
) -> None:
    topup, spend, bonus, transfer, refund, reversal = await some_history(client)
    between = created_at(topup) + (created_at(spend) - created_at(topup)) / 2

    expected = [
        (created_at(topup) - MICROSECOND, 1000),  # the seed's opening top-up
        (created_at(topup), 1100),  # at the entry's own moment: included
        (between, 1100),
        (created_at(spend), 800),
        (created_at(bonus), 800),  # another asset's entry changes nothing here
        (created_at(transfer), 750),
        (created_at(refund), 800),
        (created_at(reversal), 700),
        (datetime.now(UTC) + timedelta(days=1), 700),
    ]
    for moment, balance in expected:
        assert await balance_at(client, rfc3339(moment)) == balance, moment
    assert await parts_at(client, rfc3339(created_at(bonus)), asset="DIAMONDS") == {
        "balance": 14,
        "paid": 10,
        "free": 4,
    }
    assert await balance_at(client, rfc3339(created_at(transfer) - MICROSECOND), BOB) == 1000
    assert await balance_at(client, rfc3339(created_at(transfer)), BOB) == 1050


async def test_a_balance_at_a_moment_has_the_paid_and_free_parts_it_had_then(
    client: httpx.AsyncClient,
) -> None:
    bonus = created(await post_flow(client, "bonus", flow_body(amount=40)))
    spend = created(await post_flow(client, "spend", flow_body(amount=300)))
    topup = created(await post_flow(client, "topup", flow_body(amount=100)))

    for moment, parts in (
        (created_at(bonus) - MICROSECOND, {"balance": 1000, "paid": 1000, "free": 0}),
        (created_at(bonus), {"balance": 1040, "paid": 1000, "free": 40}),
        # free credits first: 40 free and 260 paid
        (created_at(spend), {"balance": 740, "paid": 740, "free": 0}),
        (created_at(topup), {"balance": 840, "paid": 840, "free": 0}),
    ):
        assert await parts_at(client, rfc3339(moment)) == parts, moment
    rows = await get_ok(client, f"{API}/wallet/balances/{ALICE}", at=rfc3339(created_at(bonus)))
    assert rows["balances"][1] == {
        "assetSymbol": "GOLD_COINS",
        "balance": 1040,
        "paid": 1000,
        "free": 40,
    }


async def test_a_moment_given_with_an_offset_is_that_instant(client: httpx.AsyncClient) -> None:
    topup = created(await post_flow(client, "topup", flow_body(amount=100)))
    moment = created_at(topup)

    for offset in (timedelta(hours=2), timedelta(hours=-5, minutes=-30), timedelta(hours=14)):
        assert await balance_at(client, rfc3339(moment, offset)) == 1100
        assert await balance_at(client, rfc3339(moment - MICROSECOND, offset)) == 1000


async def test_a_moment_given_with_an_offset_is_answered_in_utc(client: httpx.AsyncClient) -> None:
    at = "2030-01-01T10:00:00.5+02:00"

    for path in (f"{API}/wallet/balance/{ALICE}/GOLD_COINS", f"{API}/wallet/balances/{ALICE}"):
        body = await get_ok(client, path, at=at)
        assert body["at"] == "2030-01-01T08:00:00.500000Z", path


async def test_every_balance_at_a_moment(client: httpx.AsyncClient) -> None:
    topup, spend, bonus, *_ = await some_history(client)
    path = f"{API}/wallet/balances/{ALICE}"

    for moment, gold, diamonds in (
        (created_at(topup) - MICROSECOND, 1000, 10),
        (created_at(spend), 800, 10),
        (created_at(bonus), 800, 14),
    ):
        at = rfc3339(moment)
        assert await get_ok(client, path, at=at) == {
            "userId": ALICE,
            "balances": [
                # The bonus's 4 DIAMONDS are free credits; everything else the seed's paid ones.
                {
                    "assetSymbol": "DIAMONDS",
                    "balance": diamonds,
                    "paid": 10,
                    "free": diamonds - 10,
                },
                {"assetSymbol": "GOLD_COINS", "balance": gold, "paid": gold, "free": 0},
                {"assetSymbol": "LOYALTY_POINTS", "balance": 500, "paid": 500, "free": 0},
            ],
            "at": at,
        }
    assert await get_ok(client, path, at=LONG_AGO) == {
        "userId": ALICE,
        "balances": [
            {"assetSymbol": symbol, "balance": 0, "paid": 0, "free": 0}
            for symbol in sorted(ASSET_NAMES)
        ],
        "at": LONG_AGO,
    }


async def test_a_hold_is_no_entry_and_leaves_the_past_balance_alone(
    client: httpx.AsyncClient,
) -> None:
    await create_hold(client, amount=400)

    assert await balance_at(client, rfc3339(datetime.now(UTC))) == 1000


@pytest.mark.parametrize(
    "at",
    [
        "2026-12-02T01:00:00",
        "2026-12-02",
        "yesterday",
        "2026-13-01T00:00:00Z",
        "",
        "0.5",  # a Unix time
        "2026-12-02 01:00:00Z",  # a space for T
        "2026-12-02T01:00Z",  # no seconds
        "2026-12-31T23:59:60Z",  # a leap second
        "9999-12-31T23:59:59-01:00",  # past year 9999 in UTC
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
    ],
)
async def test_a_moment_without_an_offset_or_not_rfc3339_is_a_validation_error(
    client: httpx.AsyncClient, at: str
) -> None:
    for path in (f"{API}/wallet/balance/{ALICE}/GOLD_COINS", f"{API}/wallet/balances/{ALICE}"):
        assert_validation_error(await client.get(path, params={"at": at}), "at")


async def test_the_past_of_an_unknown_user_or_asset_is_not_found(
    client: httpx.AsyncClient,
) -> None:
    for path in (f"{API}/wallet/balance/nobody-yet/GOLD_COINS", f"{API}/wallet/balances/nobody"):
        response = await client.get(path, params={"at": LONG_AGO})
        assert_problem(response, 404, "user_not_found")
    response = await client.get(f"{API}/wallet/balance/{ALICE}/RUBIES", params={"at": LONG_AGO})
    assert_problem(response, 404, "asset_not_found")


async def test_transactions_between_two_moments_include_both_ends(
    client: httpx.AsyncClient,
) -> None:
    made = await some_history(client)
    every = await transactions_of(client, ALICE)
    newest_first = [t["transactionId"] for t in reversed(made)]
    assert [t["transactionId"] for t in every[: len(made)]] == newest_first
    first, second, *_, last = made

    def between(start: datetime | None, end: datetime | None) -> list[str]:
        return [
            t["transactionId"]
            for t in every
            if (start is None or created_at(t) >= start) and (end is None or created_at(t) <= end)
        ]

    for start, end in (
        (created_at(second), created_at(made[4])),
        (created_at(second), created_at(second)),
        (created_at(first) + MICROSECOND, created_at(last) - MICROSECOND),
        (created_at(first), None),
        (None, created_at(made[3])),
        (created_at(last), created_at(first)),
    ):
        params = {"from": rfc3339(start) if start else None, "to": rfc3339(end) if end else None}
        found = await transactions_of(client, ALICE, **{k: v for k, v in params.items() if v})
        assert [t["transactionId"] for t in found] == between(start, end), params
    assert await transactions_of(client, ALICE, **{"from": rfc3339(created_at(second))}) == [
        t for t in every if created_at(t) >= created_at(second)
    ]


async def test_transactions_between_two_moments_with_offsets_type_and_cursor(
    client: httpx.AsyncClient,
) -> None:
    made = await some_history(client)
    for _ in range(3):
        created(await post_flow(client, "spend", flow_body(amount=1)))
    later = (await transactions_of(client, ALICE))[:3]
    window = {
        "from": rfc3339(created_at(made[1]), timedelta(hours=9)),
        "to": rfc3339(created_at(later[1]), timedelta(hours=-3)),
    }
    path = f"{API}/wallet/transactions/{ALICE}"

    spends = await transactions_of(client, ALICE, type="spend", **window)

    assert [t["amount"] for t in spends] == [1, 1, 300]
    for limit in (1, 2):
        walked = await walk(client, path, "transactionId", limit, type="spend", **window)
        assert walked == [t["transactionId"] for t in spends]
    everything = await transactions_of(client, ALICE, **window)
    assert [t["type"] for t in everything] == [
        *("spend", "spend", "reversal", "refund", "transfer", "bonus", "spend")
    ]
    assert await walk(client, path, "transactionId", 3, **window) == [
        t["transactionId"] for t in everything
    ]


@pytest.mark.parametrize("name", ["from", "to"])
async def test_a_bound_without_an_offset_is_a_validation_error(
    client: httpx.AsyncClient, name: str
) -> None:
    for value in ("2026-12-02T01:00:00", "soon", "0.5", "9999-12-31T23:59:59-01:00"):
        response = await client.get(f"{API}/wallet/transactions/{ALICE}", params={name: value})
        assert_validation_error(response, name)


async def test_transactions_filter_by_the_new_types(client: httpx.AsyncClient) -> None:
    topup, spend, _bonus, transfer, refund, reversal = await some_history(client)
    hold = await create_hold(client, amount=5)
    capture = created(
        await post_flow(client, f"holds/{hold['holdId']}/capture", {"idempotencyKey": new_key()})
    )

    refunded_spend = {**spend, "refundedAmount": 50, "refunds": [refund["transactionId"]]}

    for kind, expected in (
        ("transfer", [transfer]),
        ("refund", [refund]),
        ("reversal", [reversal]),
        ("spend", [capture["transaction"], refunded_spend]),
    ):
        assert await transactions_of(client, ALICE, type=kind) == expected, kind
    assert await transactions_of(client, BOB, type="transfer") == [
        {**transfer, "balanceAfter": 1050}
    ]
    assert await transactions_of(client, BOB, type="refund") == []
    assert (await transactions_of(client, ALICE, type="topup"))[0] == {
        **topup,
        "refundedAmount": 100,
        "refunds": [reversal["transactionId"]],
    }
