"""The posting engine on batches: commands apply in arrival order in one database transaction,
each failure fails alone, and idempotency keys hold within a batch and across batches, for the
refusals the ledger's state gives as for postings (API-operations.md: a refusal is final)."""

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wallet.domain.errors import (
    IdempotencyKeyReused,
    InsufficientFunds,
    UnknownAsset,
    UnknownUser,
    WalletError,
)
from wallet.domain.ledger import Flow, Kind, Posted
from wallet.service.posting import Outcome, post
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import PageRequest, Wallet
from wallet.store.database import Database

MakeCommand = Callable[..., Any]
ReadState = Callable[[], Awaitable[dict[str, Any]]]
StoredRefusal = Callable[[str], Awaitable[tuple[str, str, str] | None]]
SEED_KEY = f"seed:{ALICE}:GOLD_COINS"


def posted(outcome: Outcome) -> Posted:
    assert isinstance(outcome, Posted), f"expected a posting, got {outcome!r}"
    return outcome


def short_of_funds(outcome: Outcome) -> InsufficientFunds:
    assert isinstance(outcome, InsufficientFunds), f"expected insufficient funds, got {outcome!r}"
    return outcome


async def gold(wallet: Wallet, user_id: str = ALICE) -> int:
    return await wallet.balance(user_id=user_id, asset_symbol="GOLD_COINS")


async def test_an_empty_batch_does_nothing(database: Database, ledger_state: ReadState) -> None:
    before = await ledger_state()
    assert await post(database, []) == []
    assert await ledger_state() == before


async def test_each_failure_in_a_batch_fails_alone_and_the_others_apply(
    database: Database,
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    stored_refusal: StoredRefusal,
) -> None:
    before = await ledger_state()
    commands = [
        make_command(Flow.TOPUP, 100),
        make_command(Flow.SPEND, 5000),
        make_command(Flow.BONUS, 1, user_id="nobody"),
        make_command(Flow.TOPUP, 1, asset="SILVER"),
        make_command(Flow.TOPUP, 999, key=SEED_KEY),
        make_command(Flow.SPEND, 30, user_id=BOB),
    ]

    outcomes = await post(database, commands)

    assert [type(o) for o in outcomes] == [
        Posted,
        InsufficientFunds,
        UnknownUser,
        UnknownAsset,
        IdempotencyKeyReused,
        Posted,
    ]
    assert posted(outcomes[0]).transaction.balance_after == 1100
    assert posted(outcomes[5]).transaction.balance_after == 970
    assert await gold(wallet) == 1100
    assert await gold(wallet, BOB) == 970
    after = await ledger_state()
    assert after["transactions"] - before["transactions"] == {
        posted(outcomes[0]).transaction.id,
        posted(outcomes[5]).transaction.id,
    }
    assert len(after["entries"] - before["entries"]) == 4
    # The refusal keeps its key, as the postings do; the unknown user and asset keep nothing.
    assert after["idempotency_keys"] - before["idempotency_keys"] == {
        commands[0].idempotency_key,
        commands[1].idempotency_key,
        commands[5].idempotency_key,
    }
    refusal = short_of_funds(outcomes[1])
    assert refusal.is_replay is False
    assert await stored_refusal(commands[1].idempotency_key) == (
        commands[1].fingerprint(),
        "insufficient_funds",
        refusal.detail,
    )


async def test_commands_on_one_user_apply_in_arrival_order(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    outcomes = await post(database, [make_command(Flow.SPEND, 600), make_command(Flow.SPEND, 600)])

    assert posted(outcomes[0]).transaction.balance_after == 400
    assert isinstance(outcomes[1], InsufficientFunds)
    assert await gold(wallet) == 400


async def test_a_spend_may_use_a_topup_earlier_in_the_same_batch(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    outcomes = await post(database, [make_command(Flow.TOPUP, 600), make_command(Flow.SPEND, 1500)])

    assert posted(outcomes[0]).transaction.balance_after == 1600
    assert posted(outcomes[1]).transaction.balance_after == 100
    assert await gold(wallet) == 100


async def test_a_spend_may_not_use_a_topup_later_in_the_same_batch(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    outcomes = await post(database, [make_command(Flow.SPEND, 1500), make_command(Flow.TOPUP, 600)])

    assert isinstance(outcomes[0], InsufficientFunds)
    assert posted(outcomes[1]).transaction.balance_after == 1600
    assert await gold(wallet) == 1600


async def test_the_balance_chain_of_a_batch_follows_arrival_order(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    amounts = [(Flow.SPEND, 100), (Flow.TOPUP, 50), (Flow.BONUS, 7), (Flow.SPEND, 900)]
    outcomes = await post(database, [make_command(flow, amount) for flow, amount in amounts])

    made = [posted(o).transaction for o in outcomes]
    assert [(t.balance_after, t.paid_amount) for t in made] == [
        (900, 100),
        (950, 50),
        (957, 0),
        (57, 893),  # the bonus's 7 free credits first
    ]
    entries, _ = await wallet.ledger(
        user_id=ALICE, asset_symbol="GOLD_COINS", page=PageRequest(limit=5)
    )
    assert [(e.kind, e.amount, e.balance_after, e.paid_after) for e in reversed(entries)] == [
        (Kind.PAID, 100, 900, 900),
        (Kind.PAID, 50, 950, 950),
        (Kind.FREE, 7, 957, 950),
        (Kind.FREE, 7, 950, 950),
        (Kind.PAID, 893, 57, 57),
    ]
    assert [e.transaction_id for e in reversed(entries)] == [t.id for t in made[:3]] + [
        made[3].id
    ] * 2


async def test_the_same_request_twice_in_a_batch_applies_once(
    database: Database, wallet: Wallet, make_command: MakeCommand, ledger_state: ReadState
) -> None:
    before = await ledger_state()
    command = make_command(Flow.SPEND, 100)

    first, second = await post(database, [command, command])

    assert posted(first).is_replay is False
    assert posted(second).is_replay is True
    assert posted(second).transaction == posted(first).transaction
    assert await gold(wallet) == 900
    after = await ledger_state()
    assert after["transactions"] - before["transactions"] == {posted(first).transaction.id}


async def test_the_same_key_for_a_different_request_in_a_batch_is_refused(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    first, second = await post(
        database,
        [make_command(Flow.SPEND, 100, key="k-1"), make_command(Flow.SPEND, 101, key="k-1")],
    )

    assert posted(first).transaction.balance_after == 900
    assert isinstance(second, IdempotencyKeyReused)
    assert await gold(wallet) == 900


async def test_a_key_whose_first_use_in_a_batch_was_refused_stays_the_refusals_later_in_it(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    refused, fits = await post(
        database,
        [make_command(Flow.SPEND, 1500, key="k-1"), make_command(Flow.SPEND, 100, key="k-1")],
    )

    assert short_of_funds(refused).is_replay is False
    assert isinstance(fits, IdempotencyKeyReused)
    assert await gold(wallet) == 1000
    # The key belongs to the refused request, in later calls too.
    (again,) = await post(database, [make_command(Flow.SPEND, 1500, key="k-1")])
    assert short_of_funds(again).is_replay is True
    assert short_of_funds(again).detail == short_of_funds(refused).detail
    (other,) = await post(database, [make_command(Flow.SPEND, 100, key="k-1")])
    assert isinstance(other, IdempotencyKeyReused)
    assert await gold(wallet) == 1000


async def test_a_refused_request_retried_once_a_topup_in_the_batch_funds_it_is_refused_again(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    spend = make_command(Flow.SPEND, 1500, key="k-1")
    outcomes = await post(database, [spend, make_command(Flow.TOPUP, 600), spend])

    assert short_of_funds(outcomes[0]).is_replay is False
    assert posted(outcomes[1]).transaction.balance_after == 1600
    assert short_of_funds(outcomes[2]).is_replay is True
    assert short_of_funds(outcomes[2]).detail == short_of_funds(outcomes[0]).detail
    assert await gold(wallet) == 1600


@pytest.mark.parametrize(
    "failing",
    [
        pytest.param({"user_id": "nobody"}, id="unknown-user"),
        pytest.param({"asset": "SILVER"}, id="unknown-asset"),
    ],
)
async def test_a_command_failed_before_the_ledger_looked_records_no_key_and_the_key_works_later(
    database: Database,
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    failing: dict[str, Any],
) -> None:
    request: dict[str, Any] = {"flow": Flow.SPEND, "amount": 100, "key": "k-1"}
    before = await ledger_state()
    (failed,) = await post(database, [make_command(**(request | failing))])

    assert isinstance(failed, WalletError)
    assert await ledger_state() == before

    (later,) = await post(database, [make_command(Flow.SPEND, 100, key="k-1")])
    assert posted(later).is_replay is False
    assert await gold(wallet) == 900


async def test_a_refused_command_keeps_its_key_with_the_refusal_in_later_calls(
    database: Database,
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    stored_refusal: StoredRefusal,
) -> None:
    before = await ledger_state()
    refused_command = make_command(Flow.SPEND, 5000, key="k-1")
    (refused,) = await post(database, [refused_command])

    assert short_of_funds(refused).is_replay is False
    assert await ledger_state() == {
        **before,
        "idempotency_keys": before["idempotency_keys"] | {"k-1"},
    }
    assert await stored_refusal("k-1") == (
        refused_command.fingerprint(),
        "insufficient_funds",
        short_of_funds(refused).detail,
    )

    await wallet.execute(make_command(Flow.TOPUP, 4000))  # Alice could pay it now
    (replayed,) = await post(database, [make_command(Flow.SPEND, 5000, key="k-1")])
    (other,) = await post(database, [make_command(Flow.SPEND, 100, key="k-1")])

    assert short_of_funds(replayed).is_replay is True
    assert short_of_funds(replayed).detail == short_of_funds(refused).detail
    assert isinstance(other, IdempotencyKeyReused)
    assert await gold(wallet) == 5000


async def test_a_replay_in_a_later_call_returns_the_stored_transaction(
    database: Database, wallet: Wallet, make_command: MakeCommand, ledger_state: ReadState
) -> None:
    command = make_command(Flow.TOPUP, 25, metadata={"order": "7", "channel": "web"})
    original = await wallet.execute(command)
    before = await ledger_state()

    (replay,) = await post(database, [command])
    again = await wallet.execute(command)

    assert posted(replay).is_replay is True
    assert again.is_replay is True
    assert posted(replay).transaction == original.transaction
    assert again.transaction == original.transaction
    assert await ledger_state() == before


async def test_a_replay_ignores_the_order_of_metadata_keys(
    wallet: Wallet, make_command: MakeCommand
) -> None:
    original = await wallet.execute(
        make_command(Flow.TOPUP, 25, key="k-1", metadata={"a": "1", "b": "2"})
    )
    replay = await wallet.execute(
        make_command(Flow.TOPUP, 25, key="k-1", metadata={"b": "2", "a": "1"})
    )
    assert replay.is_replay is True
    assert replay.transaction.id == original.transaction.id


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"flow": Flow.BONUS}, id="flow"),
        pytest.param({"user_id": BOB}, id="user"),
        pytest.param({"asset": "DIAMONDS"}, id="asset"),
        pytest.param({"amount": 26}, id="amount"),
        pytest.param({"note": "other"}, id="note"),
    ],
)
async def test_a_key_reused_in_a_later_call_for_a_different_request_is_refused(
    wallet: Wallet, make_command: MakeCommand, ledger_state: ReadState, changes: dict[str, Any]
) -> None:
    request: dict[str, Any] = {"flow": Flow.TOPUP, "amount": 5, "key": "k-1", "note": "a note"}
    await wallet.execute(make_command(**request))
    before = await ledger_state()

    with pytest.raises(IdempotencyKeyReused):
        await wallet.execute(make_command(**(request | changes)))
    assert await ledger_state() == before


async def test_the_seed_keys_replay_their_opening_topups(
    database: Database, make_command: MakeCommand
) -> None:
    (replay,) = await post(database, [make_command(Flow.TOPUP, 1000, key=SEED_KEY)])
    assert posted(replay).is_replay is True
    assert posted(replay).transaction.balance_after == 1000
