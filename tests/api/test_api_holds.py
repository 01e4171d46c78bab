"""Holds of API-ledger.md: a hold reserves part of a balance (`held`, `available`) without moving
money; capturing it spends (part of) it to system:revenue and releases the rest; releasing or
its expiry moves nothing. A hold that is not `held` cannot be captured or released, and every
write takes an idempotency key like the flows."""

import asyncio
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from api_checks import (
    ALICE,
    API,
    BOB,
    HOLD_FIELDS,
    MAX_AMOUNT,
    OPENING_BALANCES,
    account_state,
    assert_entry,
    assert_problem,
    assert_replayed,
    assert_rfc3339_utc,
    assert_transaction,
    assert_validation_error,
    create_hold,
    create_user,
    created,
    flow_body,
    get_ok,
    key_id_of,
    moves,
    new_key,
    post_flow,
    post_hold_action,
    standing_of,
    transaction_detail,
    transactions_of,
    transfer_body,
    walk,
    without,
)

from app_clients import app_client
from wallet.settings import Settings
from wallet.store.database import Database
from wallet.store.tables import holds

UNKNOWN_HOLD = "01a213cc-1111-7000-8000-000000000000"
DEFAULT_EXPIRY = timedelta(seconds=900)


async def hold_of(client: httpx.AsyncClient, hold_id: str) -> dict[str, Any]:
    hold: dict[str, Any] = await get_ok(client, f"{API}/wallet/holds/{hold_id}")
    return hold


async def holds_listed(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    page = await get_ok(client, f"{API}/wallet/holds", limit=500, **params)
    assert page["nextCursor"] is None
    items: list[dict[str, Any]] = page["items"]
    return items


def assert_hold(
    body: dict[str, Any],
    *,
    amount: int,
    created_by: str,
    status: str = "held",
    captured: int = 0,
    user_id: str = ALICE,
    asset: str = "GOLD_COINS",
    description: str | None = None,
    lasts: timedelta = DEFAULT_EXPIRY,
) -> None:
    """A hold exactly as API-ledger.md describes it."""
    assert set(body) == HOLD_FIELDS, body
    assert isinstance(body["holdId"], str)
    assert body["holdId"]
    assert without(body, "holdId", "createdAt", "expiresAt", "endedAt") == {
        "userId": user_id,
        "assetSymbol": asset,
        "amount": amount,
        "capturedAmount": captured,
        "status": status,
        "description": description,
        "createdBy": created_by,
    }
    created_at = assert_rfc3339_utc(body["createdAt"])
    assert assert_rfc3339_utc(body["expiresAt"]) - created_at == lasts
    if status == "held":
        assert body["endedAt"] is None
    elif status == "expired":
        assert body["endedAt"] == body["expiresAt"]
    else:
        assert assert_rfc3339_utc(body["endedAt"]) >= created_at


async def test_hold_answers_201_with_the_hold_and_reserves_without_moving_money(
    client: httpx.AsyncClient,
) -> None:
    before = await account_state(client, ALICE)
    body = flow_body(amount=300, description="escrow: sword of dawn")

    response = await post_flow(client, "holds", body)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    assert_hold(
        response.json(),
        amount=300,
        created_by=await key_id_of(client),
        description="escrow: sword of dawn",
    )
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 1000,
        "held": 300,
        "available": 700,
    }
    rows = (await get_ok(client, f"{API}/wallet/balances/{ALICE}"))["balances"]
    assert {
        row["assetSymbol"]: (row["balance"], row["held"], row["available"]) for row in rows
    } == {
        "DIAMONDS": (10, 0, 10),
        "GOLD_COINS": (1000, 300, 700),
        "LOYALTY_POINTS": (500, 0, 500),
    }
    after = await account_state(client, ALICE)
    assert (after["transactions"], after["ledger"]) == (before["transactions"], before["ledger"])


@pytest.mark.parametrize("seconds", [1, 60, 604_800])
async def test_hold_lasts_the_seconds_asked_for(client: httpx.AsyncClient, seconds: int) -> None:
    hold = await create_hold(client, amount=5, expiresInSeconds=seconds)

    assert_hold(
        hold, amount=5, created_by=await key_id_of(client), lasts=timedelta(seconds=seconds)
    )


@pytest.mark.parametrize("seconds", [0, -1, 604_801, 10**18, 1.5, "60", True, None])
async def test_hold_expiry_outside_1_to_604800_seconds_is_a_validation_error(
    client: httpx.AsyncClient, seconds: Any
) -> None:
    body = flow_body(amount=5, expiresInSeconds=seconds)

    response = await post_flow(client, "holds", body)

    assert_validation_error(response, "expiresInSeconds")
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 1000,
        "held": 0,
        "available": 1000,
    }
    body["expiresInSeconds"] = 30  # nothing recorded: the key is still free
    assert (await post_flow(client, "holds", body)).status_code == 201


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (flow_body(user_id="nobody-yet", amount=5), 404, "user_not_found"),
        (flow_body(asset="RUBIES", amount=5), 404, "asset_not_found"),
        (flow_body(amount=0), 422, "validation_error"),
        (flow_body(amount=MAX_AMOUNT + 1), 422, "validation_error"),
    ],
    ids=["unknown-user", "unknown-asset", "zero", "too-large"],
)
async def test_hold_refused_before_the_ledger_looked_keeps_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, code: str
) -> None:
    assert_problem(await post_flow(client, "holds", body), status, code)

    fixed = {**body, "userId": ALICE, "assetSymbol": "GOLD_COINS", "amount": 5}
    assert (await post_flow(client, "holds", fixed)).status_code == 201
    assert (await holds_listed(client, userId=ALICE))[0]["amount"] == 5


async def test_spend_transfer_and_hold_are_checked_against_available(
    client: httpx.AsyncClient,
) -> None:
    await create_hold(client, amount=900)
    before = await account_state(client, ALICE)
    bob_before = await account_state(client, BOB)

    for flow, body in (
        ("spend", flow_body(amount=101)),
        ("transfer", transfer_body(amount=101)),
        ("holds", flow_body(amount=101)),
    ):
        assert_problem(await post_flow(client, flow, body), 422, "insufficient_funds")

    assert await account_state(client, ALICE) == before
    assert await account_state(client, BOB) == bob_before
    assert len(await holds_listed(client, userId=ALICE)) == 1
    spent = created(await post_flow(client, "spend", flow_body(amount=100)))
    assert spent["balanceAfter"] == 900
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 900,
        "held": 900,
        "available": 0,
    }


async def test_a_refused_hold_replays_its_refusal(client: httpx.AsyncClient) -> None:
    body = flow_body(amount=1001)
    first = await post_flow(client, "holds", body)
    assert_problem(first, 422, "insufficient_funds")
    assert created(await post_flow(client, "topup", flow_body(amount=5000)))

    again = await post_flow(client, "holds", body)

    assert_problem(again, 422, "insufficient_funds")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["detail"] == first.json()["detail"]
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 6000,
        "held": 0,
        "available": 6000,
    }


async def test_capture_by_default_spends_the_whole_hold_to_revenue(
    client: httpx.AsyncClient,
) -> None:
    hold = await create_hold(client, user_id=BOB, amount=300, description="trade 17")
    key = new_key()
    key_id = await key_id_of(client)

    response = await post_hold_action(
        client, hold["holdId"], "capture", idempotencyKey=key, description="trade 17 closed"
    )

    captured = created(response)
    assert set(captured) == {"hold", "transaction"}
    assert_hold(
        captured["hold"],
        user_id=BOB,
        amount=300,
        captured=300,
        status="captured",
        created_by=key_id,
        description="trade 17",
    )
    assert {n: captured["hold"][n] for n in ("holdId", "createdAt", "expiresAt")} == {
        n: hold[n] for n in ("holdId", "createdAt", "expiresAt")
    }
    spend = captured["transaction"]
    assert_transaction(
        spend,
        flow="spend",
        user_id=BOB,
        amount=300,
        balance_after=700,
        key=key,
        created_by=key_id,
        free_text="trade 17 closed",
        hold_id=hold["holdId"],
    )
    assert await standing_of(client, BOB, "GOLD_COINS") == {
        "balance": 700,
        "held": 0,
        "available": 700,
    }
    assert await hold_of(client, hold["holdId"]) == captured["hold"]
    detail = await transaction_detail(client, spend["transactionId"], BOB)
    assert {name: detail[name] for name in spend} == spend
    for entry in detail["entries"]:
        assert_entry(entry)
    assert moves(detail["entries"]) == [  # Bob's seeded GOLD_COINS are all paid
        (BOB, "debit", "paid", 300),
        ("system:revenue", "credit", "paid", 300),
    ]
    assert (await transactions_of(client, BOB))[0] == spend


async def test_partial_capture_spends_that_amount_and_releases_the_rest(
    client: httpx.AsyncClient,
) -> None:
    hold = await create_hold(client, amount=300)
    await create_hold(client, amount=50)  # another hold stays held

    captured = created(await post_hold_action(client, hold["holdId"], "capture", amount=120))

    assert captured["hold"]["status"] == "captured"
    assert captured["hold"]["capturedAmount"] == 120
    assert captured["transaction"]["amount"] == 120
    assert captured["transaction"]["balanceAfter"] == 880
    assert captured["transaction"]["holdId"] == hold["holdId"]
    assert captured["transaction"]["description"] is None
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 880,
        "held": 50,
        "available": 830,
    }


async def test_capture_above_the_hold_is_refused_finally_and_the_hold_stays(
    client: httpx.AsyncClient,
) -> None:
    hold = await create_hold(client, amount=300)
    before = await account_state(client, ALICE)
    key = new_key()

    first = await post_hold_action(
        client, hold["holdId"], "capture", idempotencyKey=key, amount=301
    )

    problem = assert_problem(first, 422, "capture_exceeds_hold")
    assert "idempotent-replayed" not in first.headers
    again = await post_hold_action(
        client, hold["holdId"], "capture", idempotencyKey=key, amount=301
    )
    assert_problem(again, 422, "capture_exceeds_hold")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["detail"] == problem["detail"]
    other = await post_hold_action(
        client, hold["holdId"], "capture", idempotencyKey=key, amount=300
    )
    assert_problem(other, 409, "idempotency_key_reused")
    assert await account_state(client, ALICE) == before
    assert await hold_of(client, hold["holdId"]) == hold
    assert created(await post_hold_action(client, hold["holdId"], "capture", amount=300))


async def test_release_answers_200_with_the_hold_and_moves_nothing(
    client: httpx.AsyncClient,
) -> None:
    hold = await create_hold(client, amount=300)
    before = await account_state(client, ALICE)

    response = await post_hold_action(client, hold["holdId"], "release")

    assert response.status_code == 200, response.text
    assert "idempotent-replayed" not in response.headers
    released = response.json()
    assert_hold(released, amount=300, status="released", created_by=await key_id_of(client))
    assert released["holdId"] == hold["holdId"]
    assert await hold_of(client, hold["holdId"]) == released
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 1000,
        "held": 0,
        "available": 1000,
    }
    assert await account_state(client, ALICE) == before


@pytest.mark.parametrize("ended_by", ["capture", "release"])
@pytest.mark.parametrize("action", ["capture", "release"])
async def test_capture_or_release_of_an_ended_hold_is_hold_not_active(
    client: httpx.AsyncClient, ended_by: str, action: str
) -> None:
    hold = await create_hold(client, amount=300)
    ended = await post_hold_action(client, hold["holdId"], ended_by)
    assert ended.status_code in (200, 201), ended.text
    before = await account_state(client, ALICE)
    key = new_key()

    response = await post_hold_action(client, hold["holdId"], action, idempotencyKey=key)

    assert_problem(response, 409, "hold_not_active")
    replayed = await post_hold_action(client, hold["holdId"], action, idempotencyKey=key)
    assert_problem(replayed, 409, "hold_not_active")
    assert replayed.headers["idempotent-replayed"] == "true"
    assert await account_state(client, ALICE) == before
    assert (await hold_of(client, hold["holdId"]))["status"] == f"{ended_by}d"


@pytest.mark.parametrize("action", ["capture", "release"])
async def test_capture_or_release_of_an_unknown_hold_is_404_and_keeps_nothing(
    client: httpx.AsyncClient, action: str
) -> None:
    key = new_key()

    response = await post_hold_action(client, UNKNOWN_HOLD, action, idempotencyKey=key)

    assert_problem(response, 404, "hold_not_found")
    hold = await create_hold(client, amount=5)
    assert (await post_hold_action(client, hold["holdId"], action, idempotencyKey=key)).is_success


async def test_an_unknown_hold_is_hold_not_found(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"{API}/wallet/holds/{UNKNOWN_HOLD}"), 404, "hold_not_found")


async def test_hold_capture_and_release_replay_their_answers(client: httpx.AsyncClient) -> None:
    body = flow_body(amount=40, description="deposit")
    first = await post_flow(client, "holds", body)
    hold = created(first)
    assert_replayed(first, await post_flow(client, "holds", body))

    key = {"Idempotency-Key": new_key()}  # the key in the header, as the flows take it
    capture = f"holds/{hold['holdId']}/capture"
    captured = await post_flow(client, capture, {"amount": 15}, headers=key)
    assert captured.status_code == 201, captured.text
    assert_replayed(captured, await post_flow(client, capture, {"amount": 15}, headers=key))
    assert captured.json()["transaction"]["idempotencyKey"] == key["Idempotency-Key"]

    other = await create_hold(client, amount=60)
    release_key = new_key()
    released = await post_hold_action(
        client, other["holdId"], "release", idempotencyKey=release_key
    )
    assert released.status_code == 200, released.text
    assert_replayed(
        released,
        await post_hold_action(client, other["holdId"], "release", idempotencyKey=release_key),
    )
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 985,
        "held": 0,
        "available": 985,
    }
    assert len(await transactions_of(client, ALICE, type="spend")) == 1


@pytest.mark.parametrize("action", ["capture", "release"])
async def test_a_replayed_hold_creation_answers_as_the_first_time_after_the_hold_ended(
    client: httpx.AsyncClient, action: str
) -> None:
    body = flow_body(amount=40)
    first = await post_flow(client, "holds", body)
    ended = await post_hold_action(client, created(first)["holdId"], action)
    assert ended.is_success, ended.text

    again = await post_flow(client, "holds", body)

    assert_replayed(first, again)  # API.md: the stored response, not the hold as it is now


async def test_a_hold_key_with_another_request_is_409(client: httpx.AsyncClient) -> None:
    body = flow_body(amount=40)
    hold = await create_hold(client, amount=40, key=body["idempotencyKey"])
    for other in (
        {**body, "amount": 41},
        {**body, "expiresInSeconds": 60},
        {**body, "description": "changed"},
    ):
        assert_problem(await post_flow(client, "holds", other), 409, "idempotency_key_reused")
    for action in ("capture", "release"):  # a hold's key taken by a capture or a release
        response = await post_hold_action(
            client, hold["holdId"], action, idempotencyKey=body["idempotencyKey"]
        )
        assert_problem(response, 409, "idempotency_key_reused")
    another = await create_hold(client, amount=7)
    capture_key = new_key()
    created(await post_hold_action(client, hold["holdId"], "capture", idempotencyKey=capture_key))
    for action in ("capture", "release"):  # a capture's key, on another hold
        response = await post_hold_action(
            client, another["holdId"], action, idempotencyKey=capture_key
        )
        assert_problem(response, 409, "idempotency_key_reused")
    assert (await hold_of(client, another["holdId"]))["status"] == "held"


async def test_capture_and_release_bodies_are_validated(client: httpx.AsyncClient) -> None:
    hold = await create_hold(client, amount=40)

    for amount in (0, -1, MAX_AMOUNT + 1, 1.5, "10"):
        response = await post_hold_action(client, hold["holdId"], "capture", amount=amount)
        assert_validation_error(response, "amount")
    response = await post_hold_action(client, hold["holdId"], "release", amount=5)
    assert_validation_error(response, "amount")
    response = await post_flow(client, f"holds/{hold['holdId']}/release", {})
    assert_validation_error(response, "idempotencyKey")
    assert await hold_of(client, hold["holdId"]) == hold


async def test_concurrent_captures_and_releases_of_one_hold_exactly_one_wins(
    client: httpx.AsyncClient,
) -> None:
    hold = await create_hold(client, amount=100)

    answers = await asyncio.gather(
        *(post_hold_action(client, hold["holdId"], action) for action in ("capture", "release") * 5)
    )

    winners = [a for a in answers if a.is_success]
    assert len(winners) == 1, [a.text for a in answers]
    for answer in answers:
        if not answer.is_success:
            assert_problem(answer, 409, "hold_not_active")
    balance = 900 if winners[0].status_code == 201 else 1000
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": balance,
        "held": 0,
        "available": balance,
    }


async def test_holds_are_listed_newest_first_and_filtered_by_user_and_status(
    client: httpx.AsyncClient,
) -> None:
    carol = await create_user(client)
    created(await post_flow(client, "topup", flow_body(user_id=carol["id"], amount=50)))
    made = [
        await create_hold(client, amount=10),
        await create_hold(client, user_id=BOB, amount=20),
        await create_hold(client, amount=3, asset="DIAMONDS"),
        await create_hold(client, user_id=carol["id"], amount=40),
        await create_hold(client, amount=50),
    ]
    created(await post_hold_action(client, made[0]["holdId"], "capture"))
    assert (await post_hold_action(client, made[4]["holdId"], "release")).status_code == 200
    now = {h["holdId"]: await hold_of(client, h["holdId"]) for h in made}
    newest_first = [now[h["holdId"]] for h in reversed(made)]

    assert await holds_listed(client) == newest_first
    assert await holds_listed(client, userId=ALICE) == [
        h for h in newest_first if h["userId"] == ALICE
    ]
    assert await holds_listed(client, userId=carol["id"]) == [now[made[3]["holdId"]]]
    for status in ("held", "captured", "released", "expired"):
        assert await holds_listed(client, status=status) == [
            h for h in newest_first if h["status"] == status
        ]
    assert await holds_listed(client, userId=ALICE, status="held") == [now[made[2]["holdId"]]]
    for limit in (1, 2, 4):
        walked = await walk(client, f"{API}/wallet/holds", "holdId", limit)
        assert walked == [h["holdId"] for h in newest_first]
    walked = await walk(client, f"{API}/wallet/holds", "holdId", 1, userId=ALICE)
    assert walked == [h["holdId"] for h in newest_first if h["userId"] == ALICE]


async def test_holds_list_refuses_an_unknown_user_or_status_and_bad_paging(
    client: httpx.AsyncClient,
) -> None:
    path = f"{API}/wallet/holds"
    assert_problem(await client.get(path, params={"userId": "nobody-yet"}), 404, "user_not_found")
    for status in ("active", "HELD", ""):
        assert_validation_error(await client.get(path, params={"status": status}), "status")
    assert_validation_error(await client.get(path, params={"limit": 0}), "limit")
    assert_validation_error(await client.get(path, params={"cursor": "garbage"}), "cursor")


async def _hold_row_status(database: Database, hold_id: str) -> tuple[str, datetime | None]:
    async with database.transaction(is_write=False) as connection:
        row = (
            await connection.execute(
                sa.select(holds.c.status, holds.c.ended_at).where(holds.c.id == hold_id)
            )
        ).one()
    return row.status, row.ended_at


async def test_an_expired_hold_stops_counting_at_once_before_anything_marks_it(
    settings: Settings,
    admin_key: str,
    database: Database,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The app's sweeper runs once at start, then not for an hour: nothing marks the hold.
    monkeypatch.setattr("wallet.http.app.SWEEP_EVERY_S", 3600)
    async with app_client(settings, key=admin_key) as client:
        hold = await create_hold(client, amount=600, expiresInSeconds=1)
        assert (await standing_of(client, ALICE, "GOLD_COINS"))["held"] == 600

        await asyncio.sleep(1.5)

        assert await standing_of(client, ALICE, "GOLD_COINS") == {
            "balance": 1000,
            "held": 0,
            "available": 1000,
        }
        expired = await hold_of(client, hold["holdId"])
        assert expired == {**hold, "status": "expired", "endedAt": hold["expiresAt"]}
        assert await holds_listed(client, status="expired") == [expired]
        assert await holds_listed(client, status="held") == []
        assert await holds_listed(client, userId=ALICE) == [expired]
        # What it held is available again: a spend of all of it succeeds.
        spent = created(await post_flow(client, "spend", flow_body(amount=1000)))
        assert spent["balanceAfter"] == 0
        for action in ("capture", "release"):
            response = await post_hold_action(client, hold["holdId"], action)
            assert_problem(response, 409, "hold_not_active")
        assert (await _hold_row_status(database, hold["holdId"]))[0] == "held"


async def test_the_service_marks_expired_holds_by_itself(
    client: httpx.AsyncClient, database: Database
) -> None:
    hold = await create_hold(client, amount=600, expiresInSeconds=1)
    kept = await create_hold(client, amount=100)

    status, ended_at = "held", None
    for _ in range(50):  # up to 5 s
        await asyncio.sleep(0.1)
        status, ended_at = await _hold_row_status(database, hold["holdId"])
        if status != "held":
            break

    assert status == "expired"
    assert ended_at is not None
    expires_at = datetime.fromisoformat(hold["expiresAt"])
    assert ended_at.replace(tzinfo=ended_at.tzinfo or expires_at.tzinfo) == expires_at
    assert await _hold_row_status(database, kept["holdId"]) == ("held", None)
    assert await hold_of(client, hold["holdId"]) == {
        **hold,
        "status": "expired",
        "endedAt": hold["expiresAt"],
    }
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 1000,
        "held": 100,
        "available": 900,
    }
    assert await get_ok(client, f"{API}/wallet/balances/{ALICE}") == {
        "userId": ALICE,
        "balances": [
            {
                "assetSymbol": symbol,
                "balance": amount,
                "paid": amount,
                "free": 0,
                "held": 100 if symbol == "GOLD_COINS" else 0,
                "available": amount - (100 if symbol == "GOLD_COINS" else 0),
                "nextExpiry": None,
            }
            for symbol, amount in sorted(OPENING_BALANCES.items())
        ],
    }
