"""The `wallet` command: migrate, seed, serve, verify."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
import uvicorn
from rich.console import Console
from rich.table import Table

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


def _run(work: Callable[[Database], Awaitable[R]]) -> R:
    """Run `work` against the configured database, then close it."""

    async def main() -> R:
        database = Database(create_engine(Settings()))
        try:
            return await work(database)
        finally:
            await database.close()

    return asyncio.run(main())


@app.command()
def migrate() -> None:
    """Create or upgrade the schema to the newest migration."""
    _run(migrate_schema)
    console.print("schema is up to date")


@app.command()
def seed() -> None:
    """Create the asset types, system accounts and demo users (idempotent)."""
    _run(seed_data)
    console.print("seed data is in place")


@app.command()
def verify() -> None:
    """Recompute every balance from the ledger and check every invariant; exit 1 on a mismatch."""
    checks = _run(verify_ledger)
    table = Table("check", "result")
    for check in checks:
        shown = check.failures[:10]
        more = len(check.failures) - len(shown)
        result = "[green]ok[/]" if check.is_clean else "[red]" + "\n".join(shown) + "[/]"
        table.add_row(check.name, result + (f"\n… and {more} more" if more > 0 else ""))
    console.print(table)
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
