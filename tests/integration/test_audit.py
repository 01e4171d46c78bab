"""`verify` is clean on a ledger written by the service, paid and free credits, lots and expiries
included, and each kind of tampering with the stored rows trips exactly the checks that guard
against it."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest

from wallet.domain.ledger import (
    Action,
    Asset,
    Command,
    Entry,
    Flow,
    Posted,
    SpendOrder,
    SystemAccount,
    Transaction,
)
from wallet.service.audit import verify
from wallet.service.posting import expire_credits, post
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine

MakeCommand = Callable[..., Any]
Sql = Callable[..., Awaitable[Any]]

SUMS = "per-asset balances sum to zero"
PARTS = "balance = paid + free for every user and asset"
REPLAY = "balances equal their ledger replay"
PAIRS = "each transaction has one debit and one credit"
CHAINS = "balanceAfter chains replay"
LINKS = "hash chains are unbroken"
COUNTS = "entry counts match their chains"
HELD = "held sums match the holds"
CAPTURES = "captures match their holds"
REFUNDS = "refunds stay within their originals"
NEGATIVE_LOTS = "no lot below zero"
LOT_SUMS = "lots add up to their balances"
LOT_MOVES = "lots replay their moves"
EXPIRIES = "expiries match the lots they ended"
REVENUE = SystemAccount.REVENUE
Advance = Callable[[timedelta], None]


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The test database, writing one balance row per system account and asset: the chains the
    findings name are shard 0's (test_tamper.py covers several)."""
    database = Database(create_engine(settings), system_shards=1)
    yield database
    await database.close()


async def failures(database: Database) -> dict[str, list[str]]:
    """The failing checks, by name, with what each found (sorted: SQL gives no row order)."""
    checks = await verify(database)
    assert [c.name for c in checks] == [
        SUMS,
        PARTS,
        REPLAY,
        PAIRS,
        CHAINS,
        LINKS,
        COUNTS,
        HELD,
        CAPTURES,
        REFUNDS,
        NEGATIVE_LOTS,
        LOT_SUMS,
        LOT_MOVES,
        EXPIRIES,
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


def command(action: Action, **fields: Any) -> Command:
    """A command with a fresh key; a flow or hold is Alice's GOLD_COINS unless told."""
    if action in (Action.TOPUP, Action.BONUS, Action.SPEND, Action.TRANSFER, Action.HOLD):
        fields = {"user_id": ALICE, "asset_symbol": "GOLD_COINS"} | fields
    return Command(action=action, idempotency_key=f"audit-{uuid.uuid4().hex}", **fields)


async def apply(database: Database, *commands: Command) -> list[Posted]:
    """Post the commands in one batch through the posting engine; each must succeed."""
    outcomes = await post(database, list(commands))
    assert all(isinstance(outcome, Posted) for outcome in outcomes), outcomes
    return [outcome for outcome in outcomes if isinstance(outcome, Posted)]


async def test_verify_is_clean_on_a_ledger_of_both_kinds_with_lots_and_expiries(
    database: Database, wallet: Wallet, advance: Advance, sql: Sql
) -> None:
    """Spends, transfers, captures and refunds that move both kinds (four entries each), lots
    taken from, passed on and given back after their expiry, reversals of each kind, a hold
    still held, and the sweeper's expiries of free and of paid credits."""
    await wallet.create_asset(
        Asset("TICKETS", "Tickets", "", spend_order=SpendOrder.PAID_FIRST, paid_lifetime_days=5)
    )
    topup, *_ = await apply(
        database,
        command(Action.TOPUP, amount=500),
        command(Action.BONUS, amount=200, credit_expires_in_days=10),
        command(Action.BONUS, amount=100, credit_expires_in_days=30),
        command(Action.BONUS, amount=50),  # never expires
    )
    (spend,) = await apply(database, command(Action.SPEND, amount=400))  # 350 free, 50 paid
    *_, hold, _ = await apply(
        database,
        command(Action.REFUND, reference=spend.transaction.id, amount=200),  # 50 paid, 150 free
        command(Action.TRANSFER, amount=170, to_user_id=BOB),  # 150 free (100 of a lot), 20 paid
        command(Action.BONUS, amount=30),
        command(Action.HOLD, amount=100),  # 30 free, 70 paid
        command(Action.HOLD, amount=10),  # stays held
    )
    assert hold.hold is not None
    *_, loyalty, bob_spend, _, _, _ = await apply(
        database,
        command(Action.CAPTURE, reference=hold.hold.id, amount=80),
        command(Action.REFUND, reference=topup.transaction.id, amount=100),  # a reversal
        command(Action.BONUS, user_id=BOB, asset_symbol="LOYALTY_POINTS", amount=40),
        command(Action.SPEND, user_id=BOB, amount=50),  # from the lot Alice passed on
        command(Action.TOPUP, asset_symbol="TICKETS", amount=60),  # expires in 5 days
        command(Action.BONUS, asset_symbol="TICKETS", amount=40, credit_expires_in_days=20),
        command(Action.SPEND, asset_symbol="TICKETS", amount=30),  # paid first
    )
    await apply(database, command(Action.REFUND, reference=loyalty.transaction.id, amount=15))
    advance(timedelta(days=31))
    await apply(database, command(Action.REFUND, reference=bob_spend.transaction.id))

    assert await expire_credits(database, limit=100) == 2
    expiries = await sql(
        "SELECT user_id, asset_symbol, amount, paid_amount FROM transactions WHERE type = 'expiry'"
    )
    assert sorted(tuple(row) for row in expiries) == sorted(
        [(ALICE, "TICKETS", 70, 30), (BOB, "GOLD_COINS", 100, 0)]
    )
    of_both_kinds = await sql(
        "SELECT DISTINCT t.type FROM transactions AS t WHERE 4 ="
        " (SELECT count(*) FROM entries AS e WHERE e.transaction_id = t.id)"
    )
    assert {row.type for row in of_both_kinds} == {"spend", "refund", "transfer", "expiry"}
    assert await failures(database) == {}


async def test_verify_is_clean_while_a_hold_keeps_credits_past_their_expiry(
    database: Database, advance: Advance
) -> None:
    _, hold = await apply(
        database,
        command(Action.BONUS, amount=20, credit_expires_in_days=1),
        command(Action.HOLD, amount=30, expires_in_s=3 * 86_400),  # the lot's 20 free, 10 paid
    )
    assert hold.hold is not None
    advance(timedelta(days=2))

    assert await expire_credits(database, limit=10) == 0  # the hold keeps them
    assert await failures(database) == {}
    await apply(database, command(Action.CAPTURE, reference=hold.hold.id, amount=25))
    assert await failures(database) == {}


async def test_verify_catches_a_changed_entry_amount(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    spent, debit, _ = await alice_gold_spend(wallet, make_command)
    await sql("UPDATE entries SET amount = 101 WHERE id = :id", id=debit.id)

    assert await failures(database) == {
        REPLAY: [f"{ALICE} GOLD_COINS: balance 900, ledger 899"],
        PAIRS: [f"transaction {spent.id}"],
        CHAINS: [  # the entry is of paid credits: its paidAfter no longer follows either
            f"entry {debit.id} ({ALICE} GOLD_COINS)",
            f"entry {debit.id} ({ALICE} GOLD_COINS): paidAfter does not follow",
        ],
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
        PARTS: ["GOLD_COINS: free parts sum to 100"],  # the paid part stayed 900
        REPLAY: [f"{ALICE} GOLD_COINS: balance 1000, ledger 900"],
    }


async def test_verify_catches_balances_changed_in_a_way_that_still_sums_to_zero(
    database: Database, sql: Sql
) -> None:
    """Seven paid DIAMONDS moved from Bob to Alice: every sum, of each kind, still holds."""
    moved = "(CASE WHEN account_id = :alice THEN 7 ELSE -7 END)"
    await sql(
        f"UPDATE balances SET balance = balance + {moved}, paid = paid + {moved}"
        " WHERE account_id IN (:alice, :bob) AND asset_symbol = 'DIAMONDS'",
        alice=ALICE,
        bob=BOB,
    )

    assert await failures(database) == {
        REPLAY: sorted(
            [f"{ALICE} DIAMONDS: balance 17, ledger 10", f"{BOB} DIAMONDS: balance 3, ledger 10"]
        ),
        CHAINS: sorted(
            [
                f"{ALICE} DIAMONDS: paid 17, newest paidAfter 10",
                f"{BOB} DIAMONDS: paid 3, newest paidAfter 10",
            ]
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
        CHAINS: [f"{REVENUE} GOLD_COINS: paid 100, newest paidAfter 0"],
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
        pytest.param("UPDATE transactions SET amount = 101 WHERE id = :id", True, id="amount"),
        pytest.param(
            "UPDATE transactions SET paid_amount = 99 WHERE id = :id", True, id="paid-amount"
        ),
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
        PARTS: ["GOLD_COINS: paid parts sum to -100"],
        REPLAY: [f"{REVENUE} GOLD_COINS: entries without a balance"],
        LINKS: [f"{REVENUE} GOLD_COINS: the balance's newest link is not the last entry's"],
    }


async def test_only_the_hash_chain_catches_an_edit_that_keeps_every_sum_consistent(
    database: Database, wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    """Someone rewrites a spend of 100 as 90 in every row it touched, balances included: every
    sum, balanceAfter and paidAfter still adds up, but the entries no longer match their links."""
    spent, debit, credit = await alice_gold_spend(wallet, make_command)
    await sql(
        "UPDATE transactions SET amount = 90, paid_amount = 90, balance_after = 910 WHERE id = :id",
        id=spent.id,
    )
    await sql(
        "UPDATE entries SET amount = 90, balance_after = 910, paid_after = 910 WHERE id = :id",
        id=debit.id,
    )
    await sql(
        "UPDATE entries SET amount = 90, balance_after = 90, paid_after = 90 WHERE id = :id",
        id=credit.id,
    )
    await sql(
        "UPDATE balances SET balance = CASE WHEN account_id = :alice THEN 910 ELSE 90 END,"
        " paid = CASE WHEN account_id = :alice THEN 910 ELSE 90 END"
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


async def test_verify_sums_balances_exactly_past_64_bits(
    database: Database, wallet: Wallet, sql: Sql
) -> None:
    """Two users holding the most a balance can (2^63 - 1), one of paid credits and one of
    free: their balances add up past 64 bits, and the per-asset sums must still be exact (the
    rows, written without entries, fail only the replay)."""
    await wallet.create_asset(Asset("HUGE", "Huge", ""))
    most = 2**63 - 1
    treasury, bonus_pool = SystemAccount.TREASURY.value, SystemAccount.BONUS_POOL.value
    rows = [(ALICE, most, most), (BOB, most, 0), (treasury, -most, -most), (bonus_pool, -most, 0)]
    for account, balance, paid in rows:
        await sql(
            "INSERT INTO balances (account_id, asset_symbol, balance, paid)"
            " VALUES (:account, 'HUGE', :balance, :paid)",
            account=account,
            balance=balance,
            paid=paid,
        )

    found = await failures(database)

    assert set(found) == {REPLAY, CHAINS}  # no entries: neither a replay nor a chain head
    assert found[REPLAY] == sorted(
        f"{account} HUGE: balance {balance}, ledger 0" for account, balance, _ in rows
    )
