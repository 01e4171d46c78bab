"""The reads: history, ledger and users are newest first and page without gaps or repeats (a
transaction of two kinds is one in the history and four entries in the ledger, two of each
account's); filters narrow them; unknown ids are errors."""

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from wallet.domain.errors import UnknownAsset, UnknownTransaction, UnknownUser
from wallet.domain.ledger import Direction, Flow, Kind, Transaction
from wallet.service.posting import post
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Page, PageRequest, Wallet
from wallet.store.database import Database

MakeCommand = Callable[..., Any]
T = TypeVar("T")

# Alice's flows after the seed, oldest first; Bob's are interleaved to be filtered out.
ALICE_FLOWS = [
    (Flow.TOPUP, 10, "GOLD_COINS"),
    (Flow.SPEND, 20, "GOLD_COINS"),
    (Flow.BONUS, 3, "DIAMONDS"),
    (Flow.SPEND, 1, "DIAMONDS"),
    (Flow.TOPUP, 5, "LOYALTY_POINTS"),
    (Flow.SPEND, 100, "LOYALTY_POINTS"),
    (Flow.BONUS, 7, "GOLD_COINS"),
    (Flow.SPEND, 4, "DIAMONDS"),  # the bonus's 2 free diamonds left, then 2 paid ones
    (Flow.TOPUP, 1, "GOLD_COINS"),
]
SEED_ASSETS_NEWEST_FIRST = ["LOYALTY_POINTS", "DIAMONDS", "GOLD_COINS"]


async def walk(fetch: Callable[[PageRequest], Awaitable[Page[T]]], *, limit: int) -> list[T]:
    """Every item, page by page through the cursors; each page but the last is full."""
    items: list[T] = []
    cursor: int | None = None
    while True:
        page, cursor = await fetch(PageRequest(limit=limit, before=cursor))
        assert len(page) <= limit
        items.extend(page)
        if cursor is None:
            return items
        assert len(page) == limit


async def alice_history(database: Database, make_command: MakeCommand) -> list[Transaction]:
    """Post ALICE_FLOWS (half in one batch, half one by one) with Bob's flows in between; returns
    Alice's new transactions oldest first."""
    made: list[Transaction] = []
    commands = [make_command(flow, amount, asset=asset) for flow, amount, asset in ALICE_FLOWS]
    bob = [make_command(Flow.TOPUP, 1, user_id=BOB), make_command(Flow.SPEND, 1, user_id=BOB)]
    for outcome in await post(database, [commands[0], bob[0], *commands[1:5]]):
        assert not isinstance(outcome, Exception)
        if outcome.transaction.user_id == ALICE:
            made.append(outcome.transaction)
    for command in [commands[5], bob[1], *commands[6:]]:
        (outcome,) = await post(database, [command])
        assert not isinstance(outcome, Exception)
        if outcome.transaction.user_id == ALICE:
            made.append(outcome.transaction)
    return made


def history_of(
    wallet: Wallet, user_id: str = ALICE, *, flow: Flow | None = None, asset: str | None = None
) -> Callable[[PageRequest], Awaitable[Page[Transaction]]]:
    async def fetch(page: PageRequest) -> Page[Transaction]:
        return await wallet.history(user_id=user_id, flow=flow, asset_symbol=asset, page=page)

    return fetch


@pytest.mark.parametrize("limit", [1, 4, 5, 12, 50])
async def test_history_pages_newest_first_without_gaps_or_repeats(
    database: Database, wallet: Wallet, make_command: MakeCommand, limit: int
) -> None:
    made = await alice_history(database, make_command)

    walked = await walk(history_of(wallet), limit=limit)

    assert len({t.id for t in walked}) == len(walked) == 12
    assert [t.id for t in walked[:9]] == [t.id for t in reversed(made)]
    assert [(t.flow, t.asset_symbol) for t in walked[9:]] == [
        (Flow.TOPUP, asset) for asset in SEED_ASSETS_NEWEST_FIRST
    ]
    assert all(t.user_id == ALICE for t in walked)
    assert [t.created_at for t in walked] == sorted((t.created_at for t in walked), reverse=True)


async def test_history_pages_by_offset_for_old_clients(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    await alice_history(database, make_command)
    everything = await walk(history_of(wallet), limit=50)

    second, cursor = await wallet.history(
        user_id=ALICE, flow=None, asset_symbol=None, page=PageRequest(limit=5, offset=5)
    )
    assert second == everything[5:10]
    assert cursor is not None
    rest, end = await wallet.history(
        user_id=ALICE, flow=None, asset_symbol=None, page=PageRequest(limit=5, before=cursor)
    )
    assert rest == everything[10:]
    assert end is None


@pytest.mark.parametrize(
    ("flow", "asset"),
    [
        (Flow.SPEND, None),
        (Flow.TOPUP, None),
        (Flow.BONUS, None),
        (None, "DIAMONDS"),
        (None, "GOLD_COINS"),
        (Flow.SPEND, "DIAMONDS"),
        (Flow.BONUS, "LOYALTY_POINTS"),
    ],
)
async def test_history_filters_by_flow_and_asset(
    database: Database,
    wallet: Wallet,
    make_command: MakeCommand,
    flow: Flow | None,
    asset: str | None,
) -> None:
    await alice_history(database, make_command)
    everything = await walk(history_of(wallet), limit=50)

    filtered = await walk(history_of(wallet, flow=flow, asset=asset), limit=2)

    assert filtered == [
        t
        for t in everything
        if (flow is None or t.flow is flow) and (asset is None or t.asset_symbol == asset)
    ]


async def test_history_of_an_unknown_user_or_with_an_unknown_asset_is_an_error(
    wallet: Wallet,
) -> None:
    with pytest.raises(UnknownUser):
        await walk(history_of(wallet, "nobody"), limit=5)
    with pytest.raises(UnknownUser):
        await walk(history_of(wallet, "system:treasury"), limit=5)
    with pytest.raises(UnknownAsset):
        await walk(history_of(wallet, asset="SILVER"), limit=5)


@pytest.mark.parametrize("limit", [1, 3, 12, 50])
async def test_ledger_pages_newest_first_and_replays_each_balance_after_chain(
    database: Database, wallet: Wallet, make_command: MakeCommand, limit: int
) -> None:
    made = await alice_history(database, make_command)

    async def fetch(page: PageRequest) -> Page[Any]:
        return await wallet.ledger(user_id=ALICE, asset_symbol=None, page=page)

    walked = await walk(fetch, limit=limit)

    # 13: the seed's 3 top-ups, and Alice's side of her 9 transactions, two for the spend of
    # both kinds.
    assert len({e.id for e in walked}) == len(walked) == 13
    newest = [e.transaction_id for e in walked[:10]]
    assert list(dict.fromkeys(newest)) == [t.id for t in reversed(made)]
    assert newest.count(made[7].id) == 2
    assert all(e.account_id == ALICE for e in walked)
    running: dict[str, int] = {}
    running_paid: dict[str, int] = {}
    for entry in reversed(walked):
        signed = entry.amount if entry.direction is Direction.CREDIT else -entry.amount
        running[entry.asset_symbol] = running.get(entry.asset_symbol, 0) + signed
        paid = signed if entry.kind is Kind.PAID else 0
        running_paid[entry.asset_symbol] = running_paid.get(entry.asset_symbol, 0) + paid
        assert entry.balance_after == running[entry.asset_symbol]
        assert entry.paid_after == running_paid[entry.asset_symbol]
    standings = await wallet.standings(user_id=ALICE)
    assert sorted(running.items()) == [(s.asset_symbol, s.balance) for s in standings]
    assert sorted(running_paid.items()) == [(s.asset_symbol, s.paid) for s in standings]


async def test_ledger_entries_of_alice_debit_her_spends_and_credit_everything_else(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    made = {t.id: t for t in await alice_history(database, make_command)}
    entries, _ = await wallet.ledger(user_id=ALICE, asset_symbol=None, page=PageRequest(limit=9))

    for entry in entries:
        flow = made[entry.transaction_id].flow
        expected = Direction.DEBIT if flow is Flow.SPEND else Direction.CREDIT
        assert entry.direction is expected


async def test_ledger_filters_by_asset(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    await alice_history(database, make_command)

    async def fetch(page: PageRequest) -> Page[Any]:
        return await wallet.ledger(user_id=ALICE, asset_symbol="DIAMONDS", page=page)

    walked = await walk(fetch, limit=2)

    assert [(e.direction, e.kind, e.amount) for e in walked] == [
        (Direction.DEBIT, Kind.PAID, 2),
        (Direction.DEBIT, Kind.FREE, 2),
        (Direction.DEBIT, Kind.FREE, 1),
        (Direction.CREDIT, Kind.FREE, 3),
        (Direction.CREDIT, Kind.PAID, 10),
    ]
    assert [(e.balance_after, e.paid_after) for e in walked] == [
        (8, 8),
        (10, 10),
        (12, 10),
        (13, 10),
        (10, 10),
    ]


@pytest.mark.parametrize("limit", [1, 2, 9, 50])
async def test_users_page_newest_first_without_system_accounts(wallet: Wallet, limit: int) -> None:
    created = [
        await wallet.create_user(user_id=f"user-{n}", email=f"u{n}@example.com", name=f"U{n}")
        for n in range(7)
    ]

    async def fetch(page: PageRequest) -> Page[Any]:
        return await wallet.users(page=page)

    walked = await walk(fetch, limit=limit)

    assert [u.id for u in walked] == [u.id for u in reversed(created)] + [BOB, ALICE]


async def test_a_transaction_is_found_only_under_its_own_user(
    wallet: Wallet, make_command: MakeCommand
) -> None:
    spent = (await wallet.execute(make_command(Flow.SPEND, 5))).transaction

    found, entries = await wallet.transaction(user_id=ALICE, transaction_id=spent.id)
    assert found == spent
    assert len(entries) == 2
    with pytest.raises(UnknownTransaction):
        await wallet.transaction(user_id=BOB, transaction_id=spent.id)
    with pytest.raises(UnknownTransaction):
        await wallet.transaction(user_id=ALICE, transaction_id="no-such-transaction")


async def test_balances_list_every_asset_with_zeros_included(wallet: Wallet) -> None:
    await wallet.create_user(user_id="carol", email="carol@example.com", name="Carol")
    assert await wallet.balances(user_id="carol") == [
        ("DIAMONDS", 0),
        ("GOLD_COINS", 0),
        ("LOYALTY_POINTS", 0),
    ]
    with pytest.raises(UnknownUser):
        await wallet.balances(user_id="nobody")
    with pytest.raises(UnknownAsset):
        await wallet.balance(user_id=ALICE, asset_symbol="SILVER")
