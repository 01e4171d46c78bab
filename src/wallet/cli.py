"""The `wallet` command: migrate, seed, serve, verify, checkpoint, keys, bench.

Commands import what they use when they run: `serve` must set PROMETHEUS_MULTIPROC_DIR before
anything imports prometheus-client, and a one-line error beats a slow start."""

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from wallet.settings import Settings

if TYPE_CHECKING:
    from wallet.service.access import Access
    from wallet.service.audit import Check, Checkpoint
    from wallet.store.database import Database

app = typer.Typer(
    help="The wallet service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags show as flags
)
keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
report_app = typer.Typer(help="Reports computed from the ledger.", no_args_is_help=True)
app.add_typer(report_app, name="report")
console = Console()
R = TypeVar("R")


def load_settings(**overrides: object) -> Settings:
    """The settings from the environment; a bad one ends the command with one line naming it
    (never its value: it may be a password) and exit status 2."""
    try:
        settings = Settings()
    except ValidationError as error:
        for problem in error.errors(include_input=False, include_url=False):
            name = "WALLET_" + "_".join(str(part) for part in problem["loc"]).upper()
            name = name.replace("WALLET_OTEL_", "OTEL_")
            console.print(f"[red]{name}: {problem['msg']}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    return settings.model_copy(update=overrides) if overrides else settings


def _run(work: Callable[["Database"], Awaitable[R]], settings: Settings | None = None) -> R:
    """Run `work` against the configured database, then close it; a wallet error (such as an
    unreachable database) ends the command with its message and exit code 1."""
    from wallet.domain.errors import WalletError
    from wallet.store.database import Database, create_engine

    settings = settings or load_settings()

    async def main() -> R:
        database = Database(create_engine(settings), system_shards=settings.system_shards)
        try:
            return await work(database)
        finally:
            await database.close()

    try:
        return asyncio.run(main())
    except WalletError as error:
        console.print(f"[red]{error.code}: {error.detail}[/]", highlight=False)
        raise typer.Exit(1) from None


def _version(is_asked: bool) -> None:
    if is_asked:
        console.print(f"wallet {version('wallet')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """The wallet service."""
    if named := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # prometheus-client writes its files there as soon as a metric exists.
        Path(named).mkdir(parents=True, exist_ok=True)


LongTimeout = Annotated[
    float, typer.Option(min=1, help="Statement timeout, seconds: a large ledger takes minutes.")
]


@app.command()
def migrate(timeout_s: LongTimeout = 3600) -> None:
    """Create or upgrade the schema to the newest migration."""
    from wallet.store.migrate import migrate as migrate_schema

    before, after = _run(migrate_schema, load_settings(database_timeout_s=timeout_s))
    if before is None:
        console.print(f"created the schema at revision {after}")
    elif before != after:
        console.print(f"upgraded the schema from revision {before} to {after}")
    else:
        console.print(f"schema is up to date (revision {after})")


@app.command()
def seed() -> None:
    """Create the asset types, system accounts and demo users (idempotent); on a database
    without API keys, also a first admin key, printed once."""
    from wallet.service.seed import seed as seed_data

    settings = load_settings()

    async def seed_and_first_key(database: "Database") -> str | None:
        await seed_data(database)
        return await _access(database, settings).create_first_key()

    first_key = _run(seed_and_first_key, settings)
    console.print("seed data is in place")
    if first_key is not None:
        console.print(
            "created the first API key (scope admin); it is shown this once, keep it secret:"
        )
        print(first_key)  # alone on its line, without markup, for scripts to take


CheckpointFile = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="A checkpoint taken earlier (wallet checkpoint): also prove the ledger extends it.",
        show_default=False,
    ),
]


@app.command()
def verify(timeout_s: LongTimeout = 3600, checkpoint: CheckpointFile = None) -> None:
    """Recompute every balance from the ledger and check every invariant; exit 1 on a mismatch.
    With PROMETHEUS_MULTIPROC_DIR set to a server's, its /metrics shows the outcome."""
    import time

    from wallet import metrics
    from wallet.bench import checks_table
    from wallet.service.audit import verify as verify_ledger

    pinned = None if checkpoint is None else _read_checkpoint(checkpoint)
    settings = load_settings(database_timeout_s=timeout_s)

    async def run(database: "Database") -> "list[Check]":
        return await verify_ledger(database, checkpoint=pinned, checkpoint_name=str(checkpoint))

    checks = _run(run, settings)
    console.print(checks_table(checks))
    is_clean = all(check.is_clean for check in checks)
    metrics.VERIFY_CLEAN.set(1 if is_clean else 0)
    metrics.VERIFY_FINISHED.set(time.time())
    if not is_clean:
        console.print("[red]ledger verification FAILED[/]")
        raise typer.Exit(1)
    console.print("ledger verified: every invariant holds")


def _read_checkpoint(path: Path) -> "Checkpoint":
    """The checkpoint in `path`; one line naming the file and what is wrong, and exit status 2,
    when it cannot be read or is not a checkpoint."""
    from wallet.service.audit import InvalidCheckpoint, parse_checkpoint

    try:
        return parse_checkpoint(path.read_bytes())
    except (OSError, InvalidCheckpoint) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        console.print(f"[red]{escape(f'{path}: {reason}')}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def checkpoint(
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            help="Write the checkpoint to this file instead of printing it.",
            show_default=False,
        ),
    ] = None,
    timeout_s: LongTimeout = 3600,
) -> None:
    """Print the newest hash link and length of every chain, as JSON: kept outside the database,
    it lets `wallet verify --checkpoint FILE` prove later that the ledger still extends it."""
    import json

    from wallet.service.audit import checkpoint as take_checkpoint
    from wallet.service.audit import checkpoint_json

    taken = _run(take_checkpoint, load_settings(database_timeout_s=timeout_s))
    text = json.dumps(checkpoint_json(taken), ensure_ascii=False, separators=(",", ":"))
    if output is None:
        print(text)  # plain, without markup or wrapping, for scripts to take
        return
    try:
        output.write_text(text + "\n", encoding="utf-8")
    except OSError as error:
        reason = error.strerror or error
        console.print(f"[red]{escape(f'{output}: {reason}')}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"wrote a checkpoint of {len(taken.chains)} chains to {output}", highlight=False)


MomentOption = Annotated[
    str | None,
    typer.Option(help="RFC 3339, such as 2027-03-31T23:59:59+09:00.", show_default=False),
]


@report_app.command()
def liabilities(
    asset: Annotated[str, typer.Option(help="The asset symbol.", show_default=False)],
    at: MomentOption = None,
    since: Annotated[
        str | None,
        typer.Option("--from", help="RFC 3339: the period starts after it.", show_default=False),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--to", help="RFC 3339: the period ends at it.", show_default=False),
    ] = None,
) -> None:
    """Print what the platform owes its users of an asset at a moment (paid and free), and what
    moved in a period, as the JSON of GET /api/v1/reports/liabilities."""
    from pydantic import TypeAdapter

    from wallet.http import schemas
    from wallet.service.wallet import Wallet, liabilities_body

    moment = TypeAdapter(schemas.Moment | None)
    moments = []
    for option, value in (("--at", at), ("--from", since), ("--to", until)):
        try:
            moments.append(moment.validate_python(value))
        except ValidationError as error:
            message = error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            console.print(f"[red]{option} {escape(message)}[/]", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
    at_, since_, until_ = moments

    async def report(database: "Database") -> str:
        found = await Wallet(database).liabilities(
            asset_symbol=asset, at=at_, since=since_, until=until_
        )
        return schemas.Liabilities.model_validate(liabilities_body(found)).model_dump_json(
            by_alias=True
        )

    print(_run(report))  # plain, for scripts to take


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Worker processes. Default: WALLET_WORKERS, else the CPU count on PostgreSQL "
            "and 1 on SQLite (one writer).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the HTTP API. SIGTERM stops it gracefully: it stops accepting, answers every
    request it accepted, then exits."""
    settings = load_settings()
    workers = workers or worker_count(settings)
    metrics_dir = _clean_metrics_dir()
    import uvicorn

    from wallet.logs import configure_logging

    configure_logging(settings.log_level)
    try:
        uvicorn.run(
            "wallet.http.app:create_app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level=settings.log_level,
            log_config=None,  # the service's own logging (logs.py), set above and per worker
            access_log=False,  # the gate logs one line per request instead
            timeout_keep_alive=IDLE_CONNECTION_TIMEOUT_S,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


# Longer than the idle timeouts of clients and proxies in front (httpx 5 s, a cloud load
# balancer 60 s), so the client side closes an idle connection first: at equal timeouts a
# request sent just as the server closes the connection is lost in transit (a read error).
IDLE_CONNECTION_TIMEOUT_S = 75


def worker_count(settings: Settings) -> int:
    """WALLET_WORKERS, else one per CPU on PostgreSQL and one on SQLite (a single writer)."""
    if settings.workers is not None:
        return settings.workers
    return (os.cpu_count() or 1) if settings.database_backend == "postgresql" else 1


def _clean_metrics_dir() -> Path | None:
    """Point PROMETHEUS_MULTIPROC_DIR at an empty directory before any worker starts, so
    /metrics sums the workers of this run only. Returns the directory made here, if any, to
    delete at exit; a directory the operator named is emptied, not deleted."""
    named = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if named:
        directory = Path(named)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        return None
    made = Path(tempfile.mkdtemp(prefix="wallet-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(made)
    return made


ScopeOption = Annotated[
    list[str],
    typer.Option(
        "--scope",
        help="wallet:read, wallet:credit, wallet:debit, wallet:refund, users:write or admin; "
        "repeatable.",
    ),
]


@keys_app.command("create")
def create_key(
    label: Annotated[str, typer.Option(help="What the key is for, e.g. shop-eu.")],
    scope: ScopeOption,
    reads_per_second: Annotated[
        int | None, typer.Option(min=0, help="Read budget; 0: unlimited.", show_default=False)
    ] = None,
    writes_per_second: Annotated[
        int | None, typer.Option(min=0, help="Write budget; 0: unlimited.", show_default=False)
    ] = None,
) -> None:
    """Create a key; the key itself is printed alone on the last line, this once."""
    from wallet.domain.access import Scope

    try:
        scopes = frozenset(Scope(s) for s in scope)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--scope") from None
    settings = load_settings()

    async def create(database: "Database") -> tuple[str, str]:
        access = _access(database, settings)
        key, secret = await access.create_key(
            label=label,
            scopes=scopes,
            reads_per_second=reads_per_second,
            writes_per_second=writes_per_second,
        )
        return key.id, secret

    key_id, secret = _run(create, settings)
    console.print(f"created key {key_id} ({label}: {' '.join(sorted(scopes))})", highlight=False)
    print(secret)


@keys_app.command("list")
def list_keys() -> None:
    """Every key, without secrets: one tab-separated line each, newest first."""
    settings = load_settings()

    from wallet.service.wallet import PageRequest

    async def every_key(database: "Database") -> list[list[str]]:
        access = _access(database, settings)
        rows: list[list[str]] = []
        before: int | None = None
        while True:
            keys, before = await access.keys(page=PageRequest(limit=500, before=before))
            rows += [
                [
                    k.id,
                    k.label,
                    " ".join(sorted(k.scopes)),
                    str(k.reads_per_second),
                    str(k.writes_per_second),
                    k.created_at.isoformat(),
                    k.revoked_at.isoformat() if k.revoked_at else "",
                ]
                for k in keys
            ]
            if before is None:
                return rows

    print("\t".join(("key id", "label", "scopes", "reads/s", "writes/s", "created", "revoked")))
    for row in _run(every_key, settings):
        print("\t".join(row))


@keys_app.command("revoke")
def revoke_key(key_id: Annotated[str, typer.Argument(help="The key's id (not the key).")]) -> None:
    """Revoke a key: every worker refuses it within 2 seconds."""
    settings = load_settings()

    async def revoke(database: "Database") -> None:
        await _access(database, settings).revoke_key(key_id=key_id)

    _run(revoke, settings)
    console.print(f"revoked key {key_id}")


def _access(database: "Database", settings: Settings) -> "Access":
    from wallet.service.access import Access

    return Access(
        database,
        default_reads_per_second=settings.default_reads_per_second,
        default_writes_per_second=settings.default_writes_per_second,
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
    flows: Annotated[
        str,
        typer.Option(
            help="Flows to drive: spend, spend-expiring (spends of expiring free credits), topup, "
            "bonus, mixed (spends, transfers, holds, captures)."
        ),
    ] = "spend,topup",
    configuration: Annotated[
        list[str] | None,
        typer.Option(
            "--configuration",
            "-C",
            help="NAME[:WALLET_X=v,...,workers=N], repeatable; the first is the baseline. "
            "Default: batching off (WALLET_BATCH_MAX_SIZE=1), then batching on.",
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
    from wallet.bench import (
        DEFAULT_CONFIGURATIONS,
        BenchRefused,
        PopulatePlan,
        load_plan,
    )
    from wallet.bench import run as run_bench

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
    raise typer.Exit(run_bench(load_settings(), plan=plan, argv=sys.argv, console=console))
