"""The migrations' frozen copies of the hash-chain encodings: version 1 (in 0002 and 0005) and
version 2 (in 0005 and 0006) give the links the service made before the next version (vectors
computed with that release's `link`), and version 3 (in 0006) is the domain's `link` (a
differential test: the copy must not drift while the domain keeps this version)."""

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
    Kind,
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
        "paid_amount": 250,
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
        paid_amount=100,
    ),
    "capture": transaction(
        flow=Flow.SPEND, hold_id="0193a1a0-0000-7000-8000-0000000000aa", paid_amount=0
    ),
    "reversal": transaction(flow=Flow.REVERSAL, refund_of=TransactionId("t-original")),
    "empty metadata": transaction(metadata={}),
}
# Their version-2 links (after PREVIOUS, of `entry(header)`), computed with `link` of the release
# before version 3 (git show 274e57a:src/wallet/domain/ledger.py).
V2_LINKS = {
    "nulls": "709a6e16f2f0b960bf8f03828ea78f0571a4aad74d4114ee624321fec51bf227",
    "every field": "c63842f6f9d297c2bd80e0eb0a4cb0d5b234736da781aeede391d19d320d0c4b",
    "capture": "f4f8b9952c4603628cb50618718c9f24d199e2e7845ea10c0e43f48148663abe",
    "reversal": "40c1c5a86ca660d73e88e3b75967e2880728b845ae03cc8ffe070ce491917b51",
    "empty metadata": "495e4988f5007e1314ee73059b9b17ff94edd3d614e3324f5c6621cf67ce2f77",
}
PREVIOUS = "ab" * 32


def entry(header: Transaction, *, kind: Kind = Kind.PAID, paid_after: int = 0) -> Entry:
    return Entry(
        id="0193a1b2-7c00-7d3e-8a41-5b2d6e7f8a92",
        transaction_id=header.id,
        account_id=AccountId("system:treasury"),
        asset_symbol="GOLD_COINS",
        direction=Direction.DEBIT,
        amount=header.amount,
        balance_after=-(2**63),
        created_at=datetime(2026, 12, 2, 10, 15, 30, 7, tzinfo=UTC),
        kind=kind,
        paid_after=paid_after,
    )


def entry_row(line: Entry) -> SimpleNamespace:
    """An entry's stored columns, as a migration reads them."""
    return SimpleNamespace(
        id=line.id,
        transaction_id=line.transaction_id,
        account_id=line.account_id,
        asset_symbol=line.asset_symbol,
        direction=line.direction.value,
        amount=line.amount,
        balance_after=line.balance_after,
        created_at=line.created_at.replace(tzinfo=None),  # SQLite's: no zone, UTC
    )


def transaction_row(header: Transaction) -> SimpleNamespace:
    """A transaction's stored columns, as a migration reads them."""
    return SimpleNamespace(
        id=header.id,
        type=header.flow.value,
        user_id=header.user_id,
        to_user_id=header.to_user_id,
        asset_symbol=header.asset_symbol,
        amount=header.amount,
        hold_id=header.hold_id,
        refund_of=header.refund_of,
        idempotency_key=header.idempotency_key,
        note=header.note,
        metadata=header.metadata,
        created_by=header.created_by,
        created_at=header.created_at,
    )


@pytest.mark.parametrize("case", TRANSACTIONS)
def test_the_frozen_version_2_of_0005_gives_the_links_of_the_release_before_version_3(
    case: str,
) -> None:
    header = TRANSACTIONS[case]
    # A joined row as 0005 reads it: the entry's columns, and the transaction's as t_*.
    stored = vars(transaction_row(header))
    row = SimpleNamespace(
        **vars(entry_row(entry(header))), **{f"t_{k}": v for k, v in stored.items()}
    )

    assert migration("0005")._link_v2(PREVIOUS, row) == V2_LINKS[case]


@pytest.mark.parametrize("case", TRANSACTIONS)
def test_the_frozen_version_2_of_0006_gives_the_links_of_the_release_before_version_3(
    case: str,
) -> None:
    header = TRANSACTIONS[case]
    module = migration("0006")
    fields = module._entry_fields(entry_row(entry(header)))
    linked = module._link_v2(PREVIOUS, fields, module._header(transaction_row(header)))

    assert linked == V2_LINKS[case]


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("case", TRANSACTIONS)
def test_the_frozen_version_3_is_the_domains_link(case: str, kind: Kind) -> None:
    header = TRANSACTIONS[case]
    line = entry(header, kind=kind, paid_after=-(2**62))
    module = migration("0006")
    amounts = {"freeAmount": header.free_amount, "paidAmount": header.paid_amount}
    linked = module._link_v3(
        PREVIOUS,
        module._entry_fields(entry_row(line)),
        kind.value,
        line.paid_after,
        module._header(transaction_row(header)) | amounts,
    )

    assert linked == link(PREVIOUS, line, header)
