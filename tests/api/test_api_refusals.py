"""A refusal is final (API-operations.md): a request the ledger refused for its state keeps that
answer under its idempotency key, so a retry never turns a reported failure into a charge;
refusals made before the ledger looked keep nothing."""

import asyncio

import httpx
import pytest
from api_checks import ALICE, API, assert_problem, flow_body, new_key, post_flow

from app_clients import app_client
from wallet.domain.ledger import Action, Command, Posted, UserId
from wallet.service.posting import post
from wallet.settings import Settings
from wallet.store.database import Database

SHORT = {"asset": "DIAMONDS", "amount": 11}  # Alice holds 10 DIAMONDS


async def diamonds(client: httpx.AsyncClient) -> int:
    response = await client.get(f"{API}/wallet/balance/{ALICE}/DIAMONDS")
    balance: int = response.json()["balance"]
    return balance


async def test_a_refused_spend_replays_its_refusal_even_once_the_user_has_funds(
    client: httpx.AsyncClient,
) -> None:
    body = flow_body(**SHORT, description="shield")
    refused = await post_flow(client, "spend", body)
    first = assert_problem(refused, 422, "insufficient_funds")
    assert "idempotent-replayed" not in refused.headers

    topped_up = await post_flow(client, "topup", flow_body(asset="DIAMONDS", amount=100))
    assert topped_up.status_code == 201
    retried = await post_flow(client, "spend", body)

    again = assert_problem(retried, 422, "insufficient_funds")
    assert retried.headers["idempotent-replayed"] == "true"
    assert {k: v for k, v in again.items() if k != "requestId"} == {
        k: v for k, v in first.items() if k != "requestId"
    }
    assert await diamonds(client) == 110  # the retry charged nothing


async def test_the_key_of_a_refusal_with_another_request_is_409(client: httpx.AsyncClient) -> None:
    key = new_key()
    assert_problem(
        await post_flow(client, "spend", flow_body(**SHORT, key=key)), 422, "insufficient_funds"
    )
    for other in (
        flow_body(asset="DIAMONDS", amount=1, key=key),
        flow_body(**SHORT, key=key, description="changed"),
    ):
        assert_problem(await post_flow(client, "spend", other), 409, "idempotency_key_reused")
    another_flow = await post_flow(client, "topup", flow_body(**SHORT, key=key))
    assert_problem(another_flow, 409, "idempotency_key_reused")
    assert await diamonds(client) == 10


async def test_a_key_given_in_the_header_replays_its_refusal_too(
    client: httpx.AsyncClient,
) -> None:
    headers = {"Idempotency-Key": new_key()}
    body = {k: v for k, v in flow_body(**SHORT).items() if k != "idempotencyKey"}
    assert_problem(
        await post_flow(client, "spend", body, headers=headers), 422, "insufficient_funds"
    )
    replayed = await post_flow(client, "spend", body, headers=headers)
    assert_problem(replayed, 422, "insufficient_funds")
    assert replayed.headers["idempotent-replayed"] == "true"


async def test_a_balance_limit_refusal_is_final_too(
    client: httpx.AsyncClient, database: Database
) -> None:
    # Alice's GOLD_COINS filled to 2^63 - 1 (in one batch, for speed): a bonus past it is
    # refused, and stays refused.
    to_fill = 2**63 - 1 - 1000
    steps = [10**15] * (to_fill // 10**15) + [to_fill % 10**15]
    filled = await post(
        database,
        [
            Command(
                action=Action.BONUS,
                user_id=UserId(ALICE),
                asset_symbol="GOLD_COINS",
                amount=step,
                idempotency_key=new_key(),
            )
            for step in steps
        ],
    )
    assert all(isinstance(outcome, Posted) for outcome in filled)
    body = flow_body(amount=1)
    assert_problem(await post_flow(client, "bonus", body), 422, "balance_limit_exceeded")
    replayed = await post_flow(client, "bonus", body)
    assert_problem(replayed, 422, "balance_limit_exceeded")
    assert replayed.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (flow_body(user_id="nobody-yet"), 404, "user_not_found"),
        (flow_body(asset="RUBIES"), 404, "asset_not_found"),
        (flow_body(amount=0), 422, "validation_error"),
    ],
)
async def test_a_refusal_before_the_ledger_looked_keeps_nothing(
    client: httpx.AsyncClient, body: dict[str, object], status: int, code: str
) -> None:
    assert_problem(await post_flow(client, "topup", body), status, code)
    if code == "user_not_found":
        created = await client.post(
            f"{API}/users", json={"id": "nobody-yet", "email": "n@example.com", "name": "N"}
        )
        assert created.status_code == 201
    fixed = {**body, "userId": ALICE if code != "user_not_found" else "nobody-yet"}
    fixed.update({"assetSymbol": "GOLD_COINS", "amount": 5})
    assert (await post_flow(client, "topup", fixed)).status_code == 201


@pytest.mark.parametrize("batch_max_size", [1, 128], ids=["own-transactions", "group-commit"])
async def test_concurrent_duplicates_of_a_refused_request_all_get_the_one_refusal(
    settings: Settings, admin_key: str, batch_max_size: int
) -> None:
    body = flow_body(**SHORT)
    options = {"batch_max_size": batch_max_size, "database_pool_size": 30}
    async with app_client(settings.model_copy(update=options), key=admin_key) as http:
        answers = await asyncio.gather(*(post_flow(http, "spend", body) for _ in range(20)))
        problems = [assert_problem(a, 422, "insufficient_funds") for a in answers]
        replays = [a for a in answers if a.headers.get("idempotent-replayed") == "true"]
        assert len(replays) == 19
        assert len({p["detail"] for p in problems}) == 1
        assert await diamonds(http) == 10
