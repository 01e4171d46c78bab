"""The `wallet` command on an SQLite file: migrate, seed and verify succeed and say so; verify
fails with exit code 1 once the ledger was tampered with. Synchronous tests: the CLI runs its
own event loop."""

import json
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from wallet.cli import app, worker_count
from wallet.service.seed import ALICE
from wallet.settings import Settings

KEY = re.compile(r"wk_[A-Za-z0-9_-]{43}")


@pytest.fixture
def database_file(tmp_path: Path) -> Path:
    return tmp_path / "cli.db"


def wallet_command(database_file: Path, *args: str) -> Result:
    return CliRunner().invoke(
        app, list(args), env={"WALLET_DATABASE_URL": f"sqlite+aiosqlite:///{database_file}"}
    )


def succeeds(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_migrate_seed_and_verify_succeed_on_a_new_database(database_file: Path) -> None:
    assert "created the schema at revision" in succeeds(wallet_command(database_file, "migrate"))
    assert "schema is up to date" in succeeds(wallet_command(database_file, "migrate"))
    assert "seed data is in place" in succeeds(wallet_command(database_file, "seed"))
    output = succeeds(wallet_command(database_file, "verify"))

    assert "ledger verified: every invariant holds" in output
    for check in (
        "sum to zero",
        "balance = paid + free",
        "ledger replay",
        "one debit and one credit",
        "chains replay",
        "lots add up to their balances",
        "lots replay their moves",
    ):
        assert check in output
    with sqlite3.connect(database_file) as connection:
        rows = connection.execute(
            "SELECT asset_symbol, balance, paid FROM balances WHERE account_id = ? ORDER BY 1",
            (ALICE,),
        ).fetchall()
    assert rows == [("DIAMONDS", 10, 10), ("GOLD_COINS", 1000, 1000), ("LOYALTY_POINTS", 500, 500)]


def test_migrate_and_seed_may_run_again(database_file: Path) -> None:
    outputs = []
    for _ in range(2):
        succeeds(wallet_command(database_file, "migrate"))
        outputs.append(succeeds(wallet_command(database_file, "seed")))
    with sqlite3.connect(database_file) as connection:
        (entries,) = connection.execute("SELECT count(*) FROM entries").fetchone()
    assert entries == 12
    assert "ledger verified" in succeeds(wallet_command(database_file, "verify"))
    # The first seed printed a first admin key, alone on its last line; the second none.
    assert KEY.fullmatch(outputs[0].splitlines()[-1])
    assert not KEY.search(outputs[1])


def test_verify_exits_1_after_tampering(database_file: Path) -> None:
    succeeds(wallet_command(database_file, "migrate"))
    succeeds(wallet_command(database_file, "seed"))
    with sqlite3.connect(database_file) as connection:
        connection.execute(
            "UPDATE balances SET balance = balance + 1"
            " WHERE account_id = ? AND asset_symbol = 'GOLD_COINS'",
            (ALICE,),
        )

    result = wallet_command(database_file, "verify")

    assert result.exit_code == 1, result.output
    assert "ledger verification FAILED" in result.output
    assert "GOLD_COINS: 1" in result.output


def test_verify_exits_1_after_a_paid_part_was_tampered_with(database_file: Path) -> None:
    succeeds(wallet_command(database_file, "migrate"))
    succeeds(wallet_command(database_file, "seed"))
    with sqlite3.connect(database_file) as connection:
        connection.execute(
            "UPDATE balances SET paid = paid - 1"
            " WHERE account_id = ? AND asset_symbol = 'GOLD_COINS'",
            (ALICE,),
        )

    result = wallet_command(database_file, "verify")

    assert result.exit_code == 1, result.output
    assert "ledger verification FAILED" in result.output
    assert "GOLD_COINS: paid parts sum to -1" in result.output


def test_report_liabilities_prints_what_users_are_owed_of_each_kind(database_file: Path) -> None:
    succeeds(wallet_command(database_file, "migrate"))
    succeeds(wallet_command(database_file, "seed"))

    report = json.loads(
        succeeds(wallet_command(database_file, "report", "liabilities", "--asset", "GOLD_COINS"))
    )
    before = json.loads(
        succeeds(
            wallet_command(
                database_file,
                *("report", "liabilities", "--asset", "GOLD_COINS"),
                *("--at", "2020-01-01T09:00:00+09:00"),
            )
        )
    )

    # The seed's opening top-ups of Alice and Bob: 1000 paid coins each.
    assert report["assetSymbol"] == "GOLD_COINS"
    assert report["outstanding"] == {"paid": 2000, "free": 0}
    assert report["period"]["from"] == "1970-01-01T00:00:00Z"
    assert report["period"]["to"] == report["at"]
    moved = {name: value for name, value in report["period"].items() if name not in ("from", "to")}
    assert moved == {name: 2000 if name == "issuedPaid" else 0 for name in moved}
    assert len(moved) == 10
    assert before["at"] == "2020-01-01T00:00:00Z"
    assert before["outstanding"] == {"paid": 0, "free": 0}


@pytest.mark.parametrize(
    ("options", "exit_code", "message"),
    [
        pytest.param(("--asset", "SILVER"), 1, "asset_not_found", id="unknown-asset"),
        pytest.param(
            ("--asset", "GOLD_COINS", "--at", "yesterday"), 2, "RFC 3339", id="not-a-moment"
        ),
    ],
)
def test_report_liabilities_refuses_what_it_cannot_report_in_one_line(
    database_file: Path, options: tuple[str, ...], exit_code: int, message: str
) -> None:
    succeeds(wallet_command(database_file, "migrate"))

    result = wallet_command(database_file, "report", "liabilities", *options)

    assert result.exit_code == exit_code
    assert result.output.count("\n") == 1
    assert message in result.output


def test_checkpoint_prints_the_newest_links_and_verify_proves_the_ledger_extends_them(
    database_file: Path, tmp_path: Path
) -> None:
    succeeds(wallet_command(database_file, "migrate"))
    succeeds(wallet_command(database_file, "seed"))
    printed = json.loads(succeeds(wallet_command(database_file, "checkpoint")))
    saved = tmp_path / "checkpoint.json"

    assert "9 chains" in succeeds(
        wallet_command(database_file, "checkpoint", "--output", str(saved))
    )
    assert json.loads(saved.read_text())["chains"] == printed["chains"]
    assert len(printed["chains"]) == 9  # Alice's, Bob's and the treasury's, of three assets
    assert "ledger verified" in succeeds(
        wallet_command(database_file, "verify", "--checkpoint", str(saved))
    )


def test_verify_exits_1_when_the_ledger_no_longer_leads_through_a_checkpoint(
    database_file: Path, tmp_path: Path
) -> None:
    succeeds(wallet_command(database_file, "migrate"))
    succeeds(wallet_command(database_file, "seed"))
    taken = json.loads(succeeds(wallet_command(database_file, "checkpoint")))
    taken["chains"][0]["chainHash"] = "0" * 64  # a link the chain never had
    saved = tmp_path / "checkpoint.json"
    saved.write_text(json.dumps(taken))

    result = wallet_command(database_file, "verify", "--checkpoint", str(saved))

    assert result.exit_code == 1, result.output
    assert "(rewritten)" in result.output
    assert "ledger verification FAILED" in result.output


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(None, "No such file or directory", id="missing"),
        pytest.param("{not json", "not JSON", id="not-json"),
        pytest.param('{"at": "2026-12-02T10:20:00Z"}', "not a checkpoint", id="not-a-checkpoint"),
    ],
)
def test_a_checkpoint_file_that_is_not_one_is_one_line_and_exit_2(
    database_file: Path, tmp_path: Path, content: str | None, reason: str
) -> None:
    named = tmp_path / "checkpoint.json"
    if content is not None:
        named.write_text(content)

    result = wallet_command(database_file, "verify", "--checkpoint", str(named))

    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"{named}: ")
    assert reason in result.output
    assert not database_file.exists()  # refused before the database was opened


def test_version_names_the_package() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert re.fullmatch(r"wallet \d+\.\d+\.\d+\n", result.output)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WALLET_DATABASE_URL", "mysql://root:hunter2@db/wallet"),
        ("WALLET_DATABASE_URL", "no url at all"),
        ("WALLET_BATCH_MAX_SIZE", "0"),
        ("WALLET_REDIS_URL", "http://cache:6379"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it_and_exit_2(variable: str, value: str) -> None:
    result = CliRunner().invoke(app, ["migrate"], env={variable: value})

    assert result.exit_code == 2
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"{variable}: ")
    assert "hunter2" not in result.output
    assert "Traceback" not in result.output


def test_plain_database_urls_reach_the_async_driver(database_file: Path) -> None:
    result = CliRunner().invoke(
        app, ["migrate"], env={"WALLET_DATABASE_URL": f"sqlite:///{database_file}"}
    )
    assert "created the schema" in succeeds(result)


def test_keys_create_list_and_revoke(database_file: Path) -> None:
    succeeds(wallet_command(database_file, "migrate"))
    created = succeeds(
        wallet_command(
            database_file,
            *("keys", "create", "--label", "shop-eu", "--scope", "wallet:read"),
            *("--scope", "wallet:debit", "--writes-per-second", "5"),
        )
    )
    secret = created.splitlines()[-1]
    assert KEY.fullmatch(secret)
    key_id = re.search(r"created key (\S+)", created)
    assert key_id is not None

    listed = succeeds(wallet_command(database_file, "keys", "list"))
    assert "shop-eu" in listed
    assert "wallet:debit wallet:read" in listed
    assert secret not in listed
    succeeds(wallet_command(database_file, "keys", "revoke", key_id.group(1)))
    with sqlite3.connect(database_file) as connection:
        (revoked_at,) = connection.execute("SELECT revoked_at FROM api_keys").fetchone()
    assert revoked_at is not None

    unknown = wallet_command(database_file, "keys", "revoke", "no-such-key")
    assert unknown.exit_code == 1
    assert "key_not_found" in unknown.output
    bad_scope = wallet_command(database_file, "keys", "create", "--label", "x", "--scope", "god")
    assert bad_scope.exit_code == 2


def test_a_metrics_directory_that_does_not_exist_yet_is_made(
    database_file: Path, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "not" / "yet"
    result = CliRunner().invoke(
        app,
        ["migrate"],
        env={
            "WALLET_DATABASE_URL": f"sqlite:///{database_file}",
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        },
    )
    succeeds(result)
    assert metrics_dir.is_dir()


@pytest.mark.parametrize(
    ("environment", "expected"),
    [
        ({"WALLET_DATABASE_URL": "sqlite:///wallet.db"}, 1),
        ({"WALLET_DATABASE_URL": "postgresql://u@h/db"}, 6),
        ({"WALLET_DATABASE_URL": "postgres://u@h/db", "WALLET_WORKERS": "3"}, 3),
        ({"WALLET_DATABASE_URL": "sqlite:///wallet.db", "WALLET_WORKERS": "2"}, 2),
    ],
)
def test_serve_picks_its_worker_count(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert worker_count(Settings()) == expected
