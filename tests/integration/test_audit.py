"""`verify` is clean on a ledger written by the service, and each kind of tampering with the
stored rows trips exactly the checks that guard against it."""

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from wallet.domain.ledger import Entry, Flow, SystemAccount, Transaction
from wallet.service.audit import verify
from wallet.service.posting import post
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Wallet
from wallet.store.database import Database

MakeCommand = Callable[..., Any]
Sql = Callable[..., Awaitable[Any]]

SUMS = "per-asset balances sum to zero"
REPLAY = "balances equal their ledger replay"
PAIRS = "each transaction has one debit and one credit"
CHAINS = "balanceAfter chains replay"
LINKS = "hash chains are unbroken"
COUNTS = "entry counts match their chains"
HELD = "held sums match the holds"
CAPTURES = "captures match their holds"
REFUNDS = "refunds stay within their originals"
REVENUE = SystemAccount.REVENUE


async def failures(database: Database) -> dict[str, list[str]]:
    """The failing checks, by name, with what each found (sorted: SQL gives no row order)."""
    checks = await verify(database)
    assert [c.name for c in checks] == [
        SUMS,
        REPLAY,
        PAIRS,
        CHAINS,
        LINKS,
        COUNTS,
        HELD,
        CAPTURES,
        REFUNDS,
    ]
    return {c.name: sorted(c.failures) for c in checks if not c.is_clean}


async def alice_gold_spend(
    wallet: Wallet, make_command: MakeCommand
) -> tuple[Transaction, Entry, Entry]:
    """Alice spends 100 GOLD_COINS; returns the transaction, her debit and the revenue credit."""
    spent = (await wallet.execute(make_command(Flow.SPEND, 100))).transaction
    _, (debit, credit) = await wallet.transaction(user_id=ALICE, transaction_id=spent.id)
    return spent, debit, credit


async def test_verify_is_clean_after_seeding(database: Database) -> None:
    assert await failures(database) == {}


async def test_verify_is_clean_after_every_kind_of_flow_and_failure(
    database: Database, wallet: Wallet, make_command: MakeCommand
) -> None:
    await post(
        database,
        [
            make_command(Flow.TOPUP, 500, metadata={"order": "1"}),
            make_command(Flow.BONUS, 5, asset="DIAMONDS", note="welcome"),
            make_command(Flow.SPEND, 1500),
            make_command(Flow.SPEND, 1, user_id=BOB, asset="LOYALTY_POINTS"),
            make_command(Flow.SPEND, 10_000),
            make_command(Flow.TOPUP, 1, user_id="nobody"),
        ],
    )
    await wallet.create_user(user_id="carol", email="carol@example.com", name="Carol")
    await wallet.execute(make_command(Flow.BONUS, 70, user_id="carol"))
    await wallet.execute(make_command(Flow.SPEND, 70, user_id="carol"))

    assert await failures(database) == {}


async def test_verify_catches_a_changed_entry_amount(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    spent, debit, _ = await alice_gold_spend(wallet, make_command)
    await sql("UPDATE entries SET amount = 101 WHERE id = :id", id=debit.id)

    assert await failures(database) == {
        REPLAY: [f"{ALICE} GOLD_COINS: balance 900, ledger 899"],
        PAIRS: [f"transaction {spent.id}"],
        CHAINS: [f"entry {debit.id} ({ALICE} GOLD_COINS)"],
        LINKS: [f"entry {debit.id} ({ALICE} GOLD_COINS): first broken link"],
    }


async def test_verify_catches_a_changed_balance(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    await alice_gold_spend(wallet, make_command)
    await sql(
        "UPDATE balances SET balance = 1000"
        " WHERE account_id = :alice AND asset_symbol = 'GOLD_COINS'",
        alice=ALICE,
    )

    assert await failures(database) == {
        SUMS: ["GOLD_COINS: 100"],
        REPLAY: [f"{ALICE} GOLD_COINS: balance 1000, ledger 900"],
    }


async def test_verify_catches_balances_changed_in_a_way_that_still_sums_to_zero(
    database: Database, sql: Sql
) -> None:
    await sql(
        "UPDATE balances SET balance = balance + (CASE WHEN account_id = :alice THEN 7 ELSE -7 END)"
        " WHERE account_id IN (:alice, :bob) AND asset_symbol = 'DIAMONDS'",
        alice=ALICE,
        bob=BOB,
    )

    assert await failures(database) == {
        REPLAY: sorted(
            [f"{ALICE} DIAMONDS: balance 17, ledger 10", f"{BOB} DIAMONDS: balance 3, ledger 10"]
        ),
    }


async def test_verify_catches_a_deleted_entry(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    spent, _, credit = await alice_gold_spend(wallet, make_command)
    await sql("DELETE FROM entries WHERE id = :id", id=credit.id)

    assert await failures(database) == {
        REPLAY: [f"{REVENUE} GOLD_COINS: balance 100, ledger 0"],
        PAIRS: [f"transaction {spent.id}"],
        LINKS: [f"{REVENUE} GOLD_COINS: a newest link but no entry"],
        COUNTS: [f"{REVENUE} GOLD_COINS: entry count 1, chain 0"],
    }


async def test_verify_catches_a_changed_balance_after_of_a_system_entry(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    _, _, credit = await alice_gold_spend(wallet, make_command)
    await sql("UPDATE entries SET balance_after = 101 WHERE id = :id", id=credit.id)

    assert await failures(database) == {
        CHAINS: [f"entry {credit.id} ({REVENUE} GOLD_COINS)"],
        LINKS: [f"entry {credit.id} ({REVENUE} GOLD_COINS): first broken link"],
    }


async def test_verify_catches_a_changed_balance_after_of_a_user_entry(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    spent, debit, _ = await alice_gold_spend(wallet, make_command)
    await sql("UPDATE entries SET balance_after = 901 WHERE id = :id", id=debit.id)

    assert await failures(database) == {
        PAIRS: [f"transaction {spent.id}"],
        CHAINS: [f"entry {debit.id} ({ALICE} GOLD_COINS)"],
        LINKS: [f"entry {debit.id} ({ALICE} GOLD_COINS): first broken link"],
    }


async def test_verify_catches_a_changed_balance_after_in_the_middle_of_a_chain(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    """The entry after the changed one no longer follows from it, so both are reported."""
    spent, debit, _ = await alice_gold_spend(wallet, make_command)
    later = (await wallet.execute(make_command(Flow.TOPUP, 5))).transaction
    _, (_, later_credit) = await wallet.transaction(user_id=ALICE, transaction_id=later.id)
    await sql("UPDATE entries SET balance_after = 901 WHERE id = :id", id=debit.id)

    assert await failures(database) == {
        PAIRS: [f"transaction {spent.id}"],
        CHAINS: sorted(
            [
                f"entry {debit.id} ({ALICE} GOLD_COINS)",
                f"entry {later_credit.id} ({ALICE} GOLD_COINS)",
            ]
        ),
        LINKS: [f"entry {debit.id} ({ALICE} GOLD_COINS): first broken link"],
    }


@pytest.mark.parametrize(
    ("statement", "is_linked"),
    [
        pytest.param("UPDATE transactions SET amount = 99 WHERE id = :id", True, id="amount"),
        pytest.param(
            "UPDATE transactions SET balance_after = 899 WHERE id = :id", False, id="balance-after"
        ),
        pytest.param("UPDATE transactions SET user_id = :bob WHERE id = :id", True, id="user"),
    ],
)
async def test_verify_catches_a_transaction_that_no_longer_matches_its_entries(
    database: Database,
    wallet: Wallet,
    make_command: MakeCommand,
    sql: Sql,
    statement: str,
    is_linked: bool,
) -> None:
    """The pair check catches each; a field the links digest also breaks both entries' links
    (a transaction's own balanceAfter is not digested: its user's entry's is)."""
    spent, debit, credit = await alice_gold_spend(wallet, make_command)
    params = {"id": spent.id} | ({"bob": BOB} if ":bob" in statement else {})
    await sql(statement, **params)

    broken_links = {
        LINKS: sorted(
            [
                f"entry {debit.id} ({ALICE} GOLD_COINS): first broken link",
                f"entry {credit.id} ({REVENUE} GOLD_COINS): first broken link",
            ]
        )
    }
    assert await failures(database) == {PAIRS: [f"transaction {spent.id}"]} | (
        broken_links if is_linked else {}
    )


async def test_verify_catches_a_deleted_balance_row_whose_account_has_entries(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    await alice_gold_spend(wallet, make_command)
    await sql(
        "DELETE FROM balances WHERE account_id = :revenue AND asset_symbol = 'GOLD_COINS'",
        revenue=REVENUE,
    )

    assert await failures(database) == {
        SUMS: ["GOLD_COINS: -100"],
        REPLAY: [f"{REVENUE} GOLD_COINS: entries without a balance"],
        LINKS: [f"{REVENUE} GOLD_COINS: the balance's newest link is not the last entry's"],
    }


async def test_only_the_hash_chain_catches_an_edit_that_keeps_every_sum_consistent(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    """Someone rewrites a spend of 100 as 90 in every row it touched, balances included: every
    sum and balanceAfter still adds up, but the entries no longer match their links."""
    spent, debit, credit = await alice_gold_spend(wallet, make_command)
    await sql(
        "UPDATE transactions SET amount = 90, balance_after = 910 WHERE id = :id", id=spent.id
    )
    await sql("UPDATE entries SET amount = 90, balance_after = 910 WHERE id = :id", id=debit.id)
    await sql("UPDATE entries SET amount = 90, balance_after = 90 WHERE id = :id", id=credit.id)
    await sql(
        "UPDATE balances SET balance = CASE WHEN account_id = :alice THEN 910 ELSE 90 END"
        " WHERE account_id IN (:alice, :revenue) AND asset_symbol = 'GOLD_COINS'",
        alice=ALICE,
        revenue=REVENUE,
    )

    assert await failures(database) == {
        LINKS: sorted(
            [
                f"entry {debit.id} ({ALICE} GOLD_COINS): first broken link",
                f"entry {credit.id} ({REVENUE} GOLD_COINS): first broken link",
            ]
        ),
    }
