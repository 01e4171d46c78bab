"""The alerting rules and the Grafana dashboard against the real things: promtool runs the rule
unit tests, the real service (`wallet serve --workers 2` on a scratch SQLite file) is asked for
its /metrics and every metric the rules and panels query must be among them, and a real
Prometheus scrapes the service, loads the rules and evaluates every panel's query.

Needs Debian's `prometheus` package (/usr/bin/promtool and /usr/bin/prometheus); without it
these tests skip, which CI refuses. All traffic goes to 127.0.0.1."""

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "wallet.json"
VENV_BIN = Path(sys.executable).parent
PROMETHEUS_PACKAGE = "Debian's `prometheus` package (apt-get install prometheus)"

HEALTH = "/api/v1/health"
ALICE = "550e8400-e29b-41d4-a716-446655440000"
FIRST_KEY = re.compile(r"^\s*(wk_[A-Za-z0-9_-]{43})\s*$", re.MULTILINE)
WORKERS = 2
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
T = TypeVar("T")


# --- helpers -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tool(name: str) -> str:
    """The path of a Prometheus binary, or a skip that says which package brings it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else "")
    if not path:
        pytest.skip(f"{name} is not installed: it comes with {PROMETHEUS_PACKAGE}")
    return path


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait_for(
    what: str, probe: Callable[[], T | None], *, timeout_s: float, alive: Callable[[], str | None]
) -> T:
    """Call `probe` every 0.2 s until it returns something; fail after `timeout_s`, or at once
    when `alive` reports that the process being waited for has died (its log tail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        death = alive()
        if death is not None:
            pytest.fail(f"while waiting for {what}, the process died:\n{death}")
        result = probe()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:g} s")
        time.sleep(0.2)


def _signal_group(process: subprocess.Popen[bytes], number: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is gone already
        os.killpg(process.pid, number)  # the group we started it in (start_new_session)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group we started, then SIGKILL if it is not gone in time."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)


def _start(
    command: list[str], *, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as sink:
        return subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _families(exposition: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(exposition)}


def _health_requests_counted(exposition: str) -> float:
    """What the exposition says /api/v1/health has answered, summed over method and status."""
    return sum(
        sample.value
        for sample in _families(exposition)["wallet_http_requests"].samples
        if sample.name == "wallet_http_requests_total" and sample.labels["route"] == HEALTH
    )


# --- the service ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Service:
    process: subprocess.Popen[bytes]
    port: int
    admin_key: str
    log: Path
    environment: dict[str, str]
    directory: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def death(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"wallet serve exited {code}\n{_tail(self.log)}"

    def metrics(self) -> str:
        response = httpx.get(f"{self.url}/metrics", timeout=10, trust_env=False)
        assert response.status_code == 200, response.text
        return response.text


def _service_environment(directory: Path) -> dict[str, str]:
    """This process's environment without any WALLET_, Prometheus or OpenTelemetry setting
    (a metrics token would close /metrics), on a scratch SQLite file."""
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("WALLET_", "PROMETHEUS_", "OTEL_"))
    }
    environment["WALLET_DATABASE_URL"] = f"sqlite:///{directory / 'wallet.db'}"
    return environment


def _wallet(
    command: list[str], environment: dict[str, str], cwd: Path, *, exit_code: int = 0
) -> str:
    done = subprocess.run(
        [str(VENV_BIN / "wallet"), *command],
        env=environment,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == exit_code, (
        f"wallet {' '.join(command)}:\n{done.stdout}\n{done.stderr}"
    )
    return done.stdout


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`wallet serve --workers 2` on a migrated, seeded scratch database, healthy."""
    directory = tmp_path_factory.mktemp("wallet")
    environment = _service_environment(directory)
    _wallet(["migrate"], environment, directory)
    seeded = _wallet(["seed"], environment, directory)
    # The workers' metrics in a directory named here (`wallet serve` makes it), where
    # `wallet verify` reports too.
    environment = environment | {"PROMETHEUS_MULTIPROC_DIR": str(directory / "metrics")}
    found = FIRST_KEY.search(seeded)
    assert found, f"`wallet seed` on a fresh database printed no admin key:\n{seeded}"
    port = _free_port()
    log = directory / "serve.log"
    command = [str(VENV_BIN / "wallet"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    process = _start([*command, "--workers", str(WORKERS)], log=log, env=environment)
    running = Service(
        process=process,
        port=port,
        admin_key=found.group(1),
        log=log,
        environment=environment,
        directory=directory,
    )
    try:

        def healthy() -> bool | None:
            try:
                return (
                    httpx.get(f"{running.url}{HEALTH}", timeout=2, trust_env=False).status_code
                    == 200
                    or None
                )
            except httpx.TransportError:
                return None

        _wait_for(
            "GET /api/v1/health to answer 200",
            healthy,
            timeout_s=START_TIMEOUT_S,
            alive=running.death,
        )
        yield running
    finally:
        _stop(process)


@dataclass(frozen=True)
class Traffic:
    health_requests: int
    statuses: Counter[int]


@pytest.fixture(scope="module")
def traffic(service: Service) -> Traffic:
    """Requests that give every labelled metric a series: health, a top-up and its replay, a
    request without a key, one with a key lacking the scope, and reads past a tiny budget; then
    a `wallet verify` reporting to the server's metrics directory."""
    statuses: Counter[int] = Counter()
    admin = {"Authorization": f"Bearer {service.admin_key}"}
    with httpx.Client(base_url=service.url, timeout=10, trust_env=False) as client:

        def call(method: str, path: str, **options: Any) -> httpx.Response:
            response = client.request(method, path, **options)
            statuses[response.status_code] += 1
            return response

        health_requests = 5
        for _ in range(health_requests):
            assert call("GET", HEALTH).status_code == 200
        topup = {
            "userId": ALICE,
            "assetSymbol": "GOLD_COINS",
            "amount": 5,
            "idempotencyKey": f"observability-{uuid.uuid4()}",
        }
        first = call("POST", "/api/v1/wallet/topup", json=topup, headers=admin)
        assert first.status_code == 201, first.text
        replay = call("POST", "/api/v1/wallet/topup", json=topup, headers=admin)
        assert replay.status_code == 200, replay.text
        assert call("GET", "/api/v1/assets").status_code == 401
        created = call(
            "POST",
            "/api/v1/keys",
            headers=admin,
            json={
                "label": "observability test reader",
                "scopes": ["wallet:read"],
                "readsPerSecond": 1,
                "writesPerSecond": 1,
            },
        )
        assert created.status_code == 201, created.text
        reader = {"Authorization": f"Bearer {created.json()['key']}"}
        topup["idempotencyKey"] = f"observability-{uuid.uuid4()}"
        assert call("POST", "/api/v1/wallet/topup", json=topup, headers=reader).status_code == 403
        for _ in range(20):  # a budget of 1/s allows 2 per 2 s window in each worker
            if call("GET", "/api/v1/assets", headers=reader).status_code == 429:
                break
        assert statuses[429] > 0, f"no read was refused with 429: {statuses}"
    _wallet(["verify"], service.environment, service.directory)
    return Traffic(health_requests=health_requests, statuses=statuses)


# --- what the rules and the dashboard query ------------------------------------------------

STRING_LITERALS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
# A metric name: wallet_* or up, not part of a longer word, a $variable or a function call.
METRIC_NAME = re.compile(r"(?<![\w:$])(wallet_\w+|up)\b(?!\s*\()")


def _alert_expressions() -> dict[str, str]:
    document = yaml.safe_load(ALERTS.read_text())
    return {
        f"alert {rule['alert']}": rule["expr"]
        for group in document["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_expressions() -> dict[str, str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        f"panel {panel['title']!r} query {target['refId']}": target["expr"]
        for panel in _panels(dashboard["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    }


def _metric_names(expression: str) -> set[str]:
    return set(METRIC_NAME.findall(STRING_LITERALS.sub('""', expression)))


def test_metric_name_extraction_sees_names_not_labels_or_functions() -> None:
    expression = (
        'sum by (route) (rate(wallet_x_total{route="/wallet_y", job="up"}[$__rate_interval]))'
        " / on () group_left () up{job='wallet'} and wallet_z_bucket"
    )
    assert _metric_names(expression) == {"wallet_x_total", "up", "wallet_z_bucket"}


# --- a. promtool ---------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    done = subprocess.run(
        [_tool("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = subprocess.run(
        [_tool("promtool"), "test", "rules", str(ALERTS_TEST)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- b. every queried metric is one the service exports ------------------------------------


def test_rules_and_panels_query_only_metrics_the_service_exports(
    service: Service, traffic: Traffic
) -> None:
    families = _families(service.metrics())
    exported = {sample.name for family in families.values() for sample in family.samples}
    exported.add("up")  # Prometheus's own, per scrape target
    expressions = _alert_expressions() | _dashboard_expressions()
    unknown = {
        where: sorted(_metric_names(expression) - exported)
        for where, expression in expressions.items()
        if _metric_names(expression) - exported
    }
    assert not unknown, f"queried but not exported (exported: {sorted(exported)}):\n{unknown}"
    assert all(_metric_names(expression) for expression in expressions.values())


def test_dashboard_shows_every_metric_the_service_exports(
    service: Service, traffic: Traffic
) -> None:
    queried = set().union(*map(_metric_names, _dashboard_expressions().values()))
    families = _families(service.metrics())
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    unshown = sorted(
        name
        for name in families
        if name.startswith("wallet_") and not {name + suffix for suffix in suffixes} & queried
    )
    assert not unshown, f"exported but on no panel: {unshown}"


# --- c. a real Prometheus scraping the service, with the rules loaded ----------------------


@dataclass(frozen=True)
class Prometheus:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def death(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"prometheus exited {code}\n{_tail(self.log)}"

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(
            f"{self.url}/api/v1/{path}", params=params, timeout=10, trust_env=False
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expression)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(
    service: Service, traffic: Traffic, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    """Prometheus on a free port, scraping the service every second as job "wallet", with the
    alerting rules loaded; stopped at the end."""
    binary = _tool("prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "wallet",
                "metrics_path": "/metrics",
                "static_configs": [{"targets": [f"127.0.0.1:{service.port}"]}],
            }
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = directory / "prometheus.log"
    command = [
        binary,
        f"--config.file={directory / 'prometheus.yml'}",
        f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    running = Prometheus(process=_start(command, log=log), url=f"http://127.0.0.1:{port}", log=log)
    try:

        def scraped() -> list[dict[str, Any]] | None:
            try:
                return running.query("wallet_http_requests_total") or None
            except (httpx.TransportError, json.JSONDecodeError, AssertionError):
                return None

        _wait_for(
            "a wallet_http_requests_total series in Prometheus",
            scraped,
            timeout_s=START_TIMEOUT_S,
            alive=running.death,
        )
        yield running
    finally:
        _stop(running.process)


def test_prometheus_scrapes_the_service_and_counts_its_requests(
    prometheus: Prometheus, traffic: Traffic
) -> None:
    (up,) = prometheus.query('up{job="wallet"}')
    assert float(up["value"][1]) == 1
    (health,) = prometheus.query(f'sum(wallet_http_requests_total{{route="{HEALTH}"}})')
    assert float(health["value"][1]) >= traffic.health_requests
    by_status = {
        int(series["metric"]["status"]): float(series["value"][1])
        for series in prometheus.query("sum by (status) (wallet_http_requests_total)")
    }
    for status, made in traffic.statuses.items():
        assert by_status.get(status, 0) >= made, f"status {status}: {by_status}"


def test_prometheus_evaluates_every_alert_rule_without_error(prometheus: Prometheus) -> None:
    def evaluated() -> list[dict[str, Any]] | None:
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        never = [rule for rule in rules if rule["lastEvaluation"].startswith("0001-")]
        return rules if rules and not never else None

    rules = _wait_for(
        "every rule evaluated once", evaluated, timeout_s=START_TIMEOUT_S, alive=prometheus.death
    )
    assert {f"alert {rule['name']}" for rule in rules} == set(_alert_expressions())
    broken = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert not broken, broken
    # A healthy service fires nothing: in particular not the target-down alert, nor the ledger
    # alert after a clean `wallet verify`.
    firing = [
        alert["labels"]
        for alert in prometheus.api("alerts")["alerts"]
        if alert["state"] == "firing"
    ]
    assert not firing, firing


def test_prometheus_evaluates_every_dashboard_query(prometheus: Prometheus) -> None:
    failures = {}
    for where, expression in _dashboard_expressions().items():
        concrete = expression.replace("$__rate_interval", "1m").replace("$__range", "5m")
        response = httpx.get(
            f"{prometheus.url}/api/v1/query", params={"query": concrete}, trust_env=False
        )
        if response.status_code != 200 or response.json()["status"] != "success":
            failures[where] = response.text
    assert not failures, failures


def test_a_failed_ledger_verify_fires_its_alert_in_prometheus(
    service: Service, prometheus: Prometheus
) -> None:
    """A balance edited behind the service's back: `wallet verify` fails, reports it to the
    server's /metrics, and Prometheus fires WalletLedgerVerifyFailed. (Last: it spoils the
    ledger of this module's service.)"""
    (clean,) = prometheus.query("wallet_ledger_verify_clean")
    assert float(clean["value"][1]) == 1
    with contextlib.closing(sqlite3.connect(service.directory / "wallet.db")) as database:
        database.execute(
            "UPDATE balances SET balance = balance + 1 "
            "WHERE account_id = ? AND asset_symbol = 'DIAMONDS'",
            (ALICE,),
        )
        database.commit()
    _wallet(["verify"], service.environment, service.directory, exit_code=1)

    def firing() -> dict[str, str] | None:
        alerts = prometheus.api("alerts")["alerts"]
        return next(
            (
                alert["labels"]
                for alert in alerts
                if alert["labels"]["alertname"] == "WalletLedgerVerifyFailed"
                and alert["state"] == "firing"
            ),
            None,
        )

    labels = _wait_for(
        "WalletLedgerVerifyFailed to fire",
        firing,
        timeout_s=START_TIMEOUT_S,
        alive=prometheus.death,
    )
    assert labels["job"] == "wallet"
    assert labels["severity"] == "critical"


# --- d. several workers, one set of numbers ------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """`pid` and every process below it, from each process's parent in /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found = {pid}
    while grown := {child for child, parent in parents.items() if parent in found} - found:
        found |= grown
    return found


def _owner_of_connection(server_port: int, client_port: int, candidates: set[int]) -> int:
    """Which of `candidates` holds the server's end of the TCP connection from `client_port`:
    the worker that accepted it."""
    inode = next(
        fields[9]
        for fields in (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
        if int(fields[1].split(":")[1], 16) == server_port
        and int(fields[2].split(":")[1], 16) == client_port
    )
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError(f"no process of {candidates} holds the socket of port {client_port}")


def _get_on_a_new_connection(service: Service, path: str) -> tuple[int, str, int]:
    """GET `path` on a connection of its own: (status, body, pid of the worker that answered)."""
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read().decode()
        client_port = connection.sock.getsockname()[1]
        processes = _descendants(service.process.pid)
        return response.status, body, _owner_of_connection(service.port, client_port, processes)
    finally:
        connection.close()


def test_every_worker_reports_the_requests_of_all_workers(service: Service) -> None:
    before = _health_requests_counted(service.metrics())
    answered_by: Counter[int] = Counter()
    deadline = time.monotonic() + 30
    # At least 40 requests, and until each worker has answered some (bounded: 400, 30 s).
    while sum(answered_by.values()) < 40 or len(answered_by) < WORKERS:
        assert sum(answered_by.values()) < 400, answered_by
        assert time.monotonic() < deadline, answered_by
        status, _, worker = _get_on_a_new_connection(service, HEALTH)
        assert status == 200
        answered_by[worker] += 1
    assert len(answered_by) == WORKERS, answered_by
    made = sum(answered_by.values())

    _wait_for(
        "the summed health count to include every request made",
        lambda: _health_requests_counted(service.metrics()) >= before + made or None,
        timeout_s=5,
        alive=service.death,
    )
    scraped_by: dict[int, list[float]] = {}
    for _ in range(100):  # until each worker has answered /metrics 3 times
        if len(scraped_by) == WORKERS and all(len(v) >= 3 for v in scraped_by.values()):
            break
        status, body, worker = _get_on_a_new_connection(service, "/metrics")
        assert status == 200
        scraped_by.setdefault(worker, []).append(_health_requests_counted(body))
    assert set(scraped_by) == set(answered_by), (scraped_by, answered_by)
    totals = {total for totals in scraped_by.values() for total in totals}
    assert len(totals) == 1, f"scrapes disagree, by worker: {scraped_by}"
    assert totals.pop() >= before + made
