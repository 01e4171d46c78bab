"""The request schemas of the HTTP edge: what they let through to the service."""

from typing import Any

import pydantic
import pytest

from wallet.domain.ledger import MAX_AMOUNT
from wallet.http.schemas import (
    Amount,
    IdempotencyKey,
    NewUser,
    SpendRequest,
    TopupRequest,
)

amount = pydantic.TypeAdapter(Amount)
idempotency_key = pydantic.TypeAdapter(IdempotencyKey)


@pytest.mark.parametrize("value", [1, 2, 10**15])
def test_amount_accepts_integers_from_1_to_10_to_the_15(value: int) -> None:
    assert amount.validate_python(value) == value
    assert amount.validate_json(str(value)) == value


@pytest.mark.parametrize(
    "value",
    [1.5, 2.0, True, False, "10", 0, -1, MAX_AMOUNT + 1, None],
    ids=repr,
)
def test_amount_rejects_anything_but_an_integer_in_range(value: Any) -> None:
    with pytest.raises(pydantic.ValidationError):
        amount.validate_python(value)


@pytest.mark.parametrize("body", ["1.5", "2.0", "true", '"10"', "0", "-1", "1000000000000001"])
def test_amount_in_json_rejects_anything_but_an_integer_in_range(body: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        amount.validate_json(body)


@pytest.mark.parametrize("key", ["", "has space", "x" * 129, "semi;colon", "ключ"])
def test_idempotency_key_rejects_bad_characters_and_lengths(key: str) -> None:
    with pytest.raises(pydantic.ValidationError):
        idempotency_key.validate_python(key)


@pytest.mark.parametrize("key", ["a", "order-42:retry_1.x", "x" * 128])
def test_idempotency_key_accepts_1_to_128_allowed_characters(key: str) -> None:
    assert idempotency_key.validate_python(key) == key


def test_new_user_id_may_not_name_a_system_account() -> None:
    with pytest.raises(pydantic.ValidationError):
        NewUser(id="system:treasury", email="a@example.com", name="A")


def test_new_user_id_is_optional() -> None:
    assert NewUser(email="a@example.com", name="A").id is None


def test_flow_request_rejects_unknown_fields() -> None:
    body = {"userId": "u1", "assetSymbol": "GOLD_COINS", "amount": 1, "surprise": 1}
    with pytest.raises(pydantic.ValidationError):
        SpendRequest.model_validate(body)


def test_free_text_holds_at_most_500_characters() -> None:
    body = {"userId": "u1", "assetSymbol": "GOLD_COINS", "amount": 1}
    assert SpendRequest.model_validate(body | {"description": "d" * 500}).description
    with pytest.raises(pydantic.ValidationError):
        SpendRequest.model_validate(body | {"description": "d" * 501})


def test_topup_metadata_over_4_kib_is_rejected() -> None:
    body = {"userId": "u1", "assetSymbol": "GOLD_COINS", "amount": 1}
    assert TopupRequest.model_validate(body | {"metadata": {"k": "v" * 4000}}).metadata
    with pytest.raises(pydantic.ValidationError):
        TopupRequest.model_validate(body | {"metadata": {"k": "v" * 4100}})


def test_topup_metadata_values_must_be_strings() -> None:
    body = {"userId": "u1", "assetSymbol": "GOLD_COINS", "amount": 1}
    with pytest.raises(pydantic.ValidationError):
        TopupRequest.model_validate(body | {"metadata": {"k": 1}})
