"""Idempotency as API.md states it: a replay answers 200 with the stored body and runs nothing; the
same key on another request is 409. A request the ledger refused for its state keeps that refusal
under its key and replays it (API-operations.md); one refused before the ledger looked, such as a
validation error, records nothing."""

import asyncio
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    API,
    BOB,
    FLOWS,
    FREE_TEXT_FIELD,
    SAMPLE_FREE_TEXT,
    account_state,
    assert_problem,
    assert_validation_error,
    balance_of,
    flow_body,
    new_key,
    post_flow,
    without,
)

from app_clients import app_client
from wallet.settings import Settings


def assert_replay(response: httpx.Response, original: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert response.headers["idempotent-replayed"] == "true"
    assert response.json() == original.json()


async def test_replay_answers_200_with_the_stored_body_and_runs_nothing(
    client: httpx.AsyncClient,
) -> None:
    for flow in FLOWS:
        body = flow_body(amount=100, **{FREE_TEXT_FIELD[flow]: SAMPLE_FREE_TEXT[flow]})
        first = await post_flow(client, flow, body)
        assert first.status_code == 201, first.text
        after_first = await account_state(client, ALICE)

        for _ in range(3):
            assert_replay(await post_flow(client, flow, body), first)

        assert await account_state(client, ALICE) == after_first


async def test_key_may_come_in_the_idempotency_key_header(client: httpx.AsyncClient) -> None:
    key = new_key()
    body = without(flow_body(amount=30, key=key), "idempotencyKey")

    first = await post_flow(client, "bonus", body, headers={"Idempotency-Key": key})

    assert first.status_code == 201, first.text
    assert first.json()["idempotencyKey"] == key
    assert await balance_of(client, ALICE, "GOLD_COINS") == 1030
    assert_replay(await post_flow(client, "bonus", body, headers={"Idempotency-Key": key}), first)
    assert await balance_of(client, ALICE, "GOLD_COINS") == 1030


async def test_key_in_the_body_and_the_same_key_in_the_header_are_one_request(
    client: httpx.AsyncClient,
) -> None:
    body = flow_body(amount=30)
    key = body["idempotencyKey"]

    first = await post_flow(client, "spend", body)
    in_header = await post_flow(
        client, "spend", without(body, "idempotencyKey"), headers={"Idempotency-Key": key}
    )
    in_both = await post_flow(client, "spend", body, headers={"Idempotency-Key": key})

    assert first.status_code == 201, first.text
    assert_replay(in_header, first)
    assert_replay(in_both, first)
    assert await balance_of(client, ALICE, "GOLD_COINS") == 970


async def test_header_and_body_keys_that_differ_are_refused(client: httpx.AsyncClient) -> None:
    before = await account_state(client, ALICE)

    response = await post_flow(
        client, "topup", flow_body(amount=30), headers={"Idempotency-Key": new_key()}
    )

    assert_validation_error(response, "idempotencyKey")
    assert await account_state(client, ALICE) == before


async def test_request_without_a_key_is_refused(client: httpx.AsyncClient) -> None:
    before = await account_state(client, ALICE)

    for flow in FLOWS:
        response = await post_flow(client, flow, without(flow_body(amount=30), "idempotencyKey"))
        assert_validation_error(response, "idempotencyKey")

    assert await account_state(client, ALICE) == before


@pytest.mark.parametrize(("first_flow", "second_flow"), [("topup", "spend"), ("spend", "bonus")])
async def test_key_reused_on_another_flow_is_409_and_runs_nothing(
    client: httpx.AsyncClient, first_flow: str, second_flow: str
) -> None:
    body = flow_body(amount=25)
    first = await post_flow(client, first_flow, body)
    assert first.status_code == 201, first.text
    before = await account_state(client, ALICE)

    response = await post_flow(client, second_flow, body)

    assert_problem(response, 409, "idempotency_key_reused")
    assert await account_state(client, ALICE) == before


CHANGES: dict[str, dict[str, Any]] = {
    "amount": {"amount": 26},
    "user": {"userId": BOB},
    "asset": {"assetSymbol": "DIAMONDS"},
}
FREE_TEXT_CHANGES: dict[str, list[Any]] = {
    "topup": [{"order": "A-2", "store": "web"}, {"order": "A-1"}, None],
    "bonus": ["another reason", "", None],
    "spend": ["another description", "", None],
}


async def test_key_reused_with_a_different_request_is_409_and_runs_nothing(
    client: httpx.AsyncClient,
) -> None:
    for flow in FLOWS:
        field = FREE_TEXT_FIELD[flow]
        body = flow_body(amount=25, **{field: SAMPLE_FREE_TEXT[flow]})
        first = await post_flow(client, flow, body)
        assert first.status_code == 201, first.text
        before = {user: await account_state(client, user) for user in (ALICE, BOB)}
        variants = [{**body, **change} for change in CHANGES.values()]
        variants += [{**body, field: text} for text in FREE_TEXT_CHANGES[flow]]
        variants.append(without(body, field))

        for variant in variants:
            response = await post_flow(client, flow, variant)
            assert_problem(response, 409, "idempotency_key_reused")

        assert {user: await account_state(client, user) for user in (ALICE, BOB)} == before
        assert_replay(await post_flow(client, flow, body), first)


async def test_metadata_with_its_keys_in_another_order_is_the_same_request(
    client: httpx.AsyncClient,
) -> None:
    key = new_key()
    first = await post_flow(
        client, "topup", flow_body(key=key, metadata={"order": "A-1", "store": "web"})
    )

    again = await post_flow(
        client, "topup", flow_body(key=key, metadata={"store": "web", "order": "A-1"})
    )

    assert first.status_code == 201, first.text
    assert_replay(again, first)


def assert_refusal_replay(response: httpx.Response, original: httpx.Response) -> None:
    """The stored refusal again: its status and body, but for the id of the request answered."""
    problem, first = assert_problem(response, 422, "insufficient_funds"), original.json()
    assert response.headers["idempotent-replayed"] == "true"
    assert without(problem, "requestId") == without(first, "requestId")


async def test_key_of_a_spend_refused_for_insufficient_funds_keeps_the_refusal_once_funded(
    client: httpx.AsyncClient,
) -> None:
    before = await account_state(client, ALICE)
    body = flow_body(amount=1500, description="a castle")
    refused = await post_flow(client, "spend", body)
    assert_problem(refused, 422, "insufficient_funds")
    assert "idempotent-replayed" not in refused.headers
    assert_refusal_replay(await post_flow(client, "spend", body), refused)
    assert await account_state(client, ALICE) == before
    funded = await post_flow(client, "topup", flow_body(amount=500))
    assert funded.status_code == 201, funded.text
    after_funding = await account_state(client, ALICE)

    response = await post_flow(client, "spend", body)

    assert_refusal_replay(response, refused)  # final: Alice could pay now, and is not charged
    for other in ({**body, "amount": 1499}, {**body, "description": "a tower"}):
        assert_problem(await post_flow(client, "spend", other), 409, "idempotency_key_reused")
    on_another_flow = await post_flow(client, "topup", without(body, "description"))
    assert_problem(on_another_flow, 409, "idempotency_key_reused")
    assert await account_state(client, ALICE) == after_funding


async def test_key_of_a_request_that_failed_validation_records_nothing(
    client: httpx.AsyncClient,
) -> None:
    key = new_key()
    assert_validation_error(
        await post_flow(client, "spend", flow_body(key=key, amount=0)), "amount"
    )
    assert_validation_error(
        await post_flow(client, "bonus", flow_body(key=key, amount=10, reason="x" * 501)), "reason"
    )

    response = await post_flow(client, "topup", flow_body(key=key, amount=10))

    assert response.status_code == 201, response.text
    assert response.json()["balanceAfter"] == 1010


async def test_replay_holds_across_a_restart(
    client: httpx.AsyncClient, settings: Settings, admin_key: str
) -> None:
    body = flow_body(amount=42, reason="before the restart")
    first = await post_flow(client, "bonus", body)
    assert first.status_code == 201, first.text
    short = flow_body(amount=5000)
    refused = await post_flow(client, "spend", short)
    assert_problem(refused, 422, "insufficient_funds")

    async with app_client(settings, key=admin_key) as other_client:
        assert_replay(await post_flow(other_client, "bonus", body), first)
        assert_refusal_replay(await post_flow(other_client, "spend", short), refused)
        assert await balance_of(other_client, ALICE, "GOLD_COINS") == 1042


@pytest.mark.parametrize(("flow", "change"), [("topup", 7), ("bonus", 7), ("spend", -7)])
async def test_concurrent_duplicates_apply_exactly_once(
    client: httpx.AsyncClient, flow: str, change: int
) -> None:
    body = flow_body(amount=7)

    responses = await asyncio.gather(*(post_flow(client, flow, body) for _ in range(12)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] * 11 + [201], [r.text for r in responses]
    (original,) = (r for r in responses if r.status_code == 201)
    for response in responses:
        if response is not original:
            assert_replay(response, original)
    assert await balance_of(client, ALICE, "GOLD_COINS") == 1000 + change
    history = await client.get(f"{API}/wallet/transactions/{ALICE}", params={"limit": 500})
    keys = [item["idempotencyKey"] for item in history.json()["items"]]
    assert keys.count(body["idempotencyKey"]) == 1
