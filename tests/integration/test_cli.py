"""The `wallet` command on an SQLite file: migrate, seed and verify succeed and say so; verify
fails with exit code 1 once the ledger was tampered with. Synchronous tests: the CLI runs its
own event loop."""

import sqlite3
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from wallet.cli import app
from wallet.service.seed import ALICE


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
    assert "schema is up to date" in succeeds(wallet_command(database_file, "migrate"))
    assert "seed data is in place" in succeeds(wallet_command(database_file, "seed"))
    output = succeeds(wallet_command(database_file, "verify"))

    assert "ledger verified: every invariant holds" in output
    for check in ("sum to zero", "ledger replay", "one debit and one credit", "chains replay"):
        assert check in output
    with sqlite3.connect(database_file) as connection:
        rows = connection.execute(
            "SELECT asset_symbol, balance FROM balances WHERE account_id = ? ORDER BY 1", (ALICE,)
        ).fetchall()
    assert rows == [("DIAMONDS", 10), ("GOLD_COINS", 1000), ("LOYALTY_POINTS", 500)]


def test_migrate_and_seed_may_run_again(database_file: Path) -> None:
    for _ in range(2):
        succeeds(wallet_command(database_file, "migrate"))
        succeeds(wallet_command(database_file, "seed"))
    with sqlite3.connect(database_file) as connection:
        (entries,) = connection.execute("SELECT count(*) FROM entries").fetchone()
    assert entries == 12
    assert "ledger verified" in succeeds(wallet_command(database_file, "verify"))


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
