"""Property: whatever sequence of moves and holds is applied to a Book, per asset all balances sum
to zero, user balances and available amounts stay >= 0, every balance stays within 64 bits, and
a refused step changes nothing."""

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from wallet.domain.errors import BalanceLimitExceeded, InsufficientFunds
from wallet.domain.ledger import (
    MAX_AMOUNT,
    MAX_BALANCE,
    MIN_BALANCE,
    AccountId,
    Action,
    Book,
    SystemAccount,
    UserId,
    flow_accounts,
    is_system_account,
)

USERS = [UserId("alice"), UserId("bob"), UserId("carol")]
ASSETS = ["GOLD_COINS", "DIAMONDS"]


@dataclass(frozen=True)
class Step:
    action: Action  # a flow, or HOLD: reserve part of the user's balance
    user_id: UserId
    to_user_id: UserId
    asset: str
    amount: int


steps = st.builds(
    Step,
    action=st.sampled_from(
        [Action.TOPUP, Action.BONUS, Action.SPEND, Action.TRANSFER, Action.HOLD]
    ),
    user_id=st.sampled_from(USERS),
    to_user_id=st.sampled_from(USERS),
    asset=st.sampled_from(ASSETS),
    # Small amounts meet insufficient funds often; large ones reach the 64-bit limits.
    amount=st.integers(1, 2_000) | st.integers(1, MAX_AMOUNT),
)
# Alice's opening GOLD balance, sometimes near the top of the 64-bit range (the treasury then
# sits near the bottom), so some steps are refused for the limit.
openings = st.integers(0, 5_000) | st.integers(MAX_BALANCE - 3 * MAX_AMOUNT, MAX_BALANCE)


def assert_invariants(book: Book) -> None:
    for asset in ASSETS:
        assert sum(v for (_, symbol), v in book.balances.items() if symbol == asset) == 0
    for key, value in book.balances.items():
        assert MIN_BALANCE <= value <= MAX_BALANCE
        if not is_system_account(key[0]):
            assert value >= 0
            assert book.available(key) >= 0


Key = tuple[AccountId, str]


def apply(book: Book, step: Step) -> tuple[Key, Key] | None:
    """Apply the step; the balances it debited and credited, if it moved money."""
    if step.action is Action.HOLD:
        book.reserve((AccountId(step.user_id), step.asset), step.amount)
        return None
    to_user = step.to_user_id if step.action is Action.TRANSFER else None
    if to_user == step.user_id:
        return None  # the engine refuses a transfer to oneself before the book sees it
    debited, credited = flow_accounts(step.action, step.user_id, to_user)
    book.move(debited, credited, step.asset, step.amount)
    return (debited, step.asset), (credited, step.asset)


@settings(max_examples=300, deadline=None)
@given(opening=openings, sequence=st.lists(steps, max_size=40))
def test_any_sequence_of_moves_and_holds_keeps_every_invariant(
    opening: int, sequence: list[Step]
) -> None:
    accounts = [*USERS, *SystemAccount]
    book = Book(
        balances={(AccountId(a), asset): 0 for a in accounts for asset in ASSETS},
        held={},
        active_held={},
        holds={},
        refunded={},
    )
    book.balances[(AccountId("alice"), "GOLD_COINS")] = opening
    book.balances[(AccountId(SystemAccount.TREASURY), "GOLD_COINS")] = -opening
    for step in sequence:
        before = book.copy()
        try:
            changed = apply(book, step)
        except InsufficientFunds:
            assert step.action in (Action.SPEND, Action.TRANSFER, Action.HOLD)
            assert book == before
        except BalanceLimitExceeded:
            assert book == before
        else:
            if changed is None:
                assert book.balances == before.balances
            else:
                debited, credited = changed
                assert book.balances[debited] == before.balances[debited] - step.amount
                assert book.balances[credited] == before.balances[credited] + step.amount
                untouched = {k: v for k, v in book.balances.items() if k not in changed}
                assert untouched == {k: v for k, v in before.balances.items() if k not in changed}
        assert_invariants(book)
