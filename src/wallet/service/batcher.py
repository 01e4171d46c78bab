"""Group commit: commands that arrive together share one database transaction.

Every flow moves a system account, so one transaction per request makes all requests queue on
that row's lock and on each commit's flush. The batcher hands the posting engine up to
`max_size` commands at once, gathered for at most `max_wait_s` after the first one arrives;
each caller gets its own outcome, and only after the batch has committed. Up to `max_in_flight`
batches post at once (each on its own connection and, for system accounts, its own balance
rows); the next batch gathers while they do.

Every caller is answered: with its outcome, or with DatabaseUnavailable (503) when its batch
could not finish, the batch cancelled or the batcher's task failed (a failed task starts again
with the next command). As for any 503, a retry with the same idempotency key gives the
definite answer."""

import asyncio
import contextlib
import contextvars
import time
from dataclasses import dataclass

import structlog

from wallet import metrics
from wallet.domain.errors import DatabaseUnavailable, WalletError
from wallet.domain.ledger import Command, Posted
from wallet.service.posting import Outcome, post, retry_deadline
from wallet.store.database import Database

log = structlog.get_logger()
STOPPED = DatabaseUnavailable(
    "the request's batch was interrupted; a retry with the same idempotency key gives the "
    "definite answer"
)


@dataclass(slots=True)
class _Pending:
    command: Command
    outcome: "asyncio.Future[Outcome]"
    context: contextvars.Context  # the caller's: its trace and log context


class Batcher:
    """One per process: a single task gathers batches and starts each in a task of its own,
    at most `max_in_flight` at a time."""

    def __init__(
        self, database: Database, *, max_size: int, max_wait_s: float, max_in_flight: int = 1
    ) -> None:
        self.database = database
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight: set[asyncio.Task[None]] = set()
        self._waiting: list[_Pending] = []
        self._arrived = asyncio.Event()
        self._filled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._is_closing = False

    async def submit(self, command: Command) -> Outcome:
        """Queue `command` and wait for its outcome; raises what failed its whole batch."""
        if self._is_closing:
            raise DatabaseUnavailable("the service is shutting down")
        if self._task is None or self._task.done():  # first command, or the task failed
            self._task = asyncio.create_task(self._run(), name="wallet-batcher")
        pending = _Pending(
            command, asyncio.get_running_loop().create_future(), contextvars.copy_context()
        )
        self._waiting.append(pending)
        self._arrived.set()
        if len(self._waiting) >= self.max_size:
            self._filled.set()
        return await pending.outcome

    async def close(self) -> None:
        """Finish every command already submitted (the batches in flight and those waiting),
        then stop: a server shutting down answers what it accepted."""
        self._is_closing = True
        self._arrived.set()
        self._filled.set()  # no more waiting for a batch to fill
        if self._task is not None:
            # Not `await self._task`: cancelling close() (a shutdown that stops waiting) would
            # cancel the task, and the batch in flight with it.
            await asyncio.wait([self._task])
        if self._in_flight:  # a task that failed left its batches in flight to finish alone
            await asyncio.wait(self._in_flight)

    async def _run(self) -> None:
        try:
            while self._waiting or not self._is_closing:
                await self._slots.acquire()  # a batch may start: until then the next one grows
                batch: list[_Pending] = []
                try:
                    batch = await self._gather()
                finally:
                    if not batch:  # none to post (closing, or a failure): the slot is free
                        self._slots.release()
                if not batch:
                    continue
                # In the context of the request that opened the batch, so its trace holds the
                # batch's database spans.
                task = asyncio.create_task(self._fly(batch), context=batch[0].context)
                self._in_flight.add(task)
                task.add_done_callback(self._land)
            if self._in_flight:
                await asyncio.wait(self._in_flight)
        except Exception:
            log.exception("the batcher failed; the next command starts it again")
        finally:
            # Cancelled or failed, the task leaves no caller waiting in a queue nobody drains
            # any more (a batch in flight answers its own callers: `_fly`).
            for pending in self._waiting:
                _settle(pending, STOPPED)
            self._waiting = []

    async def _fly(self, batch: list[_Pending]) -> None:
        try:
            await self._post(batch)
        finally:  # cancelled, even in its one-by-one fallback: no caller is left waiting
            for pending in batch:
                _settle(pending, STOPPED)

    def _land(self, task: "asyncio.Task[None]") -> None:
        self._in_flight.discard(task)
        self._slots.release()

    async def _post(self, batch: list[_Pending]) -> None:
        """Post `batch` in one transaction. If the database refuses it (a constraint, a defect),
        post each command alone, in arrival order, so one refused command does not fail the
        others. The batch and its fallback share one retry deadline: a command that fails with
        a non-transient error fails at once, transient conflicts are rerun until the deadline
        the batch started with, and past it each remaining command gets one attempt. So a
        refused command costs the others RETRY_FOR_S at most in all, not RETRY_FOR_S each."""
        metrics.BATCH_SIZE.observe(len(batch))
        started = time.perf_counter()
        deadline = retry_deadline()
        try:
            outcomes = await post(self.database, [p.command for p in batch], deadline=deadline)
        except DatabaseUnavailable as error:  # no command could apply: every caller hears so
            for pending in batch:
                _settle(pending, error)
            return
        except Exception as error:
            if len(batch) == 1:
                _settle(batch[0], error)
                return
            for pending in batch:
                if not pending.outcome.done():  # a caller gone before its turn is not applied
                    await self._post_alone(pending, deadline)
            return
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        for pending, outcome in zip(batch, outcomes, strict=True):
            _settle(pending, outcome)

    async def _post_alone(self, pending: _Pending, deadline: float) -> None:
        try:
            (outcome,) = await post(self.database, [pending.command], deadline=deadline)
        except Exception as error:
            _settle(pending, error)
        else:
            _settle(pending, outcome)

    async def _gather(self) -> list[_Pending]:
        """Wait for a first command, then up to `max_wait_s` for the batch to fill."""
        while not self._waiting:
            if self._is_closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._waiting) < self.max_size and not self._is_closing:
            self._filled.clear()
            # Waiting on an Event (not on a queue's get) can time out without losing a command.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._filled.wait(), self.max_wait_s)
        batch, self._waiting = self._waiting[: self.max_size], self._waiting[self.max_size :]
        # A caller that gave up before its batch began (deadline, disconnect) is not applied.
        return [pending for pending in batch if not pending.outcome.done()]


def _settle(pending: _Pending, outcome: Outcome | Exception) -> None:
    """Hand the caller its outcome; an error that is not the wallet's is raised to it."""
    if pending.outcome.done():  # its caller went away
        return
    if isinstance(outcome, Posted | WalletError):
        pending.outcome.set_result(outcome)
    else:
        pending.outcome.set_exception(outcome)
