"""The Dockerfile, compose.yaml and the dependency locks agree with each other and with the code:
the image installs exactly the hashed lock, runs the `wallet` console script with commands it has
and health-checks the readiness route; the app logs in with the database's own credentials. No
database, no Docker engine: the files are read and checked."""

import http.server
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
import typer
import uvicorn
import yaml
from fastapi.routing import iter_route_contexts
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from typer.testing import CliRunner

from wallet import cli
from wallet.http import routes
from wallet.http.app import create_app
from wallet.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_LOCK = ROOT / "requirements.txt"
DEV_LOCK = ROOT / "requirements-dev.txt"

Instruction = tuple[str, str]


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No WALLET_* (or OTEL endpoint) variable of the test run leaks into settings read here;
    `wallet serve` gets a metrics directory of its own (else it sets one in os.environ)."""
    for name in list(os.environ):
        if name.startswith("WALLET_") or name == "OTEL_EXPORTER_OTLP_ENDPOINT":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    return monkeypatch


# Reading the Dockerfile


def _instructions() -> list[Instruction]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions: list[Instruction] = []
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


def _stages() -> dict[str, list[Instruction]]:
    """Each stage's instructions, from its FROM on, by its name (or its index when unnamed)."""
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] = []
    for keyword, arguments in _instructions():
        if keyword == "FROM":
            words = arguments.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = []
        current.append((keyword, arguments))
    return stages


def _final_stage() -> list[Instruction]:
    return list(_stages().values())[-1]


def _builder_stage() -> list[Instruction]:
    """The stage whose virtualenv the final stage copies."""
    sources = [
        re.search(r"--from=(\S+)", arguments)
        for keyword, arguments in _final_stage()
        if keyword == "COPY"
    ]
    names = [found.group(1) for found in sources if found]
    assert len(names) == 1, f"expected the final stage to copy from one stage, found {names}"
    return _stages()[names[0]]


def _only(stage: list[Instruction], keyword: str) -> str:
    found = [arguments for k, arguments in stage if k == keyword]
    assert len(found) == 1, f"expected one {keyword} in the stage, found {found}"
    return found[0]


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"not the exec (JSON) form: {arguments}"
    return [str(part) for part in value]


def _copy_sources(arguments: str) -> list[str]:
    """The build-context paths a COPY (without --from) takes."""
    words = [word for word in shlex.split(arguments) if not word.startswith("--")]
    return [source.removeprefix("./").rstrip("/") or "." for source in words[:-1]]


def _shell_commands(stage: list[Instruction]) -> list[tuple[int, list[str]]]:
    """Every command of the stage's RUN instructions (split at &&, ||, | and ;, outside quotes),
    with the position of its RUN in the stage."""
    commands: list[tuple[int, list[str]]] = []
    for position, (keyword, arguments) in enumerate(stage):
        if keyword != "RUN":
            continue
        lexer = shlex.shlex(arguments, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token.strip(";&|"):
                command.append(token)
            elif command:
                commands.append((position, command))
                command = []
    return commands


def _pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """The arguments after `pip install` of each command that is one."""
    installs = []
    for words in commands:
        for at in range(len(words) - 1):
            if Path(words[at]).name in {"pip", "pip3"} and words[at + 1] == "install":
                installs.append(words[at + 2 :])
    return installs


def _requirement_files(arguments: list[str]) -> list[str]:
    files = []
    for at, word in enumerate(arguments):
        if word in {"-r", "--requirement"}:
            files.append(arguments[at + 1])
        elif word.startswith("--requirement="):
            files.append(word.split("=", 1)[1])
    return files


def _assert_locked_then_project(installs: list[list[str]], lock: Path) -> None:
    """The first install is the whole of `lock` with --require-hashes; every other one adds only
    the project, without dependencies: nothing reaches the environment unpinned."""
    assert installs, "no pip install"
    first, *rest = installs
    assert "--require-hashes" in first, first
    assert _requirement_files(first) == [lock.name], first
    assert rest, "the project itself is never installed"
    for arguments in rest:
        assert "--no-deps" in arguments, f"installs dependencies outside the lock: {arguments}"
        assert not _requirement_files(arguments), arguments


# Reading the locks and the build context


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """A pip-compile lock as {name: (version, hashes)}; fails on anything but pinned, hashed
    requirements (an index URL, a find-links path or an editable would make it this machine's)."""
    entries: dict[str, tuple[str, list[str]]] = {}
    logical = ""
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            requirement, *options = logical.split()
            assert not requirement.startswith("-"), f"{path.name}: an option line: {logical}"
            hashes = [option.removeprefix("--hash=") for option in options]
            assert all(option.startswith("--hash=sha256:") for option in options), logical
            assert hashes, f"{path.name}: {requirement} carries no --hash"
            parsed = Requirement(requirement)
            (specifier,) = parsed.specifier
            assert specifier.operator == "==", f"{path.name}: not pinned: {requirement}"
            assert not parsed.extras, f"{path.name}: extras not stripped: {requirement}"
            entries[canonicalize_name(parsed.name)] = (specifier.version, hashes)
        logical = ""
    assert entries, f"{path.name} pins nothing"
    return entries


def _pins(requirements: list[str]) -> dict[str, str]:
    """pyproject.toml's `name==version` requirements as {name: version}."""
    pins = {}
    for text in requirements:
        requirement = Requirement(text)
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", f"pyproject.toml does not pin {text}"
        pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regular expression: `*` and `?` stay within a path element,
    `**` spans any number of them (Go's filepath.Match, as Docker uses it)."""
    expression = ""
    at = 0
    pattern = pattern.strip("/")
    while at < len(pattern):
        if pattern.startswith("**/", at):
            expression, at = expression + "(?:.*/)?", at + 3
        elif pattern.startswith("**", at):
            expression, at = expression + ".*", at + 2
        elif pattern[at] == "*":
            expression, at = expression + "[^/]*", at + 1
        elif pattern[at] == "?":
            expression, at = expression + "[^/]", at + 1
        elif pattern[at] == "[":
            end = pattern.index("]", at)
            expression, at = expression + pattern[at : end + 1], end + 1
        else:
            expression, at = expression + re.escape(pattern[at]), at + 1
    return re.compile(expression)


def _in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` (relative to the repository) into the build context:
    the last pattern that matches it or one of its parent directories decides."""
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [
        (line.startswith("!"), _dockerignore_pattern(line.removeprefix("!")))
        for line in lines
        if line and not line.startswith("#")
    ]
    parts = path.split("/")
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    included = True
    for is_exception, pattern in rules:
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            included = is_exception
    return included


# The CLI and the app


def _cli_commands() -> set[str]:
    """The commands the `wallet` CLI registers."""
    group = typer.main.get_command(cli.app)
    assert isinstance(group, typer.core.TyperGroup)
    return set(group.commands)


def _run_cli(arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run `wallet ARGUMENTS` with uvicorn stubbed out; return what it would have served with."""
    served: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.update(options))
    result = CliRunner().invoke(cli.app, arguments)
    assert result.exit_code == 0, result.output
    return served


def _served_port() -> int:
    """The port the image's CMD serves on, as the CLI reads it."""
    command = _exec_form(_only(_final_stage(), "CMD"))
    return int(command[command.index("--port") + 1])


def _readiness_path() -> str:
    """The path of the app's readiness route (the database answers and the schema is current)."""
    app = create_app(Settings(database_url="sqlite:///unused.db"))
    paths = [
        context.path
        for context in iter_route_contexts(app.routes)
        if context.endpoint is routes.ready and "GET" in (context.methods or set())
    ]
    assert len(paths) == 1, paths
    return paths[0]


def _probe_code(command: list[str]) -> str:
    """The Python code of a `python -c CODE` health check."""
    assert command[:2] == ["python", "-c"], f"not a python -c check: {command}"
    assert len(command) == 3, command
    return command[2]


def _probed_url(code: str) -> str:
    urls = re.findall(r"https?://[^'\"\s]+", code)
    assert len(urls) == 1, f"expected one URL in the health check, found {urls}"
    return urls[0]


class _Status(http.server.BaseHTTPRequestHandler):
    """Answers every GET with the server's `status`, and records the path asked for."""

    def do_GET(self) -> None:
        server: Any = self.server
        server.paths.append(self.path)
        self.send_response(server.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[Any]:
    server: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    server.paths, server.status = [], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _assert_probe_passes_only_when_ready(code: str, server: Any) -> None:
    """Run the health check's code against `server` (in place of the container's port): it must
    ask the readiness route, pass on 200 and fail on the 503 the route gives when not ready."""
    url = urlsplit(_probed_url(code))
    assert (url.scheme, url.hostname, url.port) == ("http", "127.0.0.1", _served_port())
    assert url.path == _readiness_path()
    local = code.replace(url.netloc, f"127.0.0.1:{server.server_address[1]}")
    for status, passes in ((200, True), (503, False)):
        server.status = status
        done = subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=30)
        assert (done.returncode == 0) is passes, (status, done.stderr.decode())
    assert server.paths == [url.path, url.path]


# Dockerfile


def test_image_is_built_in_stages_from_python_3_11_slim() -> None:
    images = [arguments.split()[0] for k, arguments in _instructions() if k == "FROM"]
    assert len(images) >= 2
    assert all(image == "python:3.11-slim" for image in images)
    assert any(k == "COPY" and "--from=" in arguments for k, arguments in _final_stage())


def test_image_python_is_the_one_the_project_requires_and_the_locks_were_made_for() -> None:
    image = _instructions()[0][1].split()[0]
    version = image.split(":")[1].split("-")[0]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(version), image
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        assert f"by pip-compile with Python {version}\n" in lock.read_text(), lock.name


def test_builder_installs_the_hashed_lock_then_only_the_project() -> None:
    builder = _builder_stage()
    commands = _shell_commands(builder)
    installs = _pip_installs([words for _, words in commands])
    _assert_locked_then_project(installs, RUNTIME_LOCK)
    # The lock is in the stage, copied from the context, before the RUN that installs it.
    first_install = next(
        position for position, words in commands if _pip_installs([words]) == installs[:1]
    )
    copied = [
        source
        for keyword, arguments in builder[:first_install]
        if keyword == "COPY" and "--from=" not in arguments
        for source in _copy_sources(arguments)
    ]
    assert RUNTIME_LOCK.name in copied
    # The wheel is the project's, and what was installed is checked as a whole afterwards.
    assert any(words[:3] == ["pip", "wheel", "--no-deps"] for _, words in commands)
    assert ["pip", "check"] in [words for _, words in commands]


def test_final_stage_installs_no_build_tools() -> None:
    commands = " ".join(arguments for k, arguments in _final_stage() if k == "RUN")
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in commands


def test_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    copied = {
        source
        for keyword, arguments in _instructions()
        if keyword == "COPY" and "--from=" not in arguments
        for source in _copy_sources(arguments)
    }
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
        assert _in_build_context(source), f"COPY {source}: .dockerignore keeps it out"
    for file in (ROOT / "src").rglob("*"):
        relative = file.relative_to(ROOT).as_posix()
        is_build_litter = "__pycache__" in file.parts or relative.startswith("src/wallet.egg")
        assert _in_build_context(relative) is not is_build_litter, relative
    top_level = {copied_path.split("/")[0] for copied_path in copied}
    for entry in ROOT.iterdir():
        assert _in_build_context(entry.name) is (entry.name in top_level), entry.name


def test_image_runs_as_a_non_root_user() -> None:
    user = _only(_final_stage(), "USER").split(":")[0]
    assert user not in {"root", "0"}


def test_entrypoint_is_the_wallet_console_script_of_pyproject() -> None:
    entrypoint = _exec_form(_only(_final_stage(), "ENTRYPOINT"))
    scripts = PYPROJECT["project"]["scripts"]
    assert entrypoint == ["wallet"]
    assert scripts["wallet"] == "wallet.cli:app"


def test_cmd_is_serve_on_all_interfaces_port_8000_and_the_cli_accepts_it(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    command = _exec_form(_only(_final_stage(), "CMD"))
    assert command == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert command[0] in _cli_commands()
    served = _run_cli(command, clean_environment)
    assert (served["host"], served["port"]) == ("0.0.0.0", 8000)


def test_cli_refuses_an_unknown_command() -> None:
    assert CliRunner().invoke(cli.app, ["no-such-command"]).exit_code == 2


def test_image_exposes_the_served_port_and_health_checks_readiness(status_server: Any) -> None:
    stage = _final_stage()
    assert _only(stage, "EXPOSE").split() == [str(_served_port())]
    healthcheck = _only(stage, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--timeout=" in options
    _assert_probe_passes_only_when_ready(_probe_code(_exec_form(command)), status_server)


# The locks


@pytest.mark.parametrize("lock", [RUNTIME_LOCK, DEV_LOCK], ids=lambda path: path.name)
def test_lock_pins_every_requirement_with_hashes(lock: Path) -> None:
    for name, (version, hashes) in _lock(lock).items():
        assert version, name
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", digest) for digest in hashes), name


def test_locks_hold_pyprojects_pins() -> None:
    """A dependency added to or moved in pyproject.toml without `make lock` shows here."""
    project = PYPROJECT["project"]
    runtime = _pins(project["dependencies"])
    dev = runtime | _pins(project["optional-dependencies"]["dev"])
    for lock, pins in ((RUNTIME_LOCK, runtime), (DEV_LOCK, dev)):
        locked = {name: version for name, (version, _) in _lock(lock).items()}
        stale = {name: (version, locked.get(name)) for name, version in pins.items()}
        assert {n: v for n, v in stale.items() if v[0] != v[1]} == {}, f"{lock.name}: make lock"


def test_image_runs_what_the_tests_ran() -> None:
    """Every package of the image's lock is in the development lock, same version, same files."""
    runtime, dev = _lock(RUNTIME_LOCK), _lock(DEV_LOCK)
    assert set(runtime) <= set(dev)
    for name, (version, hashes) in runtime.items():
        assert dev[name][0] == version, name
        assert set(hashes) <= set(dev[name][1]), name


def _pythons_allowed() -> list[str]:
    """Every release the project's requires-python admits, down to the patch (3.11.0, ...)."""
    allowed = SpecifierSet(PYPROJECT["project"]["requires-python"])
    candidates = [f"3.{minor}.{patch}" for minor in range(8, 20) for patch in range(30)]
    return [version for version in candidates if allowed.contains(version)]


@pytest.mark.parametrize(
    ("lock", "roots"),
    [(RUNTIME_LOCK, ["dependencies"]), (DEV_LOCK, ["dependencies", "dev"])],
    ids=["requirements.txt", "requirements-dev.txt"],
)
def test_lock_holds_everything_its_packages_need_on_every_python_allowed(
    lock: Path, roots: list[str]
) -> None:
    """Walk the requirements from pyproject.toml's down, with the installed packages' metadata,
    under every Python release the project admits (pip-compile resolves for its own only: redis
    needs async-timeout before 3.11.3): each one met is in the lock, and the lock holds no more."""
    project = PYPROJECT["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    pending = [Requirement(text) for root in roots for text in groups[root]]
    environments = [
        {**default_environment(), "python_full_version": version, "python_version": version[:4]}
        for version in _pythons_allowed()
    ]
    locked = _lock(lock)
    needed: dict[str, set[str]] = {}
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{lock.name} lacks {requirement}: make lock"
        extras = set(requirement.extras)
        if name in needed and extras <= needed[name]:
            continue
        needed[name] = needed.get(name, set()) | extras
        assert metadata.version(name) == locked[name][0], f"{name}: make install"
        for text in metadata.requires(name) or []:
            dependency = Requirement(text)
            marker = dependency.marker
            if marker is None or any(
                marker.evaluate({**environment, "extra": extra})
                for environment in environments
                for extra in needed[name] | {""}
            ):
                pending.append(dependency)
    assert set(locked) - set(needed) == set(), f"{lock.name} holds what nothing needs"


def test_make_install_installs_the_hashed_dev_lock_then_only_the_project() -> None:
    outer_make = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}  # when the suite runs under `make test`
    dry_run = subprocess.run(
        ["make", "--dry-run", "--always-make", "install"],
        cwd=ROOT,
        env={key: value for key, value in os.environ.items() if key not in outer_make},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    commands = [shlex.split(line) for line in dry_run.splitlines() if "pip install" in line]
    _assert_locked_then_project(_pip_installs(commands), DEV_LOCK)


def test_the_running_environment_is_the_dev_lock() -> None:
    """`make install` installed what the lock says: a stale .venv shows here (make install)."""

    def installed(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    locked = {name: pinned for name, (pinned, _) in _lock(DEV_LOCK).items()}
    differing = {name: (pinned, installed(name)) for name, pinned in locked.items()}
    assert {n: v for n, v in differing.items() if v[0] != v[1]} == {}


# compose.yaml


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


def test_compose_file_parses_into_services_that_refer_to_each_other() -> None:
    document = _compose()
    services = document["services"]
    assert isinstance(services, dict)
    assert services
    volumes = set(document.get("volumes") or {})
    for name, service in services.items():
        assert isinstance(service, dict), name
        assert "image" in service or "build" in service, f"{name}: nothing to run"
        assert set(service.get("depends_on", {})) <= set(services) - {name}, name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith(("/", ".")) or source in volumes, f"{name}: {volume}"
        check = service.get("healthcheck", {})
        assert check.get("disable") is True or check.get("test", ["CMD"])[0] in {
            "CMD",
            "CMD-SHELL",
            "NONE",
        }, name
    # The service built from this repository is the Dockerfile's image.
    assert {service.get("build") for service in services.values()} - {None} == {"."}


def test_compose_has_postgres_migrate_and_app() -> None:
    assert {"postgres", "migrate", "app"} <= set(_compose()["services"])
    assert _service("postgres")["image"] == "postgres:15"


@pytest.mark.parametrize("name", ["migrate", "app"])
def test_wallet_services_log_in_with_the_postgres_services_credentials(
    name: str, clean_environment: pytest.MonkeyPatch
) -> None:
    postgres = _environment(_service("postgres"))
    written = sa.make_url(_environment(_service(name))["WALLET_DATABASE_URL"])
    assert written.host in _compose()["services"]
    assert _service(written.host)["image"] == _service("postgres")["image"]
    assert written.port == 5432
    assert written.username == postgres["POSTGRES_USER"]
    assert written.password == postgres["POSTGRES_PASSWORD"]
    assert written.database == postgres["POSTGRES_DB"]
    # The service reads the whole environment as written, and reaches PostgreSQL through its
    # async driver whatever scheme the URL was written with.
    for key, value in _environment(_service(name)).items():
        clean_environment.setenv(key, value)
    settings = Settings()
    used = sa.make_url(settings.database_url.get_secret_value())
    assert used.drivername == "postgresql+asyncpg"
    assert used.set(drivername=written.drivername) == written


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


def test_app_runs_the_images_defaults_and_serve_picks_its_workers(
    clean_environment: pytest.MonkeyPatch,
) -> None:
    """No command, entrypoint or --workers of its own: `wallet serve` sizes itself, from
    WALLET_WORKERS when set, else from the CPU count (the app is on PostgreSQL)."""
    app = _service("app")
    assert "command" not in app
    assert "entrypoint" not in app
    for key, value in _environment(app).items():
        clean_environment.setenv(key, value)
    command = _exec_form(_only(_final_stage(), "CMD"))
    clean_environment.setattr("os.cpu_count", lambda: 3)
    assert _run_cli(command, clean_environment)["workers"] == 3
    clean_environment.setenv("WALLET_WORKERS", "2")
    assert _run_cli(command, clean_environment)["workers"] == 2


def test_app_is_published_on_loopback_only() -> None:
    assert _service("app")["ports"] == [f"127.0.0.1:{_served_port()}:{_served_port()}"]


def test_postgres_health_check_is_pg_isready() -> None:
    assert "pg_isready" in _service("postgres")["healthcheck"]["test"]


def test_app_health_check_is_the_images_readiness_check(status_server: Any) -> None:
    command = _service("app")["healthcheck"]["test"]
    assert command[0] == "CMD"
    _assert_probe_passes_only_when_ready(_probe_code(command[1:]), status_server)


def test_postgres_data_is_on_a_named_volume() -> None:
    volumes = _service("postgres")["volumes"]
    named = [volume.split(":")[0] for volume in volumes]
    assert set(named) <= set(_compose()["volumes"])
