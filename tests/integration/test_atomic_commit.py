"""A batch is one database transaction: if any statement fails after the balances were written,
the whole batch rolls back and the error reaches the caller."""

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.errors import InsufficientFunds
from wallet.domain.ledger import Flow, Posted
from wallet.service.posting import post
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Wallet
from wallet.store import ledger
from wallet.store.database import Database
from wallet.store.tables import balances

MakeCommand = Callable[..., Any]
ReadState = Callable[[], Awaitable[dict[str, Any]]]


class StorageBroke(Exception):
    """Stands for any failure of a statement late in the batch."""


def break_statement(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Make `ledger.<name>` do its work, then raise StorageBroke; returns the list
    that receives Alice's GOLD balance as the failing transaction saw it."""
    original = getattr(ledger, name)
    seen: list[int] = []

    async def failing(connection: AsyncConnection, *args: Any, **kwargs: Any) -> None:
        await original(connection, *args, **kwargs)
        seen.append(
            (
                await connection.execute(
                    sa.select(balances.c.balance).where(
                        balances.c.account_id == ALICE, balances.c.asset_symbol == "GOLD_COINS"
                    )
                )
            ).scalar_one()
        )
        raise StorageBroke(name)

    monkeypatch.setattr(ledger, name, failing)
    return seen


async def test_a_batch_that_fails_mid_commit_applies_nothing_and_raises(
    database: Database,
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    commands = [
        make_command(Flow.TOPUP, 100),
        make_command(Flow.SPEND, 50, user_id=BOB),
        make_command(Flow.SPEND, 5000),
    ]
    before = await ledger_state()
    # The last statement of the batch: balances, transactions and entries are written by then.
    seen = break_statement(monkeypatch, "write_postings")

    with pytest.raises(StorageBroke):
        await post(database, commands)

    assert seen == [1100], "the failure came after the balances were written"
    assert await ledger_state() == before
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 1000

    monkeypatch.undo()
    outcomes = await post(database, commands)
    assert [type(o) for o in outcomes] == [Posted, Posted, InsufficientFunds]
    assert all(o.is_replay is False for o in outcomes if isinstance(o, Posted))


async def test_a_single_flow_that_fails_mid_commit_raises_to_the_caller(
    wallet: Wallet,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = await ledger_state()
    break_statement(monkeypatch, "write_postings")

    with pytest.raises(StorageBroke):  # a bonus of credits that expire: a lot and its move too
        await wallet.execute(make_command(Flow.BONUS, 10, asset="LOYALTY_POINTS"))

    assert await ledger_state() == before
