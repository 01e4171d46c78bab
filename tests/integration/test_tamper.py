"""Tampering behind the service's back, on SQLite and PostgreSQL: a ledger written by the posting
engine verifies clean, and each kind of change made with SQL to its rows (a relabelled type,
edited metadata, an edited entry, a truncation, held sums, captures, refunds) is reported by
`verify`. A truncation that rewinds every balance consistently is caught only against a
checkpoint taken before it, and a rewrite behind a checkpoint too."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import sqlalchemy as sa

from wallet.domain.ledger import GENESIS_LINK, Action, Command, Posted, SystemAccount
from wallet.service.audit import ChainHead, Checkpoint, checkpoint, verify
from wallet.service.posting import post
from wallet.service.seed import ALICE, BOB, seed
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import migrate
from wallet.store.tables import transactions

SUMS = "per-asset balances sum to zero"
REPLAY = "balances equal their ledger replay"
PAIRS = "each transaction has one debit and one credit"
CHAINS = "balanceAfter chains replay"
LINKS = "hash chains are unbroken"
COUNTS = "entry counts match their chains"
HELD = "held sums match the holds"
CAPTURES = "captures match their holds"
REFUNDS = "refunds stay within their originals"
EXTENDS = "the ledger extends checkpoint taken-before"
Sql = Callable[..., Awaitable[list[Any]]]
REVENUE = SystemAccount.REVENUE
GOLD = "GOLD_COINS"


def command(action: Action, **fields: Any) -> Command:
    """A command with a fresh key; a flow is Alice's GOLD_COINS unless told."""
    if action in (Action.TOPUP, Action.BONUS, Action.SPEND, Action.TRANSFER, Action.HOLD):
        fields = {"user_id": ALICE, "asset_symbol": GOLD} | fields
    return Command(action=action, idempotency_key=f"tamper-{uuid.uuid4().hex}", **fields)


async def apply(database: Database, *commands: Command) -> list[Posted]:
    """Post the commands in one batch through the posting engine; each must succeed."""
    outcomes = await post(database, list(commands))
    assert all(isinstance(outcome, Posted) for outcome in outcomes), outcomes
    return [outcome for outcome in outcomes if isinstance(outcome, Posted)]


async def failures(database: Database, taken: Checkpoint | None = None) -> dict[str, list[str]]:
    """The failing checks, by name, with what each found (sorted: SQL gives no row order)."""
    checks = await verify(database, checkpoint=taken, checkpoint_name="taken-before")
    names = [SUMS, REPLAY, PAIRS, CHAINS, LINKS, COUNTS, HELD, CAPTURES, REFUNDS]
    assert [c.name for c in checks] == names + ([EXTENDS] if taken else [])
    return {c.name: sorted(c.failures) for c in checks if not c.is_clean}


async def entries_of(sql: Sql, transaction_id: str) -> dict[str, Any]:
    """A transaction's entries, by direction."""
    rows = await sql("SELECT * FROM entries WHERE transaction_id = :id", id=transaction_id)
    return {row.direction: row for row in rows}


async def broken_links(sql: Sql, transaction_id: str) -> list[str]:
    """What the link check says when both entries of the transaction are the first broken."""
    found = await entries_of(sql, transaction_id)
    return sorted(
        f"entry {e.id} ({e.account_id} {e.asset_symbol}): first broken link" for e in found.values()
    )


async def truncate(sql: Sql, transaction_id: str) -> None:
    """Delete a transaction that is the newest of both its chains, with its entries, and rewind
    both balance rows (balance, newest link and entry count) as if it had never been: the
    ledger left is consistent in itself."""
    for entry in (await entries_of(sql, transaction_id)).values():
        signed = entry.amount if entry.direction == "credit" else -entry.amount
        before = await sql(
            "SELECT chain_hash FROM entries WHERE account_id = :account"
            " AND asset_symbol = :asset AND seq < :seq ORDER BY seq DESC LIMIT 1",
            account=entry.account_id,
            asset=entry.asset_symbol,
            seq=entry.seq,
        )
        await sql(
            "UPDATE balances SET balance = balance - :signed, entry_count = entry_count - 1,"
            " chain_hash = :link WHERE account_id = :account AND asset_symbol = :asset",
            signed=signed,
            link=before[0].chain_hash if before else GENESIS_LINK,
            account=entry.account_id,
            asset=entry.asset_symbol,
        )
    await sql("DELETE FROM entries WHERE transaction_id = :id", id=transaction_id)
    await sql("DELETE FROM transactions WHERE id = :id", id=transaction_id)


async def test_verify_is_clean_after_holds_captures_refunds_reversals_transfers_and_batches(
    database: Database,
) -> None:
    topup, bonus, spend, _, hold, other_hold = await apply(
        database,
        command(Action.TOPUP, amount=500, metadata={"order": "1", "é": "ü"}),
        command(Action.BONUS, amount=50, asset_symbol="DIAMONDS", note="welcome"),
        command(Action.SPEND, amount=300, note="Épée de feu"),
        command(Action.TRANSFER, amount=40, to_user_id=BOB, note="gift"),
        command(Action.HOLD, amount=70, note="escrow"),
        command(Action.HOLD, user_id=BOB, amount=20),
    )
    assert hold.hold is not None
    assert other_hold.hold is not None
    await apply(
        database,
        command(Action.CAPTURE, reference=hold.hold.id, amount=60),
        command(Action.RELEASE, reference=other_hold.hold.id),
        command(Action.REFUND, reference=spend.transaction.id, amount=100, note="broken"),
        command(Action.REFUND, reference=spend.transaction.id, amount=50),
        command(Action.REFUND, reference=topup.transaction.id, amount=10),
        command(Action.REFUND, reference=bonus.transaction.id),
        command(
            Action.BATCH,
            operations=(
                Command(Action.TOPUP, "", user_id=BOB, asset_symbol=GOLD, amount=5),
                Command(
                    Action.TRANSFER, "", user_id=BOB, to_user_id=ALICE, asset_symbol=GOLD, amount=5
                ),
            ),
        ),
        command(Action.HOLD, amount=25),  # stays held
    )

    assert await failures(database) == {}


async def test_a_top_up_relabelled_as_a_bonus_breaks_its_links_and_its_accounts(
    database: Database, sql: Sql
) -> None:
    (topup,) = await apply(database, command(Action.TOPUP, amount=500))
    await sql("UPDATE transactions SET type = 'bonus' WHERE id = :id", id=topup.transaction.id)

    assert await failures(database) == {
        PAIRS: [f"transaction {topup.transaction.id}"],  # a bonus comes from the bonus pool
        LINKS: await broken_links(sql, topup.transaction.id),
    }


async def test_edited_metadata_breaks_the_links_of_the_transaction(
    database: Database, sql: Sql
) -> None:
    (topup,) = await apply(database, command(Action.TOPUP, amount=500, metadata={"order": "1"}))
    await sql(
        sa.update(transactions)
        .where(transactions.c.id == topup.transaction.id)
        .values(metadata={"order": "2"}),
    )

    assert await failures(database) == {LINKS: await broken_links(sql, topup.transaction.id)}


async def test_an_edited_entry_amount_is_caught(database: Database, sql: Sql) -> None:
    (transfer,) = await apply(database, command(Action.TRANSFER, amount=40, to_user_id=BOB))
    credit = (await entries_of(sql, transfer.transaction.id))["credit"]
    await sql("UPDATE entries SET amount = 45 WHERE id = :id", id=credit.id)

    assert await failures(database) == {
        REPLAY: [f"{BOB} GOLD_COINS: balance 1040, ledger 1045"],
        PAIRS: [f"transaction {transfer.transaction.id}"],
        CHAINS: [f"entry {credit.id} ({BOB} GOLD_COINS)"],
        LINKS: [f"entry {credit.id} ({BOB} GOLD_COINS): first broken link"],
    }


async def test_a_truncation_is_caught_only_against_a_checkpoint_taken_before(
    database: Database, sql: Sql
) -> None:
    (spend,) = await apply(database, command(Action.SPEND, amount=100))
    taken = await checkpoint(database)
    await truncate(sql, spend.transaction.id)

    assert await failures(database) == {}  # a consistently shortened ledger is a valid ledger
    assert await failures(database, taken) == {
        EXTENDS: sorted(
            [
                f"{ALICE} GOLD_COINS: 1 of the checkpoint's 2 entries left (truncated)",
                f"{REVENUE} GOLD_COINS: 0 of the checkpoint's 1 entries left (truncated)",
            ]
        )
    }


async def test_a_rewrite_behind_a_checkpoint_is_caught(database: Database, sql: Sql) -> None:
    """The newest spend is taken back and another made in its place: every chain is as long
    as the checkpoint says, and consistent, but leads through other links."""
    (spend,) = await apply(database, command(Action.SPEND, amount=100))
    taken = await checkpoint(database)
    await truncate(sql, spend.transaction.id)
    (other,) = await apply(database, command(Action.SPEND, amount=100))
    replaced = await entries_of(sql, other.transaction.id)

    assert await failures(database) == {}
    assert await failures(database, taken) == {
        EXTENDS: sorted(
            [
                f"{ALICE} GOLD_COINS: entry 2 ({replaced['debit'].id}) is not the checkpoint's "
                "link (rewritten)",
                f"{REVENUE} GOLD_COINS: entry 1 ({replaced['credit'].id}) is not the "
                "checkpoint's link (rewritten)",
            ]
        )
    }


async def test_a_ledger_that_grew_since_a_checkpoint_extends_it(database: Database) -> None:
    await apply(database, command(Action.SPEND, amount=100))
    taken = await checkpoint(database)
    await apply(
        database,
        command(Action.SPEND, amount=1),
        command(Action.BONUS, amount=3, user_id=BOB, asset_symbol="DIAMONDS"),
    )

    assert await failures(database, taken) == {}


async def test_a_checkpoint_names_the_newest_link_and_length_of_every_chain(
    database: Database, sql: Sql
) -> None:
    await apply(database, command(Action.SPEND, amount=100), command(Action.HOLD, amount=1))
    entries = await sql("SELECT account_id, asset_symbol, chain_hash FROM entries ORDER BY seq")
    chains: dict[tuple[str, str], list[str]] = {}
    for row in entries:
        chains.setdefault((row.account_id, row.asset_symbol), []).append(row.chain_hash)

    taken = await checkpoint(database)

    assert sorted(taken.chains, key=lambda c: (c.account, c.asset_symbol)) == taken.chains
    assert {(c.account, c.asset_symbol): c for c in taken.chains} == {
        key: ChainHead(key[0], key[1], links[-1], len(links)) for key, links in chains.items()
    }


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        pytest.param(
            "UPDATE balances SET held = held + 5 WHERE account_id = :alice"
            " AND asset_symbol = 'GOLD_COINS'",
            f"{ALICE} GOLD_COINS: held 35, holds 30",
            id="held-edited",
        ),
        pytest.param(
            "DELETE FROM holds WHERE user_id = :alice",
            f"{ALICE} GOLD_COINS: held 30, holds 0",
            id="hold-deleted",
        ),
    ],
)
async def test_a_held_sum_that_is_not_the_holds_is_caught(
    database: Database, statement: str, expected: str, sql: Sql
) -> None:
    await apply(database, command(Action.HOLD, amount=30))
    await sql(statement, alice=ALICE)

    assert await failures(database) == {HELD: [expected]}


async def test_a_capture_naming_a_hold_that_is_still_held_is_caught(
    database: Database, sql: Sql
) -> None:
    spend, hold = await apply(
        database, command(Action.SPEND, amount=30), command(Action.HOLD, amount=30)
    )
    assert hold.hold is not None
    await sql(
        "UPDATE transactions SET hold_id = :hold WHERE id = :id",
        hold=hold.hold.id,
        id=spend.transaction.id,
    )

    assert await failures(database) == {
        CAPTURES: [
            f"transaction {spend.transaction.id}: captures hold {hold.hold.id}, which is held"
        ],
        LINKS: await broken_links(sql, spend.transaction.id),  # holdId is linked
    }


async def test_a_refunded_amount_that_is_not_the_sum_of_the_refunds_is_caught(
    database: Database, sql: Sql
) -> None:
    (spend,) = await apply(database, command(Action.SPEND, amount=100))
    await apply(database, command(Action.REFUND, reference=spend.transaction.id, amount=40))
    await sql(
        "UPDATE transactions SET refunded_amount = 60 WHERE id = :id",
        id=spend.transaction.id,
    )

    assert await failures(database) == {
        REFUNDS: [f"transaction {spend.transaction.id}: amount 100, refundedAmount 60, refunds 40"]
    }


async def test_refunds_that_add_up_to_more_than_their_original_are_caught(
    database: Database, sql: Sql
) -> None:
    (spend,) = await apply(database, command(Action.SPEND, amount=100))
    (refund,) = await apply(
        database, command(Action.REFUND, reference=spend.transaction.id, amount=40)
    )
    await sql("UPDATE transactions SET amount = 120 WHERE id = :id", id=refund.transaction.id)

    assert await failures(database) == {
        PAIRS: [f"transaction {refund.transaction.id}"],
        LINKS: await broken_links(sql, refund.transaction.id),
        REFUNDS: [
            f"transaction {spend.transaction.id}: amount 100, refundedAmount 40, refunds 120"
        ],
    }


@pytest.fixture
async def unguarded(empty_database_url: str) -> AsyncIterator[Database]:
    """A migrated, seeded database of its own, whose CHECK constraints a test may drop."""
    database = Database(create_engine(Settings(database_url=empty_database_url)))
    await migrate(database)
    await seed(database)
    yield database
    await database.close()


async def past_a_check(
    database: Database, table: str, check: str, statement: str, **params: Any
) -> None:
    """Run `statement` as someone who gets past the CHECK constraint `check` of `table`: on
    SQLite with check constraints ignored, on PostgreSQL by dropping it."""
    async with database.engine.begin() as connection:
        if database.dialect == "sqlite":
            await connection.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        else:
            await connection.execute(sa.text(f"ALTER TABLE {table} DROP CONSTRAINT {check}"))
        await connection.execute(sa.text(statement), params)
        if database.dialect == "sqlite":
            await connection.exec_driver_sql("PRAGMA ignore_check_constraints = OFF")


async def test_a_hold_captured_for_more_than_its_amount_is_caught(unguarded: Database) -> None:
    (hold,) = await apply(unguarded, command(Action.HOLD, amount=30))
    assert hold.hold is not None
    (captured,) = await apply(unguarded, command(Action.CAPTURE, reference=hold.hold.id))
    await past_a_check(
        unguarded,
        "holds",
        "ck_holds_captured_within_amount",
        "UPDATE holds SET captured_amount = 40 WHERE id = :id",
        id=hold.hold.id,
    )

    assert await failures(unguarded) == {
        CAPTURES: sorted(
            [
                f"hold {hold.hold.id}: captured 40 of 30",
                f"hold {hold.hold.id}: captured 40, but its transaction is not a spend of that "
                "amount by its user in its asset",
            ]
        )
    }
    assert captured.transaction.hold_id == hold.hold.id


async def test_a_refunded_amount_above_the_original_is_caught(unguarded: Database) -> None:
    (spend,) = await apply(unguarded, command(Action.SPEND, amount=100))
    await apply(unguarded, command(Action.REFUND, reference=spend.transaction.id, amount=40))
    await past_a_check(
        unguarded,
        "transactions",
        "ck_transactions_refunded_within_amount",
        "UPDATE transactions SET refunded_amount = 150 WHERE id = :id",
        id=spend.transaction.id,
    )

    assert await failures(unguarded) == {
        REFUNDS: [f"transaction {spend.transaction.id}: amount 100, refundedAmount 150, refunds 40"]
    }
