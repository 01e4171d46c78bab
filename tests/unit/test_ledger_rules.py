"""The pure rules of wallet.domain.ledger: how a `Book` moves and reserves balances, which accounts
each flow and each refund moves money between, when a hold counts, what makes two requests the
same request, and the hash chain's links."""

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from wallet.domain import errors
from wallet.domain.ledger import (
    GENESIS_LINK,
    MAX_AMOUNT,
    MAX_BALANCE,
    MIN_BALANCE,
    AccountId,
    Action,
    BalanceKey,
    Book,
    Command,
    Direction,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Standing,
    SystemAccount,
    Transaction,
    TransactionId,
    UserId,
    flow_accounts,
    link,
    link_content,
    refund_accounts,
)

ALICE = UserId("alice")
BOB = UserId("bob")
GOLD = "GOLD_COINS"
TREASURY = AccountId(SystemAccount.TREASURY)
BONUS_POOL = AccountId(SystemAccount.BONUS_POOL)
REVENUE = AccountId(SystemAccount.REVENUE)
ALICE_GOLD: BalanceKey = (AccountId(ALICE), GOLD)
BOB_GOLD: BalanceKey = (AccountId(BOB), GOLD)

ACCOUNTS = {"alice": ALICE, "bob": BOB, "treasury": TREASURY, "bonus_pool": BONUS_POOL}
ACCOUNTS |= {"revenue": REVENUE}
MOVING_ACTIONS = (Action.TOPUP, Action.BONUS, Action.SPEND, Action.TRANSFER)


def balances(**by_account: int) -> dict[BalanceKey, int]:
    """GOLD balances of every account, by name (`alice`, `treasury`, ...); unnamed ones are 0.
    Like the posting engine's locked rows, every account a command may touch is present."""
    return {(AccountId(a), GOLD): by_account.get(name, 0) for name, a in ACCOUNTS.items()}


def book(*, alice_held: int = 0, alice_active: int | None = None, **by_account: int) -> Book:
    """A book of GOLD balances; Alice's holds sum to `alice_held`, of which `alice_active`
    (default: all) count now, the rest being past their expiry but not yet marked."""
    active = alice_held if alice_active is None else alice_active
    return Book(
        balances=balances(**by_account),
        held={ALICE_GOLD: alice_held},
        active_held={ALICE_GOLD: active},
        holds={},
        refunded={},
    )


def snapshot(state: Book) -> tuple[object, ...]:
    return (state.balances, state.held, state.active_held, state.holds, state.refunded)


def moving(action: Action, amount: int, state: Book) -> None:
    """Apply one flow of Alice's (a transfer goes to Bob) to `state`, as the engine does."""
    debited, credited = flow_accounts(action, ALICE, BOB if action is Action.TRANSFER else None)
    state.move(debited, credited, GOLD, amount)


# ---- which accounts a flow and a refund move money between ---------------------------------


@pytest.mark.parametrize(
    ("action", "debited", "credited"),
    [
        (Action.TOPUP, TREASURY, ALICE),
        (Action.BONUS, BONUS_POOL, ALICE),
        (Action.SPEND, ALICE, REVENUE),
        (Action.CAPTURE, ALICE, REVENUE),
        (Action.TRANSFER, ALICE, BOB),
    ],
)
def test_each_flow_debits_and_credits_its_own_accounts(
    action: Action, debited: AccountId, credited: AccountId
) -> None:
    assert flow_accounts(action, ALICE, BOB) == (debited, credited)


@pytest.mark.parametrize("action", [Action.TOPUP, Action.BONUS, Action.SPEND, Action.CAPTURE])
def test_a_flow_of_one_user_ignores_any_receiver(action: Action) -> None:
    assert flow_accounts(action, ALICE, None) == flow_accounts(action, ALICE, BOB)


@pytest.mark.parametrize(
    ("action", "to_user_id"),
    [
        (Action.TRANSFER, None),  # a transfer needs its receiver
        (Action.HOLD, None),
        (Action.RELEASE, None),
        (Action.REFUND, None),
        (Action.BATCH, None),
        (Action.HOLD, BOB),
    ],
)
def test_actions_that_move_no_money_by_themselves_have_no_accounts(
    action: Action, to_user_id: UserId | None
) -> None:
    with pytest.raises(ValueError, match="moves no money"):
        flow_accounts(action, ALICE, to_user_id)


def original(flow: Flow, *, user_id: UserId = ALICE, amount: int = 100) -> Transaction:
    return Transaction(
        id=TransactionId("tx-1"),
        flow=flow,
        user_id=user_id,
        asset_symbol=GOLD,
        amount=amount,
        balance_after=amount,
        idempotency_key="key-1",
        note=None,
        metadata=None,
        created_at=datetime(2026, 12, 2, tzinfo=UTC),
        to_user_id=BOB if flow is Flow.TRANSFER else None,
    )


@pytest.mark.parametrize(
    ("flow", "made", "debited", "credited"),
    [
        (Flow.SPEND, Flow.REFUND, REVENUE, ALICE),
        (Flow.TOPUP, Flow.REVERSAL, ALICE, TREASURY),
        (Flow.BONUS, Flow.REVERSAL, ALICE, BONUS_POOL),
    ],
)
def test_a_refund_swaps_the_accounts_of_its_original(
    flow: Flow, made: Flow, debited: AccountId, credited: AccountId
) -> None:
    assert refund_accounts(original(flow)) == (made, debited, credited)
    # The original's own accounts, the other way round.
    action = Action(flow)
    assert flow_accounts(action, ALICE, None) == (credited, debited)


@pytest.mark.parametrize("flow", [Flow.TRANSFER, Flow.REFUND, Flow.REVERSAL])
def test_transfers_refunds_and_reversals_are_not_refundable(flow: Flow) -> None:
    with pytest.raises(errors.NotRefundable) as raised:
        refund_accounts(original(flow))
    assert raised.value.code == "not_refundable"
    assert not raised.value.is_replay


# ---- Book.move -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "after"),
    [
        (Action.TOPUP, {"treasury": -130, "alice": 130}),
        (Action.BONUS, {"bonus_pool": -30, "alice": 130, "treasury": -100}),
        (Action.SPEND, {"alice": 70, "revenue": 30, "treasury": -100}),
        (Action.TRANSFER, {"alice": 70, "bob": 30, "treasury": -100}),
    ],
)
def test_move_takes_the_amount_from_the_debited_and_gives_it_to_the_credited(
    action: Action, after: dict[str, int]
) -> None:
    state = book(alice=100, treasury=-100)
    moving(action, 30, state)
    assert state.balances == balances(**after)


@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_a_debit_of_everything_available_leaves_zero(action: Action) -> None:
    state = book(alice=100, treasury=-100)
    moving(action, 100, state)
    assert state.balances[ALICE_GOLD] == 0
    assert state.available(ALICE_GOLD) == 0


@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_a_debit_beyond_the_balance_raises_insufficient_funds_and_changes_nothing(
    action: Action,
) -> None:
    state = book(alice=100, treasury=-100)
    before = snapshot(state.copy())
    with pytest.raises(errors.InsufficientFunds):
        moving(action, 101, state)
    assert snapshot(state) == before


@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_active_holds_are_not_available_to_a_debit(action: Action) -> None:
    state = book(alice=100, treasury=-100, alice_held=40)
    before = snapshot(state.copy())
    with pytest.raises(errors.InsufficientFunds, match="available GOLD_COINS is 60"):
        moving(action, 61, state)
    assert snapshot(state) == before
    moving(action, 60, state)
    assert state.balances[ALICE_GOLD] == 40
    assert state.available(ALICE_GOLD) == 0
    assert (state.held[ALICE_GOLD], state.active_held[ALICE_GOLD]) == (40, 40)


def test_holds_past_their_expiry_no_longer_count_against_a_debit() -> None:
    # 40 held, of which 30 expired but not yet marked: 90 of 100 are available.
    state = book(alice=100, treasury=-100, alice_held=40, alice_active=10)
    assert state.available(ALICE_GOLD) == 90
    with pytest.raises(errors.InsufficientFunds):
        moving(Action.SPEND, 91, state)
    moving(Action.SPEND, 90, state)
    assert state.balances[ALICE_GOLD] == 10


def test_credits_ignore_holds() -> None:
    state = book(alice=100, treasury=-100, alice_held=100)
    assert state.available(ALICE_GOLD) == 0
    moving(Action.TOPUP, 5, state)
    assert state.available(ALICE_GOLD) == 5


def test_a_balance_with_no_holds_is_all_available() -> None:
    state = Book(balances=balances(alice=7), held={}, active_held={}, holds={}, refunded={})
    assert state.available(ALICE_GOLD) == 7


@pytest.mark.parametrize("action", [Action.TOPUP, Action.BONUS])
def test_system_accounts_may_go_negative(action: Action) -> None:
    state = book()
    moving(action, 500, state)
    debited, _ = flow_accounts(action, ALICE, None)
    assert state.balances[(debited, GOLD)] == -500
    assert state.balances[ALICE_GOLD] == 500


def test_system_accounts_may_pay_back_more_than_they_hold() -> None:
    # A refund takes from revenue, which may be short of it: it issues credits as the others do.
    state = book(alice=0, revenue=10, treasury=-10)
    state.move(REVENUE, AccountId(ALICE), GOLD, 25)
    assert state.balances[(REVENUE, GOLD)] == -15
    assert state.balances[ALICE_GOLD] == 25


def test_a_credit_may_take_a_balance_exactly_to_the_64_bit_maximum() -> None:
    state = book(alice=MAX_BALANCE - 10, treasury=-(MAX_BALANCE - 10))
    moving(Action.TOPUP, 10, state)
    assert state.balances[ALICE_GOLD] == MAX_BALANCE


def test_a_debit_may_take_a_system_balance_exactly_to_the_64_bit_minimum() -> None:
    state = book(treasury=MIN_BALANCE + 10, bob=-(MIN_BALANCE + 10))
    moving(Action.TOPUP, 10, state)
    assert state.balances[(TREASURY, GOLD)] == MIN_BALANCE


@pytest.mark.parametrize(
    ("opening", "action"),
    [
        pytest.param(
            {"alice": MAX_BALANCE - 5, "treasury": -(MAX_BALANCE - 5)},
            Action.TOPUP,
            id="user-above-max",
        ),
        pytest.param(
            {"revenue": MAX_BALANCE - 5, "alice": 100, "treasury": -(MAX_BALANCE - 5) - 100},
            Action.SPEND,
            id="revenue-above-max",
        ),
        pytest.param(
            {"bob": MAX_BALANCE - 5, "alice": 100, "treasury": -(MAX_BALANCE - 5) - 100},
            Action.TRANSFER,
            id="receiver-above-max",
        ),
        pytest.param(
            {"treasury": MIN_BALANCE + 5, "bob": -(MIN_BALANCE + 5)},
            Action.TOPUP,
            id="treasury-below-min",
        ),
        pytest.param(
            {"bonus_pool": MIN_BALANCE + 5, "bob": -(MIN_BALANCE + 5)},
            Action.BONUS,
            id="bonus-pool-below-min",
        ),
    ],
)
def test_a_move_past_64_bits_raises_balance_limit_exceeded_and_changes_nothing(
    opening: dict[str, int], action: Action
) -> None:
    state = book(**opening)
    before = snapshot(state.copy())
    with pytest.raises(errors.BalanceLimitExceeded):
        moving(action, 10, state)
    assert snapshot(state) == before


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1])
@pytest.mark.parametrize("action", MOVING_ACTIONS)
def test_move_refuses_an_amount_outside_the_contract_and_changes_nothing(
    action: Action, amount: int
) -> None:
    state = book(alice=1000, treasury=-1000)
    before = snapshot(state.copy())
    with pytest.raises(errors.InvalidRequest) as raised:
        moving(action, amount, state)
    assert raised.value.field == "amount"
    assert snapshot(state) == before


# ---- Book.reserve and Book.end_hold --------------------------------------------------------


def test_reserve_counts_a_hold_against_the_available_balance_without_moving_money() -> None:
    state = book(alice=100, treasury=-100)
    state.reserve(ALICE_GOLD, 30)
    state.reserve(ALICE_GOLD, 70)
    assert state.balances == balances(alice=100, treasury=-100)
    assert (state.held[ALICE_GOLD], state.active_held[ALICE_GOLD]) == (100, 100)
    assert state.available(ALICE_GOLD) == 0


def test_reserve_beyond_the_available_balance_raises_insufficient_funds_and_changes_nothing() -> (
    None
):
    state = book(alice=100, treasury=-100, alice_held=30)
    before = snapshot(state.copy())
    with pytest.raises(errors.InsufficientFunds, match="available GOLD_COINS is 70"):
        state.reserve(ALICE_GOLD, 71)
    assert snapshot(state) == before


def test_reserve_may_use_what_expired_holds_no_longer_reserve() -> None:
    state = book(alice=100, treasury=-100, alice_held=80, alice_active=0)
    state.reserve(ALICE_GOLD, 100)
    assert (state.held[ALICE_GOLD], state.active_held[ALICE_GOLD]) == (180, 100)
    assert state.available(ALICE_GOLD) == 0


def test_reserve_of_a_balance_with_no_holds_starts_its_sums() -> None:
    state = Book(balances=balances(alice=10), held={}, active_held={}, holds={}, refunded={})
    state.reserve(ALICE_GOLD, 10)
    assert (state.held[ALICE_GOLD], state.active_held[ALICE_GOLD]) == (10, 10)


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1])
def test_reserve_refuses_an_amount_outside_the_contract_and_changes_nothing(amount: int) -> None:
    state = book(alice=1000, treasury=-1000)
    before = snapshot(state.copy())
    with pytest.raises(errors.InvalidRequest):
        state.reserve(ALICE_GOLD, amount)
    assert snapshot(state) == before


NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


def hold(amount: int = 40, *, status: HoldStatus = HoldStatus.HELD, expires_in_s: int = 60) -> Hold:
    return Hold(
        id="hold-1",
        user_id=ALICE,
        asset_symbol=GOLD,
        amount=amount,
        captured_amount=0,
        status=status,
        expires_at=NOW + timedelta(seconds=expires_in_s),
        created_at=NOW,
        ended_at=None if status is HoldStatus.HELD else NOW,
        description=None,
        created_by=None,
        idempotency_key="key-1",
    )


def test_end_hold_gives_back_what_the_hold_reserved() -> None:
    state = book(alice=100, treasury=-100)
    state.reserve(ALICE_GOLD, 40)
    state.reserve(ALICE_GOLD, 25)
    state.end_hold(hold(40))
    assert (state.held[ALICE_GOLD], state.active_held[ALICE_GOLD]) == (25, 25)
    assert state.available(ALICE_GOLD) == 75
    assert state.balances == balances(alice=100, treasury=-100)


def test_copy_is_independent_of_its_book() -> None:
    state = book(alice=100, treasury=-100)
    state.holds["hold-1"] = hold()
    state.refunded[TransactionId("tx-1")] = 5
    trial = state.copy()
    before = snapshot(state.copy())
    moving(Action.SPEND, 10, trial)
    trial.reserve(ALICE_GOLD, 10)
    trial.holds["hold-1"] = hold(status=HoldStatus.RELEASED)
    trial.refunded[TransactionId("tx-1")] = 50
    assert snapshot(state) == before
    assert snapshot(trial) != before


# ---- Hold.is_active and Hold.as_of ---------------------------------------------------------


def test_a_held_hold_counts_until_its_expiry_and_not_from_it() -> None:
    held = hold(expires_in_s=60)
    assert held.is_active(NOW)
    assert held.is_active(held.expires_at - timedelta(microseconds=1))
    assert not held.is_active(held.expires_at)
    assert not held.is_active(held.expires_at + timedelta(days=1))


def test_as_of_shows_a_held_hold_as_it_is_before_its_expiry() -> None:
    held = hold()
    assert held.as_of(held.expires_at - timedelta(microseconds=1)) is held


@pytest.mark.parametrize("after_s", [0, 1, 86_400])
def test_as_of_shows_a_hold_past_its_expiry_as_expired_at_its_expiry(after_s: int) -> None:
    held = hold()
    seen = held.as_of(held.expires_at + timedelta(seconds=after_s))
    assert seen == replace(held, status=HoldStatus.EXPIRED, ended_at=held.expires_at)
    assert not seen.is_active(NOW)


@pytest.mark.parametrize("status", [HoldStatus.CAPTURED, HoldStatus.RELEASED, HoldStatus.EXPIRED])
def test_an_ended_hold_never_counts_and_stays_as_it_ended(status: HoldStatus) -> None:
    ended = hold(status=status)
    for moment in (NOW, ended.expires_at, ended.expires_at + timedelta(days=1)):
        assert not ended.is_active(moment)
        assert ended.as_of(moment) is ended


@pytest.mark.parametrize("status", list(HoldStatus))
def test_as_created_is_the_hold_its_creation_answered_whatever_became_of_it(
    status: HoldStatus,
) -> None:
    placed = hold()
    since = replace(
        placed,
        status=status,
        captured_amount=25 if status is HoldStatus.CAPTURED else 0,
        ended_at=None if status is HoldStatus.HELD else NOW + timedelta(seconds=5),
    )
    assert since.as_created() == placed


def test_a_standing_makes_available_what_holds_do_not_reserve() -> None:
    assert Standing(asset_symbol=GOLD, balance=100, held=40).available == 60
    assert Standing(asset_symbol=GOLD, balance=0, held=0).available == 0


# ---- Command.fingerprint -------------------------------------------------------------------

BASE = Command(
    action=Action.TOPUP,
    user_id=ALICE,
    asset_symbol=GOLD,
    amount=100,
    idempotency_key="key-1",
    note=None,
    metadata={"order": "42", "channel": "store"},
)


@pytest.mark.parametrize(
    ("command", "digest"),
    [
        pytest.param(
            BASE, "0c9341da19c3f65bcbc01f8aaa9ba40ea1a921d30f8d98137e8cca8bf1fbfb47", id="topup"
        ),
        pytest.param(
            Command(
                action=Action.BONUS,
                user_id=ALICE,
                asset_symbol=GOLD,
                amount=25,
                idempotency_key="k",
                note="welcome",
            ),
            "3c9b466479e91ce025fac70e7db211c96b613a2c5bcdedcf046c2070768a755d",
            id="bonus",
        ),
        pytest.param(
            Command(
                action=Action.SPEND,
                user_id=BOB,
                asset_symbol="DIAMONDS",
                amount=7,
                idempotency_key="k",
                note="a sword",
            ),
            "05c57c39a9ccff245e28899f2509ea06b31168441ac92d9968f3e9ac85f0f8ff",
            id="spend",
        ),
    ],
)
def test_the_three_flows_keep_the_fingerprints_their_stored_keys_were_made_with(
    command: Command, digest: str
) -> None:
    # The digests of the implementation before holds, refunds and transfers (commit c2bf956's
    # `Command(flow=...)`): every stored key's fingerprint was made that way, and a retry of
    # such a request must still replay, not meet 409 idempotency_key_reused.
    assert command.fingerprint() == digest


TRANSFER = Command(
    action=Action.TRANSFER,
    user_id=ALICE,
    to_user_id=BOB,
    asset_symbol=GOLD,
    amount=10,
    idempotency_key="key-1",
)
HOLD = Command(
    action=Action.HOLD,
    user_id=ALICE,
    asset_symbol=GOLD,
    amount=10,
    expires_in_s=60,
    idempotency_key="key-1",
)
CAPTURE = Command(action=Action.CAPTURE, reference="hold-1", idempotency_key="key-1")
REFUND = Command(action=Action.REFUND, reference="tx-1", amount=5, idempotency_key="key-1")
BATCH = Command(
    action=Action.BATCH,
    idempotency_key="key-1",
    operations=(replace(BASE, idempotency_key=""), replace(TRANSFER, idempotency_key="")),
)


@pytest.mark.parametrize(
    ("command", "changed"),
    [
        pytest.param(BASE, {"action": Action.BONUS}, id="flow"),
        pytest.param(BASE, {"user_id": BOB}, id="user"),
        pytest.param(BASE, {"asset_symbol": "DIAMONDS"}, id="asset"),
        pytest.param(BASE, {"amount": 101}, id="amount"),
        pytest.param(BASE, {"note": "a gift"}, id="note"),
        pytest.param(BASE, {"note": ""}, id="empty-note"),
        pytest.param(BASE, {"metadata": {"order": "43", "channel": "store"}}, id="metadata-value"),
        pytest.param(BASE, {"metadata": {"order": "42"}}, id="metadata-key-missing"),
        pytest.param(BASE, {"metadata": None}, id="metadata-absent"),
        pytest.param(BASE, {"metadata": {}}, id="metadata-empty"),
        pytest.param(BASE, {"to_user_id": BOB}, id="new-field-to-user"),
        pytest.param(BASE, {"reference": "tx-1"}, id="new-field-reference"),
        pytest.param(BASE, {"expires_in_s": 900}, id="new-field-expiry"),
        pytest.param(BASE, {"operations": (BASE,)}, id="new-field-operations"),
        pytest.param(TRANSFER, {"to_user_id": UserId("carol")}, id="transfer-receiver"),
        pytest.param(TRANSFER, {"to_user_id": None}, id="transfer-without-receiver"),
        pytest.param(TRANSFER, {"action": Action.SPEND}, id="transfer-as-spend"),
        pytest.param(HOLD, {"expires_in_s": 61}, id="hold-expiry"),
        pytest.param(HOLD, {"expires_in_s": None}, id="hold-default-expiry"),
        pytest.param(HOLD, {"action": Action.SPEND}, id="hold-as-spend"),
        pytest.param(CAPTURE, {"reference": "hold-2"}, id="capture-hold"),
        pytest.param(CAPTURE, {"amount": 10}, id="capture-amount"),
        pytest.param(CAPTURE, {"action": Action.RELEASE}, id="capture-as-release"),
        pytest.param(CAPTURE, {"note": "x"}, id="capture-description"),
        pytest.param(REFUND, {"reference": "tx-2"}, id="refund-original"),
        pytest.param(REFUND, {"amount": None}, id="refund-default-amount"),
        pytest.param(REFUND, {"note": "sorry"}, id="refund-reason"),
        pytest.param(BATCH, {"operations": BATCH.operations[:1]}, id="batch-fewer"),
        pytest.param(BATCH, {"operations": BATCH.operations[::-1]}, id="batch-order"),
        pytest.param(
            BATCH,
            {"operations": (BATCH.operations[0], replace(BATCH.operations[1], amount=11))},
            id="batch-operation-amount",
        ),
        pytest.param(
            BATCH,
            {
                "operations": (
                    replace(BATCH.operations[0], action=Action.BONUS),
                    BATCH.operations[1],
                )
            },
            id="batch-operation-flow",
        ),
    ],
)
def test_fingerprint_differs_when_the_request_differs(
    command: Command, changed: dict[str, object]
) -> None:
    assert replace(command, **changed).fingerprint() != command.fingerprint()  # type: ignore[arg-type]


def test_a_flow_and_a_batch_of_that_one_flow_are_different_requests() -> None:
    batch = Command(action=Action.BATCH, idempotency_key="key-1", operations=(BASE,))
    assert batch.fingerprint() != BASE.fingerprint()


def test_fingerprint_is_equal_for_equal_requests() -> None:
    same = replace(BASE, metadata={"order": "42", "channel": "store"})
    assert same.fingerprint() == BASE.fingerprint()


def test_fingerprint_ignores_the_order_of_metadata_keys() -> None:
    reordered = replace(BASE, metadata={"channel": "store", "order": "42"})
    assert reordered.fingerprint() == BASE.fingerprint()


@pytest.mark.parametrize("command", [BASE, TRANSFER, HOLD, CAPTURE, REFUND, BATCH])
def test_fingerprint_ignores_the_idempotency_key_and_the_api_key(command: Command) -> None:
    assert replace(command, idempotency_key="key-2").fingerprint() == command.fingerprint()
    assert replace(command, created_by="api-key-2").fingerprint() == command.fingerprint()


def test_fingerprint_of_a_batch_ignores_what_the_engine_gives_its_operations() -> None:
    # Operations carry no key of their own (the engine makes `<key>:<i>`), nor the API key.
    given = tuple(
        replace(op, idempotency_key=f"key-1:{i}", created_by="api-key-1")
        for i, op in enumerate(BATCH.operations)
    )
    assert replace(BATCH, operations=given).fingerprint() == BATCH.fingerprint()


@pytest.mark.parametrize("command", [BASE, TRANSFER, HOLD, CAPTURE, REFUND, BATCH])
def test_fingerprint_fits_the_stored_column_of_64_characters(command: Command) -> None:
    assert len(command.fingerprint()) == 64
    assert set(command.fingerprint()) <= set("0123456789abcdef")


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.UnknownUser, "user_not_found"),
        (errors.UnknownAsset, "asset_not_found"),
        (errors.UnknownTransaction, "transaction_not_found"),
        (errors.UnknownHold, "hold_not_found"),
        (errors.UserExists, "user_exists"),
        (errors.IdempotencyKeyReused, "idempotency_key_reused"),
        (errors.InsufficientFunds, "insufficient_funds"),
        (errors.BalanceLimitExceeded, "balance_limit_exceeded"),
        (errors.HoldNotActive, "hold_not_active"),
        (errors.CaptureExceedsHold, "capture_exceeds_hold"),
        (errors.RefundExceedsOriginal, "refund_exceeds_original"),
        (errors.NotRefundable, "not_refundable"),
        (errors.DatabaseUnavailable, "database_unavailable"),
    ],
)
def test_each_error_carries_the_stable_code_of_the_api_contract(
    error: type[errors.WalletError], code: str
) -> None:
    assert error("detail").code == code
    assert error("detail").detail == "detail"
    assert error("detail").operation_index is None


def test_every_refusal_by_the_ledgers_state_can_be_stored_and_read_back_by_its_code() -> None:
    refusals = {
        errors.InsufficientFunds,
        errors.BalanceLimitExceeded,
        errors.HoldNotActive,
        errors.CaptureExceedsHold,
        errors.RefundExceedsOriginal,
        errors.NotRefundable,
    }
    assert set(errors.REFUSALS.values()) == refusals
    for code, refusal in errors.REFUSALS.items():
        assert refusal.code == code
        assert refusal("detail", is_replay=True).is_replay


# ---- the hash chain's links ----------------------------------------------------------------

CREATED_AT = datetime(2026, 12, 2, 10, 17, 0, 5, tzinfo=UTC)
TRANSACTION = Transaction(
    id=TransactionId("tx-1"),
    flow=Flow.TRANSFER,
    user_id=ALICE,
    asset_symbol=GOLD,
    amount=250,
    balance_after=750,
    idempotency_key="key-1",
    note="for the sword, ça va",
    metadata=None,
    created_at=CREATED_AT,
    created_by="api-key-1",
    to_user_id=BOB,
)
ENTRY = Entry(
    id="entry-1",
    transaction_id=TRANSACTION.id,
    account_id=AccountId(ALICE),
    asset_symbol=GOLD,
    direction=Direction.DEBIT,
    amount=250,
    balance_after=750,
    created_at=CREATED_AT,
)


def test_a_link_depends_only_on_what_it_digests() -> None:
    again = link(GENESIS_LINK, replace(ENTRY), replace(TRANSACTION))
    assert again == link(GENESIS_LINK, ENTRY, TRANSACTION)
    assert link_content(GENESIS_LINK, ENTRY, TRANSACTION) == link_content(
        GENESIS_LINK, ENTRY, TRANSACTION
    )
    # Not what the entry's own chain_hash says, nor what the view of the original has gained.
    assert link(GENESIS_LINK, replace(ENTRY, chain_hash="f" * 64), TRANSACTION) == again
    refunded = replace(TRANSACTION, refunded_amount=5, refunds=(TransactionId("tx-2"),))
    assert link(GENESIS_LINK, ENTRY, refunded) == again


def test_a_link_names_one_instant_whatever_the_zone_it_is_written_in() -> None:
    elsewhere = timezone(timedelta(hours=-5))
    moved = replace(ENTRY, created_at=CREATED_AT.astimezone(elsewhere))
    header = replace(TRANSACTION, created_at=CREATED_AT.astimezone(elsewhere))
    assert link(GENESIS_LINK, moved, header) == link(GENESIS_LINK, ENTRY, TRANSACTION)


def test_link_content_is_one_line_of_sorted_json_with_every_member() -> None:
    content = link_content(GENESIS_LINK, ENTRY, TRANSACTION)
    text = content.decode("utf-8")
    assert "\n" not in text
    assert " " not in text.replace("for the sword, ça va", "")
    assert "ça va" in text  # as itself, not \u escaped
    record = json.loads(text)
    assert json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) == text
    assert record["v"] == 2
    assert record["previous"] == GENESIS_LINK
    assert record["entry"]["createdAt"] == "2026-12-02T10:17:00.000005Z"
    assert record["transaction"]["toUserId"] == BOB
    assert record["transaction"]["holdId"] is None
    assert record["transaction"]["refundOf"] is None


@pytest.mark.parametrize(
    ("entry_change", "transaction_change"),
    [
        pytest.param({"id": "entry-2"}, {}, id="entry-id"),
        pytest.param({"account_id": AccountId(BOB)}, {}, id="entry-account"),
        pytest.param({"asset_symbol": "DIAMONDS"}, {}, id="entry-asset"),
        pytest.param({"direction": Direction.CREDIT}, {}, id="entry-direction"),
        pytest.param({"amount": 251}, {}, id="entry-amount"),
        pytest.param({"balance_after": 749}, {}, id="entry-balance-after"),
        pytest.param(
            {"created_at": CREATED_AT + timedelta(microseconds=1)}, {}, id="entry-created-at"
        ),
        pytest.param({}, {"id": TransactionId("tx-2")}, id="transaction-id"),
        pytest.param({}, {"flow": Flow.SPEND}, id="transaction-type"),
        pytest.param({}, {"user_id": UserId("carol")}, id="transaction-user"),
        pytest.param({}, {"to_user_id": UserId("carol")}, id="transaction-receiver"),
        pytest.param({}, {"asset_symbol": "DIAMONDS"}, id="transaction-asset"),
        pytest.param({}, {"amount": 251}, id="transaction-amount"),
        pytest.param({}, {"hold_id": "hold-1"}, id="transaction-hold"),
        pytest.param({}, {"refund_of": TransactionId("tx-0")}, id="transaction-refund-of"),
        pytest.param({}, {"idempotency_key": "key-2"}, id="transaction-key"),
        pytest.param({}, {"note": None}, id="transaction-note"),
        pytest.param({}, {"metadata": {}}, id="transaction-metadata"),
        pytest.param({}, {"created_by": None}, id="transaction-created-by"),
        pytest.param(
            {}, {"created_at": CREATED_AT + timedelta(microseconds=1)}, id="transaction-created-at"
        ),
    ],
)
def test_a_link_changes_with_anything_the_entry_or_its_transaction_states(
    entry_change: dict[str, object], transaction_change: dict[str, object]
) -> None:
    original_link = link(GENESIS_LINK, ENTRY, TRANSACTION)
    changed = link(
        GENESIS_LINK,
        replace(ENTRY, **entry_change),  # type: ignore[arg-type]
        replace(TRANSACTION, **transaction_change),  # type: ignore[arg-type]
    )
    assert changed != original_link


def test_a_link_follows_its_previous_link() -> None:
    first = link(GENESIS_LINK, ENTRY, TRANSACTION)
    second = link(first, ENTRY, TRANSACTION)
    assert second != first
    assert link("1" * 64, ENTRY, TRANSACTION) != first
    assert len(second) == 64
    assert set(second) <= set("0123456789abcdef")
