"""Refunds and reversals of API-ledger.md: a spend is refunded from system:revenue back to the
user, a top-up or bonus reversed from the user back to where it came from; the refunds of one
transaction never exceed its amount; refunds, reversals and transfers are not refundable; the
original shows what it has had refunded."""

import asyncio
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    BOB,
    MAX_AMOUNT,
    TRANSACTION_FIELDS,
    account_state,
    assert_entry,
    assert_problem,
    assert_replayed,
    assert_rfc3339_utc,
    assert_validation_error,
    create_hold,
    created,
    flow_body,
    key_id_of,
    kinds_of,
    moves,
    new_key,
    post_flow,
    post_refund,
    standing_of,
    transaction_detail,
    transactions_of,
    transfer_body,
)

UNKNOWN_TRANSACTION = "01a213cc-6477-716a-bb08-b23f082a45d5"
# What a refund or reversal gives back, the account it moves between with the user, and the kind
# of credits it moves (API-credits.md: Bob's seeded GOLD_COINS, which his spend takes, are paid).
GIVEN_BACK = {
    "spend": ("refund", "system:revenue", "paid"),
    "topup": ("reversal", "system:treasury", "paid"),
    "bonus": ("reversal", "system:bonus_pool", "free"),
}


async def post_ok(client: httpx.AsyncClient, flow: str, **fields: Any) -> dict[str, Any]:
    return created(await post_flow(client, flow, flow_body(**fields)))


def assert_refund(
    body: dict[str, Any],
    *,
    kind: str,
    of: dict[str, Any],
    amount: int,
    balance_after: int,
    key: str,
    created_by: str,
    paid_amount: int,
    reason: str | None = None,
) -> None:
    """A refund or reversal exactly as API-ledger.md and API-credits.md describe it."""
    assert set(body) == TRANSACTION_FIELDS | {"refundOf", "reason"}, body
    assert isinstance(body["transactionId"], str)
    assert body["transactionId"] != of["transactionId"]
    assert {name: body[name] for name in body if name not in ("transactionId", "createdAt")} == {
        "type": kind,
        "status": "completed",
        "userId": of["userId"],
        "assetSymbol": of["assetSymbol"],
        "amount": amount,
        "paidAmount": paid_amount,
        "freeAmount": amount - paid_amount,
        "balanceAfter": balance_after,
        "idempotencyKey": key,
        "createdBy": created_by,
        "refundOf": of["transactionId"],
        "reason": reason,
    }
    assert assert_rfc3339_utc(body["createdAt"]) >= assert_rfc3339_utc(of["createdAt"])


@pytest.mark.parametrize("flow", ["spend", "topup", "bonus"])
async def test_refund_gives_the_whole_amount_back_between_the_documented_accounts(
    client: httpx.AsyncClient, flow: str
) -> None:
    original = await post_ok(client, flow, user_id=BOB, amount=300)
    key = new_key()

    response = await post_refund(
        client, original["transactionId"], idempotencyKey=key, reason="order 17 cancelled"
    )

    refund = created(response)
    kind, system, credits = GIVEN_BACK[flow]
    assert_refund(
        refund,
        kind=kind,
        of=original,
        amount=300,
        balance_after=1000,
        key=key,
        created_by=await key_id_of(client),
        paid_amount=300 if credits == "paid" else 0,
        reason="order 17 cancelled",
    )
    assert await standing_of(client, BOB, "GOLD_COINS") == {
        "balance": 1000,
        "held": 0,
        "available": 1000,
    }
    assert await kinds_of(client, BOB, "GOLD_COINS") == {"paid": 1000, "free": 0}
    detail = await transaction_detail(client, refund["transactionId"], BOB)
    assert {name: detail[name] for name in refund} == refund
    for entry in detail["entries"]:
        assert_entry(entry)
    user_gets_back = flow == "spend"
    assert moves(detail["entries"]) == [
        (system if user_gets_back else BOB, "debit", credits, 300),
        (BOB if user_gets_back else system, "credit", credits, 300),
    ]
    assert (await transactions_of(client, BOB))[0] == refund


async def test_partial_refunds_add_up_to_the_original_and_the_default_is_what_is_left(
    client: httpx.AsyncClient,
) -> None:
    await post_ok(client, "bonus", amount=40)
    spend = await post_ok(client, "spend", amount=300)  # 40 free, then 260 paid

    first = created(await post_refund(client, spend["transactionId"], amount=100))
    second = created(await post_refund(client, spend["transactionId"], amount=50))
    rest = created(await post_refund(client, spend["transactionId"]))

    assert [r["amount"] for r in (first, second, rest)] == [100, 50, 150]
    assert [r["balanceAfter"] for r in (first, second, rest)] == [840, 890, 1040]
    # Paid credits come back first: the 260 paid, then the 40 free.
    assert [(r["paidAmount"], r["freeAmount"]) for r in (first, second, rest)] == [
        (100, 0),
        (50, 0),
        (110, 40),
    ]
    assert moves((await transaction_detail(client, rest["transactionId"]))["entries"]) == [
        ("system:revenue", "debit", "paid", 110),
        (ALICE, "credit", "paid", 110),
        ("system:revenue", "debit", "free", 40),
        (ALICE, "credit", "free", 40),
    ]
    refunds = [r["transactionId"] for r in (first, second, rest)]
    detail = await transaction_detail(client, spend["transactionId"])
    assert (detail["refundedAmount"], detail["refunds"]) == (300, refunds)
    for amount in (None, 1):
        fields = {} if amount is None else {"amount": amount}
        response = await post_refund(client, spend["transactionId"], **fields)
        assert_problem(response, 409, "refund_exceeds_original")
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 1040,
        "held": 0,
        "available": 1040,
    }
    assert await kinds_of(client, ALICE, "GOLD_COINS") == {"paid": 1000, "free": 40}


async def test_a_refund_above_what_is_left_is_refused_finally(client: httpx.AsyncClient) -> None:
    spend = await post_ok(client, "spend", amount=300)
    created(await post_refund(client, spend["transactionId"], amount=200))
    before = await account_state(client, ALICE)
    key = new_key()

    first = await post_refund(client, spend["transactionId"], idempotencyKey=key, amount=101)

    problem = assert_problem(first, 409, "refund_exceeds_original")
    assert "idempotent-replayed" not in first.headers
    again = await post_refund(client, spend["transactionId"], idempotencyKey=key, amount=101)
    assert_problem(again, 409, "refund_exceeds_original")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["detail"] == problem["detail"]
    other = await post_refund(client, spend["transactionId"], idempotencyKey=key, amount=100)
    assert_problem(other, 409, "idempotency_key_reused")
    assert await account_state(client, ALICE) == before
    assert created(await post_refund(client, spend["transactionId"], amount=100))["amount"] == 100


async def test_a_reversal_of_paid_credits_the_user_no_longer_has_is_insufficient_funds(
    client: httpx.AsyncClient,
) -> None:
    original = await post_ok(client, "topup", amount=200)
    await post_ok(client, "spend", amount=1101)  # 99 paid left of 1200
    before = await account_state(client, ALICE)
    key = new_key()

    response = await post_refund(client, original["transactionId"], idempotencyKey=key)

    assert_problem(response, 422, "insufficient_funds")
    assert await account_state(client, ALICE) == before
    await post_ok(client, "topup", amount=500)  # the user has it now; the refusal is final
    replayed = await post_refund(client, original["transactionId"], idempotencyKey=key)
    assert_problem(replayed, 422, "insufficient_funds")
    assert replayed.headers["idempotent-replayed"] == "true"
    reversal = created(await post_refund(client, original["transactionId"]))
    assert (reversal["amount"], reversal["paidAmount"], reversal["balanceAfter"]) == (200, 200, 399)


async def test_a_bonus_reversal_takes_back_free_credits_only(client: httpx.AsyncClient) -> None:
    original = await post_ok(client, "bonus", amount=200)
    await post_ok(client, "spend", amount=1101)  # the 200 free first: 99 paid left, no free
    before = await account_state(client, ALICE)
    key = new_key()

    response = await post_refund(client, original["transactionId"], idempotencyKey=key)

    assert_problem(response, 422, "insufficient_funds")
    assert await account_state(client, ALICE) == before
    await post_ok(client, "topup", amount=500)  # paid credits do not make up for free ones
    replayed = await post_refund(client, original["transactionId"], idempotencyKey=key)
    assert_problem(replayed, 422, "insufficient_funds")
    assert replayed.headers["idempotent-replayed"] == "true"
    response = await post_refund(client, original["transactionId"])
    assert_problem(response, 422, "insufficient_funds")
    assert await kinds_of(client, ALICE, "GOLD_COINS") == {"paid": 599, "free": 0}
    await post_ok(client, "bonus", amount=150)  # free credits again, but fewer than 200
    assert_problem(await post_refund(client, original["transactionId"]), 422, "insufficient_funds")
    await post_ok(client, "bonus", amount=50)
    reversal = created(await post_refund(client, original["transactionId"]))
    assert (reversal["amount"], reversal["freeAmount"], reversal["balanceAfter"]) == (200, 200, 599)
    assert await kinds_of(client, ALICE, "GOLD_COINS") == {"paid": 599, "free": 0}
    assert await transactions_of(client, ALICE, type="reversal") == [reversal]


async def test_a_reversal_of_coins_that_are_held_is_insufficient_funds(
    client: httpx.AsyncClient,
) -> None:
    topup = await post_ok(client, "topup", amount=200)
    await create_hold(client, amount=1101)  # 99 available of 1200
    before = await account_state(client, ALICE)

    response = await post_refund(client, topup["transactionId"])

    assert_problem(response, 422, "insufficient_funds")
    assert await account_state(client, ALICE) == before
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 1200,
        "held": 1101,
        "available": 99,
    }
    assert created(await post_refund(client, topup["transactionId"], amount=99))["amount"] == 99


async def test_refunds_reversals_and_transfers_are_not_refundable(
    client: httpx.AsyncClient,
) -> None:
    refund = created(
        await post_refund(client, (await post_ok(client, "spend", amount=30))["transactionId"])
    )
    reversal = created(
        await post_refund(client, (await post_ok(client, "topup", amount=30))["transactionId"])
    )
    transfer = created(await post_flow(client, "transfer", transfer_body(amount=30)))
    before = await account_state(client, ALICE)

    for original in (refund, reversal, transfer):
        key = new_key()
        response = await post_refund(client, original["transactionId"], idempotencyKey=key)
        assert_problem(response, 422, "not_refundable")
        replayed = await post_refund(client, original["transactionId"], idempotencyKey=key)
        assert_problem(replayed, 422, "not_refundable")
        assert replayed.headers["idempotent-replayed"] == "true"

    assert await account_state(client, ALICE) == before


async def test_refund_of_an_unknown_transaction_is_404_and_keeps_nothing(
    client: httpx.AsyncClient,
) -> None:
    key = new_key()

    response = await post_refund(client, UNKNOWN_TRANSACTION, idempotencyKey=key)

    assert_problem(response, 404, "transaction_not_found")
    spend = await post_ok(client, "spend", amount=30)
    assert created(await post_refund(client, spend["transactionId"], idempotencyKey=key))


async def test_the_original_shows_its_refunds_in_its_detail_and_in_the_list(
    client: httpx.AsyncClient,
) -> None:
    spend = await post_ok(client, "spend", amount=300, description="armour")
    untouched = await post_ok(client, "bonus", amount=5)
    refunds = [
        created(await post_refund(client, spend["transactionId"], amount=amount))["transactionId"]
        for amount in (10, 20)
    ]

    detail = await transaction_detail(client, spend["transactionId"])
    assert {name: detail[name] for name in spend} == {
        **spend,
        "refundedAmount": 30,
        "refunds": refunds,
    }
    listed = {t["transactionId"]: t for t in await transactions_of(client, ALICE)}
    assert listed[spend["transactionId"]] == {**spend, "refundedAmount": 30, "refunds": refunds}
    assert listed[untouched["transactionId"]] == untouched
    assert [t["transactionId"] for t in await transactions_of(client, ALICE, type="refund")] == [
        *reversed(refunds)
    ]


async def test_a_captured_hold_is_refunded_as_a_spend(client: httpx.AsyncClient) -> None:
    hold = await create_hold(client, amount=80)
    capture = created(
        await post_flow(client, f"holds/{hold['holdId']}/capture", {"idempotencyKey": new_key()})
    )
    spend = capture["transaction"]

    refund = created(await post_refund(client, spend["transactionId"], amount=30))

    assert (refund["type"], refund["refundOf"], refund["balanceAfter"]) == (
        "refund",
        spend["transactionId"],
        950,
    )
    detail = await transaction_detail(client, spend["transactionId"])
    assert (detail["holdId"], detail["refundedAmount"]) == (hold["holdId"], 30)


async def test_a_refund_replays_and_its_key_with_another_request_is_409(
    client: httpx.AsyncClient,
) -> None:
    spend = await post_ok(client, "spend", amount=300)
    other_spend = await post_ok(client, "spend", amount=10)
    key = new_key()
    first = await post_refund(client, spend["transactionId"], idempotencyKey=key, amount=40)
    created(first)

    assert_replayed(
        first, await post_refund(client, spend["transactionId"], idempotencyKey=key, amount=40)
    )
    headers = {"Idempotency-Key": key}  # the header, as the flows take it
    path = f"transactions/{spend['transactionId']}/refund"
    assert_replayed(first, await post_flow(client, path, {"amount": 40}, headers=headers))
    for path, body in (
        (f"transactions/{spend['transactionId']}/refund", {"amount": 41}),
        (f"transactions/{spend['transactionId']}/refund", {"amount": 40, "reason": "r"}),
        (f"transactions/{other_spend['transactionId']}/refund", {"amount": 40}),
        ("spend", flow_body(amount=40)),
    ):
        response = await post_flow(client, path, {**body, "idempotencyKey": key})
        assert_problem(response, 409, "idempotency_key_reused")
    detail = await transaction_detail(client, spend["transactionId"])
    assert detail["refundedAmount"] == 40
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 730,
        "held": 0,
        "available": 730,
    }


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1, 1.5, "10", True])
async def test_a_refund_amount_is_validated(client: httpx.AsyncClient, amount: Any) -> None:
    spend = await post_ok(client, "spend", amount=30)

    response = await post_refund(client, spend["transactionId"], amount=amount)

    assert_validation_error(response, "amount")
    assert (await transaction_detail(client, spend["transactionId"]))["refundedAmount"] == 0


async def test_concurrent_refunds_never_exceed_the_original(client: httpx.AsyncClient) -> None:
    spend = await post_ok(client, "spend", amount=100)

    answers = await asyncio.gather(
        *(post_refund(client, spend["transactionId"], amount=30) for _ in range(8))
    )

    assert sorted(a.status_code for a in answers) == [201] * 3 + [409] * 5
    for answer in answers:
        if answer.status_code == 409:
            assert_problem(answer, 409, "refund_exceeds_original")
    detail = await transaction_detail(client, spend["transactionId"])
    assert detail["refundedAmount"] == 90
    assert len(detail["refunds"]) == 3
    assert await standing_of(client, ALICE, "GOLD_COINS") == {
        "balance": 990,
        "held": 0,
        "available": 990,
    }
