"""Each flow through Wallet.execute: which accounts move and which kind of credit (a top-up gives
paid credits, a bonus free ones, a spend takes them in the asset's spend order), the debit and
credit entries it writes per kind, and the errors that stop it without moving anything: a
refusal the ledger's state gave is kept under its idempotency key and replayed
(API-operations.md); one made before the ledger looked keeps nothing."""

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from wallet.domain.errors import (
    BalanceLimitExceeded,
    IdempotencyKeyReused,
    InsufficientFunds,
    Refusal,
    UnknownAsset,
    UnknownUser,
)
from wallet.domain.ledger import (
    MAX_BALANCE,
    MIN_BALANCE,
    Command,
    Direction,
    Flow,
    Kind,
    SpendOrder,
    Standing,
    SystemAccount,
)
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Wallet
from wallet.store.tables import lots

MakeCommand = Callable[..., Any]
AccountBalance = Callable[..., Awaitable[int]]
ReadState = Callable[[], Awaitable[dict[str, Any]]]
StoredRefusal = Callable[[str], Awaitable[tuple[str, str, str] | None]]

TREASURY = SystemAccount.TREASURY
BONUS_POOL = SystemAccount.BONUS_POOL
REVENUE = SystemAccount.REVENUE


async def set_gold_balance(sql: Callable[..., Awaitable[Any]], account: str, value: int) -> None:
    """Put a balance near a limit directly: reaching it through flows would take thousands."""
    await sql(
        "UPDATE balances SET balance = :value"
        " WHERE account_id = :account AND asset_symbol = 'GOLD_COINS'",
        value=value,
        account=account,
    )


async def assert_only_the_refusal_was_kept(
    ledger_state: ReadState,
    stored_refusal: StoredRefusal,
    before: dict[str, Any],
    command: Command,
    refusal: Refusal,
) -> None:
    """Nothing moved, and the command's key now holds its refusal (and its request)."""
    key = command.idempotency_key
    assert await ledger_state() == {
        **before,
        "idempotency_keys": before["idempotency_keys"] | {key},
    }
    assert await stored_refusal(key) == (command.fingerprint(), refusal.code, refusal.detail)


@pytest.mark.parametrize(
    ("flow", "debited", "credited", "kind", "alice_after", "alice_paid_after"),
    [
        (Flow.TOPUP, TREASURY, ALICE, Kind.PAID, 1250, 1250),
        (Flow.BONUS, BONUS_POOL, ALICE, Kind.FREE, 1250, 1000),
        (Flow.SPEND, ALICE, REVENUE, Kind.PAID, 750, 750),  # the seed's credits are all paid
    ],
)
async def test_a_flow_moves_its_amount_of_its_kind_from_the_debited_to_the_credited_account(
    wallet: Wallet,
    make_command: MakeCommand,
    account_balance: AccountBalance,
    account_paid: AccountBalance,
    flow: Flow,
    debited: str,
    credited: str,
    kind: Kind,
    alice_after: int,
    alice_paid_after: int,
) -> None:
    debited_before = (await account_balance(debited), await account_paid(debited))
    credited_before = (await account_balance(credited), await account_paid(credited))
    paid = 250 if kind is Kind.PAID else 0

    posted = await wallet.execute(make_command(flow, 250))

    assert posted.is_replay is False
    assert posted.transaction.balance_after == alice_after
    assert (posted.transaction.paid_amount, posted.transaction.free_amount) == (paid, 250 - paid)
    assert await wallet.standings(user_id=ALICE, asset_symbol="GOLD_COINS") == [
        Standing("GOLD_COINS", alice_after, alice_paid_after, held=0)
    ]
    assert (await account_balance(debited), await account_paid(debited)) == (
        debited_before[0] - 250,
        debited_before[1] - paid,
    )
    assert (await account_balance(credited), await account_paid(credited)) == (
        credited_before[0] + 250,
        credited_before[1] + paid,
    )
    assert await wallet.balance(user_id=BOB, asset_symbol="GOLD_COINS") == 1000


@pytest.mark.parametrize(
    ("flow", "debited", "credited", "kind"),
    [
        (Flow.TOPUP, TREASURY, ALICE, Kind.PAID),
        (Flow.BONUS, BONUS_POOL, ALICE, Kind.FREE),
        (Flow.SPEND, ALICE, REVENUE, Kind.PAID),
    ],
)
async def test_a_flow_of_one_kind_writes_one_debit_and_one_credit_entry_with_the_balances_after(
    wallet: Wallet,
    make_command: MakeCommand,
    sql: Callable[..., Awaitable[Any]],
    flow: Flow,
    debited: str,
    credited: str,
    kind: Kind,
) -> None:
    posted = await wallet.execute(make_command(flow, 4, asset="DIAMONDS"))

    transaction, entries = await wallet.transaction(
        user_id=ALICE, transaction_id=posted.transaction.id
    )
    assert transaction == posted.transaction
    assert [(e.account_id, e.direction, e.kind) for e in entries] == [
        (debited, Direction.DEBIT, kind),
        (credited, Direction.CREDIT, kind),
    ]
    for entry in entries:
        assert entry.transaction_id == transaction.id
        assert entry.asset_symbol == "DIAMONDS"
        assert entry.amount == 4
        # What the entry left in its balance row (a system account's is one of several).
        (row,) = await sql(
            "SELECT b.balance, b.paid FROM entries e JOIN balances b"
            " ON b.account_id = e.account_id AND b.asset_symbol = e.asset_symbol"
            " AND b.shard = e.shard WHERE e.id = :entry",
            entry=entry.id,
        )
        assert (entry.balance_after, entry.paid_after) == (row.balance, row.paid)
    (user_entry,) = [e for e in entries if e.account_id == ALICE]
    assert transaction.balance_after == user_entry.balance_after


@pytest.mark.parametrize(
    ("order", "taken"),
    [
        (SpendOrder.FREE_FIRST, [(Kind.FREE, 30), (Kind.PAID, 990)]),
        (SpendOrder.PAID_FIRST, [(Kind.PAID, 1000), (Kind.FREE, 20)]),
    ],
)
async def test_a_spend_of_both_kinds_writes_a_debit_and_a_credit_per_kind_first_kind_first(
    wallet: Wallet,
    make_command: MakeCommand,
    order: SpendOrder,
    taken: list[tuple[Kind, int]],
) -> None:
    await wallet.change_asset(symbol="GOLD_COINS", changes={"spend_order": order})
    await wallet.execute(make_command(Flow.BONUS, 30))  # Alice: 1000 paid, 30 free

    spent = (await wallet.execute(make_command(Flow.SPEND, 1020))).transaction

    paid = dict(taken)[Kind.PAID]
    assert (spent.amount, spent.paid_amount, spent.free_amount) == (1020, paid, 1020 - paid)
    assert spent.balance_after == 10
    _, entries = await wallet.transaction(user_id=ALICE, transaction_id=spent.id)
    # Alice's balance and paid part, then revenue's (which had nothing), after each entry.
    (first, first_amount), (second, second_amount) = taken
    alice_paid_between = 1000 if first is Kind.FREE else 0
    revenue_paid_between = 0 if first is Kind.FREE else 1000
    assert [
        (e.account_id, e.direction, e.kind, e.amount, e.balance_after, e.paid_after)
        for e in entries
    ] == [
        (ALICE, Direction.DEBIT, first, first_amount, 1030 - first_amount, alice_paid_between),
        (REVENUE, Direction.CREDIT, first, first_amount, first_amount, revenue_paid_between),
        (ALICE, Direction.DEBIT, second, second_amount, 10, 1000 - paid),
        (REVENUE, Direction.CREDIT, second, second_amount, 1020, paid),
    ]
    assert await wallet.standings(user_id=ALICE, asset_symbol="GOLD_COINS") == [
        Standing("GOLD_COINS", 10, 1000 - paid, held=0)
    ]


async def test_bonus_credits_expire_as_the_bonus_asks_else_by_the_assets_free_lifetime(
    wallet: Wallet, make_command: MakeCommand, sql: Callable[..., Awaitable[Any]]
) -> None:
    before = datetime.now(UTC)
    await wallet.execute(make_command(Flow.BONUS, 30, asset="LOYALTY_POINTS"))  # 365 days
    await wallet.execute(make_command(Flow.BONUS, 7, asset="LOYALTY_POINTS", expires_in_days=2))
    await wallet.execute(make_command(Flow.BONUS, 5, asset="GOLD_COINS"))  # never expires
    after = datetime.now(UTC)

    (points,) = await wallet.standings(user_id=ALICE, asset_symbol="LOYALTY_POINTS")
    assert (points.balance, points.paid, points.available) == (537, 500, 537)
    assert points.next_expiry is not None
    amount, expires_at = points.next_expiry
    assert amount == 7
    assert before + timedelta(days=2) <= expires_at <= after + timedelta(days=2)
    stored = await sql(
        sa.select(lots).where(lots.c.account_id == ALICE).order_by(lots.c.expires_at)
    )
    assert [(lot.asset_symbol, lot.kind, lot.remaining) for lot in stored] == [
        ("LOYALTY_POINTS", "free", 7),
        ("LOYALTY_POINTS", "free", 30),
    ]
    year = stored[1].expires_at
    year = year.replace(tzinfo=UTC) if year.tzinfo is None else year  # SQLite's: no zone, UTC
    assert before + timedelta(days=365) <= year <= after + timedelta(days=365)
    (gold,) = await wallet.standings(user_id=ALICE, asset_symbol="GOLD_COINS")
    assert (gold.balance, gold.paid, gold.next_expiry) == (1005, 1000, None)


async def test_a_transaction_records_the_request_as_sent(
    wallet: Wallet, make_command: MakeCommand
) -> None:
    topup = make_command(Flow.TOPUP, 5, key="order-1", metadata={"order": "1", "channel": "ios"})
    bonus = make_command(Flow.BONUS, 6, asset="LOYALTY_POINTS", note="welcome back")
    spend = make_command(Flow.SPEND, 7, user_id=BOB, asset="DIAMONDS", note="a sword")

    for command in (topup, bonus, spend):
        stored = (await wallet.execute(command)).transaction
        assert (stored.flow.value, stored.user_id, stored.asset_symbol, stored.amount) == (
            command.action.value,
            command.user_id,
            command.asset_symbol,
            command.amount,
        )
        assert stored.idempotency_key == command.idempotency_key
        assert stored.note == command.note
        assert stored.metadata == command.metadata
        reread, _ = await wallet.transaction(user_id=command.user_id, transaction_id=stored.id)
        assert reread == stored


async def test_the_first_topup_of_a_new_user_creates_the_balance(
    wallet: Wallet, make_command: MakeCommand
) -> None:
    await wallet.create_user(user_id="carol", email="carol@example.com", name="Carol")
    assert await wallet.balance(user_id="carol", asset_symbol="GOLD_COINS") == 0

    posted = await wallet.execute(make_command(Flow.TOPUP, 40, user_id="carol"))

    assert posted.transaction.balance_after == 40
    assert await wallet.standings(user_id="carol") == [
        Standing("DIAMONDS", 0, 0, held=0),
        Standing("GOLD_COINS", 40, 40, held=0),
        Standing("LOYALTY_POINTS", 0, 0, held=0),
    ]


async def test_spend_of_the_whole_balance_leaves_zero(
    wallet: Wallet, make_command: MakeCommand
) -> None:
    posted = await wallet.execute(make_command(Flow.SPEND, 1000))
    assert posted.transaction.balance_after == 0
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 0


async def test_spend_beyond_the_balance_raises_insufficient_funds_and_keeps_the_refusal(
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    stored_refusal: StoredRefusal,
) -> None:
    before = await ledger_state()
    command = make_command(Flow.SPEND, 1001)
    with pytest.raises(InsufficientFunds) as refused:
        await wallet.execute(command)

    assert refused.value.is_replay is False
    await assert_only_the_refusal_was_kept(
        ledger_state, stored_refusal, before, command, refused.value
    )
    # Final: once Alice could pay, the same request still gets the same refusal, and moves
    # nothing; another request with the key is refused as a reuse.
    await wallet.execute(make_command(Flow.TOPUP, 1))
    with pytest.raises(InsufficientFunds) as replayed:
        await wallet.execute(command)
    assert replayed.value.is_replay is True
    assert replayed.value.detail == refused.value.detail
    with pytest.raises(IdempotencyKeyReused):
        await wallet.execute(make_command(Flow.SPEND, 1000, key=command.idempotency_key))
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 1001


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        pytest.param({"user_id": "nobody"}, UnknownUser, id="unknown-user"),
        pytest.param({"user_id": TREASURY}, UnknownUser, id="system-account-as-user"),
        pytest.param({"asset": "SILVER"}, UnknownAsset, id="unknown-asset"),
    ],
)
@pytest.mark.parametrize("flow", [Flow.TOPUP, Flow.BONUS, Flow.SPEND])
async def test_a_flow_on_an_unknown_user_or_asset_is_refused_and_changes_nothing(
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    flow: Flow,
    changes: dict[str, str],
    error: type[Exception],
) -> None:
    before = await ledger_state()
    with pytest.raises(error):
        await wallet.execute(make_command(flow, 1, **changes))
    # The key too stays free: refused before the ledger looked.
    assert await ledger_state() == before


async def test_a_topup_past_the_64_bit_maximum_is_refused_and_keeps_the_refusal(
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    stored_refusal: StoredRefusal,
    sql: Callable[..., Awaitable[Any]],
) -> None:
    await set_gold_balance(sql, ALICE, MAX_BALANCE - 5)
    before = await ledger_state()
    command = make_command(Flow.TOPUP, 10)
    with pytest.raises(BalanceLimitExceeded) as refused:
        await wallet.execute(command)

    assert refused.value.is_replay is False
    await assert_only_the_refusal_was_kept(
        ledger_state, stored_refusal, before, command, refused.value
    )
    await set_gold_balance(sql, ALICE, 1000)  # room again: the refusal stands all the same
    with pytest.raises(BalanceLimitExceeded) as replayed:
        await wallet.execute(command)
    assert replayed.value.is_replay is True
    assert replayed.value.detail == refused.value.detail
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 1000


async def test_a_topup_taking_a_treasury_row_past_the_64_bit_minimum_is_applied_on_another(
    wallet: Wallet,
    make_command: MakeCommand,
    account_balance: AccountBalance,
    sql: Callable[..., Awaitable[Any]],
) -> None:
    """The treasury's balance has no 64-bit floor: a top-up goes on in a row with room (a new
    one, when every row is full) and leaves the full rows as they are."""
    await set_gold_balance(sql, TREASURY, MIN_BALANCE + 5)
    full = await sql(
        "SELECT shard, balance FROM balances WHERE account_id = :account"
        " AND asset_symbol = 'GOLD_COINS'",
        account=TREASURY,
    )
    before = await account_balance(TREASURY)

    posted = await wallet.execute(make_command(Flow.TOPUP, 10))

    assert posted.transaction.amount == 10
    assert await account_balance(TREASURY) == before - 10
    after = await sql(
        "SELECT shard, balance FROM balances WHERE account_id = :account"
        " AND asset_symbol = 'GOLD_COINS'",
        account=TREASURY,
    )
    assert set(full) <= set(after)


async def test_a_balance_may_reach_the_64_bit_maximum_exactly(
    wallet: Wallet, make_command: MakeCommand, sql: Callable[..., Awaitable[Any]]
) -> None:
    await set_gold_balance(sql, ALICE, MAX_BALANCE - 10)
    posted = await wallet.execute(make_command(Flow.TOPUP, 10))
    assert posted.transaction.balance_after == MAX_BALANCE
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == MAX_BALANCE
