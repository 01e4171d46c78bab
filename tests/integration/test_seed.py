"""Seeding is idempotent: a second run changes no balance and adds no entry."""

from collections.abc import Awaitable, Callable
from typing import Any

from wallet.domain.ledger import Flow, SpendOrder, Standing
from wallet.service.seed import ALICE, BOB, seed
from wallet.service.wallet import PageRequest, Wallet
from wallet.store.database import Database

MakeCommand = Callable[..., Any]
ReadState = Callable[[], Awaitable[dict[str, Any]]]


async def test_seed_creates_the_assets_users_and_opening_balances(wallet: Wallet) -> None:
    # Free credits first everywhere; only loyalty points expire, a year after they are given.
    assert [
        (a.symbol, a.spend_order, a.free_lifetime_days, a.paid_lifetime_days)
        for a in await wallet.assets()
    ] == [
        ("DIAMONDS", SpendOrder.FREE_FIRST, None, None),
        ("GOLD_COINS", SpendOrder.FREE_FIRST, None, None),
        ("LOYALTY_POINTS", SpendOrder.FREE_FIRST, 365, None),
    ]
    users, _ = await wallet.users(page=PageRequest())
    assert {(u.id, u.email) for u in users} == {
        (ALICE, "alice@example.com"),
        (BOB, "bob@example.com"),
    }
    for user_id in (ALICE, BOB):
        # Top-ups: paid credits, which no asset makes expire.
        assert await wallet.standings(user_id=user_id) == [
            Standing("DIAMONDS", 10, 10, held=0),
            Standing("GOLD_COINS", 1000, 1000, held=0),
            Standing("LOYALTY_POINTS", 500, 500, held=0),
        ]
        history, _ = await wallet.history(
            user_id=user_id, flow=None, asset_symbol=None, page=PageRequest()
        )
        assert {(t.flow, t.asset_symbol, t.amount, t.paid_amount) for t in history} == {
            (Flow.TOPUP, "DIAMONDS", 10, 10),
            (Flow.TOPUP, "GOLD_COINS", 1000, 1000),
            (Flow.TOPUP, "LOYALTY_POINTS", 500, 500),
        }


async def test_seeding_twice_changes_nothing(
    database: Database, wallet: Wallet, ledger_state: ReadState
) -> None:
    before = await ledger_state()
    users_before = await wallet.users(page=PageRequest())

    await seed(database)

    assert await ledger_state() == before
    assert await wallet.users(page=PageRequest()) == users_before


async def test_seeding_again_after_flows_does_not_reset_balances(
    database: Database, wallet: Wallet, make_command: MakeCommand, ledger_state: ReadState
) -> None:
    await wallet.execute(make_command(Flow.SPEND, 300))
    before = await ledger_state()

    await seed(database)

    assert await ledger_state() == before
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 700
