"""What `wallet bench` runs: the flows and mixes it drives, the server configurations it compares,
the cells (scenario, flow, clients) it measures in each, and the API key its load sends."""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from wallet.domain.access import Scope
from wallet.domain.ledger import Flow
from wallet.settings import Settings

# The load's API key: rate limiting stays on, as in production (each request pays for its
# check), with a budget so large it never refuses one; 0 would mean unlimited and skip the check.
LOAD_KEY_BUDGET_PER_S = 1_000_000
# The three flows, and the mixed load's transfers, holds and captures (debit), no more.
LOAD_KEY_SCOPES = frozenset({Scope.WALLET_CREDIT, Scope.WALLET_DEBIT})
CALIBRATION_NAME = "bare ASGI"


class BenchRefused(Exception):
    """A run that cannot start or cannot go on; the message says why and what to do."""


class Scenario(StrEnum):
    SPREAD = "spread"  # round-robin over every bench user: only the system account is hot
    HOT = "hot"  # every request on one user: the user's row is hot too


class Mix(StrEnum):
    """A load of several kinds of request in one cell, driven beside the single flows."""

    MIXED = "mixed"  # spend, transfer, hold, and capture of a hold the same wrk thread made


class Variant(StrEnum):
    """A single flow on other credits than its plain flow's, measured beside it: the table shows
    its rate over the plain flow's."""

    SPEND_EXPIRING = "spend-expiring"  # spends of free credits in lots: each takes from a lot

    @property
    def plain(self) -> Flow:
        return Flow.SPEND


Load = Flow | Mix | Variant
# What --flows accepts: a single flow (every request posts it), a variant of one, or a mix.
LOADS: dict[str, Load] = {
    load.value: load
    for load in (Flow.SPEND, Flow.TOPUP, Flow.BONUS, Mix.MIXED, Variant.SPEND_EXPIRING)
}
MIX_KINDS = ("spend", "transfer", "hold", "capture")  # what a mixed cell counts, per kind


@dataclass(frozen=True, slots=True)
class Configuration:
    """One server set-up to measure: its name, its environment overrides, its worker count."""

    name: str
    environment: dict[str, str]
    workers: int

    def describe(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.environment.items()) or "defaults"
        return f"{self.name}: {settings}, --workers {self.workers}"


@dataclass(frozen=True, slots=True)
class Cell:
    scenario: Scenario
    flow: Load
    concurrency: int


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """What `wallet bench` runs: every configuration, scenario, flow and concurrency."""

    users: int
    duration_s: int
    warmup_s: int
    concurrencies: tuple[int, ...]
    scenarios: tuple[Scenario, ...]
    flows: tuple[Load, ...]
    configurations: tuple[Configuration, ...]
    max_requests: int
    is_markdown: bool  # print the table as Markdown, to paste into docs

    def cells(self) -> list[Cell]:
        """The cells each configuration runs, in order. The flows of one concurrency run one
        after the other (and sit together in the table), so a variant and its plain flow meet
        the machine in the same state."""
        return [
            Cell(scenario, flow, concurrency)
            for scenario in self.scenarios
            for concurrency in self.concurrencies
            for flow in self.flows
        ]

    def calibration(self) -> Configuration:
        """The bare ASGI app's set-up: as many workers as the most any configuration has."""
        return Configuration(CALIBRATION_NAME, {}, max(c.workers for c in self.configurations))

    def calibration_cells(self) -> list[Cell]:
        """Spends at each concurrency: the bare app answers them all alike, whatever the user."""
        return [Cell(self.scenarios[0], Flow.SPEND, c) for c in self.concurrencies]


@dataclass(frozen=True, slots=True)
class PopulatePlan:
    """What `wallet bench --populate` loads."""

    users: int
    entries: int
    is_forced: bool


DEFAULT_CONFIGURATIONS = ("batching off:WALLET_BATCH_MAX_SIZE=1", "batching on")


def parse_configuration(spec: str, *, workers: int) -> Configuration:
    """'NAME' or 'NAME:WALLET_X=value,...,workers=N' into a configuration."""
    name, _, assignments = spec.partition(":")
    environment: dict[str, str] = {}
    for assignment in filter(None, (a.strip() for a in assignments.split(","))):
        key, is_assignment, value = assignment.partition("=")
        key = key.strip()
        if not is_assignment:
            raise BenchRefused(f"configuration {spec!r}: {assignment!r} is not KEY=VALUE")
        if key == "workers":
            workers = _positive_int(value, what=f"workers in configuration {spec!r}")
            continue
        setting = key.removeprefix("WALLET_").lower()
        if not key.startswith("WALLET_") or setting not in Settings.model_fields:
            raise BenchRefused(f"configuration {spec!r}: {key} is not a WALLET_ setting")
        if setting == "database_url":
            raise BenchRefused(
                "a configuration cannot change WALLET_DATABASE_URL: set it for the run"
            )
        environment[key] = value.strip()
    if not name.strip():
        raise BenchRefused(f"configuration {spec!r} has no name")
    return Configuration(name.strip(), environment, workers)


def parse_list(text: str, *, what: str) -> tuple[str, ...]:
    """A comma-separated option, without blanks or repeats."""
    items = tuple(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise BenchRefused(f"{what}: give at least one value")
    return items


def _load(name: str) -> Load:
    if name not in LOADS:
        raise ValueError(f"{name!r} is not a flow the bench drives")
    return LOADS[name]


def _positive_int(text: str, *, what: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise BenchRefused(f"{what}: {text!r} is not a whole number") from None
    if number < 1:
        raise BenchRefused(f"{what}: {number} is less than 1")
    return number


def load_plan(
    *,
    users: int,
    duration_s: int,
    warmup_s: int,
    concurrency: str,
    scenarios: str,
    flows: str,
    configurations: Sequence[str],
    workers: int,
    max_requests: int,
    is_markdown: bool,
) -> LoadPlan:
    """The plan the options describe, or BenchRefused naming the bad option."""
    try:
        chosen_scenarios = tuple(Scenario(s) for s in parse_list(scenarios, what="--scenarios"))
        chosen_flows = tuple(_load(f) for f in parse_list(flows, what="--flows"))
    except ValueError as error:
        choices = ", ".join(LOADS)
        raise BenchRefused(f"{error}; scenarios: spread, hot; flows: {choices}") from None
    if Mix.MIXED in chosen_flows and users < 2:
        raise BenchRefused("--flows mixed transfers between two users: give --users 2 or more")
    chosen = [parse_configuration(c, workers=workers) for c in configurations]
    if len({c.name for c in chosen}) != len(chosen):
        raise BenchRefused("two configurations have the same name")
    return LoadPlan(
        users=users,
        duration_s=duration_s,
        warmup_s=warmup_s,
        concurrencies=tuple(
            _positive_int(c, what="--concurrency")
            for c in parse_list(concurrency, what="--concurrency")
        ),
        scenarios=chosen_scenarios,
        flows=chosen_flows,
        configurations=tuple(chosen),
        max_requests=max_requests,
        is_markdown=is_markdown,
    )
