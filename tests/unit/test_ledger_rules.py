"""The pure rules of wallet.domain.ledger: how a `Book` moves and reserves balances by kind (paid
and free) in the asset's spend order and through lots of expiring credits, which credits a refund
gives back, which accounts each flow and each refund moves money between, when a hold counts,
what makes two requests the same request, and the hash chain's links."""

import json
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from wallet.domain import errors
from wallet.domain.ledger import (
    GENESIS_LINK,
    MAX_AMOUNT,
    MAX_BALANCE,
    MIN_BALANCE,
    AccountId,
    Action,
    Asset,
    BalanceKey,
    Book,
    Command,
    Direction,
    Entry,
    Flow,
    Hold,
    HoldStatus,
    Kind,
    Leg,
    LotKey,
    Portion,
    SpendOrder,
    Standing,
    SystemAccount,
    SystemRowFull,
    Transaction,
    TransactionId,
    UserId,
    check_amount,
    expiry_account,
    flow_accounts,
    link,
    link_content,
    lot_expiry,
    refund_accounts,
    returned,
    standing,
    taken_portions,
    unprotected,
)

ALICE = UserId("alice")
BOB = UserId("bob")
GOLD = "GOLD_COINS"
TREASURY = AccountId(SystemAccount.TREASURY)
BONUS_POOL = AccountId(SystemAccount.BONUS_POOL)
REVENUE = AccountId(SystemAccount.REVENUE)
ALICE_GOLD: BalanceKey = (AccountId(ALICE), GOLD)
BOB_GOLD: BalanceKey = (AccountId(BOB), GOLD)
FREE, PAID = Kind.FREE, Kind.PAID
FREE_FIRST, PAID_FIRST = SpendOrder.FREE_FIRST, SpendOrder.PAID_FIRST

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
GONE = NOW - timedelta(seconds=1)  # a lot's expiry that has passed
SOON = NOW + timedelta(days=1)
LATER = NOW + timedelta(days=30)

ACCOUNTS = {"alice": ALICE, "bob": BOB, "treasury": TREASURY, "bonus_pool": BONUS_POOL}
ACCOUNTS |= {"revenue": REVENUE}
MOVING_ACTIONS = (Action.TOPUP, Action.BONUS, Action.SPEND, Action.TRANSFER)


def balances(**by_account: int) -> dict[BalanceKey, int]:
    """GOLD balances (or paid parts) of every account, by name (`alice`, `treasury`, ...); unnamed
    ones are 0. Like the posting engine's locked rows, every account a command may touch is
    present."""
    return {(AccountId(a), GOLD): by_account.get(name, 0) for name, a in ACCOUNTS.items()}


def book(
    *,
    free: Mapping[str, int] | None = None,
    alice_held: int = 0,
    alice_active: Mapping[Kind, int] | None = None,
    alice_lots: Mapping[LotKey, int] | None = None,
    **paid: int,
) -> Book:
    """A book of GOLD balances, by account name: the paid credits given as keywords, plus the
    `free` ones. Alice's holds sum to `alice_held`, of which those that count now reserve
    `alice_active` of each kind (default: all of it, of paid credits; the rest being past their
    expiry but not yet marked); her credits that can expire sit in `alice_lots`."""
    free = free or {}
    active = {PAID: alice_held} if alice_active is None else dict(alice_active)
    return Book(
        balances=balances(**{name: paid.get(name, 0) + free.get(name, 0) for name in ACCOUNTS}),
        paid=balances(**paid),
        held={ALICE_GOLD: alice_held},
        active_held={ALICE_GOLD: active},
        lots={ALICE_GOLD: dict(alice_lots or {})},
        holds={},
        refunded={},
    )


def alice_with(*, paid: int, free: int, **more: Any) -> Book:
    """A book where Alice has `paid` credits from the treasury and `free` ones from the pool."""
    return book(alice=paid, treasury=-paid, free={"alice": free, "bonus_pool": -free}, **more)


def reserved(state: Book) -> dict[Kind, int]:
    """What the holds that count now reserve of each kind of Alice's balance."""
    return {kind: state.active_held.get(ALICE_GOLD, {}).get(kind, 0) for kind in Kind}


def available(state: Book) -> dict[Kind, int]:
    """What Alice has available of each kind at NOW."""
    return {kind: state.available(ALICE_GOLD, kind, NOW) for kind in Kind}


def moving(
    action: Action,
    amount: int,
    state: Book,
    *,
    order: SpendOrder = FREE_FIRST,
    expires_at: datetime | None = None,
) -> list[Leg]:
    """Apply one flow of Alice's (a transfer goes to Bob) to `state` at NOW, as the engine does: a
    top-up or bonus gives credits of its kind (in a lot when they expire), a spend or transfer
    takes what is available in the spend order; one leg per kind."""
    debited, credited = flow_accounts(action, ALICE, BOB if action is Action.TRANSFER else None)
    if action in (Action.TOPUP, Action.BONUS):
        portions = [Portion(PAID if action is Action.TOPUP else FREE, expires_at, amount)]
    else:
        portions = state.plan_in_order((debited, GOLD), amount, order, NOW)
    kinds = dict.fromkeys(p.kind for p in portions)
    legs = [(debited, credited, [p for p in portions if p.kind is kind]) for kind in kinds]
    return state.move(GOLD, legs)


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
        (Action.EXPIRE, None),
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
        paid_amount=amount if flow is Flow.TOPUP else 0,
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


@pytest.mark.parametrize("flow", [Flow.TRANSFER, Flow.REFUND, Flow.REVERSAL, Flow.EXPIRY])
def test_transfers_refunds_reversals_and_expiries_are_not_refundable(flow: Flow) -> None:
    with pytest.raises(errors.NotRefundable) as raised:
        refund_accounts(original(flow))
    assert raised.value.code == "not_refundable"
    assert not raised.value.is_replay


def test_expired_free_credits_go_back_to_the_bonus_pool_and_paid_ones_to_revenue() -> None:
    assert expiry_account(FREE) == BONUS_POOL
    assert expiry_account(PAID) == REVENUE


def test_a_transactions_free_amount_is_what_is_not_paid() -> None:
    spend = replace(original(Flow.SPEND, amount=100), paid_amount=70)
    assert (spend.paid_amount, spend.free_amount) == (70, 30)


# ---- Book.move -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "after", "paid_after"),
    [
        (
            Action.TOPUP,
            {"treasury": -130, "alice": 130},
            {"treasury": -130, "alice": 130},
        ),
        (
            Action.BONUS,
            {"bonus_pool": -30, "alice": 130, "treasury": -100},
            {"alice": 100, "treasury": -100},
        ),
        (
            Action.SPEND,
            {"alice": 70, "revenue": 30, "treasury": -100},
            {"alice": 70, "revenue": 30, "treasury": -100},
        ),
        (
            Action.TRANSFER,
            {"alice": 70, "bob": 30, "treasury": -100},
            {"alice": 70, "bob": 30, "treasury": -100},
        ),
    ],
)
def test_move_takes_the_amount_from_the_debited_and_gives_it_to_the_credited(
    action: Action, after: dict[str, int], paid_after: dict[str, int]
) -> None:
    state = book(alice=100, treasury=-100)
    moving(action, 30, state)
    assert state.balances == balances(**after)
    assert state.paid == balances(**paid_after)


def test_a_move_of_two_kinds_has_a_debit_and_a_credit_per_kind_first_kind_first() -> None:
    state = alice_with(paid=60, free=40)
    legs = moving(Action.SPEND, 50, state)
    assert legs == [
        Leg(AccountId(ALICE), Direction.DEBIT, FREE, 40, balance_after=60, paid_after=60),
        Leg(REVENUE, Direction.CREDIT, FREE, 40, balance_after=40, paid_after=0),
        Leg(AccountId(ALICE), Direction.DEBIT, PAID, 10, balance_after=50, paid_after=50),
        Leg(REVENUE, Direction.CREDIT, PAID, 10, balance_after=50, paid_after=10),
    ]
    assert (state.balances[ALICE_GOLD], state.paid[ALICE_GOLD]) == (50, 50)


@pytest.mark.parametrize(
    ("order", "taken"),
    [
        (FREE_FIRST, {FREE: 40, PAID: 10}),
        (PAID_FIRST, {PAID: 50}),
    ],
)
@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_a_debit_takes_the_first_kind_of_the_spend_order_before_the_second(
    action: Action, order: SpendOrder, taken: dict[Kind, int]
) -> None:
    state = alice_with(paid=60, free=40)
    legs = moving(action, 50, state, order=order)
    debits = {leg.kind: leg.amount for leg in legs if leg.direction is Direction.DEBIT}
    credits = {leg.kind: leg.amount for leg in legs if leg.direction is Direction.CREDIT}
    assert list(debits.items()) == list(taken.items())  # in the spend order
    assert credits == debits  # the receiver gets the kinds the sender gave up
    assert state.paid[ALICE_GOLD] == 60 - taken[PAID]
    assert state.balances[ALICE_GOLD] - state.paid[ALICE_GOLD] == 40 - taken.get(FREE, 0)


@pytest.mark.parametrize("order", list(SpendOrder))
def test_per_kind_every_balance_of_the_asset_sums_to_zero_after_each_flow(
    order: SpendOrder,
) -> None:
    state = alice_with(paid=60, free=40)
    for action, amount in [
        (Action.SPEND, 50),
        (Action.BONUS, 25),
        (Action.TRANSFER, 45),
        (Action.TOPUP, 5),
        (Action.SPEND, 30),
    ]:
        moving(action, amount, state, order=order)
        assert sum(state.balances.values()) == 0
        assert sum(state.paid.values()) == 0


@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_a_debit_of_everything_available_leaves_zero(action: Action) -> None:
    state = alice_with(paid=60, free=40)
    moving(action, 100, state)
    assert (state.balances[ALICE_GOLD], state.paid[ALICE_GOLD]) == (0, 0)
    assert available(state) == {FREE: 0, PAID: 0}


@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_a_debit_beyond_the_balance_raises_insufficient_funds_and_changes_nothing(
    action: Action,
) -> None:
    state = alice_with(paid=60, free=40)
    before = state.copy()
    with pytest.raises(errors.InsufficientFunds, match="available GOLD_COINS is 100"):
        moving(action, 101, state)
    assert state == before


@pytest.mark.parametrize("action", [Action.SPEND, Action.TRANSFER])
def test_active_holds_are_not_available_to_a_debit(action: Action) -> None:
    state = book(alice=100, treasury=-100, alice_held=40)
    before = state.copy()
    with pytest.raises(errors.InsufficientFunds, match="available GOLD_COINS is 60"):
        moving(action, 61, state)
    assert state == before
    moving(action, 60, state)
    assert state.balances[ALICE_GOLD] == 40
    assert state.available(ALICE_GOLD, PAID, NOW) == 0
    assert (state.held[ALICE_GOLD], reserved(state)) == (40, {FREE: 0, PAID: 40})


def test_a_hold_of_one_kind_leaves_the_other_kind_to_a_debit() -> None:
    # 40 free credits reserved: a spend, free first, can only take paid ones.
    state = alice_with(paid=60, free=40, alice_held=40, alice_active={FREE: 40})
    legs = moving(Action.SPEND, 60, state)
    assert [(leg.kind, leg.amount) for leg in legs] == [(PAID, 60), (PAID, 60)]
    assert (state.balances[ALICE_GOLD], state.paid[ALICE_GOLD]) == (40, 0)


def test_holds_past_their_expiry_no_longer_count_against_a_debit() -> None:
    # 40 held, of which 30 expired but not yet marked: 90 of 100 are available.
    state = book(alice=100, treasury=-100, alice_held=40, alice_active={PAID: 10})
    assert state.available(ALICE_GOLD, PAID, NOW) == 90
    with pytest.raises(errors.InsufficientFunds):
        moving(Action.SPEND, 91, state)
    moving(Action.SPEND, 90, state)
    assert state.balances[ALICE_GOLD] == 10


def test_credits_ignore_holds() -> None:
    state = book(alice=100, treasury=-100, alice_held=100)
    assert state.available(ALICE_GOLD, PAID, NOW) == 0
    moving(Action.TOPUP, 5, state)
    assert state.available(ALICE_GOLD, PAID, NOW) == 5


def test_a_balance_with_no_holds_and_no_lots_is_all_available() -> None:
    state = Book(
        balances=balances(alice=7),
        paid=balances(alice=3),
        held={},
        active_held={},
        lots={},
        holds={},
        refunded={},
    )
    assert state.available(ALICE_GOLD, PAID, NOW) == 3
    assert state.available(ALICE_GOLD, FREE, NOW) == 4
    assert state.expiring(ALICE_GOLD) == 0


@pytest.mark.parametrize(("action", "kind"), [(Action.TOPUP, PAID), (Action.BONUS, FREE)])
def test_system_accounts_may_go_negative_in_the_kind_they_issue(action: Action, kind: Kind) -> None:
    state = book()
    moving(action, 500, state)
    debited, _ = flow_accounts(action, ALICE, None)
    assert state.balances[(debited, GOLD)] == -500
    assert state.balances[ALICE_GOLD] == 500
    assert state.sub_balance((debited, GOLD), kind) == -500
    assert state.sub_balance(ALICE_GOLD, kind) == 500


def test_system_accounts_may_pay_back_more_than_they_hold() -> None:
    # A refund takes from revenue, which may be short of it: it issues credits as the others do.
    state = book(alice=0, revenue=10, treasury=-10)
    state.move(GOLD, [(REVENUE, AccountId(ALICE), [Portion(PAID, None, 25)])])
    assert (state.balances[(REVENUE, GOLD)], state.paid[(REVENUE, GOLD)]) == (-15, -15)
    assert (state.balances[ALICE_GOLD], state.paid[ALICE_GOLD]) == (25, 25)


def test_a_credit_may_take_a_balance_exactly_to_the_64_bit_maximum() -> None:
    state = book(alice=MAX_BALANCE - 10, treasury=-(MAX_BALANCE - 10))
    moving(Action.TOPUP, 10, state)
    assert state.balances[ALICE_GOLD] == MAX_BALANCE


def test_a_debit_may_take_a_system_balance_exactly_to_the_64_bit_minimum() -> None:
    state = book(treasury=MIN_BALANCE + 10, bob=-(MIN_BALANCE + 10))
    moving(Action.TOPUP, 10, state)
    assert state.balances[(TREASURY, GOLD)] == MIN_BALANCE


@pytest.mark.parametrize(
    ("opening", "action", "full_row"),
    [
        pytest.param(
            # Another row of the treasury's balance holds the rest: this one has room.
            {"alice": MAX_BALANCE - 5, "treasury": -100},
            Action.TOPUP,
            None,
            id="user-above-max",
        ),
        pytest.param(
            {"revenue": MAX_BALANCE - 5, "alice": 100, "treasury": -(MAX_BALANCE - 5) - 100},
            Action.SPEND,
            REVENUE,
            id="revenue-above-max",
        ),
        pytest.param(
            {"bob": MAX_BALANCE - 5, "alice": 100, "treasury": -(MAX_BALANCE - 5) - 100},
            Action.TRANSFER,
            None,
            id="receiver-above-max",
        ),
        pytest.param(
            {"treasury": MIN_BALANCE + 5, "bob": -(MIN_BALANCE + 5)},
            Action.TOPUP,
            TREASURY,
            id="treasury-below-min",
        ),
        pytest.param(
            {"free": {"bonus_pool": MIN_BALANCE + 5, "bob": -(MIN_BALANCE + 5)}},
            Action.BONUS,
            AccountId(SystemAccount.BONUS_POOL),
            id="bonus-pool-below-min",
        ),
        pytest.param(
            # Revenue's balance has room, its paid part not: free credits it lost to refunds.
            {
                "revenue": MAX_BALANCE - 5,
                "alice": 100,
                "treasury": -(MAX_BALANCE - 5) - 100,
                "free": {"revenue": -1000, "bob": 1000},
            },
            Action.SPEND,
            REVENUE,
            id="revenue-paid-part-above-max",
        ),
    ],
)
def test_a_move_past_64_bits_is_refused_for_a_user_and_full_for_a_system_row(
    opening: dict[str, Any], action: Action, full_row: AccountId | None
) -> None:
    """A user's balance past 64 bits refuses the request (balance_limit_exceeded); a system
    account's row is full instead, and the batch moves on to another row of it. Neither
    changes anything."""
    state = book(**opening, alice_lots={(PAID, SOON): 100} if "alice" in opening else None)
    before = state.copy()
    if full_row is None:
        with pytest.raises(errors.BalanceLimitExceeded):
            moving(action, 10, state, expires_at=SOON)
    else:
        with pytest.raises(SystemRowFull) as full:
            moving(action, 10, state, expires_at=SOON)
        assert full.value.key == (full_row, GOLD)
    assert state == before


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1])
@pytest.mark.parametrize("order", list(SpendOrder))
def test_a_debit_of_an_amount_outside_the_contract_is_refused_and_changes_nothing(
    order: SpendOrder, amount: int
) -> None:
    state = alice_with(paid=1000, free=1000)
    before = state.copy()
    with pytest.raises(errors.InvalidRequest) as raised:
        state.plan_in_order(ALICE_GOLD, amount, order, NOW)
    assert raised.value.field == "amount"
    assert state == before


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1])
def test_a_grant_of_an_amount_outside_the_contract_is_refused(amount: int) -> None:
    # A top-up's or bonus's amount, checked before its credits are moved.
    with pytest.raises(errors.InvalidRequest) as raised:
        check_amount(amount)
    assert raised.value.field == "amount"


# ---- lots: credits that expire -------------------------------------------------------------


def test_a_grant_that_expires_puts_its_credits_in_a_lot_of_its_kind() -> None:
    state = book()
    moving(Action.BONUS, 30, state, expires_at=SOON)
    moving(Action.BONUS, 20, state, expires_at=SOON)
    moving(Action.TOPUP, 5, state, expires_at=LATER)
    moving(Action.TOPUP, 7, state)  # never expires: no lot
    assert state.lots[ALICE_GOLD] == {(FREE, SOON): 50, (PAID, LATER): 5}
    assert state.expiring(ALICE_GOLD) == 55
    assert state.changed_lots == {(ALICE_GOLD, (FREE, SOON)), (ALICE_GOLD, (PAID, LATER))}


def test_a_debit_takes_the_lots_expiring_soonest_first_then_credits_that_never_expire() -> None:
    lots = {(FREE, LATER): 10, (FREE, SOON): 5, (PAID, NOW + timedelta(hours=1)): 7}
    state = alice_with(paid=7, free=25, alice_lots=lots)
    assert state.plan(ALICE_GOLD, FREE, 20, NOW) == [
        Portion(FREE, SOON, 5),
        Portion(FREE, LATER, 10),
        Portion(FREE, None, 5),
    ]
    moving(Action.SPEND, 12, state)
    assert state.lots[ALICE_GOLD] == {
        (FREE, LATER): 3,
        (FREE, SOON): 0,
        (PAID, NOW + timedelta(hours=1)): 7,
    }


def test_a_plan_covered_by_lots_takes_nothing_that_never_expires() -> None:
    state = alice_with(paid=0, free=25, alice_lots={(FREE, SOON): 5, (FREE, LATER): 10})
    assert state.plan(ALICE_GOLD, FREE, 8, NOW) == [Portion(FREE, SOON, 5), Portion(FREE, LATER, 3)]


def test_a_transfer_gives_the_receiver_lot_credits_with_their_expiry() -> None:
    state = alice_with(paid=10, free=30, alice_lots={(FREE, SOON): 20, (PAID, LATER): 4})
    moving(Action.TRANSFER, 35, state)
    assert state.lots[BOB_GOLD] == {(FREE, SOON): 20, (PAID, LATER): 4}
    assert state.lots[ALICE_GOLD] == {(FREE, SOON): 0, (PAID, LATER): 0}
    assert (state.balances[BOB_GOLD], state.paid[BOB_GOLD]) == (35, 5)


def test_system_accounts_have_no_lots() -> None:
    state = alice_with(paid=0, free=30, alice_lots={(FREE, SOON): 30})
    moving(Action.SPEND, 30, state)
    assert (REVENUE, GOLD) not in state.lots
    assert state.lots[ALICE_GOLD] == {(FREE, SOON): 0}


def test_credits_past_their_expiry_are_unavailable_at_once() -> None:
    state = alice_with(paid=10, free=70, alice_lots={(FREE, GONE): 50, (FREE, NOW): 5})
    # A lot expires at its moment: the one at NOW is gone too.
    assert state.expired(ALICE_GOLD, FREE, NOW) == 55
    assert state.available(ALICE_GOLD, FREE, NOW) == 15
    assert state.expired(ALICE_GOLD, PAID, NOW) == 0
    with pytest.raises(errors.InsufficientFunds, match="available GOLD_COINS is 25"):
        moving(Action.SPEND, 26, state)
    # A debit leaves them for the expiry to move out.
    assert state.plan_in_order(ALICE_GOLD, 25, FREE_FIRST, NOW) == [
        Portion(FREE, None, 15),
        Portion(PAID, None, 10),
    ]


@pytest.mark.parametrize(
    ("held", "expired", "free_available"),
    [
        pytest.param(0, 50, 20, id="no-hold"),
        pytest.param(30, 20, 20, id="hold-keeps-part"),
        pytest.param(60, 0, 10, id="hold-keeps-all"),
    ],
)
def test_an_active_hold_keeps_the_credits_it_reserved_from_expiring(
    held: int, expired: int, free_available: int
) -> None:
    # 70 free credits, 50 of them past their expiry; a hold reserves `held` free credits.
    state = alice_with(
        paid=0, free=70, alice_held=held, alice_active={FREE: held}, alice_lots={(FREE, GONE): 50}
    )
    assert state.expired(ALICE_GOLD, FREE, NOW) == expired
    assert state.available(ALICE_GOLD, FREE, NOW) == free_available


def test_what_a_hold_kept_is_taken_first_when_it_is_asked_for() -> None:
    # A capture or an expiry takes lots past their expiry too (`due_first`), soonest first.
    state = alice_with(paid=0, free=70, alice_lots={(FREE, GONE): 50, (FREE, SOON): 5})
    assert state.plan(ALICE_GOLD, FREE, 60, NOW, due_first=True) == [
        Portion(FREE, GONE, 50),
        Portion(FREE, SOON, 5),
        Portion(FREE, None, 5),
    ]
    assert state.plan(ALICE_GOLD, FREE, 10, NOW) == [
        Portion(FREE, SOON, 5),
        Portion(FREE, None, 5),
    ]


@pytest.mark.parametrize(
    ("due", "held", "expired"), [(50, 0, 50), (50, 30, 20), (50, 50, 0), (50, 80, 0), (0, 10, 0)]
)
def test_of_credits_past_their_expiry_only_those_no_hold_keeps_have_expired(
    due: int, held: int, expired: int
) -> None:
    assert unprotected(due, held) == expired


@pytest.mark.parametrize(
    ("asset", "kind", "expires_at"),
    [
        (Asset(GOLD, "Gold", "", free_lifetime_days=365), FREE, NOW + timedelta(days=365)),
        (Asset(GOLD, "Gold", "", free_lifetime_days=365), PAID, None),
        (Asset(GOLD, "Gold", "", paid_lifetime_days=30), PAID, NOW + timedelta(days=30)),
        (Asset(GOLD, "Gold", ""), FREE, None),
    ],
)
def test_credits_granted_without_an_expiry_expire_by_the_assets_lifetime_of_their_kind(
    asset: Asset, kind: Kind, expires_at: datetime | None
) -> None:
    assert lot_expiry(asset, kind, NOW) == expires_at


def test_an_asset_spends_free_credits_first_unless_it_says_otherwise() -> None:
    assert Asset(GOLD, "Gold", "").spend_order is FREE_FIRST
    assert FREE_FIRST.kinds == (FREE, PAID)
    assert PAID_FIRST.kinds == (PAID, FREE)


# ---- what a refund gives back --------------------------------------------------------------

# A spend's free credits as it took them: the lot expiring soonest, a later one, then credits
# that never expire.
TAKEN = [Portion(FREE, SOON, 10), Portion(FREE, LATER, 20), Portion(FREE, None, 5)]


def test_a_refund_gives_back_the_credits_taken_last_first() -> None:
    assert returned(TAKEN, 0, 8) == [Portion(FREE, None, 5), Portion(FREE, LATER, 3)]


def test_a_later_refund_goes_on_where_the_earlier_ones_stopped() -> None:
    assert returned(TAKEN, 8, 20) == [Portion(FREE, LATER, 17), Portion(FREE, SOON, 3)]
    assert returned(TAKEN, 30, 5) == [Portion(FREE, SOON, 5)]


def test_refunds_in_pieces_give_back_each_credit_taken_once() -> None:
    pieces = [returned(TAKEN, before, amount) for before, amount in [(0, 1), (1, 12), (13, 22)]]
    given: dict[datetime | None, int] = {}
    for portion in (p for piece in pieces for p in piece):
        given[portion.expires_at] = given.get(portion.expires_at, 0) + portion.amount
    assert given == {p.expires_at: p.amount for p in TAKEN}


def test_what_a_transaction_took_is_its_lots_soonest_first_then_the_rest() -> None:
    assert taken_portions(FREE, 35, [(LATER, 20), (SOON, 10)]) == TAKEN
    assert taken_portions(PAID, 30, [(LATER, 20), (SOON, 10)]) == [
        Portion(PAID, SOON, 10),
        Portion(PAID, LATER, 20),
    ]
    assert taken_portions(PAID, 9, []) == [Portion(PAID, None, 9)]


# ---- Book.reserve and Book.end_hold --------------------------------------------------------


def test_reserve_counts_a_hold_against_the_available_balance_without_moving_money() -> None:
    state = book(alice=100, treasury=-100)
    assert state.reserve(ALICE_GOLD, 30, FREE_FIRST, NOW) == 30
    assert state.reserve(ALICE_GOLD, 70, FREE_FIRST, NOW) == 70
    assert state.balances == balances(alice=100, treasury=-100)
    assert (state.held[ALICE_GOLD], reserved(state)) == (100, {FREE: 0, PAID: 100})
    assert state.available(ALICE_GOLD, PAID, NOW) == 0


@pytest.mark.parametrize(
    ("order", "first", "second"),
    [
        (FREE_FIRST, {FREE: 40, PAID: 10}, {FREE: 0, PAID: 40}),
        (PAID_FIRST, {FREE: 0, PAID: 50}, {FREE: 30, PAID: 10}),
    ],
)
def test_reserve_takes_each_kind_in_the_spend_order_and_returns_the_paid_part(
    order: SpendOrder, first: dict[Kind, int], second: dict[Kind, int]
) -> None:
    state = alice_with(paid=60, free=40)
    assert state.reserve(ALICE_GOLD, 50, order, NOW) == first[PAID]
    assert reserved(state) == first
    assert state.reserve(ALICE_GOLD, 40, order, NOW) == second[PAID]
    assert reserved(state) == {kind: first[kind] + second[kind] for kind in Kind}
    assert available(state) == {
        FREE: 40 - first[FREE] - second[FREE],
        PAID: 60 - first[PAID] - second[PAID],
    }
    assert state.held[ALICE_GOLD] == 90


def test_reserve_takes_no_credits_past_their_expiry() -> None:
    state = alice_with(paid=10, free=40, alice_lots={(FREE, GONE): 25})
    assert state.reserve(ALICE_GOLD, 20, FREE_FIRST, NOW) == 5
    assert reserved(state) == {FREE: 15, PAID: 5}


def test_reserve_beyond_the_available_balance_raises_insufficient_funds_and_changes_nothing() -> (
    None
):
    state = book(alice=100, treasury=-100, alice_held=30)
    before = state.copy()
    with pytest.raises(errors.InsufficientFunds, match="available GOLD_COINS is 70"):
        state.reserve(ALICE_GOLD, 71, FREE_FIRST, NOW)
    assert state == before


def test_reserve_may_use_what_expired_holds_no_longer_reserve() -> None:
    state = book(alice=100, treasury=-100, alice_held=80, alice_active={})
    state.reserve(ALICE_GOLD, 100, FREE_FIRST, NOW)
    assert (state.held[ALICE_GOLD], reserved(state)) == (180, {FREE: 0, PAID: 100})
    assert state.available(ALICE_GOLD, PAID, NOW) == 0


def test_reserve_of_a_balance_with_no_holds_starts_its_sums() -> None:
    state = Book(
        balances=balances(alice=10),
        paid=balances(alice=10),
        held={},
        active_held={},
        lots={},
        holds={},
        refunded={},
    )
    state.reserve(ALICE_GOLD, 10, FREE_FIRST, NOW)
    assert (state.held[ALICE_GOLD], reserved(state)) == (10, {FREE: 0, PAID: 10})


@pytest.mark.parametrize("amount", [0, -5, MAX_AMOUNT + 1])
def test_reserve_refuses_an_amount_outside_the_contract_and_changes_nothing(amount: int) -> None:
    state = book(alice=1000, treasury=-1000)
    before = state.copy()
    with pytest.raises(errors.InvalidRequest):
        state.reserve(ALICE_GOLD, amount, FREE_FIRST, NOW)
    assert state == before


def hold(
    amount: int = 40,
    *,
    paid_amount: int | None = None,
    status: HoldStatus = HoldStatus.HELD,
    expires_in_s: int = 60,
) -> Hold:
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
        paid_amount=amount if paid_amount is None else paid_amount,
    )


def test_a_hold_reserves_its_paid_amount_of_paid_credits_and_the_rest_of_free() -> None:
    placed = hold(40, paid_amount=15)
    assert (placed.reserved(PAID), placed.reserved(FREE)) == (15, 25)


def test_end_hold_gives_back_what_the_hold_reserved_of_each_kind() -> None:
    state = alice_with(paid=60, free=40)
    paid = state.reserve(ALICE_GOLD, 50, FREE_FIRST, NOW)
    state.reserve(ALICE_GOLD, 25, FREE_FIRST, NOW)
    state.end_hold(hold(50, paid_amount=paid))
    assert (state.held[ALICE_GOLD], reserved(state)) == (25, {FREE: 0, PAID: 25})
    assert available(state) == {FREE: 40, PAID: 35}
    assert state.balances == alice_with(paid=60, free=40).balances


def test_copy_is_independent_of_its_book() -> None:
    state = alice_with(paid=60, free=40, alice_lots={(FREE, SOON): 40})
    state.holds["hold-1"] = hold()
    state.refunded[TransactionId("tx-1")] = 5
    trial = state.copy()
    before = state.copy()
    moving(Action.SPEND, 10, trial)
    trial.reserve(ALICE_GOLD, 10, FREE_FIRST, NOW)
    trial.holds["hold-1"] = hold(status=HoldStatus.RELEASED)
    trial.refunded[TransactionId("tx-1")] = 50
    assert state == before
    assert trial.lots != state.lots
    assert trial.active_held != state.active_held
    assert trial.changed_lots != state.changed_lots


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


# ---- a user's standing in an asset ---------------------------------------------------------


def test_a_standing_makes_available_what_holds_do_not_reserve_and_has_not_expired() -> None:
    seen = Standing(asset_symbol=GOLD, balance=100, paid=70, held=40, expired=25)
    assert (seen.free, seen.available) == (30, 35)
    assert Standing(asset_symbol=GOLD, balance=0, paid=0, held=0).available == 0


def test_standing_counts_expired_credits_per_kind_less_what_holds_of_that_kind_keep() -> None:
    lots = [(FREE, GONE, 30), (PAID, GONE, 20), (FREE, SOON, 5)]
    seen = standing(GOLD, 100, 60, {FREE: 10, PAID: 25}, lots, NOW)
    # Free: 30 due, 10 kept by holds. Paid: 20 due, all kept.
    assert (seen.held, seen.expired, seen.available) == (35, 20, 45)
    assert (seen.balance, seen.paid, seen.free) == (100, 60, 40)


def test_standing_names_the_soonest_lot_still_to_expire_both_kinds_summed() -> None:
    lots = [(FREE, GONE, 30), (FREE, LATER, 7), (FREE, SOON, 5), (PAID, SOON, 4), (PAID, NOW, 8)]
    assert standing(GOLD, 100, 60, {}, lots, NOW).next_expiry == (9, SOON)


def test_standing_skips_lots_that_are_used_up_or_past_their_expiry() -> None:
    lots = [(FREE, SOON, 0), (FREE, GONE, 3), (PAID, LATER, 2)]
    assert standing(GOLD, 10, 5, {}, lots, NOW).next_expiry == (2, LATER)
    assert standing(GOLD, 10, 5, {}, [(FREE, GONE, 3)], NOW).next_expiry is None
    assert standing(GOLD, 10, 5, {}, [], NOW) == Standing(GOLD, 10, 5, held=0)


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
BONUS = Command(
    action=Action.BONUS,
    user_id=ALICE,
    asset_symbol=GOLD,
    amount=25,
    credit_expires_in_days=30,
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
        pytest.param(BASE, {"credit_expires_in_days": 30}, id="new-field-credit-lifetime"),
        pytest.param(BASE, {"credit_expires_at": LATER}, id="new-field-credit-expiry"),
        pytest.param(BONUS, {"credit_expires_in_days": 31}, id="bonus-credit-lifetime"),
        pytest.param(BONUS, {"credit_expires_in_days": None}, id="bonus-default-lifetime"),
        pytest.param(
            BONUS, {"credit_expires_in_days": None, "credit_expires_at": LATER}, id="bonus-at"
        ),
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


@pytest.mark.parametrize("command", [BASE, TRANSFER, HOLD, BONUS, CAPTURE, REFUND, BATCH])
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


@pytest.mark.parametrize("command", [BASE, TRANSFER, HOLD, BONUS, CAPTURE, REFUND, BATCH])
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
        (errors.AssetExists, "asset_exists"),
        (errors.IdempotencyKeyReused, "idempotency_key_reused"),
        (errors.InsufficientFunds, "insufficient_funds"),
        (errors.BalanceLimitExceeded, "balance_limit_exceeded"),
        (errors.HoldNotActive, "hold_not_active"),
        (errors.CaptureExceedsHold, "capture_exceeds_hold"),
        (errors.RefundExceedsOriginal, "refund_exceeds_original"),
        (errors.NotRefundable, "not_refundable"),
        (errors.DatabaseUnavailable, "database_unavailable"),
        (errors.NothingExpired, "nothing_expired"),
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
    paid_amount=100,
    created_by="api-key-1",
    to_user_id=BOB,
)
ENTRY = Entry(
    id="entry-1",
    transaction_id=TRANSACTION.id,
    account_id=AccountId(ALICE),
    asset_symbol=GOLD,
    direction=Direction.DEBIT,
    amount=150,  # the free part, taken first
    balance_after=850,
    created_at=CREATED_AT,
    kind=FREE,
    paid_after=600,
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
    assert record["v"] == 3
    assert record["previous"] == GENESIS_LINK
    assert record["entry"]["createdAt"] == "2026-12-02T10:17:00.000005Z"
    assert (record["entry"]["kind"], record["entry"]["paidAfter"]) == ("free", 600)
    assert (record["transaction"]["paidAmount"], record["transaction"]["freeAmount"]) == (100, 150)
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
        pytest.param({"balance_after": 849}, {}, id="entry-balance-after"),
        pytest.param({"kind": PAID}, {}, id="entry-kind"),
        pytest.param({"paid_after": 599}, {}, id="entry-paid-after"),
        pytest.param(
            {"created_at": CREATED_AT + timedelta(microseconds=1)}, {}, id="entry-created-at"
        ),
        pytest.param({}, {"id": TransactionId("tx-2")}, id="transaction-id"),
        pytest.param({}, {"flow": Flow.SPEND}, id="transaction-type"),
        pytest.param({}, {"user_id": UserId("carol")}, id="transaction-user"),
        pytest.param({}, {"to_user_id": UserId("carol")}, id="transaction-receiver"),
        pytest.param({}, {"asset_symbol": "DIAMONDS"}, id="transaction-asset"),
        pytest.param({}, {"amount": 251}, id="transaction-amount"),
        pytest.param({}, {"paid_amount": 101}, id="transaction-paid-amount"),
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
