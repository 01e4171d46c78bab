"""The README's walk-through, run as a new user would copy it into a shell: its `sh` blocks and
every `$` command of its `console` blocks go through one bash session against a fresh service
(migrated and seeded like `make run`, with the key `wallet seed` printed), and every line the
README shows must come out, in order. Ids, times and keys differ on every run: the README's own
values of those stand for any value of their shape, and `…` for any text."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
WALLET = Path(sys.executable).parent / "wallet"
SECTION = re.compile(r"^## A walk through the API\n(.*?)^## ", re.MULTILINE | re.DOTALL)
BLOCK = re.compile(r"^```(sh|console)\n(.*?)^```", re.MULTILINE | re.DOTALL)
KEY = re.compile(r"wk_[A-Za-z0-9_-]{43}")
# Values that differ from run to run, as the README prints them, and what stands for them.
VARYING = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), r"[0-9a-f-]{36}"),
    (
        re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+Z"),
        r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d+Z",
    ),
    (KEY, KEY.pattern),
    (re.compile(r"\b[0-9a-f]{64}\b"), r"[0-9a-f]{64}"),  # hash-chain links
    (re.compile(r"\b[0-9a-f]{32}\b"), r"[0-9a-f]{32}"),
    (re.compile(r"run\d{10}"), r"run\d+"),  # $RUN: the run's own part of idempotency keys
]
MARK = "=====wallet-walkthrough-step====="


def walkthrough() -> list[tuple[str, list[str]]]:
    """The walk-through's steps in order: (shell text, lines the README shows it printing)."""
    section = SECTION.search((ROOT / "README.md").read_text())
    assert section, "README.md has no section '## A walk through the API'"
    steps: list[tuple[str, list[str]]] = []
    for kind, text in BLOCK.findall(section.group(1)):
        if kind == "sh":
            steps.append((text, []))
            continue
        for command in re.split(r"^\$ ", text, flags=re.MULTILINE)[1:]:
            command_line, *shown = command.rstrip("\n").split("\n")
            steps.append((command_line, shown))
    return steps


def expected_pattern(line: str) -> re.Pattern[str]:
    """A README line as a pattern: its varying values stand for any of their shape."""
    pattern, position = "", 0
    spans = sorted(
        (match.start(), match.end(), replacement)
        for regex, replacement in VARYING
        for match in regex.finditer(line)
    )
    for start, end, replacement in spans:
        if start < position:
            continue
        pattern += _literal(line[position:start]) + replacement
        position = end
    return re.compile(pattern + _literal(line[position:]))


def _literal(text: str) -> str:
    return ".*".join(re.escape(part) for part in text.split("…"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A fresh service as `make run` makes it: its address and the first key seed printed."""
    workdir = tmp_path_factory.mktemp("walkthrough")
    environment = {**os.environ, "WALLET_DATABASE_URL": f"sqlite:///{workdir / 'wallet.db'}"}
    for step in ("migrate", "seed"):
        done = subprocess.run(
            [WALLET, step], env=environment, capture_output=True, text=True, check=True
        )
    key = done.stdout.splitlines()[-1]
    assert KEY.fullmatch(key), done.stdout
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [WALLET, "serve", "--port", str(port)],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health").is_success:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not start within 30 s"
            time.sleep(0.1)
        yield f"127.0.0.1:{port}", key
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def run_in_one_shell(steps: list[str], *, address: str, key: str) -> list[list[str]]:
    """What each step printed, all run in one bash session as a person would paste them."""
    script = "\n".join(f"echo {MARK}\n" + step.replace("127.0.0.1:8000", address) for step in steps)
    script = re.sub(r"^KEY=wk_\S*", f"KEY={key}", script, flags=re.MULTILINE)
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    printed = done.stdout.split(MARK + "\n")[1:]
    assert len(printed) == len(steps), done.stdout
    # curl -i ends header lines with CR, and a body without a newline runs into the next mark.
    return [text.replace("\r", "").split("\n") for text in printed]


def test_every_line_the_readme_shows_is_what_its_commands_print(
    service: tuple[str, str],
) -> None:
    address, key = service
    steps = walkthrough()
    assert len(steps) > 20, "the walk-through lost its commands"
    printed = run_in_one_shell([command for command, _ in steps], address=address, key=key)
    for (command, shown), actual in zip(steps, printed, strict=True):
        remaining = iter(actual)
        for line in shown:
            pattern = expected_pattern(line)
            assert any(pattern.fullmatch(candidate) for candidate in remaining), (
                f"after `{command[:120]}`, the README shows\n  {line}\nwhich is not among "
                "what it printed (in order):\n  " + "\n  ".join(actual)
            )


def test_the_walkthrough_can_run_again_on_the_same_database(service: tuple[str, str]) -> None:
    """A second run makes new transactions (201), not replays: its keys are new each run."""
    address, key = service
    steps = walkthrough()
    time.sleep(1.1)  # $RUN counts seconds: a person does not paste it twice within one
    printed = run_in_one_shell([command for command, _ in steps], address=address, key=key)
    topups = [
        lines for (command, _), lines in zip(steps, printed, strict=True) if "/topup" in command
    ]
    assert topups[0][0] == "HTTP/1.1 201 Created"  # not "200 OK", a replay of the first run
