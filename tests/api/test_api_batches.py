"""Atomic batches of API-ledger.md: up to 100 flows that all apply, in order, each seeing the
balances the earlier ones left, or none does; operation i's transaction has the key
`<key>:<i>`; a failure names the operation and records nothing; the key needs the scope of
every operation."""

from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    API,
    BOB,
    OPENING_BALANCES,
    account_state,
    assert_problem,
    assert_replayed,
    assert_transaction,
    assert_validation_error,
    balances_of,
    created,
    flow_body,
    key_id_of,
    kinds_of,
    new_key,
    post_flow,
    transaction_detail,
    transactions_of,
    without,
)

from app_clients import bearer, create_key
from wallet.domain.access import Scope
from wallet.settings import Settings


def operation(kind: str, user: str = ALICE, amount: int = 10, **fields: Any) -> dict[str, Any]:
    """A batch operation: a flow body without its key, Alice's GOLD_COINS unless told."""
    if kind == "transfer":
        body = {"fromUserId": user, "toUserId": BOB, "assetSymbol": "GOLD_COINS", "amount": amount}
        return {"type": kind, **body, **fields}
    body = without(flow_body(user_id=user, amount=amount), "idempotencyKey")
    return {"type": kind, **body, **fields}


def batch_body(*operations: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    return {"idempotencyKey": key or new_key(), "operations": list(operations)}


async def everyones_state(client: httpx.AsyncClient) -> dict[str, Any]:
    return {user: await account_state(client, user) for user in (ALICE, BOB)}


async def test_batch_applies_every_operation_in_order_each_seeing_the_earlier(
    client: httpx.AsyncClient,
) -> None:
    body = batch_body(
        operation("topup", amount=500, metadata={"order": "B-1"}),
        operation("spend", amount=1400, description="castle"),  # needs the top-up's coins
        operation("transfer", amount=100, description="rent"),
        operation("bonus", user=BOB, amount=7, reason="loyalty"),
    )

    response = await post_flow(client, "batch", body)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    made = response.json()
    assert set(made) == {"transactions"}
    topup, spend, transfer, bonus = made["transactions"]
    key, key_id = body["idempotencyKey"], await key_id_of(client)
    assert_transaction(
        topup,
        flow="topup",
        amount=500,
        balance_after=1500,
        key=f"{key}:0",
        created_by=key_id,
        free_text={"order": "B-1"},
    )
    assert_transaction(
        spend,
        flow="spend",
        amount=1400,
        balance_after=100,
        key=f"{key}:1",
        created_by=key_id,
        free_text="castle",
    )
    assert {name: transfer[name] for name in ("type", "userId", "toUserId", "amount")} == {
        "type": "transfer",
        "userId": ALICE,
        "toUserId": BOB,
        "amount": 100,
    }
    assert (transfer["balanceAfter"], transfer["idempotencyKey"]) == (0, f"{key}:2")
    assert (transfer["paidAmount"], transfer["freeAmount"]) == (100, 0)
    assert (transfer["description"], transfer["createdBy"]) == ("rent", key_id)
    assert_transaction(
        bonus,
        flow="bonus",
        user_id=BOB,
        amount=7,
        balance_after=1107,
        key=f"{key}:3",
        created_by=key_id,
        free_text="loyalty",
    )
    ids = [t["transactionId"] for t in made["transactions"]]
    assert ids == sorted(ids)
    assert await balances_of(client, ALICE) == {**OPENING_BALANCES, "GOLD_COINS": 0}
    assert await balances_of(client, BOB) == {**OPENING_BALANCES, "GOLD_COINS": 1107}
    assert await kinds_of(client, BOB, "GOLD_COINS") == {"paid": 1100, "free": 7}
    assert (await transactions_of(client, ALICE))[:3] == [transfer, spend, topup]
    for transaction in (topup, spend):
        detail = await transaction_detail(client, transaction["transactionId"])
        assert {name: detail[name] for name in transaction} == transaction


async def test_batch_of_100_operations_is_accepted(client: httpx.AsyncClient) -> None:
    body = batch_body(*(operation("bonus", amount=1) for _ in range(100)))

    made = created(await post_flow(client, "batch", body))["transactions"]

    assert [t["balanceAfter"] for t in made] == list(range(1001, 1101))
    assert [t["idempotencyKey"] for t in made] == [
        f"{body['idempotencyKey']}:{i}" for i in range(100)
    ]


FAILURES = {
    "insufficient-funds": (
        [operation("topup", amount=10), operation("spend", amount=1011), operation("bonus")],
        1,
        (422, "insufficient_funds"),
    ),
    "unknown-user": (
        [operation("topup"), operation("bonus", user=BOB), operation("spend", user="nobody-yet")],
        2,
        (404, "user_not_found"),
    ),
    "unknown-receiver": (
        [operation("bonus"), operation("transfer", toUserId="nobody-yet"), operation("spend")],
        1,
        (404, "user_not_found"),
    ),
    "unknown-asset": (
        [operation("topup", assetSymbol="RUBIES"), operation("bonus")],
        0,
        (404, "asset_not_found"),
    ),
    "spend-after-a-transfer": (
        [operation("transfer", amount=1000), operation("spend", amount=1)],
        1,
        (422, "insufficient_funds"),
    ),
}


@pytest.mark.parametrize(("operations", "index", "answer"), FAILURES.values(), ids=FAILURES)
async def test_a_failing_operation_fails_the_batch_which_changes_and_records_nothing(
    client: httpx.AsyncClient,
    operations: list[dict[str, Any]],
    index: int,
    answer: tuple[int, str],
) -> None:
    before = await everyones_state(client)
    key = new_key()

    response = await post_flow(client, "batch", batch_body(*operations, key=key))

    problem = assert_problem(response, *answer)
    assert problem["operationIndex"] == index
    assert "idempotent-replayed" not in response.headers
    assert await everyones_state(client) == before
    # Nothing recorded: the key, and its operations' keys, are free for a batch that succeeds.
    fixed = created(await post_flow(client, "batch", batch_body(operation("bonus"), key=key)))
    assert [t["idempotencyKey"] for t in fixed["transactions"]] == [f"{key}:0"]


async def test_a_failed_batch_retried_as_it_was_fails_again_without_replaying(
    client: httpx.AsyncClient,
) -> None:
    body = batch_body(operation("spend", amount=600), operation("spend", amount=600))
    assert_problem(await post_flow(client, "batch", body), 422, "insufficient_funds")
    created(await post_flow(client, "topup", flow_body(amount=200)))

    response = await post_flow(client, "batch", body)

    made = created(response)
    assert [t["balanceAfter"] for t in made["transactions"]] == [600, 0]


@pytest.mark.parametrize("count", [0, 101])
async def test_a_batch_of_no_or_over_100_operations_is_a_validation_error(
    client: httpx.AsyncClient, count: int
) -> None:
    body = batch_body(*(operation("bonus", amount=1) for _ in range(count)))

    assert_validation_error(await post_flow(client, "batch", body), "operations")
    assert await balances_of(client, ALICE) == OPENING_BALANCES


@pytest.mark.parametrize(
    "bad",
    [
        operation("topup", idempotencyKey="inner-key"),
        operation("refund"),
        without(operation("spend"), "amount"),
        operation("bonus", amount=0),
        operation("transfer", toUserId=ALICE),
    ],
    ids=["own-key", "unknown-type", "no-amount", "zero-amount", "transfer-to-oneself"],
)
async def test_an_operation_that_breaks_the_rules_is_a_validation_error_naming_it(
    client: httpx.AsyncClient, bad: dict[str, Any]
) -> None:
    before = await everyones_state(client)

    response = await post_flow(client, "batch", batch_body(operation("bonus"), bad))

    assert_validation_error(response, "operations.1")
    assert await everyones_state(client) == before


async def test_a_batch_replays_and_its_key_with_another_batch_is_409(
    client: httpx.AsyncClient,
) -> None:
    body = batch_body(operation("topup", amount=5), operation("spend", amount=3))
    first = await post_flow(client, "batch", body)
    created(first)

    assert_replayed(first, await post_flow(client, "batch", body))
    headers = {"Idempotency-Key": body["idempotencyKey"]}
    assert_replayed(
        first, await post_flow(client, "batch", without(body, "idempotencyKey"), headers=headers)
    )
    for operations in (
        [operation("topup", amount=5), operation("spend", amount=4)],
        [operation("topup", amount=5)],
        [operation("topup", amount=5), operation("spend", amount=3), operation("bonus")],
    ):
        response = await post_flow(client, "batch", {**body, "operations": operations})
        assert_problem(response, 409, "idempotency_key_reused")
    assert (await balances_of(client, ALICE))["GOLD_COINS"] == 1002


async def test_a_batchs_key_reused_by_a_flow_is_409(client: httpx.AsyncClient) -> None:
    key = new_key()
    created(await post_flow(client, "batch", batch_body(operation("bonus", amount=5), key=key)))

    response = await post_flow(client, "topup", flow_body(amount=5, key=key))

    assert_problem(response, 409, "idempotency_key_reused")
    assert (await balances_of(client, ALICE))["GOLD_COINS"] == 1005


@pytest.mark.parametrize("flow", ["topup", "spend"])
async def test_the_key_of_a_batchs_transaction_reused_by_a_flow_is_409(
    client: httpx.AsyncClient, flow: str
) -> None:
    key = new_key()
    created(await post_flow(client, "batch", batch_body(operation("bonus", amount=5), key=key)))

    response = await post_flow(client, flow, flow_body(amount=5, key=f"{key}:0"))

    assert_problem(response, 409, "idempotency_key_reused")
    assert (await balances_of(client, ALICE))["GOLD_COINS"] == 1005


async def test_a_flows_key_reused_by_a_batch_is_409(client: httpx.AsyncClient) -> None:
    key = new_key()
    created(await post_flow(client, "topup", flow_body(amount=5, key=key)))

    response = await post_flow(client, "batch", batch_body(operation("topup", amount=5), key=key))

    assert_problem(response, 409, "idempotency_key_reused")
    assert (await balances_of(client, ALICE))["GOLD_COINS"] == 1005


@pytest.mark.parametrize(
    ("scope", "operations", "missing"),
    [
        (Scope.WALLET_CREDIT, [operation("topup"), operation("spend")], Scope.WALLET_DEBIT),
        (Scope.WALLET_CREDIT, [operation("bonus"), operation("transfer")], Scope.WALLET_DEBIT),
        (Scope.WALLET_DEBIT, [operation("spend"), operation("bonus")], Scope.WALLET_CREDIT),
    ],
    ids=["credit-key-spends", "credit-key-transfers", "debit-key-grants"],
)
async def test_a_batch_needs_the_scope_of_every_operation(
    client: httpx.AsyncClient,
    settings: Settings,
    scope: Scope,
    operations: list[dict[str, Any]],
    missing: Scope,
) -> None:
    key = await create_key(settings.database_url.get_secret_value(), scope)
    before = await everyones_state(client)
    body = batch_body(*operations)

    response = await client.post(f"{API}/wallet/batch", json=body, headers=bearer(key))

    problem = assert_problem(response, 403, "insufficient_scope")
    assert missing.value in problem["detail"]
    assert await everyones_state(client) == before
    # Refused before the ledger looked: the key stays free, for a key with both scopes.
    assert len(created(await post_flow(client, "batch", body))["transactions"]) == 2


@pytest.mark.parametrize(
    ("scope", "operations"),
    [
        (Scope.WALLET_CREDIT, [operation("topup"), operation("bonus", user=BOB)]),
        (Scope.WALLET_DEBIT, [operation("spend"), operation("transfer")]),
    ],
    ids=["credit", "debit"],
)
async def test_a_key_with_one_scope_runs_batches_of_what_it_allows(
    client: httpx.AsyncClient, settings: Settings, scope: Scope, operations: list[dict[str, Any]]
) -> None:
    key = await create_key(settings.database_url.get_secret_value(), scope)

    response = await client.post(
        f"{API}/wallet/batch", json=batch_body(*operations), headers=bearer(key)
    )

    made = created(response)
    assert [t["type"] for t in made["transactions"]] == [op["type"] for op in operations]


async def test_a_batch_with_a_key_without_either_scope_is_403(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    key = await create_key(settings.database_url.get_secret_value(), Scope.WALLET_READ)

    response = await client.post(
        f"{API}/wallet/batch", json=batch_body(operation("bonus")), headers=bearer(key)
    )

    assert_problem(response, 403, "insufficient_scope")
