"""Tampering behind the service's back, on SQLite and PostgreSQL: a ledger written by the posting
engine verifies clean, and each kind of change made with SQL to its rows (a relabelled type,
edited metadata, an edited entry or its kind, a truncation, held sums, captures, refunds, paid
parts, lots, their moves and expiries) is reported by `verify`. A truncation that rewinds every
balance consistently is caught only against a checkpoint taken before it, and a rewrite behind a
checkpoint too; all of it also where system accounts write to several balance rows (shards), each
its own chain."""

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from wallet.domain.ledger import GENESIS_LINK, Action, Command, Posted, SystemAccount
from wallet.service.audit import (
    ChainHead,
    Checkpoint,
    checkpoint,
    checkpoint_json,
    parse_checkpoint,
    verify,
)
from wallet.service.posting import expire_credits, post
from wallet.service.seed import ALICE, BOB, seed
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import migrate
from wallet.store.tables import transactions

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
EXTENDS = "the ledger extends checkpoint taken-before"
Sql = Callable[..., Awaitable[list[Any]]]
REVENUE = SystemAccount.REVENUE
Advance = Callable[[timedelta], None]
GOLD = "GOLD_COINS"


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The test database, writing one balance row per system account and asset: the chains the
    findings name are shard 0's (`sharded` writes to several)."""
    database = Database(create_engine(settings), system_shards=1)
    yield database
    await database.close()


@pytest.fixture
async def sharded(settings: Settings) -> AsyncIterator[Database]:
    """The test database, each batch writing to the next of four rows (shards) of every system
    account and asset it moves."""
    database = Database(create_engine(settings), system_shards=4)
    yield database
    await database.close()


def lot(bonus: Posted, days: int) -> str:
    """How findings name Alice's GOLD_COINS lot of the free credits a bonus gave for `days`."""
    at = (bonus.transaction.created_at + timedelta(days=days)).isoformat()
    return f"{ALICE} {GOLD} free lot expiring {at.replace('+00:00', 'Z')}"


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
    names = [
        *(SUMS, PARTS, REPLAY, PAIRS, CHAINS, LINKS, COUNTS, HELD, CAPTURES, REFUNDS),
        *(NEGATIVE_LOTS, LOT_SUMS, LOT_MOVES, EXPIRIES),
    ]
    assert [c.name for c in checks] == names + ([EXTENDS] if taken else [])
    return {c.name: sorted(c.failures) for c in checks if not c.is_clean}


async def entries_of(sql: Sql, transaction_id: str) -> dict[str, Any]:
    """A transaction of one kind's entries, by direction."""
    rows = await sql("SELECT * FROM entries WHERE transaction_id = :id", id=transaction_id)
    return {row.direction: row for row in rows}


async def broken_links(sql: Sql, transaction_id: str) -> list[str]:
    """What the link check says when both entries of the transaction are the first broken."""
    found = await entries_of(sql, transaction_id)
    return sorted(
        f"entry {e.id} ({e.account_id} {e.asset_symbol}): first broken link" for e in found.values()
    )


async def truncate(sql: Sql, transaction_id: str) -> None:
    """Delete a transaction of one kind that is the newest of both its chains, with its entries,
    and rewind both balance rows (balance, paid part, newest link and entry count) as if it had
    never been: the ledger left is consistent in itself."""
    for entry in (await entries_of(sql, transaction_id)).values():
        signed = entry.amount if entry.direction == "credit" else -entry.amount
        signed_paid = signed if entry.kind == "paid" else 0
        chain = {"account": entry.account_id, "asset": entry.asset_symbol, "shard": entry.shard}
        before = await sql(
            "SELECT chain_hash FROM entries WHERE account_id = :account"
            " AND asset_symbol = :asset AND shard = :shard AND seq < :seq"
            " ORDER BY seq DESC LIMIT 1",
            seq=entry.seq,
            **chain,
        )
        await sql(
            "UPDATE balances SET balance = balance - :signed, paid = paid - :signed_paid,"
            " entry_count = entry_count - 1, chain_hash = :link"
            " WHERE account_id = :account AND asset_symbol = :asset AND shard = :shard",
            signed=signed,
            signed_paid=signed_paid,
            link=before[0].chain_hash if before else GENESIS_LINK,
            **chain,
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
    await sql(
        "UPDATE transactions SET type = 'bonus', paid_amount = 0 WHERE id = :id",
        id=topup.transaction.id,
    )

    assert await failures(database) == {
        # A bonus moves free credits, from the bonus pool.
        PAIRS: [f"transaction {topup.transaction.id}"],
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
        CHAINS: [
            f"entry {credit.id} ({BOB} GOLD_COINS)",
            f"entry {credit.id} ({BOB} GOLD_COINS): paidAfter does not follow",  # paid credits
        ],
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
    entries = await sql(
        "SELECT account_id, asset_symbol, shard, chain_hash FROM entries ORDER BY seq"
    )
    chains: dict[tuple[str, str, int], list[str]] = {}
    for row in entries:
        chains.setdefault((row.account_id, row.asset_symbol, row.shard), []).append(row.chain_hash)

    taken = await checkpoint(database)

    assert sorted(taken.chains, key=lambda c: (c.account, c.asset_symbol, c.shard)) == taken.chains
    assert {(c.account, c.asset_symbol, c.shard): c for c in taken.chains} == {
        key: ChainHead(key[0], key[1], links[-1], len(links), key[2])
        for key, links in chains.items()
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
        REFUNDS: [
            f"transaction {spend.transaction.id}: amount 100 (100 paid), refundedAmount 60, "
            "refunds 40 (40 paid)"
        ]
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
            f"transaction {spend.transaction.id}: amount 100 (100 paid), refundedAmount 40, "
            "refunds 120 (40 paid)"
        ],
    }


@pytest.fixture
async def unguarded(empty_database_url: str) -> AsyncIterator[Database]:
    """A migrated, seeded database of its own, whose CHECK constraints a test may drop."""
    database = Database(create_engine(Settings(database_url=empty_database_url)), system_shards=1)
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
                "amount by its user in its asset, of what it reserved",
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
        REFUNDS: [
            f"transaction {spend.transaction.id}: amount 100 (100 paid), refundedAmount 150, "
            "refunds 40 (40 paid)"
        ]
    }


async def test_an_entry_whose_kind_is_flipped_is_caught(database: Database, sql: Sql) -> None:
    (spend,) = await apply(database, command(Action.SPEND, amount=100))  # of paid credits
    debit = (await entries_of(sql, spend.transaction.id))["debit"]
    await sql("UPDATE entries SET kind = 'free' WHERE id = :id", id=debit.id)

    assert await failures(database) == {
        # A free debit without its credit, a paid credit without its debit.
        PAIRS: [f"transaction {spend.transaction.id}"],
        CHAINS: [f"entry {debit.id} ({ALICE} GOLD_COINS): paidAfter does not follow"],
        LINKS: [f"entry {debit.id} ({ALICE} GOLD_COINS): first broken link"],
    }


async def test_a_paid_part_that_is_not_the_ledgers_is_caught(database: Database, sql: Sql) -> None:
    await sql(
        "UPDATE balances SET paid = paid - 5 WHERE account_id = :alice AND asset_symbol = :gold",
        alice=ALICE,
        gold=GOLD,
    )

    assert await failures(database) == {
        PARTS: sorted(["GOLD_COINS: paid parts sum to -5", "GOLD_COINS: free parts sum to 5"]),
        CHAINS: [f"{ALICE} GOLD_COINS: paid 995, newest paidAfter 1000"],
    }


async def test_an_edited_lot_is_caught(database: Database, sql: Sql) -> None:
    (bonus,) = await apply(database, command(Action.BONUS, amount=50, credit_expires_in_days=30))
    await sql("UPDATE lots SET remaining = 40 WHERE account_id = :alice", alice=ALICE)

    assert await failures(database) == {
        LOT_SUMS: [f"{ALICE} GOLD_COINS: expiring 50, lots 40"],
        LOT_MOVES: [f"{lot(bonus, 30)}: remaining 40, moves 50"],
    }


async def test_a_deleted_lot_move_is_caught(database: Database, sql: Sql) -> None:
    bonus, spend = await apply(
        database,
        command(Action.BONUS, amount=50, credit_expires_in_days=30),
        command(Action.SPEND, amount=20),  # free credits first: of the lot
    )
    await sql("DELETE FROM lot_moves WHERE transaction_id = :id", id=spend.transaction.id)

    assert await failures(database) == {LOT_MOVES: [f"{lot(bonus, 30)}: remaining 30, moves 50"]}


async def test_lots_of_a_kind_above_its_part_are_caught(database: Database, sql: Sql) -> None:
    """The lot and the balance's `expiring` agree, but the balance has only 50 free credits."""
    (bonus,) = await apply(database, command(Action.BONUS, amount=50, credit_expires_in_days=30))
    await sql("UPDATE lots SET remaining = 60 WHERE account_id = :alice", alice=ALICE)
    await sql(
        "UPDATE balances SET expiring = 60 WHERE account_id = :alice AND asset_symbol = :gold",
        alice=ALICE,
        gold=GOLD,
    )

    assert await failures(database) == {
        LOT_SUMS: [f"{ALICE} GOLD_COINS: free lots 60, more than the free part 50"],
        LOT_MOVES: [f"{lot(bonus, 30)}: remaining 60, moves 50"],
    }


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        pytest.param(
            "UPDATE lot_moves SET amount = -40 WHERE transaction_id = :id",
            {
                EXPIRIES: ["moved 0 paid and 50 free, took 0 paid and 40 free from lots"],
                LOT_MOVES: [(1, "remaining 0, moves 10")],
            },
            id="amount-edited",
        ),
        pytest.param(
            "UPDATE lot_moves SET expires_at = (SELECT max(expires_at) FROM lots)"
            " WHERE transaction_id = :id",
            {
                EXPIRIES: [
                    "moved 0 paid and 50 free, took 0 paid and 50 free from lots, 1 of its lot "
                    "moves not taken from its user's lots expired by then"
                ],
                LOT_MOVES: [(1, "remaining 0, moves 50"), (10, "remaining 30, moves -20")],
            },
            id="taken-from-a-lot-not-expired",
        ),
    ],
)
async def test_an_expiry_that_no_longer_matches_the_lots_it_ended_is_caught(
    database: Database, sql: Sql, advance: Advance, statement: str, expected: dict[str, list[Any]]
) -> None:
    soon, later = await apply(
        database,
        command(Action.BONUS, amount=50, credit_expires_in_days=1),
        command(Action.BONUS, amount=30, credit_expires_in_days=10),
    )
    advance(timedelta(days=2))
    assert await expire_credits(database, limit=10) == 1
    (expiry,) = await sql("SELECT id FROM transactions WHERE type = 'expiry'")
    await sql(statement, id=expiry.id)

    granted = {1: soon, 10: later}
    assert await failures(database) == {
        EXPIRIES: [f"transaction {expiry.id}: {finding}" for finding in expected[EXPIRIES]],
        LOT_MOVES: sorted(
            f"{lot(granted[days], days)}: {finding}" for days, finding in expected[LOT_MOVES]
        ),
    }


async def test_holds_that_reserve_more_of_a_kind_than_the_balance_has_are_caught(
    database: Database, sql: Sql
) -> None:
    _, hold = await apply(
        database,
        command(Action.BONUS, amount=20),
        command(Action.HOLD, amount=30),  # 20 free, 10 paid
    )
    assert hold.hold is not None
    await sql("UPDATE holds SET paid_amount = 0 WHERE id = :id", id=hold.hold.id)

    assert await failures(database) == {
        HELD: [f"{ALICE} GOLD_COINS: active holds reserve 0 paid of 1000 and 30 free of 20"]
    }


async def test_a_capture_that_took_more_of_a_kind_than_its_hold_reserved_is_caught(
    database: Database, sql: Sql
) -> None:
    (hold,) = await apply(database, command(Action.HOLD, amount=30))  # of paid credits
    assert hold.hold is not None
    await apply(database, command(Action.CAPTURE, reference=hold.hold.id))
    await sql("UPDATE holds SET paid_amount = 10 WHERE id = :id", id=hold.hold.id)

    assert await failures(database) == {
        CAPTURES: [
            f"hold {hold.hold.id}: captured 30, but its transaction is not a spend of that "
            "amount by its user in its asset, of what it reserved"
        ]
    }


async def test_a_paid_part_above_the_balance_is_caught(unguarded: Database) -> None:
    await past_a_check(
        unguarded,
        "balances",
        "ck_balances_user_parts_within_balance",
        "UPDATE balances SET paid = 1001 WHERE account_id = :alice AND asset_symbol = :gold",
        alice=ALICE,
        gold=GOLD,
    )

    assert await failures(unguarded) == {
        PARTS: sorted(
            [
                "GOLD_COINS: paid parts sum to 1",
                "GOLD_COINS: free parts sum to -1",
                f"{ALICE} GOLD_COINS: paid 1001 of balance 1000",
            ]
        ),
        CHAINS: [f"{ALICE} GOLD_COINS: paid 1001, newest paidAfter 1000"],
    }


async def test_a_lot_below_zero_is_caught(unguarded: Database) -> None:
    (bonus,) = await apply(unguarded, command(Action.BONUS, amount=50, credit_expires_in_days=30))
    await past_a_check(
        unguarded,
        "lots",
        "ck_lots_remaining_not_negative",
        "UPDATE lots SET remaining = -5 WHERE account_id = :alice",
        alice=ALICE,
    )

    assert await failures(unguarded) == {
        NEGATIVE_LOTS: [f"{lot(bonus, 30)}: remaining -5"],
        LOT_SUMS: [f"{ALICE} GOLD_COINS: expiring 50, lots -5"],
        LOT_MOVES: [f"{lot(bonus, 30)}: remaining -5, moves 50"],
    }


async def test_a_hold_that_reserves_more_paid_credits_than_its_amount_is_caught(
    unguarded: Database,
) -> None:
    (hold,) = await apply(unguarded, command(Action.HOLD, amount=30))
    assert hold.hold is not None
    await past_a_check(
        unguarded,
        "holds",
        "ck_holds_paid_within_amount",
        "UPDATE holds SET paid_amount = 40 WHERE id = :id",
        id=hold.hold.id,
    )

    assert await failures(unguarded) == {HELD: [f"hold {hold.hold.id}: paidAmount 40 of 30"]}


async def spends_in_turn(database: Database, count: int) -> list[Posted]:
    """Alice spends 10 paid GOLD_COINS `count` times, each in a batch of its own: the credits to
    the revenue account go to its rows (shards) in turn."""
    return [(await apply(database, command(Action.SPEND, amount=10)))[0] for _ in range(count)]


async def revenue_credits(sql: Sql, shard: int) -> list[Any]:
    """The revenue account's GOLD_COINS entries in one of its rows, oldest first."""
    return await sql(
        "SELECT id, transaction_id FROM entries WHERE account_id = :revenue"
        " AND asset_symbol = :gold AND shard = :shard ORDER BY seq",
        revenue=REVENUE,
        gold=GOLD,
        shard=shard,
    )


async def test_a_ledger_on_several_rows_of_each_system_account_verifies_clean(
    sharded: Database, sql: Sql
) -> None:
    spends = []
    for _ in range(4):
        _, _, spend = await apply(
            sharded,
            command(Action.TOPUP, amount=10),
            command(Action.BONUS, amount=3),
            command(Action.SPEND, amount=10),  # free credits first, then paid
        )
        spends.append(spend)
    # Given back from another row of the revenue account than the one the spend went to: the
    # fifth transaction takes the first's row again, the second spend went to the next one.
    await apply(sharded, command(Action.REFUND, reference=spends[1].transaction.id, amount=4))
    rows = await sql(
        "SELECT DISTINCT account_id, shard FROM entries WHERE account_id LIKE 'system:%'"
    )

    assert {(r.account_id, r.shard) for r in rows} >= {
        (account.value, shard) for account in SystemAccount for shard in (0, 1, 2, 3)
    }
    assert await failures(sharded) == {}


async def test_an_edited_entry_amount_in_a_row_above_zero_is_caught(
    sharded: Database, sql: Sql
) -> None:
    await spends_in_turn(sharded, 8)  # two in each of the four rows
    older, _ = await revenue_credits(sql, 2)
    await sql("UPDATE entries SET amount = 15 WHERE id = :id", id=older.id)

    chain = f"{REVENUE} GOLD_COINS shard 2"
    assert await failures(sharded) == {
        REPLAY: [f"{chain}: balance 20, ledger 25"],
        PAIRS: [f"transaction {older.transaction_id}"],
        CHAINS: [  # of paid credits: its paidAfter no longer follows either
            f"entry {older.id} ({chain})",
            f"entry {older.id} ({chain}): paidAfter does not follow",
        ],
        LINKS: [f"entry {older.id} ({chain}): first broken link"],
    }


async def test_an_edited_link_in_a_row_above_zero_is_caught(sharded: Database, sql: Sql) -> None:
    await spends_in_turn(sharded, 8)
    _, newest = await revenue_credits(sql, 3)
    await sql("UPDATE entries SET chain_hash = :link WHERE id = :id", link="f" * 64, id=newest.id)

    chain = f"{REVENUE} GOLD_COINS shard 3"
    assert await failures(sharded) == {
        LINKS: sorted(
            [
                f"entry {newest.id} ({chain}): first broken link",
                f"{chain}: the balance's newest link is not the last entry's",
            ]
        )
    }


async def test_a_ledger_that_grew_since_a_checkpoint_of_several_rows_extends_it(
    sharded: Database,
) -> None:
    await spends_in_turn(sharded, 4)
    # Read back from its JSON, as `wallet verify --checkpoint FILE` does.
    taken = parse_checkpoint(json.dumps(checkpoint_json(await checkpoint(sharded))))
    await spends_in_turn(sharded, 5)

    assert {c.shard for c in taken.chains if c.account == REVENUE} == {0, 1, 2, 3}
    assert await failures(sharded, taken) == {}


async def test_a_truncation_of_a_row_above_zero_is_caught_against_a_checkpoint(
    sharded: Database, sql: Sql
) -> None:
    spends = await spends_in_turn(sharded, 8)
    if (await entries_of(sql, spends[-1].transaction.id))["credit"].shard == 0:
        spends += await spends_in_turn(sharded, 1)  # the next batch takes row 1
    newest = spends[-1].transaction.id
    shard = (await entries_of(sql, newest))["credit"].shard
    taken = await checkpoint(sharded)
    length = {(c.account, c.asset_symbol, c.shard): c.entries for c in taken.chains}
    alice, revenue = length[ALICE, GOLD, 0], length[REVENUE, GOLD, shard]
    await truncate(sql, newest)

    assert await failures(sharded) == {}
    assert await failures(sharded, taken) == {
        EXTENDS: sorted(
            [
                f"{ALICE} GOLD_COINS: {alice - 1} of the checkpoint's {alice} entries left "
                "(truncated)",
                f"{REVENUE} GOLD_COINS shard {shard}: {revenue - 1} of the checkpoint's {revenue}"
                " entries left (truncated)",
            ]
        )
    }
