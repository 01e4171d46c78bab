"""The request schemas of the HTTP edge: what they let through to the service."""

from typing import Any

import pydantic
import pytest

from wallet.domain.ledger import MAX_AMOUNT
from wallet.http.schemas import (
    Amount,
    AssetChange,
    BatchRequest,
    BonusRequest,
    IdempotencyKey,
    NewAsset,
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


BONUS = {"userId": "u1", "assetSymbol": "GOLD_COINS", "amount": 1}


@pytest.mark.parametrize("days", [1, 3650])
def test_a_bonus_may_give_its_credits_a_lifetime_of_1_to_3650_days(days: int) -> None:
    assert BonusRequest.model_validate(BONUS | {"expiresInDays": days}).expiresInDays == days


@pytest.mark.parametrize("days", [0, 3651, 1.5, "30", True])
def test_a_bonus_refuses_any_other_lifetime(days: Any) -> None:
    with pytest.raises(pydantic.ValidationError):
        BonusRequest.model_validate(BONUS | {"expiresInDays": days})


def test_a_bonus_may_give_its_credits_a_moment_of_expiry() -> None:
    bonus = BonusRequest.model_validate(BONUS | {"expiresAt": "2030-01-01T00:00:00Z"})
    assert bonus.expiresAt is not None
    assert bonus.expiresAt.isoformat() == "2030-01-01T00:00:00+00:00"


def test_a_bonus_names_a_lifetime_or_a_moment_of_expiry_not_both() -> None:
    both = BONUS | {"expiresInDays": 30, "expiresAt": "2030-01-01T00:00:00Z"}
    with pytest.raises(pydantic.ValidationError, match="not both"):
        BonusRequest.model_validate(both)
    batch = {"operations": [{"type": "bonus", **both}]}
    with pytest.raises(pydantic.ValidationError, match="not both"):
        BatchRequest.model_validate(batch)


def test_a_new_asset_spends_free_credits_first_and_never_expires_them_by_default() -> None:
    asset = NewAsset.model_validate({"symbol": "STARS.v2:x-1", "name": "Stars"})
    assert (asset.description, asset.spendOrder) == ("", "free_first")
    assert (asset.freeLifetimeDays, asset.paidLifetimeDays) == (None, None)


@pytest.mark.parametrize(
    "change",
    [
        {"symbol": ""},
        {"symbol": "x" * 33},
        {"symbol": "has space"},
        {"symbol": "ключ"},
        {"name": ""},
        {"name": "n" * 101},
        {"description": "d" * 501},
        {"spendOrder": "newest_first"},
        {"freeLifetimeDays": 0},
        {"paidLifetimeDays": 3651},
        {"surprise": 1},
    ],
    ids=repr,
)
def test_a_new_asset_refuses_fields_outside_the_contract(change: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        NewAsset.model_validate({"symbol": "STARS", "name": "Stars"} | change)


def test_an_asset_change_tells_a_lifetime_set_to_null_from_one_left_out() -> None:
    change = AssetChange.model_validate({"freeLifetimeDays": None})
    assert change.model_fields_set == {"freeLifetimeDays"}
    assert AssetChange.model_validate({}).model_fields_set == set()
