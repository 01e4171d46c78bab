"""The pure rules of wallet.domain.ledger: how a command moves balances, and what makes two
requests the same request."""

from dataclasses import replace

import pytest

from wallet.domain import errors
from wallet.domain.ledger import (
    MAX_AMOUNT,
    MAX_BALANCE,
    MIN_BALANCE,
    AccountId,
    Command,
    Flow,
    SystemAccount,
    UserId,
    move,
)

ALICE = UserId("alice")
BOB = UserId("bob")
GOLD = "GOLD_COINS"
TREASURY = AccountId(SystemAccount.TREASURY)
BONUS_POOL = AccountId(SystemAccount.BONUS_POOL)
REVENUE = AccountId(SystemAccount.REVENUE)

Balances = dict[tuple[AccountId, str], int]


def command(flow: Flow, amount: int, *, user_id: UserId = ALICE, asset: str = GOLD) -> Command:
    return Command(
        flow=flow, user_id=user_id, asset_symbol=asset, amount=amount, idempotency_key="key-1"
    )


ACCOUNTS = {"alice": ALICE, "bob": BOB, "treasury": TREASURY, "bonus_pool": BONUS_POOL}
ACCOUNTS |= {"revenue": REVENUE}


def balances(**by_account: int) -> Balances:
    """GOLD balances of every account, by name (`alice`, `treasury`, ...); unnamed ones are 0.
    Like the posting engine's locked rows, every account a command may touch is present."""
    return {(AccountId(a), GOLD): by_account.get(name, 0) for name, a in ACCOUNTS.items()}


@pytest.mark.parametrize(
    ("flow", "debited", "credited"),
    [
        (Flow.TOPUP, TREASURY, ALICE),
        (Flow.BONUS, BONUS_POOL, ALICE),
        (Flow.SPEND, ALICE, REVENUE),
    ],
)
def test_each_flow_debits_and_credits_its_own_accounts(
    flow: Flow, debited: AccountId, credited: AccountId
) -> None:
    assert command(flow, 1).debited == debited
    assert command(flow, 1).credited == credited


@pytest.mark.parametrize(
    ("flow", "after"),
    [
        (Flow.TOPUP, {"treasury": -130, "alice": 130}),
        (Flow.BONUS, {"bonus_pool": -30, "alice": 130, "treasury": -100}),
        (Flow.SPEND, {"alice": 70, "revenue": 30, "treasury": -100}),
    ],
)
def test_move_takes_the_amount_from_the_debited_and_gives_it_to_the_credited(
    flow: Flow, after: dict[str, int]
) -> None:
    held = balances(alice=100, treasury=-100)
    move(held, command(flow, 30))
    assert held == balances(**after)


def test_spend_of_the_whole_balance_leaves_zero() -> None:
    held = balances(alice=100, treasury=-100)
    move(held, command(Flow.SPEND, 100))
    assert held == balances(alice=0, revenue=100, treasury=-100)


def test_spend_beyond_the_balance_raises_insufficient_funds_and_changes_nothing() -> None:
    held = balances(alice=100, treasury=-100)
    with pytest.raises(errors.InsufficientFunds):
        move(held, command(Flow.SPEND, 101))
    assert held == balances(alice=100, treasury=-100)


@pytest.mark.parametrize("flow", [Flow.TOPUP, Flow.BONUS])
def test_system_accounts_may_go_negative(flow: Flow) -> None:
    held = balances()
    move(held, command(flow, 500))
    assert held[(command(flow, 500).debited, GOLD)] == -500
    assert held[(ALICE, GOLD)] == 500


def test_a_credit_may_take_a_balance_exactly_to_the_64_bit_maximum() -> None:
    held = balances(alice=MAX_BALANCE - 10, treasury=-(MAX_BALANCE - 10))
    move(held, command(Flow.TOPUP, 10))
    assert held[(ALICE, GOLD)] == MAX_BALANCE


def test_a_debit_may_take_a_system_balance_exactly_to_the_64_bit_minimum() -> None:
    held = balances(treasury=MIN_BALANCE + 10, bob=-(MIN_BALANCE + 10))
    move(held, command(Flow.TOPUP, 10))
    assert held[(TREASURY, GOLD)] == MIN_BALANCE


@pytest.mark.parametrize(
    ("opening", "flow"),
    [
        pytest.param(
            {"alice": MAX_BALANCE - 5, "treasury": -(MAX_BALANCE - 5)},
            Flow.TOPUP,
            id="user-above-max",
        ),
        pytest.param(
            {"revenue": MAX_BALANCE - 5, "alice": 100, "treasury": -(MAX_BALANCE - 5) - 100},
            Flow.SPEND,
            id="revenue-above-max",
        ),
        pytest.param(
            {"treasury": MIN_BALANCE + 5, "bob": -(MIN_BALANCE + 5)},
            Flow.TOPUP,
            id="treasury-below-min",
        ),
        pytest.param(
            {"bonus_pool": MIN_BALANCE + 5, "bob": -(MIN_BALANCE + 5)},
            Flow.BONUS,
            id="bonus-pool-below-min",
        ),
    ],
)
def test_a_move_past_64_bits_raises_balance_limit_exceeded_and_changes_nothing(
    opening: dict[str, int], flow: Flow
) -> None:
    held = balances(**opening)
    with pytest.raises(errors.BalanceLimitExceeded):
        move(held, command(flow, 10))
    assert held == balances(**opening)


BASE = Command(
    flow=Flow.TOPUP,
    user_id=ALICE,
    asset_symbol=GOLD,
    amount=100,
    idempotency_key="key-1",
    note=None,
    metadata={"order": "42", "channel": "store"},
)


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"flow": Flow.BONUS}, id="flow"),
        pytest.param({"user_id": BOB}, id="user"),
        pytest.param({"asset_symbol": "DIAMONDS"}, id="asset"),
        pytest.param({"amount": 101}, id="amount"),
        pytest.param({"note": "a gift"}, id="note"),
        pytest.param({"note": ""}, id="empty-note"),
        pytest.param({"metadata": {"order": "43", "channel": "store"}}, id="metadata-value"),
        pytest.param({"metadata": {"order": "42"}}, id="metadata-key-missing"),
        pytest.param({"metadata": None}, id="metadata-absent"),
        pytest.param({"metadata": {}}, id="metadata-empty"),
    ],
)
def test_fingerprint_differs_when_the_request_differs(changed: dict[str, object]) -> None:
    assert replace(BASE, **changed).fingerprint() != BASE.fingerprint()  # type: ignore[arg-type]


def test_fingerprint_is_equal_for_equal_requests() -> None:
    same = replace(BASE, metadata={"order": "42", "channel": "store"})
    assert same.fingerprint() == BASE.fingerprint()


def test_fingerprint_ignores_the_order_of_metadata_keys() -> None:
    reordered = replace(BASE, metadata={"channel": "store", "order": "42"})
    assert reordered.fingerprint() == BASE.fingerprint()


def test_fingerprint_ignores_the_idempotency_key_itself() -> None:
    assert replace(BASE, idempotency_key="key-2").fingerprint() == BASE.fingerprint()


def test_fingerprint_fits_the_stored_column_of_64_characters() -> None:
    assert len(BASE.fingerprint()) == 64


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.UnknownUser, "user_not_found"),
        (errors.UnknownAsset, "asset_not_found"),
        (errors.UnknownTransaction, "transaction_not_found"),
        (errors.UserExists, "user_exists"),
        (errors.IdempotencyKeyReused, "idempotency_key_reused"),
        (errors.InsufficientFunds, "insufficient_funds"),
        (errors.BalanceLimitExceeded, "balance_limit_exceeded"),
        (errors.DatabaseUnavailable, "database_unavailable"),
    ],
)
def test_each_error_carries_the_stable_code_of_the_api_contract(
    error: type[errors.WalletError], code: str
) -> None:
    assert error("detail").code == code
    assert error("detail").detail == "detail"


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1])
@pytest.mark.parametrize("flow", list(Flow))
def test_move_refuses_an_amount_outside_the_contract_and_changes_nothing(
    flow: Flow, amount: int
) -> None:
    before = balances(alice=1000)
    after = dict(before)
    with pytest.raises(errors.InvalidRequest):
        move(after, command(flow, amount))
    assert after == before
