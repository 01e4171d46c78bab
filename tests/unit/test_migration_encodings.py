"""The migrations' frozen copies of the hash-chain encodings: version 1 (in 0002 and 0005) gives the
links the service made before version 2 (vectors computed with that release's `link`), and
version 2 (in 0005) is the domain's `link` (a differential test: the copy must not drift while
the domain keeps this version)."""

import importlib.util
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from wallet.domain.ledger import (
    GENESIS_LINK,
    AccountId,
    Direction,
    Entry,
    Flow,
    Transaction,
    TransactionId,
    UserId,
    link,
)

VERSIONS = (
    Path(__file__).resolve().parents[2] / "src" / "wallet" / "store" / "migrations" / "versions"
)

# Entries and their version-1 links, computed with `link(previous, entry)` of the release before
# version 2 (git show c2bf956:src/wallet/domain/ledger.py).
V1_FIRST = SimpleNamespace(
    id="e1",
    transaction_id="t1",
    account_id="system:treasury",
    asset_symbol="GOLD_COINS",
    direction="debit",
    amount=1000,
    balance_after=-1000,
    created_at=datetime(2026, 11, 1, 10, 0, 1, 1, tzinfo=UTC),
)
V1_FIRST_LINK = "94117f5ce8c118af1b7849e9ac5c1aec6166dd808ca7682794579db9b3e0b702"
V1_SECOND = SimpleNamespace(
    id="e5",
    transaction_id="t3",
    account_id="system:treasury",
    asset_symbol="GOLD_COINS",
    direction="credit",
    amount=10**15,
    balance_after=-(2**63),
    created_at=datetime(2026, 11, 1, 10, 0, 1, 999999),  # as SQLite returns it: no zone, UTC
)
V1_SECOND_LINK = "75420920573af14a5e791d7dde85e0fa4ea5fd75cdd919b3cae8cd93a01ff642"


def migration(name: str) -> ModuleType:
    (path,) = VERSIONS.glob(f"*_{name}_*.py")
    spec = importlib.util.spec_from_file_location(f"migration_{name}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["0002", "0005"])
def test_the_frozen_version_1_gives_the_links_of_the_release_before_version_2(name: str) -> None:
    link_v1 = migration(name)._link_v1

    assert link_v1(GENESIS_LINK, V1_FIRST) == V1_FIRST_LINK
    assert link_v1(V1_FIRST_LINK, V1_SECOND) == V1_SECOND_LINK


def transaction(**changes: Any) -> Transaction:
    fields: dict[str, Any] = {
        "id": TransactionId("0193a1b2-7c00-7d3e-8a41-5b2d6e7f8a90"),
        "flow": Flow.TOPUP,
        "user_id": UserId("alice"),
        "asset_symbol": "GOLD_COINS",
        "amount": 250,
        "balance_after": 250,
        "idempotency_key": "k-1",
        "note": None,
        "metadata": None,
        "created_at": datetime(2026, 12, 2, 10, 15, 30, 123456, tzinfo=UTC),
    }
    return Transaction(**(fields | changes))


TRANSACTIONS = {
    "nulls": transaction(),
    "every field": transaction(
        flow=Flow.TRANSFER,
        to_user_id=UserId("bob"),
        note='a "quoted" note\\ with\nlines, tabs\t and Épée ☃ 𝄞',
        metadata={"z": "last", "a": "first", "é": "accent", "": "empty"},
        created_by="0193a1a0-0000-7000-8000-00000000c0de",
        idempotency_key="batch-7:3",
    ),
    "capture": transaction(flow=Flow.SPEND, hold_id="0193a1a0-0000-7000-8000-0000000000aa"),
    "reversal": transaction(flow=Flow.REVERSAL, refund_of=TransactionId("t-original")),
    "empty metadata": transaction(metadata={}),
}


@pytest.mark.parametrize("case", TRANSACTIONS)
def test_the_frozen_version_2_is_the_domains_link(case: str) -> None:
    header = TRANSACTIONS[case]
    entry = Entry(
        id="0193a1b2-7c00-7d3e-8a41-5b2d6e7f8a92",
        transaction_id=header.id,
        account_id=AccountId("system:treasury"),
        asset_symbol="GOLD_COINS",
        direction=Direction.DEBIT,
        amount=header.amount,
        balance_after=-(2**63),
        created_at=datetime(2026, 12, 2, 10, 15, 30, 7, tzinfo=UTC),
    )
    # A joined row as the migration reads it: the entry's columns, and the transaction's as t_*.
    row = SimpleNamespace(
        id=entry.id,
        account_id=entry.account_id,
        asset_symbol=entry.asset_symbol,
        direction=entry.direction.value,
        amount=entry.amount,
        balance_after=entry.balance_after,
        created_at=entry.created_at.replace(tzinfo=None),  # SQLite's: no zone, UTC
        t_id=header.id,
        t_type=header.flow.value,
        t_user_id=header.user_id,
        t_to_user_id=header.to_user_id,
        t_asset_symbol=header.asset_symbol,
        t_amount=header.amount,
        t_hold_id=header.hold_id,
        t_refund_of=header.refund_of,
        t_idempotency_key=header.idempotency_key,
        t_note=header.note,
        t_metadata=header.metadata,
        t_created_by=header.created_by,
        t_created_at=header.created_at,
    )
    previous = "ab" * 32

    assert migration("0005")._link_v2(previous, row) == link(previous, entry, header)
