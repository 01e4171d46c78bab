"""The batcher's edges: every caller is answered, whatever stops its batch (a cancelled batch, a
failed batcher task, a refused command, a shutdown), and a refused command costs the others one
retry deadline at most, not one each."""

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.errors import Conflict, DatabaseUnavailable
from wallet.domain.ledger import Command, Flow, Posted
from wallet.service import batcher as batcher_module
from wallet.service import posting
from wallet.service.batcher import Batcher
from wallet.service.posting import Outcome, post
from wallet.store.database import Database, TransientConflict
from wallet.store.ledger import ShardPicker

MakeCommand = Callable[..., Command]
ReadState = Callable[[], Awaitable[dict[str, Any]]]
Answer = Outcome | BaseException
# Only a caller the batcher left waiting takes this long: every other finishes well within it.
NEVER_ANSWERED_S = 30


async def answers(callers: Sequence["asyncio.Task[Outcome]"]) -> list[Answer]:
    """What each caller got, once the batcher has nothing left to do for them."""
    _, waiting = await asyncio.wait(callers, timeout=NEVER_ANSWERED_S)
    assert not waiting, f"{len(waiting)} of {len(callers)} callers were never answered"
    return list(await asyncio.gather(*callers, return_exceptions=True))


def submit_each(batcher: Batcher, commands: Sequence[Command]) -> list["asyncio.Task[Outcome]"]:
    return [asyncio.create_task(batcher.submit(c)) for c in commands]


class SlowPost:
    """Stands in for `post`: a batch holding `poison` is refused as by a constraint; the posting
    of `command_held` (alone or in a batch) waits until `release` is set."""

    def __init__(self, *, poison: str | None = None, command_held: str | None = None) -> None:
        self.poison = poison
        self.command_held = command_held
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self.holding_task: asyncio.Task[Any] | None = None
        self.posted_alone: list[str] = []

    async def __call__(
        self, database: Database, commands: Sequence[Command], *, deadline: float | None = None
    ) -> list[Outcome]:
        keys = [c.idempotency_key for c in commands]
        if len(keys) == 1:
            self.posted_alone.append(keys[0])
        if self.poison in keys:
            raise Conflict("refused by a constraint")
        if self.command_held in keys:
            self.holding_task = asyncio.current_task()
            self.held.set()
            await self.release.wait()
        return await post(database, commands, deadline=deadline)


async def test_a_batch_cancelled_during_its_one_by_one_fallback_answers_every_caller(
    database: Database,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    commands = [make_command(Flow.TOPUP, 1) for _ in range(4)]
    first, poison = commands[0].idempotency_key, commands[1].idempotency_key
    slow = SlowPost(poison=poison, command_held=first)
    monkeypatch.setattr(batcher_module, "post", slow)
    before = await ledger_state()
    batcher = Batcher(database, max_size=len(commands), max_wait_s=0.05)

    callers = submit_each(batcher, commands)
    await slow.held.wait()  # the batch was refused; its first command is posted alone
    assert slow.holding_task is not None
    slow.holding_task.cancel()
    outcomes = await answers(callers)

    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
    assert await ledger_state() == before
    slow.command_held = None
    assert isinstance(await batcher.submit(make_command(Flow.TOPUP, 1)), Posted)
    await batcher.close()


async def test_a_caller_gone_during_the_fallback_is_not_applied_and_the_others_are(
    database: Database,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    commands = [make_command(Flow.TOPUP, 1) for _ in range(4)]
    first, poison, gone, last = (c.idempotency_key for c in commands)
    slow = SlowPost(poison=poison, command_held=first)
    monkeypatch.setattr(batcher_module, "post", slow)
    batcher = Batcher(database, max_size=len(commands), max_wait_s=0.05)

    callers = submit_each(batcher, commands)
    await slow.held.wait()
    callers[2].cancel()  # its deadline passed while the first command was posted alone
    slow.release.set()
    outcomes = await answers(callers)
    await batcher.close()

    assert [type(o) for o in outcomes] == [Posted, Conflict, asyncio.CancelledError, Posted]
    assert slow.posted_alone == [first, poison, last]
    assert gone not in (await ledger_state())["idempotency_keys"]


async def test_callers_waiting_when_the_batcher_task_fails_hear_503_and_the_next_is_served(
    database: Database,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gather = Batcher._gather
    has_failed = False

    async def failing_once(batcher: Batcher) -> list[Any]:
        nonlocal has_failed
        if not has_failed:
            has_failed = True
            raise RuntimeError("a defect of the batcher")
        return await gather(batcher)

    monkeypatch.setattr(Batcher, "_gather", failing_once)
    before = await ledger_state()
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)

    outcomes = await answers(submit_each(batcher, [make_command(Flow.TOPUP, 1) for _ in range(3)]))
    assert all(isinstance(o, DatabaseUnavailable) for o in outcomes), outcomes
    assert await ledger_state() == before

    served = await answers(submit_each(batcher, [make_command(Flow.TOPUP, 1)]))
    await batcher.close()
    assert [type(o) for o in served] == [Posted]


async def test_a_refused_command_costs_the_others_of_its_batch_one_retry_deadline_in_all(
    database: Database, make_command: MakeCommand, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first two commands meet a transient conflict on every attempt: the first is rerun
    until the batch's deadline, the second then gets one attempt, not a deadline of its own;
    the refused one fails at its first attempt alone, the last applies."""
    commands = [make_command(Flow.TOPUP, 1) for _ in range(4)]
    conflicted, poison, conflicted_too, last = (c.idempotency_key for c in commands)
    attempts_alone: Counter[str] = Counter()
    apply = posting._apply

    async def injected(
        connection: AsyncConnection, batch: Sequence[Command], shards: ShardPicker
    ) -> list[Outcome]:
        keys = {c.idempotency_key for c in batch}
        if len(batch) == 1:
            attempts_alone.update(keys)
        if poison in keys:
            raise Conflict("refused by a constraint")
        if len(batch) == 1 and keys & {conflicted, conflicted_too}:
            raise TransientConflict("40001")
        return await apply(connection, batch, shards)

    monkeypatch.setattr(posting, "_apply", injected)
    monkeypatch.setattr(posting, "RETRY_FOR_S", 0.5)
    batcher = Batcher(database, max_size=len(commands), max_wait_s=0.05)

    outcomes = await answers(submit_each(batcher, commands))
    await batcher.close()

    assert [type(o) for o in outcomes] == [
        DatabaseUnavailable,
        Conflict,
        DatabaseUnavailable,
        Posted,
    ]
    assert attempts_alone[poison] == 1
    assert attempts_alone[conflicted_too] == 1, "the second conflicted command had its own deadline"
    assert attempts_alone[last] == 1


@pytest.mark.parametrize("is_close_cancelled", [False, True], ids=["close", "close-cancelled"])
async def test_closing_while_a_batch_posts_answers_every_caller_with_its_real_outcome(
    database: Database,
    make_command: MakeCommand,
    ledger_state: ReadState,
    monkeypatch: pytest.MonkeyPatch,
    is_close_cancelled: bool,
) -> None:
    """Even when the shutdown stops waiting for close(): the batch in flight still commits, and
    the commands waiting behind it are still posted."""
    commands = [make_command(Flow.TOPUP, 1) for _ in range(3)]
    slow = SlowPost(command_held=commands[0].idempotency_key)
    monkeypatch.setattr(batcher_module, "post", slow)
    batcher = Batcher(database, max_size=100, max_wait_s=0.05)

    in_flight = submit_each(batcher, commands[:1])
    await slow.held.wait()
    waiting = submit_each(batcher, commands[1:])
    await asyncio.sleep(0)  # both are queued behind the batch in flight
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(DatabaseUnavailable):
        await batcher.submit(make_command(Flow.TOPUP, 1))
    if is_close_cancelled:
        closing.cancel()
    slow.release.set()
    outcomes = await answers([*in_flight, *waiting])
    await asyncio.gather(closing, return_exceptions=True)

    assert all(isinstance(o, Posted) for o in outcomes), outcomes
    stored = (await ledger_state())["idempotency_keys"]
    assert {c.idempotency_key for c in commands} <= stored
