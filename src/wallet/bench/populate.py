"""`wallet bench --populate`: bulk-load a large, consistent ledger into a scratch PostgreSQL
database, then show that the API's reads stay indexed: their timings before and after, and their
plans for the heaviest user."""

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from wallet.bench.database import open_database, run_on
from wallet.bench.plan import PopulatePlan
from wallet.bench.report import print_as_is, provenance
from wallet.service.populate import (
    ASSET,
    OnProgress,
    explain_reads,
    load_ledger,
    prepare_scratch,
    table_sizes,
    vacuum_analyze,
)
from wallet.service.seed import ALICE
from wallet.service.wallet import PageRequest, Wallet
from wallet.settings import Settings
from wallet.store.database import Database

TIMED_READS = 50


@dataclass(frozen=True, slots=True)
class Read:
    """One read the API serves, as the service runs it."""

    name: str
    run: Callable[[Wallet, str], Awaitable[object]]


READS = (
    Read(
        "balance (GET /wallet/balance/{user}/GOLD_COINS)",
        lambda wallet, user: wallet.balance(user_id=user, asset_symbol=ASSET),
    ),
    Read(
        "history, first page of 50 (GET /wallet/transactions/{user})",
        lambda wallet, user: wallet.history(
            user_id=user, flow=None, asset_symbol=None, page=PageRequest()
        ),
    ),
    Read(
        "ledger, first page of 50 (GET /wallet/ledger/{user})",
        lambda wallet, user: wallet.ledger(user_id=user, asset_symbol=None, page=PageRequest()),
    ),
    Read(
        # The newest entry at or before `at` is one index descent, wherever `at` falls.
        "every balance at a time (GET /wallet/balances/{user}?at=)",
        lambda wallet, user: wallet.balances_at(user_id=user, at=datetime.now(UTC)),
    ),
    Read(
        # Outstanding: three index descents; the period: every transaction of the asset so far.
        "liabilities of GOLD_COINS, whole history (GET /reports/liabilities)",
        lambda wallet, _: wallet.liabilities(asset_symbol=ASSET, at=None, since=None, until=None),
    ),
)


async def time_reads(database: Database, users: Sequence[tuple[str, str]]) -> Table:
    """Median and p95 of TIMED_READS runs of each read for each (label, user id)."""
    wallet = Wallet(database)
    table = Table("read", "user", "median ms", "p95 ms", title=f"reads, {TIMED_READS} runs each")
    for read in READS:
        for label, user in users:
            await read.run(wallet, user)  # warm the pool and the cache
            took = []
            for _ in range(TIMED_READS):
                started = time.perf_counter()
                await read.run(wallet, user)
                took.append((time.perf_counter() - started) * 1000)
            p95 = statistics.quantiles(took, n=20)[-1]
            table.add_row(read.name, label, f"{statistics.median(took):.2f}", f"{p95:.2f}")
    return table


async def show_plans(database: Database, user: str, *, console: Console) -> None:
    """EXPLAIN (ANALYZE, BUFFERS) of every distinct statement the reads run for `user`."""
    wallet = Wallet(database)

    async def reads() -> None:
        for read in READS:
            await read.run(wallet, user)

    for explained in await explain_reads(database, reads):
        print_as_is(console, f"\n{explained.statement}\nparameters: {explained.parameters}")
        print_as_is(console, "\n".join(explained.lines))


def populate_command(
    settings: Settings, plan: PopulatePlan, *, argv: Sequence[str], console: Console
) -> int:
    """`wallet bench --populate`: load, then show the plans and timings of the API's reads."""
    database = open_database(settings)

    async def work() -> None:
        await prepare_scratch(database, is_forced=plan.is_forced)
        for line in provenance(database, argv=argv):
            print_as_is(console, line)
        alice = str(ALICE)
        console.print(await time_reads(database, [("seed data only: Alice", alice)]))
        with _progress_bars(console) as show:
            loaded = await load_ledger(
                database, users=plan.users, entries=plan.entries, on_progress=show
            )
        console.print(
            f"loaded {loaded.users:,} users, {loaded.transactions:,} transactions and "
            f"{loaded.entries:,} entries in {loaded.seconds:.1f} s "
            f"({loaded.entries / loaded.seconds:,.0f} entries/s), one transaction",
            highlight=False,
        )
        started = time.monotonic()
        await vacuum_analyze(database)
        console.print(f"VACUUM (ANALYZE) took {time.monotonic() - started:.1f} s", highlight=False)
        sizes = Table("table", "rows", "size with indexes", title="tables")
        for size in await table_sizes(database):
            sizes.add_row(size.name, f"{size.rows:,}", size.size)
        console.print(sizes)
        heavy = loaded.heavy_user
        users = [("heavy user", heavy), ("typical user", loaded.typical_user), ("Alice", alice)]
        console.print(await time_reads(database, users))
        console.print(f"\nplans for the heavy user {heavy}:")
        await show_plans(database, heavy, console=console)

    asyncio.run(run_on(database, work()))
    return 0


@contextmanager
def _progress_bars(console: Console) -> Iterator[OnProgress]:
    """Shows a load's progress: a bar per phase, added when the phase starts."""
    tasks: dict[str, TaskID] = {}
    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(TextColumn("{task.description}"), *columns, console=console) as progress:

        def show(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done)

        yield show
