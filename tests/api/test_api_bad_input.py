"""Bad input is a 4xx with its documented code, never a 5xx, and changes nothing: amounts that
are not integers in range, malformed ids and keys, bodies that are not JSON objects, too large or
of another media type, oversized free text and metadata, malformed path and query parameters."""

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    API,
    BOB,
    FLOWS,
    FREE_TEXT_FIELD,
    MAX_AMOUNT,
    MAX_BODY_BYTES,
    SAMPLE_FREE_TEXT,
    account_state,
    assert_problem,
    assert_transaction,
    assert_validation_error,
    describe,
    flow_body,
    flow_json_with_amount,
    get_ok,
    outcome,
    post_flow,
    post_raw,
    without,
)

BAD_AMOUNTS = {
    "fractional": "1.5",
    "integral float": "10.0",
    "exponent": "1e3",
    "string": '"10"',
    "true": "true",
    "false": "false",
    "null": "null",
    "zero": "0",
    "negative zero float": "-0.0",
    "negative": "-1",
    "just over 10^15": str(MAX_AMOUNT + 1),
    "10^30": str(10**30),
    "2^63": str(2**63),
    "2^64 negative": str(-(2**64)),
    "huge float": "1e400",
    "huge negative float": "-1e400",
    "array": "[10]",
    "object": '{"value": 10}',
}
MALFORMED_USER_IDS: list[Any] = [
    "",
    "has space",
    " leading-space",
    "x" * 65,
    "x" * 10_000,
    "ünïcödé",
    "a/b",
    "a\nb",
    "x\u0000y",
    123,
    None,
    ["x"],
]
UNKNOWN_USER_IDS = [
    "nobody-here",
    "x" * 64,
    "system:treasury",
    "system:bonus_pool",
    "system:revenue",
]
MALFORMED_KEYS: list[Any] = [
    "",
    "a b",
    "a/b",
    "a\nb",
    "ключ",
    "key🔑",
    "k" * 129,
    "k" * 10_000,
    5,
    {"k": "v"},
]
MALFORMED_HEADER_KEYS = ["", "a b", "a/b", "k" * 129, "k" * 10_000]
VALID_KEYS = ["a", "k" * 128, "Az09_.:-", "system:looks-reserved-but-keys-are-free"]
NOT_JSON = [
    "{",
    "not json",
    '{"userId": }',
    "{'userId': 'single quotes'}",
    '{"amount": 1,}',
    '{"a": 1} trailing',
    "\xff\xfe",
]
NOT_AN_OBJECT = ["[]", '[{"amount": 1}]', '"a string"', "null", "42", "true"]
OTHER_MEDIA_TYPES = [
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/xml",
    "text/json",
    None,
]


async def chunked(data: bytes, size: int = 8192) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
async def untouched(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """Fails the test if Alice's or Bob's money changed by its end."""
    before = {user: await account_state(client, user) for user in (ALICE, BOB)}
    yield
    assert {user: await account_state(client, user) for user in (ALICE, BOB)} == before


@pytest.mark.usefixtures("untouched")
async def test_amount_that_is_not_an_integer_from_1_to_10_15_is_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    for flow in FLOWS:
        for literal in BAD_AMOUNTS.values():
            response = await post_raw(
                client, f"{API}/wallet/{flow}", flow_json_with_amount(literal)
            )
            assert_validation_error(response, "amount")


@pytest.mark.usefixtures("untouched")
async def test_amount_with_thousands_of_digits_is_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    # Valid JSON; Python's int parser refuses more than 4300 digits by default.
    for flow in FLOWS:
        for literal in ("1" + "0" * 5000, "-" + "9" * 5000):
            response = await post_raw(
                client, f"{API}/wallet/{flow}", flow_json_with_amount(literal)
            )
            assert_validation_error(response, "amount")


@pytest.mark.usefixtures("untouched")
async def test_number_literals_json_does_not_have_are_malformed_json(
    client: httpx.AsyncClient,
) -> None:
    # NaN and Infinity are not JSON (RFC 8259), though Python's json module reads them.
    for flow in FLOWS:
        for literal in ("NaN", "Infinity", "-Infinity"):
            response = await post_raw(
                client, f"{API}/wallet/{flow}", flow_json_with_amount(literal)
            )
            assert_problem(response, 400, "malformed_json")


async def test_spend_of_the_largest_amount_is_insufficient_funds_not_invalid(
    client: httpx.AsyncClient,
) -> None:
    response = await post_flow(client, "spend", flow_body(amount=MAX_AMOUNT))

    assert_problem(response, 422, "insufficient_funds")


@pytest.mark.usefixtures("untouched")
async def test_malformed_user_id_is_a_validation_error(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for user_id in MALFORMED_USER_IDS:
            response = await post_flow(client, flow, flow_body(user_id=user_id))
            assert_validation_error(response, "userId")


@pytest.mark.usefixtures("untouched")
async def test_unknown_user_or_system_account_is_user_not_found(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for user_id in UNKNOWN_USER_IDS:
            response = await post_flow(client, flow, flow_body(user_id=user_id))
            assert_problem(response, 404, "user_not_found")


@pytest.mark.usefixtures("untouched")
async def test_unknown_asset_is_asset_not_found(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for symbol in ("NOPE", "gold_coins", "GOLD COINS", "DIAMONDS "):
            response = await post_flow(client, flow, flow_body(asset=symbol))
            assert_problem(response, 404, "asset_not_found")


@pytest.mark.usefixtures("untouched")
async def test_asset_symbol_that_is_not_a_string_is_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    for flow in FLOWS:
        for symbol in ("", 5, None, ["GOLD_COINS"]):
            response = await post_flow(client, flow, flow_body(asset=symbol))
            assert_validation_error(response, "assetSymbol")


@pytest.mark.usefixtures("untouched")
async def test_overlong_asset_symbol_is_unknown_or_invalid(client: httpx.AsyncClient) -> None:
    # API.md sets no length for symbols: naming no asset (404) and breaking a bound (422) both
    # keep the contract.
    for flow in FLOWS:
        for symbol in ("A" * 33, "A" * 10_000):
            response = await post_flow(client, flow, flow_body(asset=symbol))
            assert outcome(response) in {(404, "asset_not_found"), (422, "validation_error")}, (
                describe(response)
            )


@pytest.mark.usefixtures("untouched")
async def test_malformed_idempotency_key_is_a_validation_error(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for key in MALFORMED_KEYS:
            body = {**flow_body(), "idempotencyKey": key}
            assert_validation_error(await post_flow(client, flow, body), "idempotencyKey")
        for key in MALFORMED_HEADER_KEYS:
            response = await post_flow(
                client,
                flow,
                without(flow_body(), "idempotencyKey"),
                headers={"Idempotency-Key": key},
            )
            problem = assert_problem(response, 422, "validation_error")
            fields = {error["field"].lower() for error in problem["errors"]}
            assert fields & {"idempotency-key", "idempotencykey"}, describe(response)


async def test_idempotency_keys_of_every_allowed_shape_are_accepted(
    client: httpx.AsyncClient,
) -> None:
    for key in VALID_KEYS:
        response = await post_flow(client, "topup", flow_body(key=key, amount=1))
        assert response.status_code == 201, describe(response)
        assert response.json()["idempotencyKey"] == key
    header_key = "h" * 128
    response = await post_flow(
        client,
        "topup",
        without(flow_body(amount=1), "idempotencyKey"),
        headers={"Idempotency-Key": header_key},
    )
    assert response.status_code == 201, describe(response)
    assert response.json()["idempotencyKey"] == header_key


@pytest.mark.usefixtures("untouched")
async def test_missing_fields_are_validation_errors_naming_them(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for field in ("userId", "assetSymbol", "amount"):
            response = await post_flow(client, flow, without(flow_body(), field))
            assert_validation_error(response, field)

        problem = assert_problem(await post_flow(client, flow, {}), 422, "validation_error")
        assert {"userId", "assetSymbol", "amount"} <= {e["field"] for e in problem["errors"]}


@pytest.mark.usefixtures("untouched")
async def test_unknown_fields_are_validation_errors_naming_them(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        others = [name for name in FREE_TEXT_FIELD.values() if name != FREE_TEXT_FIELD[flow]]
        extras = {"unknown": 1, "currency": "EUR", "user_id": ALICE, **dict.fromkeys(others, "x")}
        for field, value in extras.items():
            response = await post_flow(client, flow, {**flow_body(), field: value})
            assert_validation_error(response, field)


@pytest.mark.usefixtures("untouched")
async def test_body_that_is_not_json_is_malformed_json(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for text in NOT_JSON:
            response = await post_raw(client, f"{API}/wallet/{flow}", text)
            assert_problem(response, 400, "malformed_json")


@pytest.mark.usefixtures("untouched")
async def test_json_that_is_not_an_object_is_a_validation_error(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        for text in NOT_AN_OBJECT:
            response = await post_raw(client, f"{API}/wallet/{flow}", text)
            assert_problem(response, 422, "validation_error")


@pytest.mark.usefixtures("untouched")
async def test_deeply_nested_json_is_refused_with_a_documented_code(
    client: httpx.AsyncClient,
) -> None:
    # Valid JSON that parsers may refuse for its depth (RFC 8259 section 9): refusing to read it
    # (400 malformed_json) and reading it as a bad body (422 validation_error) both keep the
    # contract; any other code does not.
    depth = 20_000
    for flow in FLOWS:
        for text in (
            "[" * depth + "]" * depth,
            flow_json_with_amount("[" * depth + "1" + "]" * depth),
        ):
            response = await post_raw(client, f"{API}/wallet/{flow}", text)
            assert outcome(response) in {(400, "malformed_json"), (422, "validation_error")}, (
                describe(response)
            )


@pytest.mark.usefixtures("untouched")
async def test_lone_surrogates_are_refused_with_a_documented_code(
    client: httpx.AsyncClient,
) -> None:
    # "\ud800" is well-formed JSON escaping no Unicode character: not storable text.
    for flow in FLOWS:
        bodies = [
            flow_body(user_id="\ud800"),
            flow_body(asset="GOLD\udfff"),
            flow_body(key="k\ud800"),
            flow_body(**{FREE_TEXT_FIELD[flow]: {"k": "\ud800"} if flow == "topup" else "\ud800"}),
        ]
        for body in bodies:
            response = await post_raw(client, f"{API}/wallet/{flow}", json.dumps(body))
            assert outcome(response) in {(400, "malformed_json"), (422, "validation_error")}, (
                describe(response)
            )


async def test_nul_character_in_free_text_is_kept_or_refused_never_a_server_error(
    client: httpx.AsyncClient,
) -> None:
    # API.md limits free text only in length, so it is kept as sent; a service that cannot
    # store NUL may refuse it as a validation error instead.
    for flow in FLOWS:
        variants = (
            [{"a\u0000": "b"}, {"a": "b\u0000"}] if flow == "topup" else ["a\u0000b", "\u0000"]
        )
        for free_text in variants:
            body = flow_body(amount=1, **{FREE_TEXT_FIELD[flow]: free_text})
            response = await post_flow(client, flow, body)
            if response.status_code == 201:
                assert response.json()[FREE_TEXT_FIELD[flow]] == free_text
            else:
                assert_validation_error(response, FREE_TEXT_FIELD[flow])


async def test_nul_character_in_a_user_name_is_kept_or_refused_never_a_server_error(
    client: httpx.AsyncClient,
) -> None:
    for name in ("a\u0000b", "\u0000"):
        body = {"email": "nul@example.com", "name": name}
        response = await client.post(f"{API}/users", json=body)
        if response.status_code == 201:
            assert response.json()["name"] == name
        else:
            assert_validation_error(response, "name")


@pytest.mark.usefixtures("untouched")
async def test_nul_character_in_an_asset_symbol_is_unknown_or_invalid(
    client: httpx.AsyncClient,
) -> None:
    for flow in FLOWS:
        for symbol in ("GOLD_COINS\u0000", "\u0000"):
            response = await post_flow(client, flow, flow_body(asset=symbol))
            assert outcome(response) in {(404, "asset_not_found"), (422, "validation_error")}, (
                describe(response)
            )


async def test_nul_character_in_read_parameters_is_not_found_or_invalid(
    client: httpx.AsyncClient,
) -> None:
    answers = {
        f"{API}/wallet/balance/{ALICE}/GOLD%00": "asset_not_found",
        f"{API}/wallet/transactions/{ALICE}?assetSymbol=%00": "asset_not_found",
        f"{API}/wallet/ledger/{ALICE}?assetSymbol=GOLD%00": "asset_not_found",
        f"{API}/wallet/transactions/{ALICE}/%00": "transaction_not_found",
    }
    for path, not_found in answers.items():
        response = await client.get(path)
        assert outcome(response) in {(404, not_found), (422, "validation_error")}, describe(
            response
        )


@pytest.mark.usefixtures("untouched")
async def test_bad_metadata_is_a_validation_error(client: httpx.AsyncClient) -> None:
    bad: list[Any] = [
        [],
        ["a", "b"],
        "text",
        42,
        {"a": 1},
        {"a": None},
        {"a": True},
        {"a": {"b": "c"}},
        {"a": ["x"]},
        {"k": "x" * 5000},
        {"k": "é" * 2100},  # 2100 characters, but over 4 KiB in UTF-8
        {f"key-{i}": "value" for i in range(400)},
    ]
    for metadata in bad:
        response = await post_flow(client, "topup", flow_body(metadata=metadata))
        assert_validation_error(response, "metadata")


async def test_metadata_under_4_kib_is_kept_as_sent(client: httpx.AsyncClient) -> None:
    for metadata in ({}, {"k": "x" * 4000}, {f"key-{i}": "v" for i in range(100)}):
        body = flow_body(amount=1, metadata=metadata)
        response = await post_flow(client, "topup", body)
        assert response.status_code == 201, describe(response)
        assert response.json()["metadata"] == metadata


@pytest.mark.usefixtures("untouched")
async def test_free_text_over_500_characters_or_not_text_is_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    for flow in ("bonus", "spend"):
        field = FREE_TEXT_FIELD[flow]
        for text in ("x" * 501, "é" * 501, "x" * 10_000, 5, ["x"], {"a": "b"}, True):
            response = await post_flow(client, flow, flow_body(**{field: text}))
            assert_validation_error(response, field)


async def test_free_text_of_up_to_500_characters_is_kept_as_sent(
    client: httpx.AsyncClient,
) -> None:
    for flow in ("bonus", "spend"):
        field = FREE_TEXT_FIELD[flow]
        for text in ("x" * 500, "é" * 500, "", "😀 emoji and ünïcode"):
            body = flow_body(amount=1, **{field: text})
            response = await post_flow(client, flow, body)
            assert response.status_code == 201, describe(response)
            assert response.json()[field] == text


def _padded(body: dict[str, Any], size: int) -> bytes:
    """The JSON of `body` padded with spaces to exactly `size` bytes."""
    data = json.dumps(body).encode()
    return data + b" " * (size - len(data))


@pytest.mark.usefixtures("untouched")
async def test_body_over_64_kib_is_payload_too_large(client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        large = json.dumps(flow_body(**{FREE_TEXT_FIELD[flow]: SAMPLE_FREE_TEXT[flow]}))
        bodies = [
            _padded(flow_body(), MAX_BODY_BYTES + 1),
            large.encode() + b" " * 70_000,
            json.dumps(flow_body(**{FREE_TEXT_FIELD[flow]: "x" * 200_000})).encode(),
        ]
        for data in bodies:
            with_length = await post_raw(client, f"{API}/wallet/{flow}", data)
            assert_problem(with_length, 413, "payload_too_large")
            streamed = await post_raw(client, f"{API}/wallet/{flow}", chunked(data))
            assert_problem(streamed, 413, "payload_too_large")


async def test_body_of_exactly_64_kib_is_accepted(client: httpx.AsyncClient) -> None:
    body = flow_body(amount=3)

    with_length = await post_raw(client, f"{API}/wallet/topup", _padded(body, MAX_BODY_BYTES))
    streamed = await post_raw(client, f"{API}/wallet/topup", chunked(_padded(body, MAX_BODY_BYTES)))

    assert with_length.status_code == 201, describe(with_length)
    assert_transaction(
        with_length.json(),
        flow="topup",
        amount=3,
        balance_after=1003,
        key=body["idempotencyKey"],
        created_by=(await get_ok(client, f"{API}/keys"))["items"][0]["keyId"],  # the client's
    )
    assert streamed.status_code == 200, describe(streamed)
    assert streamed.json() == with_length.json()


async def test_new_user_body_over_64_kib_is_payload_too_large(client: httpx.AsyncClient) -> None:
    data = _padded({"email": "big@example.com", "name": "Big"}, MAX_BODY_BYTES + 1)

    assert_problem(await post_raw(client, f"{API}/users", data), 413, "payload_too_large")
    assert_problem(await post_raw(client, f"{API}/users", chunked(data)), 413, "payload_too_large")


POST_PATHS = [*(f"{API}/wallet/{flow}" for flow in FLOWS), f"{API}/users", f"{API}/assets"]
# A good body for each path that is not a flow: only the media type it is sent as is wrong.
GOOD_BODIES = {
    f"{API}/users": {"email": "m@example.com", "name": "M"},
    f"{API}/assets": {"symbol": "MEDIA", "name": "M"},
}


@pytest.mark.usefixtures("untouched")
async def test_body_that_is_not_application_json_is_unsupported_media_type(
    client: httpx.AsyncClient,
) -> None:
    for path in POST_PATHS:
        body = GOOD_BODIES.get(path) or flow_body()
        for media_type in OTHER_MEDIA_TYPES:
            response = await post_raw(client, path, json.dumps(body), content_type=media_type)
            assert_problem(response, 415, "unsupported_media_type")
        form = await client.post(path, data={"userId": ALICE, "amount": "10"})
        assert_problem(form, 415, "unsupported_media_type")
        files = await client.post(path, files={"file": ("body.json", b"{}", "application/json")})
        assert_problem(files, 415, "unsupported_media_type")
    assert len((await client.get(f"{API}/users")).json()["items"]) == 2
    assert "MEDIA" not in {asset["symbol"] for asset in await get_ok(client, f"{API}/assets")}


USER_PATHS = [
    f"{API}/users/{{user}}",
    f"{API}/wallet/balance/{{user}}/GOLD_COINS",
    f"{API}/wallet/balances/{{user}}",
    f"{API}/wallet/transactions/{{user}}",
    f"{API}/wallet/transactions/{{user}}/01a213ca-8d5a-70bd-b315-173b45df56e8",
    f"{API}/wallet/ledger/{{user}}",
]


async def test_malformed_user_id_in_the_path_is_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    for path in USER_PATHS:
        for user_id in ("x" * 10_000, "x" * 65, "has%20space", "%D0%BA%D0%BB%D1%8E%D1%87", "a!b"):
            assert_validation_error(await client.get(path.format(user=user_id)), "userId")


async def test_overlong_symbols_and_transaction_ids_in_reads_are_unknown_or_invalid(
    client: httpx.AsyncClient,
) -> None:
    # API.md gives symbols and transaction ids no length: 404 and 422 both keep the contract.
    answers = {
        f"{API}/wallet/balance/{ALICE}/{'A' * 10_000}": "asset_not_found",
        f"{API}/wallet/balance/{ALICE}/{'A' * 33}": "asset_not_found",
        f"{API}/wallet/transactions/{ALICE}?assetSymbol={'A' * 10_000}": "asset_not_found",
        f"{API}/wallet/ledger/{ALICE}?assetSymbol={'A' * 10_000}": "asset_not_found",
        f"{API}/wallet/transactions/{ALICE}/{'t' * 10_000}": "transaction_not_found",
        f"{API}/wallet/transactions/{ALICE}/{'t' * 65}": "transaction_not_found",
        f"{API}/reports/liabilities?assetSymbol={'A' * 10_000}": "asset_not_found",
        f"{API}/reports/liabilities?assetSymbol={'A' * 33}": "asset_not_found",
    }
    for path, not_found in answers.items():
        response = await client.get(path)
        assert outcome(response) in {(404, not_found), (422, "validation_error")}, describe(
            response
        )
    for symbol in ("A" * 10_000, "A" * 33):
        response = await client.patch(f"{API}/assets/{symbol}", json={"name": "N"})
        assert outcome(response) in {(404, "asset_not_found"), (422, "validation_error")}, describe(
            response
        )


async def test_empty_asset_filter_is_a_validation_error(client: httpx.AsyncClient) -> None:
    for path in (f"{API}/wallet/transactions/{ALICE}", f"{API}/wallet/ledger/{ALICE}"):
        assert_validation_error(await client.get(path, params={"assetSymbol": ""}), "assetSymbol")


async def test_a_method_a_route_does_not_have_is_405_naming_the_allowed_ones(
    client: httpx.AsyncClient,
) -> None:
    response = await client.delete(f"{API}/wallet/balances/{ALICE}")
    assert_problem(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


async def test_a_path_that_is_no_route_is_404_not_found(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get(f"{API}/nowhere"), 404, "not_found")
