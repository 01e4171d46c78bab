"""The `wallet` command: migrate, seed, serve, verify, bench."""

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
import uvicorn
from rich.console import Console

from wallet.bench import (
    DEFAULT_CONFIGURATIONS,
    BenchRefused,
    PopulatePlan,
    checks_table,
    load_plan,
)
from wallet.bench import run as run_bench
from wallet.domain.errors import WalletError
from wallet.service.audit import verify as verify_ledger
from wallet.service.seed import seed as seed_data
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import migrate as migrate_schema

app = typer.Typer(
    help="The wallet service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
R = TypeVar("R")


def _run(work: Callable[[Database], Awaitable[R]], settings: Settings | None = None) -> R:
    """Run `work` against the configured database, then close it; a wallet error (such as an
    unreachable database) ends the command with its message and exit code 1."""

    async def main() -> R:
        database = Database(create_engine(settings or Settings()))
        try:
            return await work(database)
        finally:
            await database.close()

    try:
        return asyncio.run(main())
    except WalletError as error:
        console.print(f"[red]{error.code}: {error.detail}[/]")
        raise typer.Exit(1) from None


LongTimeout = Annotated[
    float, typer.Option(min=1, help="Statement timeout, seconds: a large ledger takes minutes.")
]


def _with_timeout(timeout_s: float) -> Settings:
    return Settings().model_copy(update={"database_timeout_s": timeout_s})


@app.command()
def migrate(timeout_s: LongTimeout = 3600) -> None:
    """Create or upgrade the schema to the newest migration."""
    _run(migrate_schema, _with_timeout(timeout_s))
    console.print("schema is up to date")


@app.command()
def seed() -> None:
    """Create the asset types, system accounts and demo users (idempotent)."""
    _run(seed_data)
    console.print("seed data is in place")


@app.command()
def verify(timeout_s: LongTimeout = 3600) -> None:
    """Recompute every balance from the ledger and check every invariant; exit 1 on a mismatch."""
    checks = _run(verify_ledger, _with_timeout(timeout_s))
    console.print(checks_table(checks))
    if not all(check.is_clean for check in checks):
        console.print("[red]ledger verification FAILED[/]")
        raise typer.Exit(1)
    console.print("ledger verified: every invariant holds")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
) -> None:
    """Serve the HTTP API."""
    settings = Settings()
    uvicorn.run(
        "wallet.http.app:create_app_from_environment",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=settings.log_level,
        access_log=False,
    )


@app.command()
def bench(
    users: Annotated[int, typer.Option(min=1, help="Bench users to seed and load.")] = 1000,
    duration: Annotated[int, typer.Option(min=1, help="Seconds of load per cell.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Seconds of unmeasured load first.")] = 1,
    concurrency: Annotated[str, typer.Option(help="Client connections per cell.")] = "1,16,64,256",
    scenarios: Annotated[str, typer.Option(help="spread (many users), hot (one user).")] = (
        "spread,hot"
    ),
    flows: Annotated[str, typer.Option(help="Flows to drive: spend, topup, bonus.")] = (
        "spend,topup"
    ),
    configuration: Annotated[
        list[str] | None,
        typer.Option(
            "--configuration",
            "-C",
            help="NAME[:WALLET_X=v,...,workers=N], repeatable; the first is the baseline. "
            f"Default: {' and '.join(repr(c) for c in DEFAULT_CONFIGURATIONS)}.",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Server worker processes.")] = 2,
    max_requests: Annotated[int, typer.Option(min=1, help="Most requests per cell.")] = 1_000_000,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print the table as Markdown, for docs.")
    ] = False,
    populate: Annotated[
        bool, typer.Option("--populate", help="Bulk-load a large ledger instead (PostgreSQL).")
    ] = False,
    populate_users: Annotated[int, typer.Option(min=1)] = 1_000_000,
    populate_entries: Annotated[int, typer.Option(min=2)] = 10_000_000,
    force: Annotated[
        bool, typer.Option("--force", help="Populate a database that holds more than the seed.")
    ] = False,
) -> None:
    """Load a server started for the run with wrk and print a table; then verify the ledger.
    Runs on WALLET_DATABASE_URL: point it at a scratch database."""
    try:
        plan = (
            PopulatePlan(users=populate_users, entries=populate_entries, is_forced=force)
            if populate
            else load_plan(
                users=users,
                duration_s=duration,
                warmup_s=warmup,
                concurrency=concurrency,
                scenarios=scenarios,
                flows=flows,
                configurations=configuration or DEFAULT_CONFIGURATIONS,
                workers=workers,
                max_requests=max_requests,
                is_markdown=markdown,
            )
        )
    except BenchRefused as refusal:
        raise typer.BadParameter(str(refusal)) from None
    raise typer.Exit(run_bench(Settings(), plan=plan, argv=sys.argv, console=console))
