"""The Dockerfile and compose.yaml agree with each other and with the code: the image runs the
`wallet` console script with commands it has, and the app logs in with the database's own
credentials. No database, no Docker engine: the files are read and checked."""

import json
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import typer
import yaml
from typer.testing import CliRunner

from wallet import cli

ROOT = Path(__file__).resolve().parents[2]


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def _only(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for k, arguments in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec (JSON) form: {arguments}"
    return [str(part) for part in value]


def _cli_commands() -> set[str]:
    """The commands the `wallet` CLI registers."""
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    return set(group.commands)


def _run_cli(arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `wallet ARGUMENTS` with uvicorn stubbed out; return what it would have served with."""
    served: dict[str, Any] = {}
    monkeypatch.setattr("wallet.cli.uvicorn.run", lambda app, **options: served.update(options))
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    return served


def _compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"compose.yaml has no {name} service"
    service: dict[str, Any] = services[name]
    return service


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):  # the KEY=VALUE list form
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


# Dockerfile


def test_image_is_built_in_stages_from_python_3_11_slim() -> None:
    images = [arguments.split()[0] for k, arguments in _instructions() if k == "FROM"]
    assert len(images) >= 2
    assert all(image == "python:3.11-slim" for image in images)
    assert any(k == "COPY" and "--from=" in arguments for k, arguments in _final_stage())


def test_final_stage_installs_no_build_tools() -> None:
    commands = " ".join(arguments for k, arguments in _final_stage() if k == "RUN")
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in commands


def test_image_runs_as_a_non_root_user() -> None:
    user = _only(_final_stage(), "USER").split(":")[0]
    assert user not in {"root", "0"}


def test_entrypoint_is_the_wallet_console_script_of_pyproject() -> None:
    entrypoint = _exec_form(_only(_final_stage(), "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["wallet"]
    assert scripts["wallet"] == "wallet.cli:app"


def test_cmd_is_serve_on_all_interfaces_port_8000_and_the_cli_accepts_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    command = _exec_form(_only(_final_stage(), "CMD"))
    assert command == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert command[0] in _cli_commands()
    served = _run_cli(command, monkeypatch)
    assert (served["host"], served["port"]) == ("0.0.0.0", 8000)


def test_cli_refuses_an_unknown_command() -> None:
    assert CliRunner().invoke(cli.app, ["no-such-command"]).exit_code == 2


def test_image_exposes_and_health_checks_the_served_port() -> None:
    stage = _final_stage()
    assert _only(stage, "EXPOSE").split() == ["8000"]
    healthcheck = _only(stage, "HEALTHCHECK")
    assert "python" in healthcheck
    assert "http://127.0.0.1:8000/api/v1/health" in healthcheck


# compose.yaml


def test_compose_has_postgres_migrate_and_app() -> None:
    assert {"postgres", "migrate", "app"} <= set(_compose()["services"])
    assert _service("postgres")["image"] == "postgres:15"


@pytest.mark.parametrize("name", ["migrate", "app"])
def test_wallet_services_log_in_with_the_postgres_services_credentials(name: str) -> None:
    postgres = _environment(_service("postgres"))
    url = sa.make_url(_environment(_service(name))["WALLET_DATABASE_URL"])
    assert url.drivername == "postgresql+asyncpg"
    assert (url.host, url.port) == ("postgres", 5432)
    assert url.username == postgres["POSTGRES_USER"]
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.database == postgres["POSTGRES_DB"]


def test_migrate_and_app_run_the_same_image() -> None:
    migrate, app = _service("migrate"), _service("app")
    assert migrate["image"] == app["image"]
    assert migrate["build"] == app["build"]


def test_migrate_runs_wallet_migrate_then_seed_once_postgres_is_healthy() -> None:
    migrate = _service("migrate")
    entrypoint = migrate["entrypoint"]
    script = entrypoint[-1] if isinstance(entrypoint, list) else entrypoint
    steps = [shlex.split(step) for step in script.split("&&")]
    assert steps == [["wallet", "migrate"], ["wallet", "seed"]]
    assert {"migrate", "seed"} <= _cli_commands()
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_app_starts_after_migrate_completes() -> None:
    depends_on = _service("app")["depends_on"]
    assert depends_on["migrate"]["condition"] == "service_completed_successfully"


def test_app_is_published_on_loopback_only() -> None:
    assert _service("app")["ports"] == ["127.0.0.1:8000:8000"]


def test_postgres_and_app_have_healthchecks() -> None:
    postgres_check = " ".join(_service("postgres")["healthcheck"]["test"])
    assert "pg_isready" in postgres_check
    app_check = " ".join(_service("app")["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/api/v1/health" in app_check


def test_postgres_data_is_on_a_named_volume() -> None:
    volumes = _service("postgres")["volumes"]
    named = [volume.split(":")[0] for volume in volumes]
    assert set(named) <= set(_compose()["volumes"])
