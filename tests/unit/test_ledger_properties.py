"""Property: whatever sequence of commands is applied with move(), per asset all balances sum to
zero, user balances stay >= 0, every balance stays within 64 bits, and a refused command changes
nothing."""

from hypothesis import given, settings
from hypothesis import strategies as st

from wallet.domain.errors import BalanceLimitExceeded, InsufficientFunds
from wallet.domain.ledger import (
    MAX_AMOUNT,
    MAX_BALANCE,
    MIN_BALANCE,
    AccountId,
    Command,
    Flow,
    SystemAccount,
    UserId,
    is_system_account,
    move,
)

USERS = [UserId("alice"), UserId("bob"), UserId("carol")]
ASSETS = ["GOLD_COINS", "DIAMONDS"]

commands = st.builds(
    Command,
    flow=st.sampled_from(Flow),
    user_id=st.sampled_from(USERS),
    asset_symbol=st.sampled_from(ASSETS),
    # Small amounts meet insufficient funds often; large ones reach the 64-bit limits.
    amount=st.integers(1, 2_000) | st.integers(1, MAX_AMOUNT),
    idempotency_key=st.just("key"),
)
# Alice's opening GOLD balance, sometimes near the top of the 64-bit range (the treasury then
# sits near the bottom), so some commands are refused for the limit.
openings = st.integers(0, 5_000) | st.integers(MAX_BALANCE - 3 * MAX_AMOUNT, MAX_BALANCE)


def assert_invariants(balances: dict[tuple[AccountId, str], int]) -> None:
    for asset in ASSETS:
        assert sum(v for (_, symbol), v in balances.items() if symbol == asset) == 0
    for (account, _), value in balances.items():
        assert MIN_BALANCE <= value <= MAX_BALANCE
        if not is_system_account(account):
            assert value >= 0


@settings(max_examples=300, deadline=None)
@given(opening=openings, sequence=st.lists(commands, max_size=40))
def test_any_sequence_of_moves_keeps_every_invariant(opening: int, sequence: list[Command]) -> None:
    accounts = [*USERS, *SystemAccount]
    balances = {(AccountId(a), asset): 0 for a in accounts for asset in ASSETS}
    balances[(AccountId("alice"), "GOLD_COINS")] = opening
    balances[(AccountId(SystemAccount.TREASURY), "GOLD_COINS")] = -opening
    for command in sequence:
        before = dict(balances)
        try:
            move(balances, command)
        except InsufficientFunds:
            assert command.flow is Flow.SPEND
            assert balances == before
        except BalanceLimitExceeded:
            assert balances == before
        else:
            debited = (command.debited, command.asset_symbol)
            credited = (command.credited, command.asset_symbol)
            assert balances[debited] == before[debited] - command.amount
            assert balances[credited] == before[credited] + command.amount
            untouched = {k: v for k, v in balances.items() if k not in (debited, credited)}
            assert untouched == {k: v for k, v in before.items() if k not in (debited, credited)}
        assert_invariants(balances)
