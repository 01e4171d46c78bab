"""`wallet bench`: load from outside the server, measured. The command starts `wallet serve` itself
for each configuration compared, and a bare ASGI app to calibrate against, drives them over
loopback with wrk (bounded in seconds and in requests), prints one table with its provenance, and
ends by verifying the ledger. With `--populate` it bulk-loads a large, consistent ledger instead
and shows that reads stay indexed.

Modules: plan (what to run), server (the processes loaded, and their CPU), load (wrk),
calibration (the bare app), report (what is printed), measure (a load run), populate
(`--populate`)."""

from collections.abc import Sequence

from rich.console import Console

from wallet.bench.measure import benchmark
from wallet.bench.plan import (
    DEFAULT_CONFIGURATIONS,
    BenchRefused,
    LoadPlan,
    PopulatePlan,
    load_plan,
)
from wallet.bench.populate import populate_command
from wallet.bench.report import checks_table, print_as_is
from wallet.service.populate import PopulateRefused
from wallet.settings import Settings

__all__ = [
    "DEFAULT_CONFIGURATIONS",
    "BenchRefused",
    "PopulatePlan",
    "checks_table",
    "load_plan",
    "run",
]
MACHINE_WIDTH = 280  # the widest table is not wrapped, to an 80-column pipe or otherwise


def run(
    settings: Settings,
    *,
    plan: LoadPlan | PopulatePlan,
    argv: Sequence[str],
    console: Console,
) -> int:
    """The `wallet bench` command: its exit code; a refusal is printed, with exit code 2."""
    if not console.is_terminal:
        console = Console(width=MACHINE_WIDTH)
    try:
        if isinstance(plan, PopulatePlan):
            return populate_command(settings, plan, argv=argv, console=console)
        return benchmark(settings, plan, argv=argv, console=console)
    except (BenchRefused, PopulateRefused) as refusal:
        print_as_is(console, f"wallet bench: {refusal}", style="red")
        return 2
