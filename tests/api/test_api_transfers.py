"""Transfers of API-ledger.md: one user's coins to another, checked against the sender's
available balance, shown in both users' lists with each one's own balance after it."""

import asyncio
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    BOB,
    MAX_AMOUNT,
    OPENING_BALANCES,
    TRANSACTION_FIELDS,
    account_state,
    assert_entry,
    assert_problem,
    assert_replayed,
    assert_rfc3339_utc,
    assert_validation_error,
    balances_of,
    create_user,
    created,
    flow_body,
    key_id_of,
    kinds_of,
    moves,
    post_flow,
    transaction_detail,
    transactions_of,
    transfer_body,
    without,
)


def assert_transfer(
    body: dict[str, Any],
    *,
    amount: int,
    balance_after: int,
    key: str,
    created_by: str,
    from_user: str = ALICE,
    to_user: str = BOB,
    asset: str = "GOLD_COINS",
    description: str | None = None,
    paid_amount: int | None = None,
) -> None:
    """A transfer exactly as API-ledger.md and API-credits.md describe it: by default of paid
    credits only, as the seed's balances are."""
    assert set(body) == TRANSACTION_FIELDS | {"toUserId", "description"}, body
    assert isinstance(body["transactionId"], str)
    assert body["transactionId"]
    assert {name: body[name] for name in body if name not in ("transactionId", "createdAt")} == {
        "type": "transfer",
        "status": "completed",
        "userId": from_user,
        "toUserId": to_user,
        "assetSymbol": asset,
        "amount": amount,
        "paidAmount": amount if paid_amount is None else paid_amount,
        "freeAmount": 0 if paid_amount is None else amount - paid_amount,
        "balanceAfter": balance_after,
        "idempotencyKey": key,
        "createdBy": created_by,
        "description": description,
    }
    assert_rfc3339_utc(body["createdAt"])


async def test_transfer_moves_coins_from_the_sender_to_the_receiver(
    client: httpx.AsyncClient,
) -> None:
    body = transfer_body(amount=300, description="for the guild bank")

    response = await post_flow(client, "transfer", body)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    sent = response.json()
    assert_transfer(
        sent,
        amount=300,
        balance_after=700,
        key=body["idempotencyKey"],
        created_by=await key_id_of(client),
        description="for the guild bank",
    )
    assert await balances_of(client, ALICE) == {**OPENING_BALANCES, "GOLD_COINS": 700}
    assert await balances_of(client, BOB) == {**OPENING_BALANCES, "GOLD_COINS": 1300}
    detail = await transaction_detail(client, sent["transactionId"])
    assert {name: detail[name] for name in sent} == sent
    for entry in detail["entries"]:
        assert_entry(entry)
    assert [
        (*move, e["balanceAfter"], e["paidAfter"])
        for move, e in zip(moves(detail["entries"]), detail["entries"], strict=True)
    ] == [(ALICE, "debit", "paid", 300, 700, 700), (BOB, "credit", "paid", 300, 1300, 1300)]


async def test_a_transfer_passes_on_the_kinds_the_sender_gave_up(
    client: httpx.AsyncClient,
) -> None:
    created(await post_flow(client, "bonus", flow_body(amount=40)))
    body = transfer_body(amount=300)

    sent = created(await post_flow(client, "transfer", body))

    assert_transfer(
        sent,
        amount=300,
        balance_after=740,
        key=body["idempotencyKey"],
        created_by=await key_id_of(client),
        paid_amount=260,  # the 40 free credits first
    )
    assert await kinds_of(client, ALICE, "GOLD_COINS") == {"paid": 740, "free": 0}
    assert await kinds_of(client, BOB, "GOLD_COINS") == {"paid": 1260, "free": 40}
    entries = (await transaction_detail(client, sent["transactionId"], BOB))["entries"]
    for entry in entries:
        assert_entry(entry)
    assert [
        (*move, e["balanceAfter"], e["paidAfter"])
        for move, e in zip(moves(entries), entries, strict=True)
    ] == [
        (ALICE, "debit", "free", 40, 1000, 1000),
        (BOB, "credit", "free", 40, 1040, 1000),
        (ALICE, "debit", "paid", 260, 740, 740),
        (BOB, "credit", "paid", 260, 1300, 1260),
    ]
    assert (await transactions_of(client, BOB))[0] == {**sent, "balanceAfter": 1300}


async def test_a_transfer_is_in_both_lists_with_each_users_balance_after_it(
    client: httpx.AsyncClient,
) -> None:
    sent = created(await post_flow(client, "transfer", transfer_body(amount=300)))
    received = {**sent, "balanceAfter": 1300}

    assert (await transactions_of(client, ALICE))[0] == sent
    assert (await transactions_of(client, BOB))[0] == received
    assert await transactions_of(client, ALICE, type="transfer") == [sent]
    assert await transactions_of(client, BOB, type="transfer") == [received]
    detail = await transaction_detail(client, sent["transactionId"], BOB)
    assert {name: detail[name] for name in sent} == received


async def test_transfers_are_filtered_by_type_among_other_flows(
    client: httpx.AsyncClient,
) -> None:
    carol = await create_user(client)
    first = created(await post_flow(client, "transfer", transfer_body(amount=5)))
    created(await post_flow(client, "topup", flow_body(user_id=BOB, amount=9)))
    second = created(
        await post_flow(client, "transfer", transfer_body(to_user=carol["id"], amount=7))
    )
    back = created(
        await post_flow(client, "transfer", transfer_body(from_user=BOB, to_user=ALICE, amount=2))
    )

    alice = await transactions_of(client, ALICE, type="transfer")
    assert [t["transactionId"] for t in alice] == [
        back["transactionId"],
        second["transactionId"],
        first["transactionId"],
    ]
    assert [t["balanceAfter"] for t in alice] == [990, 988, 995]
    bob = await transactions_of(client, BOB, type="transfer")
    assert [(t["transactionId"], t["balanceAfter"]) for t in bob] == [
        (back["transactionId"], 1012),
        (first["transactionId"], 1005),
    ]
    carols = await transactions_of(client, carol["id"])
    assert [(t["transactionId"], t["balanceAfter"]) for t in carols] == [
        (second["transactionId"], 7)
    ]


async def test_a_transfer_to_oneself_is_a_validation_error_and_keeps_nothing(
    client: httpx.AsyncClient,
) -> None:
    before = await account_state(client, ALICE)
    body = transfer_body(to_user=ALICE, amount=5)

    response = await post_flow(client, "transfer", body)

    assert_validation_error(response, "toUserId")
    assert await account_state(client, ALICE) == before
    assert created(await post_flow(client, "transfer", {**body, "toUserId": BOB}))


@pytest.mark.parametrize(
    "fields",
    [
        {"from_user": "nobody-yet"},
        {"to_user": "nobody-yet"},
        {"to_user": "system:revenue"},
    ],
    ids=["unknown-sender", "unknown-receiver", "system-account"],
)
async def test_a_transfer_naming_no_user_is_user_not_found_and_keeps_nothing(
    client: httpx.AsyncClient, fields: dict[str, str]
) -> None:
    before = {user: await account_state(client, user) for user in (ALICE, BOB)}
    body = transfer_body(amount=5, **fields)

    response = await post_flow(client, "transfer", body)

    assert_problem(response, 404, "user_not_found")
    assert {user: await account_state(client, user) for user in (ALICE, BOB)} == before
    fixed = {**body, "fromUserId": ALICE, "toUserId": BOB}
    assert created(await post_flow(client, "transfer", fixed))


async def test_a_transfer_of_an_unknown_asset_is_asset_not_found(
    client: httpx.AsyncClient,
) -> None:
    response = await post_flow(client, "transfer", transfer_body(asset="RUBIES"))

    assert_problem(response, 404, "asset_not_found")


async def test_a_transfer_over_the_senders_balance_is_refused_finally(
    client: httpx.AsyncClient,
) -> None:
    before = {user: await account_state(client, user) for user in (ALICE, BOB)}
    body = transfer_body(asset="DIAMONDS", amount=11)

    first = await post_flow(client, "transfer", body)

    assert_problem(first, 422, "insufficient_funds")
    assert {user: await account_state(client, user) for user in (ALICE, BOB)} == before
    created(await post_flow(client, "topup", flow_body(asset="DIAMONDS", amount=5)))
    again = await post_flow(client, "transfer", body)
    assert_problem(again, 422, "insufficient_funds")
    assert again.headers["idempotent-replayed"] == "true"
    assert (await balances_of(client, BOB))["DIAMONDS"] == 10


async def test_a_transfer_replays_and_its_key_with_another_request_is_409(
    client: httpx.AsyncClient,
) -> None:
    body = transfer_body(amount=25)
    first = await post_flow(client, "transfer", body)
    created(first)

    assert_replayed(first, await post_flow(client, "transfer", body))
    headers = {"Idempotency-Key": body["idempotencyKey"]}
    assert_replayed(
        first,
        await post_flow(client, "transfer", without(body, "idempotencyKey"), headers=headers),
    )
    for other in (
        {**body, "amount": 26},
        {**body, "toUserId": ALICE, "fromUserId": BOB},
        {**body, "description": "changed"},
    ):
        assert_problem(await post_flow(client, "transfer", other), 409, "idempotency_key_reused")
    spend = flow_body(amount=25, key=body["idempotencyKey"])
    assert_problem(await post_flow(client, "spend", spend), 409, "idempotency_key_reused")
    assert (await balances_of(client, BOB))["GOLD_COINS"] == 1025


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", 0),
        ("amount", MAX_AMOUNT + 1),
        ("amount", 1.5),
        ("toUserId", ""),
        ("toUserId", "a b"),
        ("fromUserId", "x" * 65),
        ("description", "d" * 501),
    ],
)
async def test_a_transfer_body_is_validated(
    client: httpx.AsyncClient, field: str, value: Any
) -> None:
    response = await post_flow(client, "transfer", {**transfer_body(), field: value})

    assert_validation_error(response, field)


async def test_concurrent_transfers_both_ways_never_deadlock_nor_lose_an_update(
    client: httpx.AsyncClient,
) -> None:
    answers = await asyncio.gather(
        *(
            post_flow(client, "transfer", transfer_body(from_user=a, to_user=b, amount=amount))
            for _ in range(10)
            for a, b, amount in ((ALICE, BOB, 3), (BOB, ALICE, 1))
        )
    )

    assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers]
    assert (await balances_of(client, ALICE))["GOLD_COINS"] == 1000 - 30 + 10
    assert (await balances_of(client, BOB))["GOLD_COINS"] == 1000 + 30 - 10
