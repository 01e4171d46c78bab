"""The flows served through the framework routes (lean_flows=false) keep the same contract as the
default lean path the other API tests exercise: a compact pass over each kind of answer, and the
same requests sent both ways answered alike."""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    API,
    FLOWS,
    FREE_TEXT_FIELD,
    MAX_AMOUNT,
    MAX_BODY_BYTES,
    SAMPLE_FREE_TEXT,
    account_state,
    assert_problem,
    assert_replayed,
    assert_transaction,
    assert_validation_error,
    describe,
    flow_body,
    flow_json_with_amount,
    get_ok,
    new_key,
    outcome,
    post_flow,
    post_raw,
    problem_of,
    without,
)

from app_clients import app_client
from wallet.settings import Settings


@pytest.fixture
async def framework_client(settings: Settings, admin_key: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client, with an admin key, of the app with the lean flow path turned off, over the test
    database."""
    if "lean_flows" not in Settings.model_fields:
        pytest.skip("the service has a single flow path (no lean_flows setting)")
    framework = Settings(database_url=settings.database_url.get_secret_value(), lean_flows=False)
    async with app_client(framework, key=admin_key) as http:
        yield http


# The flows run in order: the spend takes the bonus's free credits first (API-credits.md).
PAID_OF_EACH_FLOW = {"topup": 20, "bonus": 0, "spend": 0}


async def test_flows_answer_201_then_replay_200_then_409_on_another_request(
    framework_client: httpx.AsyncClient,
) -> None:
    # The admin key the client sends is the newest key (the seed's own is older).
    key_id = (await get_ok(framework_client, f"{API}/keys"))["items"][0]["keyId"]
    for flow in FLOWS:
        field = FREE_TEXT_FIELD[flow]
        body = flow_body(amount=20, **{field: SAMPLE_FREE_TEXT[flow]})
        before = (await account_state(framework_client, ALICE))["balances"]["GOLD_COINS"]

        first = await post_flow(framework_client, flow, body)
        replay = await post_flow(framework_client, flow, body)
        reused = await post_flow(framework_client, flow, {**body, "amount": 21})

        assert first.status_code == 201, describe(first)
        expected = before - 20 if flow == "spend" else before + 20
        assert_transaction(
            first.json(),
            flow=flow,
            amount=20,
            balance_after=expected,
            key=body["idempotencyKey"],
            created_by=key_id,
            free_text=SAMPLE_FREE_TEXT[flow],
            paid_amount=PAID_OF_EACH_FLOW[flow],
        )
        assert replay.status_code == 200, describe(replay)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json() == first.json()
        assert_problem(reused, 409, "idempotency_key_reused")
        assert (await account_state(framework_client, ALICE))["balances"]["GOLD_COINS"] == expected


async def test_key_in_the_header_is_accepted_and_a_different_body_key_refused(
    framework_client: httpx.AsyncClient,
) -> None:
    key = new_key()
    body = without(flow_body(amount=5), "idempotencyKey")

    in_header = await post_flow(framework_client, "topup", body, headers={"Idempotency-Key": key})
    differing = await post_flow(
        framework_client, "topup", flow_body(amount=5), headers={"Idempotency-Key": key}
    )
    missing = await post_flow(framework_client, "topup", body)

    assert in_header.status_code == 201, describe(in_header)
    assert in_header.json()["idempotencyKey"] == key
    assert_validation_error(differing, "idempotencyKey")
    assert_validation_error(missing, "idempotencyKey")


async def test_bad_bodies_get_their_documented_answers_and_change_nothing(
    framework_client: httpx.AsyncClient,
) -> None:
    before = await account_state(framework_client, ALICE)
    validation_errors: list[tuple[str, str]] = [
        (flow_json_with_amount(literal), "amount")
        for literal in ("1.5", '"10"', "true", "0", "-1", str(MAX_AMOUNT + 1), "1e400")
    ]
    validation_errors += [
        (flow_json_with_amount("1" + "0" * 5000), "amount"),
        (json.dumps(flow_body(user_id="has space")), "userId"),
        (json.dumps(flow_body(key="k" * 129)), "idempotencyKey"),
        (json.dumps({**flow_body(), "unknown": 1}), "unknown"),
        (json.dumps(without(flow_body(), "assetSymbol")), "assetSymbol"),
    ]
    others: list[tuple[str, tuple[int, str]]] = [
        (json.dumps(flow_body(user_id="nobody")), (404, "user_not_found")),
        (json.dumps(flow_body(user_id="system:treasury")), (404, "user_not_found")),
        (json.dumps(flow_body(asset="NOPE")), (404, "asset_not_found")),
        ("{", (400, "malformed_json")),
        (flow_json_with_amount("NaN"), (400, "malformed_json")),
        ("[]", (422, "validation_error")),
    ]

    for flow in FLOWS:
        for text, field in validation_errors:
            assert_validation_error(
                await post_raw(framework_client, f"{API}/wallet/{flow}", text), field
            )
        for text, (status, code) in others:
            response = await post_raw(framework_client, f"{API}/wallet/{flow}", text)
            assert_problem(response, status, code)
    short = await post_flow(framework_client, "spend", flow_body(amount=1001))
    assert_problem(short, 422, "insufficient_funds")

    assert await account_state(framework_client, ALICE) == before


async def test_deep_nesting_oversized_and_non_json_bodies_are_refused(
    framework_client: httpx.AsyncClient,
) -> None:
    before = await account_state(framework_client, ALICE)
    depth = 20_000
    oversized = json.dumps(flow_body()).encode() + b" " * MAX_BODY_BYTES

    async def streamed() -> AsyncIterator[bytes]:
        for start in range(0, len(oversized), 8192):
            yield oversized[start : start + 8192]

    for flow in FLOWS:
        path = f"{API}/wallet/{flow}"
        nested = await post_raw(framework_client, path, "[" * depth + "]" * depth)
        assert outcome(nested) in {(400, "malformed_json"), (422, "validation_error")}, describe(
            nested
        )
        assert_problem(await post_raw(framework_client, path, oversized), 413, "payload_too_large")
        assert_problem(await post_raw(framework_client, path, streamed()), 413, "payload_too_large")
        plain = await post_raw(
            framework_client, path, json.dumps(flow_body()), content_type="text/plain"
        )
        assert_problem(plain, 415, "unsupported_media_type")

    assert await account_state(framework_client, ALICE) == before


async def test_a_flow_made_on_either_path_replays_alike_on_the_other(
    client: httpx.AsyncClient, framework_client: httpx.AsyncClient
) -> None:
    for flow in FLOWS:
        body = flow_body(amount=3, **{FREE_TEXT_FIELD[flow]: SAMPLE_FREE_TEXT[flow]})
        for first_path, other_path in ((client, framework_client), (framework_client, client)):
            body = {**body, "idempotencyKey": new_key()}
            first = await post_flow(first_path, flow, body)

            assert first.status_code == 201, describe(first)
            assert_replayed(first, await post_flow(other_path, flow, body))


def bad_requests() -> list[tuple[str, dict[str, str]]]:
    """Bodies (as JSON text) and headers to refuse, with fresh keys: errors in the body and the
    header at once, bodies that are not objects, the key missing or differing between header and
    body, an unknown user, an amount out of range, text that is not JSON."""
    return [
        (json.dumps(flow_body(amount=0, key="bad key")), {"Idempotency-Key": "also bad"}),
        (json.dumps({"amount": "1"}), {"Idempotency-Key": ""}),
        ("null", {}),
        ("[]", {}),
        ("1", {}),
        (json.dumps(flow_body()), {"Idempotency-Key": new_key()}),
        (json.dumps(without(flow_body(), "idempotencyKey")), {}),
        (json.dumps(flow_body(user_id="nobody")), {}),
        (flow_json_with_amount("1e400"), {}),
        ("{", {}),
    ]


async def test_both_paths_refuse_a_bad_request_with_the_same_problem(
    client: httpx.AsyncClient, framework_client: httpx.AsyncClient
) -> None:
    async def refusals(http: httpx.AsyncClient, flow: str) -> list[Any]:
        answers = []
        for text, headers in bad_requests():
            response = await http.post(
                f"{API}/wallet/{flow}",
                content=text,
                headers={"Content-Type": "application/json", **headers},
            )
            answers.append(without(problem_of(response), "requestId"))
        return answers

    for flow in FLOWS:
        assert await refusals(client, flow) == await refusals(framework_client, flow), flow
