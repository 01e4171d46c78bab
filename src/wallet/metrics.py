"""The service's Prometheus metrics. With several worker processes, `wallet serve` points
PROMETHEUS_MULTIPROC_DIR at a directory cleaned at start, and /metrics sums every worker's
numbers (prometheus-client's multiprocess mode)."""

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "wallet_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
REQUEST_SECONDS = Histogram(
    "wallet_http_request_duration_seconds",
    "Time from a request's arrival to its answer, by route template.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "wallet_batch_size",
    "Commands posted in one database transaction (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
BATCH_SECONDS = Histogram(
    "wallet_batch_commit_duration_seconds",
    "Time to post one batch: its transaction from BEGIN to COMMIT, retries included.",
    buckets=LATENCY_BUCKETS,
)
POOL_IN_USE = Gauge(
    "wallet_db_pool_connections_in_use",
    "Database connections checked out of the pool, summed over the live workers.",
    multiprocess_mode="livesum",
)
REPLAYS = Counter(
    "wallet_idempotent_replays",
    "Requests answered from an earlier one with the same idempotency key, by action.",
    ["flow"],
)
RATE_LIMITED = Counter(
    "wallet_rate_limited", "Requests refused with 429, by budget (reads or writes).", ["budget"]
)
AUTH_FAILURES = Counter(
    "wallet_auth_failures", "Requests refused with 401 or 403, by code.", ["code"]
)
MONEY_MOVED = Counter(
    "wallet_money_moved_units",
    "Units of an asset moved by applied transactions (replays not counted), by type and asset.",
    ["flow", "asset"],
)
VERIFY_CLEAN = Gauge(
    "wallet_ledger_verify_clean",
    "1 if the last `wallet verify` found every invariant holding, 0 if not.",
    multiprocess_mode="mostrecent",
)
VERIFY_FINISHED = Gauge(
    "wallet_ledger_verify_last_run_timestamp_seconds",
    "When the last `wallet verify` finished (Unix time).",
    multiprocess_mode="mostrecent",
)


def is_multiprocess() -> bool:
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


def exposition() -> tuple[bytes, str]:
    """The text format of every metric, summed over the workers in multiprocess mode."""
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def forget_this_process() -> None:
    """At a worker's exit: its live gauges stop counting."""
    if is_multiprocess():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
