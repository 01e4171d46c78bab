"""The database enforces the ledger's invariants on its own: writes that bypass the service and
break one are refused with IntegrityError."""

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from wallet.domain.ledger import Action, Command, Flow, UserId
from wallet.service.seed import ALICE, BOB
from wallet.service.wallet import Wallet
from wallet.store.tables import accounts, entries, idempotency_keys, lots

MakeCommand = Callable[..., Any]
Sql = Callable[..., Awaitable[Any]]
NOW = datetime(2026, 11, 25, 16, 21, 15, tzinfo=UTC)


async def a_spend(wallet: Wallet, make_command: MakeCommand) -> dict[str, str]:
    """Alice spends 10 GOLD_COINS, is given 5 LOYALTY_POINTS that expire (in a lot) and holds 5
    GOLD_COINS; the ids of the spend, its entries and its key, of the bonus and of the hold."""
    spent = (await wallet.execute(make_command(Flow.SPEND, 10))).transaction
    _, (debit, credit) = await wallet.transaction(user_id=ALICE, transaction_id=spent.id)
    bonus = (await wallet.execute(make_command(Flow.BONUS, 5, asset="LOYALTY_POINTS"))).transaction
    held = await wallet.execute(
        Command(
            action=Action.HOLD,
            user_id=UserId(ALICE),
            asset_symbol="GOLD_COINS",
            amount=5,
            idempotency_key=f"hold-{spent.id}",
        )
    )
    assert held.hold is not None
    return {
        "tx": spent.id,
        "key": spent.idempotency_key,
        "debit": debit.id,
        "credit": credit.id,
        "bonus": bonus.id,
        "hold": held.hold.id,
        "seed": f"seed:{ALICE}:GOLD_COINS",
        "alice": ALICE,
        "bob": BOB,
    }


@pytest.mark.parametrize(
    "statement",
    [
        pytest.param(
            "UPDATE balances SET balance = -1"
            " WHERE account_id = :alice AND asset_symbol = 'GOLD_COINS'",
            id="negative-user-balance",
        ),
        pytest.param("UPDATE entries SET amount = 0 WHERE id = :debit", id="entry-amount-0"),
        pytest.param(
            "UPDATE entries SET amount = -10 WHERE id = :debit", id="entry-amount-negative"
        ),
        pytest.param(
            "UPDATE entries SET amount = 1000000000000001 WHERE id = :debit",
            id="entry-amount-over-10-to-the-15",
        ),
        pytest.param(
            "UPDATE transactions SET amount = 0 WHERE id = :tx", id="transaction-amount-0"
        ),
        pytest.param(
            "UPDATE entries SET balance_after = -1 WHERE id = :debit",
            id="negative-user-balance-after-in-an-entry",
        ),
        pytest.param(
            "UPDATE transactions SET balance_after = -1 WHERE id = :tx",
            id="negative-balance-after-in-a-transaction",
        ),
        pytest.param("UPDATE entries SET direction = 'debit' WHERE id = :credit", id="two-debits"),
        pytest.param(
            "UPDATE entries SET direction = 'both' WHERE id = :credit", id="unknown-direction"
        ),
        pytest.param("UPDATE transactions SET type = 'gift' WHERE id = :tx", id="unknown-flow"),
        pytest.param(
            "UPDATE transactions SET idempotency_key = 'unclaimed-key' WHERE id = :tx",
            id="transaction-key-never-claimed",
        ),
        pytest.param(
            "UPDATE transactions SET idempotency_key = (SELECT idempotency_key FROM transactions"
            " WHERE user_id = :bob AND asset_symbol = 'GOLD_COINS') WHERE id = :tx",
            id="two-transactions-with-one-key",
        ),
        pytest.param(
            "UPDATE entries SET account_id = 'nobody' WHERE id = :debit", id="unknown-account"
        ),
        pytest.param(
            "UPDATE balances SET asset_symbol = 'SILVER' WHERE account_id = :alice"
            " AND asset_symbol = 'GOLD_COINS'",
            id="unknown-asset",
        ),
        pytest.param(
            "UPDATE balances SET paid = balance + 1"
            " WHERE account_id = :alice AND asset_symbol = 'GOLD_COINS'",
            id="user-paid-part-above-the-balance",
        ),
        pytest.param(
            "UPDATE balances SET paid = -1"
            " WHERE account_id = :alice AND asset_symbol = 'GOLD_COINS'",
            id="negative-user-paid-part",
        ),
        pytest.param(
            "UPDATE balances SET expiring = balance + 1"
            " WHERE account_id = :alice AND asset_symbol = 'LOYALTY_POINTS'",
            id="user-expiring-above-the-balance",
        ),
        pytest.param(
            "UPDATE balances SET expiring = 1"
            " WHERE account_id = 'system:bonus_pool' AND asset_symbol = 'LOYALTY_POINTS'",
            id="system-account-with-expiring-credits",
        ),
        pytest.param("UPDATE entries SET kind = 'gift' WHERE id = :debit", id="unknown-kind"),
        pytest.param(
            "UPDATE entries SET paid_after = -1 WHERE id = :debit",
            id="negative-user-paid-after-in-an-entry",
        ),
        pytest.param(
            "UPDATE entries SET paid_after = balance_after + 1 WHERE id = :debit",
            id="user-paid-after-above-the-balance-after",
        ),
        pytest.param(
            "UPDATE transactions SET paid_amount = amount + 1 WHERE id = :tx",
            id="paid-amount-above-the-amount",
        ),
        pytest.param(
            "UPDATE transactions SET paid_amount = -1 WHERE id = :tx", id="negative-paid-amount"
        ),
        pytest.param(
            "UPDATE transactions SET paid_amount = 0 WHERE idempotency_key = :seed",
            id="topup-of-free-credits",
        ),
        pytest.param(
            "UPDATE transactions SET paid_amount = 1 WHERE id = :bonus",
            id="bonus-of-paid-credits",
        ),
        pytest.param(
            "UPDATE holds SET paid_amount = amount + 1 WHERE id = :hold",
            id="hold-reserving-more-paid-than-its-amount",
        ),
        pytest.param("UPDATE lots SET remaining = -1 WHERE account_id = :alice", id="negative-lot"),
        pytest.param("UPDATE lots SET kind = 'gift' WHERE account_id = :alice", id="lot-kind"),
        pytest.param(
            "UPDATE lot_moves SET amount = 0 WHERE transaction_id = :bonus", id="empty-lot-move"
        ),
        pytest.param(
            "UPDATE lot_moves SET expires_at = '2000-01-01 00:00:00' WHERE transaction_id = :bonus",
            id="lot-move-of-no-lot",
        ),
    ],
)
async def test_a_write_that_breaks_an_invariant_is_refused(
    wallet: Wallet, make_command: MakeCommand, sql: Sql, statement: str
) -> None:
    ids = await a_spend(wallet, make_command)
    used = {name: value for name, value in ids.items() if f":{name}" in statement}
    with pytest.raises(sa.exc.IntegrityError):
        await sql(statement, **used)


async def test_a_system_account_balance_and_its_paid_part_may_be_negative(sql: Sql) -> None:
    # Either part may be the negative one: here the free part, -8.
    await sql(
        "UPDATE balances SET balance = -5, paid = 3"
        " WHERE account_id = 'system:treasury' AND asset_symbol = 'GOLD_COINS'"
    )
    (row,) = await sql(
        "SELECT balance, paid FROM balances"
        " WHERE account_id = 'system:treasury' AND asset_symbol = 'GOLD_COINS'"
    )
    assert (row.balance, row.paid) == (-5, 3)


async def test_a_second_debit_or_credit_of_one_kind_for_a_transaction_is_refused(
    wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    ids = await a_spend(wallet, make_command)  # its two entries: paid credits
    for direction, account, after in (("debit", ALICE, 980), ("credit", "system:revenue", 20)):
        entry = {
            "id": f"third-{direction}",
            "transaction_id": ids["tx"],
            "account_id": account,
            "asset_symbol": "GOLD_COINS",
            "direction": direction,
            "amount": 10,
            "balance_after": after,
            "created_at": NOW,
            "chain_hash": "0" * 64,
            "paid_after": after,
        }
        with pytest.raises(sa.exc.IntegrityError):
            await sql(sa.insert(entries).values(**entry, kind="paid"))
        # Of the other kind it is one of the four a transaction of both kinds has.
        await sql(sa.insert(entries).values(**entry, kind="free"))


async def test_a_lot_of_a_system_account_is_refused(sql: Sql) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        await sql(
            sa.insert(lots).values(
                account_id="system:bonus_pool",
                asset_symbol="GOLD_COINS",
                kind="free",
                expires_at=NOW,
                remaining=5,
            )
        )


async def test_a_duplicate_idempotency_key_is_refused(
    wallet: Wallet, make_command: MakeCommand, sql: Sql
) -> None:
    ids = await a_spend(wallet, make_command)
    with pytest.raises(sa.exc.IntegrityError):
        await sql(sa.insert(idempotency_keys).values(key=ids["key"]))


@pytest.mark.parametrize(
    ("account_id", "is_system"),
    [
        pytest.param("system:mint", False, id="system-prefix-on-a-user"),
        pytest.param("mint", True, id="system-account-without-the-prefix"),
        pytest.param("", False, id="empty-id"),
        pytest.param(ALICE, False, id="duplicate-id"),
    ],
)
async def test_an_account_with_an_invalid_id_is_refused(
    sql: Sql, account_id: str, is_system: bool
) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        await sql(
            sa.insert(accounts).values(
                id=account_id,
                is_system=is_system,
                email="mint@example.com",
                name="Mint",
                created_at=NOW,
            )
        )


async def test_a_user_without_an_email_is_refused(sql: Sql) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        await sql(
            sa.insert(accounts).values(
                id="carol", is_system=False, email=None, name="Carol", created_at=NOW
            )
        )


async def test_a_refused_write_leaves_the_row_as_it_was(wallet: Wallet, sql: Sql) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        await sql(
            "UPDATE balances SET balance = balance - 2000"
            " WHERE account_id = :alice AND asset_symbol = 'GOLD_COINS'",
            alice=ALICE,
        )
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 1000
