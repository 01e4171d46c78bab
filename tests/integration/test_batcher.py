"""Group commit: commands that arrive together share a transaction, yet each caller gets its own
outcome, and only after its batch committed."""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from wallet.domain.errors import Conflict, DatabaseUnavailable, InsufficientFunds, UnknownUser
from wallet.domain.ledger import Command, Flow, Posted
from wallet.service import batcher as batcher_module
from wallet.service.batcher import Batcher
from wallet.service.posting import Outcome, post
from wallet.service.seed import BOB
from wallet.service.wallet import Wallet
from wallet.store import ledger
from wallet.store.database import Database

MakeCommand = Callable[..., Command]
ReadState = Callable[[], Awaitable[dict[str, Any]]]


def record_batches(monkeypatch: pytest.MonkeyPatch, *, poison: str | None = None) -> list[int]:
    """Count the commands of each batch the batcher posts; a batch holding the command with key
    `poison` fails as the database would fail it on a constraint."""
    sizes: list[int] = []

    async def recording_post(
        database: Database, commands: Sequence[Command], *, deadline: float | None = None
    ) -> list[Outcome]:
        sizes.append(len(commands))
        if any(c.idempotency_key == poison for c in commands):
            raise Conflict("refused by a constraint")
        return await post(database, commands, deadline=deadline)

    monkeypatch.setattr(batcher_module, "post", recording_post)
    return sizes


async def submit_all(batcher: Batcher, commands: list[Command]) -> list[Outcome | BaseException]:
    return await asyncio.gather(*(batcher.submit(c) for c in commands), return_exceptions=True)


async def test_commands_that_arrive_together_share_one_transaction(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(monkeypatch)
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    outcomes = await submit_all(batcher, [make_command(Flow.TOPUP, 1) for _ in range(20)])
    await batcher.close()

    assert all(isinstance(o, Posted) and not o.is_replay for o in outcomes)
    assert sum(sizes) == 20
    assert max(sizes) > 1, "concurrent commands were posted one transaction each"


async def test_a_batch_never_holds_more_than_its_maximum(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(monkeypatch)
    batcher = Batcher(database, max_size=3, max_wait_s=0.05)
    outcomes = await submit_all(batcher, [make_command(Flow.BONUS, 1) for _ in range(10)])
    await batcher.close()

    assert all(isinstance(o, Posted) for o in outcomes)
    assert sum(sizes) == 10
    assert max(sizes) <= 3


async def test_each_caller_gets_its_own_outcome_in_arrival_order(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(monkeypatch)
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    commands = [
        make_command(Flow.SPEND, 600),
        make_command(Flow.SPEND, 600),  # sees the first spend's balance: 400 left
        make_command(Flow.TOPUP, 5, user_id="nobody"),
        make_command(Flow.SPEND, 400),
        make_command(Flow.TOPUP, 7, user_id=BOB),
    ]
    outcomes = await submit_all(batcher, commands)
    await batcher.close()

    assert sizes == [5]
    assert [type(o) for o in outcomes] == [Posted, InsufficientFunds, UnknownUser, Posted, Posted]
    first, _, _, last, bob = outcomes
    assert isinstance(first, Posted)
    assert first.transaction.balance_after == 400
    assert isinstance(last, Posted)
    assert last.transaction.balance_after == 0
    assert isinstance(bob, Posted)
    assert bob.transaction.balance_after == 1007


async def test_duplicates_in_one_batch_apply_once(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(monkeypatch)
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    command = make_command(Flow.SPEND, 10, key="same-key")
    outcomes = await submit_all(batcher, [command] * 6)
    await batcher.close()

    assert sizes == [6]
    assert all(isinstance(o, Posted) for o in outcomes)
    posted = [o for o in outcomes if isinstance(o, Posted)]
    assert [o.is_replay for o in posted] == [False] + [True] * 5
    assert len({o.transaction.id for o in posted}) == 1
    assert posted[-1].transaction.balance_after == 990


async def test_when_the_database_is_unavailable_every_caller_of_the_batch_hears_it(
    database: Database,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def unavailable(
        _database: Database, _commands: Sequence[Command], *, deadline: float | None = None
    ) -> list[Outcome]:
        raise DatabaseUnavailable("the database cannot be reached")

    monkeypatch.setattr(batcher_module, "post", unavailable)
    before = await ledger_state()
    wallet = Wallet(database, batcher=Batcher(database, max_size=100, max_wait_s=0.05))
    results = await asyncio.gather(
        *(wallet.execute(make_command(Flow.TOPUP, 1)) for _ in range(5)), return_exceptions=True
    )
    assert wallet.batcher is not None
    await wallet.batcher.close()

    assert all(isinstance(r, DatabaseUnavailable) for r in results)
    assert await ledger_state() == before


async def test_a_command_the_database_refuses_fails_alone(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(monkeypatch, poison="poison")
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    commands = [make_command(Flow.TOPUP, 1) for _ in range(4)]
    commands.insert(2, make_command(Flow.TOPUP, 1, key="poison"))
    outcomes = await submit_all(batcher, commands)
    await batcher.close()

    assert sizes == [5, 1, 1, 1, 1, 1], "the refused batch was posted again command by command"
    assert [type(o) for o in outcomes] == [Posted, Posted, Conflict, Posted, Posted]


async def test_a_batch_that_fails_mid_commit_gives_every_caller_an_error_and_applies_nothing(
    database: Database,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = ledger.write_postings

    async def write_then_break(*args: Any, **kwargs: Any) -> None:
        await original(*args, **kwargs)  # everything written, then the connection breaks
        raise DatabaseUnavailable("the connection broke before the commit")

    monkeypatch.setattr(ledger, "write_postings", write_then_break)
    before = await ledger_state()
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    outcomes = await submit_all(batcher, [make_command(Flow.BONUS, 3) for _ in range(4)])
    await batcher.close()

    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes)
    assert await ledger_state() == before


async def test_a_caller_that_goes_away_does_not_disturb_the_others(
    database: Database, make_command: MakeCommand
) -> None:
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    tasks = [asyncio.create_task(batcher.submit(make_command(Flow.TOPUP, 2))) for _ in range(5)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await batcher.close()

    assert isinstance(results[1], asyncio.CancelledError)
    assert all(isinstance(r, Posted) for i, r in enumerate(results) if i != 1)


async def test_closing_finishes_commands_still_waiting_then_refuses_new_ones(
    database: Database, make_command: MakeCommand
) -> None:
    batcher = Batcher(database, max_size=100, max_wait_s=5)
    waiting = asyncio.create_task(batcher.submit(make_command(Flow.TOPUP, 2)))
    await asyncio.sleep(0.01)
    await asyncio.wait_for(batcher.close(), 2)  # does not sit out the 5 s batch wait

    assert isinstance(await waiting, Posted)
    with pytest.raises(DatabaseUnavailable):
        await batcher.submit(make_command(Flow.TOPUP, 2))


async def test_a_caller_gone_before_its_batch_began_is_not_applied(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = record_batches(monkeypatch)
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)
    kept = asyncio.create_task(batcher.submit(make_command(Flow.TOPUP, 2)))
    gone = asyncio.create_task(batcher.submit(make_command(Flow.TOPUP, 3)))
    await asyncio.sleep(0.01)  # both wait for the batch to fill
    gone.cancel()
    assert isinstance(await kept, Posted)
    await batcher.close()

    assert sizes == [1]


@pytest.mark.postgres_only
async def test_up_to_max_in_flight_batches_post_at_once_and_close_waits_for_all(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches post concurrently, never more than `max_in_flight`; each caller gets its own
    outcome, and closing waits for every batch in flight. (PostgreSQL: SQLite has one writer.)"""
    in_flight, most = 0, 0

    async def slow_post(
        database: Database, commands: Sequence[Command], *, deadline: float | None = None
    ) -> list[Outcome]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.05)  # long enough for the next batches to gather and start
            return await post(database, commands, deadline=deadline)
        finally:
            in_flight -= 1

    monkeypatch.setattr(batcher_module, "post", slow_post)
    batcher = Batcher(database, max_size=2, max_wait_s=0.001, max_in_flight=3)
    callers = [asyncio.create_task(batcher.submit(make_command(Flow.TOPUP, 1))) for _ in range(12)]
    await asyncio.sleep(0.01)
    await batcher.close()

    assert all(caller.done() for caller in callers), "close returned with callers unanswered"
    assert all(isinstance(caller.result(), Posted) for caller in callers)
    assert most == 3
