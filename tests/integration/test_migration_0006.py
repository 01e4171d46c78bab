"""Migration 0006 gives the history stored at revision 0005 its kinds (paid or free) by replaying
it, splits the transactions that moved both kinds into four entries, links every entry again with
chain version 3, and refuses a ledger whose version-2 chains are broken; its downgrade merges the
entries back, relinks them with version 2, and refuses while lots or expiries exist.

Self-contained on purpose: the ledgers are written as plain rows in 0005's shape (there is no
0005-era code left to post them), linked by a frozen copy of version 2, and the results are
checked against hand-computed kinds and a frozen copy of version 3 (docs/LEDGER.md's records,
through json.dumps), not against the posting engine or `wallet verify` (but for one history
0005 allowed and the service no longer makes, which both must still accept as the upgrade
recorded it)."""

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection

from wallet.domain.ledger import Flow, Kind
from wallet.service.audit import verify
from wallet.service.wallet import Wallet
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import alembic_config

T = TypeVar("T")
ALICE = "550e8400-e29b-41d4-a716-446655440000"
BOB = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
TREASURY, BONUS_POOL, REVENUE = "system:treasury", "system:bonus_pool", "system:revenue"
GOLD, DIAMONDS = "GOLD_COINS", "DIAMONDS"
GENESIS = "0" * 64
OPENED = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
START = datetime(2026, 11, 10, 12, 0, 0, 1, tzinfo=UTC)


def at(second: float) -> datetime:
    return START + timedelta(seconds=second)


# --- running migrations and statements ------------------------------------------------------


async def on_connection(url: str, work: Callable[[Connection], T], *, schema: bool = True) -> T:
    """Run `work` in one transaction, as `wallet migrate` does for a schema change."""
    database = Database(create_engine(Settings(database_url=url)))
    try:
        async with database.transaction(is_write=True, is_schema_change=schema) as connection:
            return await connection.run_sync(work)
    finally:
        await database.close()


def revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def step(to: str, *, is_up: bool = True) -> Callable[[Connection], str | None]:
    def run(connection: Connection) -> str | None:
        config = alembic_config()
        config.attributes["connection"] = connection
        (command.upgrade if is_up else command.downgrade)(config, to)
        return revision(connection)

    return run


def rows(statement: str, **params: Any) -> Callable[[Connection], list[Any]]:
    def run(connection: Connection) -> list[Any]:
        return list(connection.execute(sa.text(statement), params))

    return run


def execute(*statements: str) -> Callable[[Connection], None]:
    def run(connection: Connection) -> None:
        for statement in statements:
            connection.execute(sa.text(statement))

    return run


# --- the hash chain, frozen from docs/LEDGER.md ---------------------------------------------


def _utc(moment: datetime | str) -> datetime:
    """A stored time: SQLite's come back as text (from a text query) and without a zone."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stamp(moment: datetime | str) -> str:
    return _utc(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def digest(record: dict[str, Any]) -> str:
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def header_v2(t: Any) -> dict[str, Any]:
    return {
        "id": t["id"],
        "type": t["type"],
        "userId": t["user_id"],
        "toUserId": t["to_user_id"],
        "assetSymbol": t["asset_symbol"],
        "amount": t["amount"],
        "holdId": t["hold_id"],
        "refundOf": t["refund_of"],
        "idempotencyKey": t["idempotency_key"],
        "note": t["note"],
        "metadata": None if t["metadata"] is None else dict(t["metadata"]),
        "createdBy": t["created_by"],
        "createdAt": stamp(t["created_at"]),
    }


def entry_v2(e: Any) -> dict[str, Any]:
    return {
        "id": e["id"],
        "account": e["account_id"],
        "assetSymbol": e["asset_symbol"],
        "direction": e["direction"],
        "amount": e["amount"],
        "balanceAfter": e["balance_after"],
        "createdAt": stamp(e["created_at"]),
    }


def link_v2(previous: str, e: Any, t: Any) -> str:
    return digest({"v": 2, "previous": previous, "entry": entry_v2(e), "transaction": header_v2(t)})


def link_v3(previous: str, e: Any, t: Any) -> str:
    """Version 3: version 2's record with the entry's kind and paid part after it and the
    transaction's free and paid amounts."""
    return digest(
        {
            "v": 3,
            "previous": previous,
            "entry": {**entry_v2(e), "kind": e["kind"], "paidAfter": e["paid_after"]},
            "transaction": {
                **header_v2(t),
                "freeAmount": t["amount"] - t["paid_amount"],
                "paidAmount": t["paid_amount"],
            },
        }
    )


# --- a ledger as revision 0005 stored it ----------------------------------------------------

# The tables as revision 0005 has them, as far as a ledger's rows need.
ACCOUNTS = sa.table(
    "accounts",
    *(sa.column(name) for name in ("id", "is_system", "email", "name")),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
TRANSACTIONS = sa.table(
    "transactions",
    *(sa.column(n) for n in ("id", "type", "user_id", "asset_symbol", "amount", "balance_after")),
    *(sa.column(n) for n in ("idempotency_key", "request_fingerprint", "note")),
    sa.column("metadata", sa.JSON()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    *(sa.column(n) for n in ("created_by", "to_user_id", "hold_id", "refund_of")),
    sa.column("refunded_amount"),
)
ENTRIES = sa.table(
    "entries",
    *(sa.column(n) for n in ("id", "transaction_id", "account_id", "asset_symbol", "direction")),
    *(sa.column(n) for n in ("amount", "balance_after", "chain_hash")),
    sa.column("created_at", sa.DateTime(timezone=True)),
)
HOLDS = sa.table(
    "holds",
    *(sa.column(n) for n in ("id", "user_id", "asset_symbol", "amount", "captured_amount")),
    *(sa.column(n) for n in ("status", "idempotency_key", "request_fingerprint")),
    *(sa.column(n) for n in ("release_key", "release_fingerprint")),
    *(sa.column(n, sa.DateTime(timezone=True)) for n in ("expires_at", "created_at", "ended_at")),
)
BALANCES = sa.table(
    "balances",
    *(sa.column(n) for n in ("account_id", "asset_symbol", "balance", "chain_hash")),
    *(sa.column(n) for n in ("entry_count", "held")),
)
Key = tuple[str, str]


@dataclass
class History:
    """Rows of a ledger as the 0005 service wrote them: two entries per transaction, each
    linked with version 2 in its (account, asset) chain."""

    transactions: list[dict[str, Any]] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    holds: list[dict[str, Any]] = field(default_factory=list)
    balances: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    heads: dict[Key, str] = field(default_factory=dict)
    counts: dict[Key, int] = field(default_factory=lambda: defaultdict(int))
    by_id: dict[str, dict[str, Any]] = field(default_factory=dict)

    def post(
        self,
        tid: str,
        kind: str,
        moment: datetime,
        user: str,
        amount: int,
        debited: str,
        credited: str,
        *,
        asset: str = GOLD,
        to_user: str | None = None,
        hold_id: str | None = None,
        refund_of: str | None = None,
        note: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.balances[(debited, asset)] -= amount
        self.balances[(credited, asset)] += amount
        t = {
            "id": tid,
            "type": kind,
            "user_id": user,
            "asset_symbol": asset,
            "amount": amount,
            "balance_after": self.balances[(user, asset)],
            "idempotency_key": f"key-{tid}",
            "request_fingerprint": "f" * 64,
            "note": note,
            "metadata": metadata,
            "created_at": moment,
            "created_by": None,
            "to_user_id": to_user,
            "hold_id": hold_id,
            "refund_of": refund_of,
            "refunded_amount": 0,
        }
        if refund_of is not None:
            self.by_id[refund_of]["refunded_amount"] += amount
        self.transactions.append(t)
        self.by_id[tid] = t
        for account, direction in ((debited, "debit"), (credited, "credit")):
            key = (account, asset)
            e = {
                "id": f"{tid}-{direction[0]}",
                "transaction_id": tid,
                "account_id": account,
                "asset_symbol": asset,
                "direction": direction,
                "amount": amount,
                "balance_after": self.balances[key],
                "created_at": moment,
            }
            e["chain_hash"] = self.heads[key] = link_v2(self.heads.get(key, GENESIS), e, t)
            self.counts[key] += 1
            self.entries.append(e)

    def topup(self, tid: str, second: int, user: str, amount: int, **extra: Any) -> None:
        self.post(tid, "topup", at(second), user, amount, TREASURY, user, **extra)

    def bonus(self, tid: str, second: int, user: str, amount: int, **extra: Any) -> None:
        self.post(tid, "bonus", at(second), user, amount, BONUS_POOL, user, **extra)

    def spend(self, tid: str, second: int, user: str, amount: int, **extra: Any) -> None:
        self.post(tid, "spend", at(second), user, amount, user, REVENUE, **extra)

    def transfer(self, tid: str, second: int, user: str, to: str, amount: int) -> None:
        self.post(tid, "transfer", at(second), user, amount, user, to, to_user=to)

    def refund(self, tid: str, second: int, original: str, amount: int) -> None:
        """A refund of a spend, or a reversal of a top-up or bonus."""
        o = self.by_id[original]
        user, asset = o["user_id"], o["asset_symbol"]
        if o["type"] == "spend":
            self.post(tid, "refund", at(second), user, amount, REVENUE, user, refund_of=original)
            return
        back_to = TREASURY if o["type"] == "topup" else BONUS_POOL
        self.post(
            tid,
            "reversal",
            at(second),
            user,
            amount,
            user,
            back_to,
            asset=asset,
            refund_of=original,
        )

    def hold(
        self,
        hid: str,
        second: float,
        user: str,
        amount: int,
        *,
        expires: datetime,
        status: str = "held",
        ended: datetime | None = None,
        captured: int = 0,
    ) -> None:
        self.holds.append(
            {
                "id": hid,
                "user_id": user,
                "asset_symbol": GOLD,
                "amount": amount,
                "captured_amount": captured,
                "status": status,
                "idempotency_key": f"key-{hid}",
                "request_fingerprint": "f" * 64,
                "release_key": f"release-{hid}" if status == "released" else None,
                "release_fingerprint": "f" * 64 if status == "released" else None,
                "expires_at": expires,
                "created_at": at(second),
                "ended_at": ended,
            }
        )

    def write(self, connection: Connection) -> None:
        connection.execute(
            sa.text("INSERT INTO assets VALUES (:symbol, :symbol, 'coins')"),
            [{"symbol": GOLD}, {"symbol": DIAMONDS}],
        )
        users = [(ALICE, False, "alice@example.com"), (BOB, False, "bob@example.com")]
        systems = [(account, True, None) for account in (TREASURY, BONUS_POOL, REVENUE)]
        connection.execute(
            sa.insert(ACCOUNTS),
            [
                {"id": i, "is_system": s, "email": e, "name": i, "created_at": OPENED}
                for i, s, e in users + systems
            ],
        )
        keys = [t["idempotency_key"] for t in self.transactions]
        keys += [k for h in self.holds for k in (h["idempotency_key"], h["release_key"]) if k]
        connection.execute(
            sa.text("INSERT INTO idempotency_keys (key) VALUES (:key)"), [{"key": k} for k in keys]
        )
        if self.holds:
            connection.execute(sa.insert(HOLDS), self.holds)
        connection.execute(sa.insert(TRANSACTIONS), self.transactions)
        connection.execute(sa.insert(ENTRIES), self.entries)
        held: dict[Key, int] = defaultdict(int)
        for h in self.holds:
            if h["status"] == "held":
                held[(h["user_id"], h["asset_symbol"])] += h["amount"]
        connection.execute(
            sa.insert(BALANCES),
            [
                {
                    "account_id": account,
                    "asset_symbol": asset,
                    "balance": balance,
                    "chain_hash": self.heads[(account, asset)],
                    "entry_count": self.counts[(account, asset)],
                    "held": held[(account, asset)],
                }
                for (account, asset), balance in self.balances.items()
            ],
        )


async def at_0005(url: str, history: History) -> None:
    """A database at revision 0005 holding `history`."""
    await on_connection(url, step("0005"))
    await on_connection(url, history.write, schema=False)


FAR = datetime(2099, 1, 1, tzinfo=UTC)


def mixed_history() -> History:
    """Top-ups, bonuses, mixed spends, a mixed transfer, holds (captured, active, released,
    expired), a refund in two parts of a mixed spend, reversals of a top-up and a bonus, and a
    second asset. The comments give each user's paid + free parts after the line, as the
    replay must find them (holds reserve free first, then paid)."""
    h = History()
    h.topup("t01", 1, ALICE, 100, metadata={"order": "7", "shop": "Élan"})  # A 100+0
    h.bonus("t02", 2, ALICE, 50)  # A 100+50
    h.spend("t03", 3, ALICE, 70, note="Épée de feu")  # free 50, paid 20: A 80+0
    h.bonus("t04", 4, ALICE, 30)  # A 80+30
    h.bonus("t05", 5, BOB, 25)  # B 0+25
    h.topup("t06", 6, BOB, 40)  # B 40+25
    h.transfer("t07", 7, BOB, ALICE, 45)  # free 25, paid 20: B 20+0, A 100+55
    h.hold("h1", 8, ALICE, 60, expires=FAR, status="captured", ended=at(11), captured=58)
    # h1 reserves free 55, paid 5
    h.hold("h2", 9, ALICE, 20, expires=FAR)  # paid 20 (no free left): still held
    h.spend("t08", 10, ALICE, 30)  # free available 55 - 55 = 0: paid 30: A 70+55
    h.spend("t09", 11, ALICE, 58, hold_id="h1")  # free 55, paid 3 of h1's: A 67+0
    h.hold("h3", 12, ALICE, 10, expires=FAR, status="released", ended=at(14))  # paid 10
    h.bonus("t10", 13, ALICE, 20)  # A 67+20
    h.refund("t11", 15, "t03", 30)  # paid first: paid 20, free 10: A 87+30
    h.refund("t12", 16, "t03", 25)  # t03's paid all given back: free 25: A 87+55
    h.hold("h4", 17, ALICE, 15, expires=at(19), status="expired", ended=at(25))  # free 15
    h.spend("t13", 18, ALICE, 50)  # free available 55 - 15 = 40: free 40, paid 10: A 77+15
    h.spend("t14", 20, ALICE, 15)  # h4 expired at 19: free 15: A 77+0
    h.refund("t15", 21, "t01", 40)  # a top-up's reversal: paid 40: A 37+0
    h.bonus("t16", 23, BOB, 10)  # B 20+10
    h.refund("t17", 24, "t16", 10)  # a bonus's reversal: free 10: B 20+0
    h.topup("t18", 26, BOB, 5, asset=DIAMONDS)
    return h


PAID_AMOUNTS = {
    "t01": 100,
    "t02": 0,
    "t03": 20,
    "t04": 0,
    "t05": 0,
    "t06": 40,
    "t07": 20,
    "t08": 30,
    "t09": 3,
    "t10": 0,
    "t11": 20,
    "t12": 0,
    "t13": 10,
    "t14": 0,
    "t15": 40,
    "t16": 0,
    "t17": 0,
    "t18": 5,
}
# Per transaction that moved both kinds, or whose kind a hold decided: its entries in order,
# (account, direction, kind, amount, balance after, paid part after).
SPLIT = {
    "t03": [
        (ALICE, "debit", "free", 50, 100, 100),
        (REVENUE, "credit", "free", 50, 50, 0),
        (ALICE, "debit", "paid", 20, 80, 80),
        (REVENUE, "credit", "paid", 20, 70, 20),
    ],
    "t07": [
        (BOB, "debit", "free", 25, 40, 40),
        (ALICE, "credit", "free", 25, 135, 80),
        (BOB, "debit", "paid", 20, 20, 20),
        (ALICE, "credit", "paid", 20, 155, 100),
    ],
    "t08": [(ALICE, "debit", "paid", 30, 125, 70), (REVENUE, "credit", "paid", 30, 100, 50)],
    "t09": [
        (ALICE, "debit", "free", 55, 70, 70),
        (REVENUE, "credit", "free", 55, 155, 50),
        (ALICE, "debit", "paid", 3, 67, 67),
        (REVENUE, "credit", "paid", 3, 158, 53),
    ],
    "t11": [
        (REVENUE, "debit", "paid", 20, 138, 33),
        (ALICE, "credit", "paid", 20, 107, 87),
        (REVENUE, "debit", "free", 10, 128, 33),
        (ALICE, "credit", "free", 10, 117, 87),
    ],
    "t12": [(REVENUE, "debit", "free", 25, 103, 33), (ALICE, "credit", "free", 25, 142, 87)],
    "t13": [
        (ALICE, "debit", "free", 40, 102, 87),
        (REVENUE, "credit", "free", 40, 143, 33),
        (ALICE, "debit", "paid", 10, 92, 77),
        (REVENUE, "credit", "paid", 10, 153, 43),
    ],
    "t14": [(ALICE, "debit", "free", 15, 77, 77), (REVENUE, "credit", "free", 15, 168, 43)],
    "t15": [(ALICE, "debit", "paid", 40, 37, 37), (TREASURY, "credit", "paid", 40, -100, -100)],
    "t17": [(BOB, "debit", "free", 10, 20, 20), (BONUS_POOL, "credit", "free", 10, -125, 0)],
}
HOLD_PAID = {"h1": 5, "h2": 20, "h3": 10, "h4": 0}
# (account, asset): balance, paid part, entries
BALANCES_AFTER = {
    (ALICE, GOLD): (37, 37, 18),
    (BOB, GOLD): (20, 20, 6),
    (BOB, DIAMONDS): (5, 5, 1),
    (REVENUE, GOLD): (168, 43, 11),
    (TREASURY, GOLD): (-100, -100, 3),
    (TREASURY, DIAMONDS): (-5, -5, 1),
    (BONUS_POOL, GOLD): (-125, 0, 6),
}


# --- reading a migrated ledger --------------------------------------------------------------


def read_ledger(connection: Connection) -> dict[str, Any]:
    """Everything the checks need, as plain values."""

    def table(statement: str) -> list[dict[str, Any]]:
        return [dict(row._mapping) for row in connection.execute(sa.text(statement))]

    return {
        "transactions": table("SELECT * FROM transactions ORDER BY seq"),
        "entries": table("SELECT * FROM entries ORDER BY seq"),
        "balances": table("SELECT * FROM balances"),
        "holds": table("SELECT * FROM holds ORDER BY seq"),
    }


def metadata_of(t: dict[str, Any]) -> Any:
    value = t["metadata"]
    return json.loads(value) if isinstance(value, str) else value


def check_kinded_ledger(ledger: dict[str, Any]) -> None:
    """What holds of any ledger at 0006: per transaction and kind one debit and one credit of
    equal amounts, adding up to its amount and paid amount, in the order debit, credit per
    kind; per chain, balances and paid parts that add up, and version-3 links that check;
    each balance row at its chain's end."""
    transactions = {t["id"]: {**t, "metadata": metadata_of(t)} for t in ledger["transactions"]}
    by_transaction: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger["entries"]:
        by_transaction[e["transaction_id"]].append(e)
    for tid, t in transactions.items():
        es = by_transaction[tid]
        kinds = [e["kind"] for e in es]
        assert kinds in (["free", "free"], ["paid", "paid"], ["free"] * 2 + ["paid"] * 2) or (
            t["type"] in ("refund", "reversal") and kinds == ["paid"] * 2 + ["free"] * 2
        ), (tid, kinds)
        assert [e["direction"] for e in es] == ["debit", "credit"] * (len(es) // 2), tid
        for debit, credit in zip(es[::2], es[1::2], strict=True):
            assert debit["kind"] == credit["kind"]
            assert debit["amount"] == credit["amount"]
        assert sum(e["amount"] for e in es) == 2 * t["amount"], tid
        assert sum(e["amount"] for e in es if e["kind"] == "paid") == 2 * t["paid_amount"], tid
    chains: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for e in ledger["entries"]:
        chains[(e["account_id"], e["asset_symbol"])].append(e)
    heads = {}
    for key, es in chains.items():
        balance = paid = 0
        previous = GENESIS
        for e in es:
            sign = 1 if e["direction"] == "credit" else -1
            balance += sign * e["amount"]
            paid += sign * e["amount"] if e["kind"] == "paid" else 0
            assert (e["balance_after"], e["paid_after"]) == (balance, paid), e["id"]
            if not key[0].startswith("system:"):
                assert 0 <= paid <= balance, e["id"]
            assert e["chain_hash"] == link_v3(previous, e, transactions[e["transaction_id"]])
            previous = e["chain_hash"]
        heads[key] = (balance, paid, len(es), previous)
    stored = {
        (b["account_id"], b["asset_symbol"]): (
            b["balance"],
            b["paid"],
            b["entry_count"],
            b["chain_hash"],
        )
        for b in ledger["balances"]
    }
    assert stored == heads
    assert {b["expiring"] for b in ledger["balances"]} == {0}


def kinds_by_transaction(ledger: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Each transaction's entries as (account, direction, kind, amount, balance after, paid
    part after), in order."""
    split: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for e in ledger["entries"]:
        split[e["transaction_id"]].append(
            (
                e["account_id"],
                e["direction"],
                e["kind"],
                e["amount"],
                e["balance_after"],
                e["paid_after"],
            )
        )
    return dict(split)


def snapshot_0005(connection: Connection) -> dict[str, Any]:
    """A 0005 ledger's rows, entries by id (their seq may change), and its schema."""

    def table(statement: str) -> list[tuple[Any, ...]]:
        return sorted(tuple(row) for row in connection.execute(sa.text(statement)))

    return {
        "entries": table(
            "SELECT id, transaction_id, account_id, asset_symbol, direction, amount,"
            " balance_after, created_at, chain_hash FROM entries"
        ),
        "balances": table("SELECT * FROM balances"),
        "transactions": table("SELECT * FROM transactions"),
        "holds": table("SELECT * FROM holds"),
        "schema": schema(connection),
    }


def schema(connection: Connection) -> dict[str, Any]:
    """Every table's columns, keys, constraints and indexes, names and texts included."""
    inspector = sa.inspect(connection)
    found: dict[str, Any] = {}
    for name in sorted(inspector.get_table_names()):
        found[name] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], str(c.get("default")))
                for c in inspector.get_columns(name)
            ],
            "primary key": inspector.get_pk_constraint(name),
            "foreign keys": sorted(
                (f["name"], tuple(f["constrained_columns"]), f["referred_table"])
                for f in inspector.get_foreign_keys(name)
            ),
            "unique": sorted(
                (u["name"], tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(name)
            ),
            "indexes": sorted(
                (
                    i["name"],
                    tuple(map(str, i["column_names"])),
                    i["unique"],
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in inspector.get_indexes(name)
            ),
            "checks": sorted(
                (c["name"], " ".join(c["sqltext"].split()))
                for c in inspector.get_check_constraints(name)
            ),
        }
    return found


# --- the tests ------------------------------------------------------------------------------


async def test_the_upgrade_gives_the_history_its_kinds_and_links_it_with_version_3(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    history = mixed_history()
    await at_0005(url, history)

    assert await on_connection(url, step("0006")) == "0006"

    ledger = await on_connection(url, read_ledger, schema=False)
    check_kinded_ledger(ledger)
    assert {t["id"]: t["paid_amount"] for t in ledger["transactions"]} == PAID_AMOUNTS
    split = kinds_by_transaction(ledger)
    assert {tid: split[tid] for tid in SPLIT} == SPLIT
    assert {h["id"]: h["paid_amount"] for h in ledger["holds"]} == HOLD_PAID
    balances = {
        (b["account_id"], b["asset_symbol"]): (b["balance"], b["paid"], b["entry_count"])
        for b in ledger["balances"]
    }
    assert balances == BALANCES_AFTER
    # The first kind's entries keep the stored ids, in the order of their transactions; the
    # second kind's are new.
    ids = [e["id"] for e in ledger["entries"]]
    assert len(ids) == len(set(ids)) == 46
    stored_ids = {e["id"] for e in history.entries}
    assert [i for i in ids if i in stored_ids] == [e["id"] for e in history.entries]
    new = [e for e in ledger["entries"] if e["id"] not in stored_ids]
    assert [(e["transaction_id"], e["kind"]) for e in new] == [
        (tid, "paid" if tid != "t11" else "free")
        for tid in ("t03", "t07", "t09", "t11", "t13")
        for _ in range(2)
    ]
    assert all(len(e["id"]) == 36 for e in new)
    # Nothing else of the history moved.
    stored = {t["id"]: t for t in history.transactions}
    for t in ledger["transactions"]:
        assert (t["balance_after"], t["refunded_amount"]) == (
            stored[t["id"]]["balance_after"],
            stored[t["id"]]["refunded_amount"],
        )
    seqs = [e["seq"] for e in ledger["entries"]]
    assert seqs == list(range(1, 47))

    def next_seq(connection: Connection) -> int:
        """The entries' sequence carries on after the rewritten rows (PostgreSQL's too)."""
        connection.execute(
            sa.text(
                "INSERT INTO entries (id, transaction_id, account_id, asset_symbol, direction,"
                " amount, balance_after, created_at, chain_hash, kind, paid_after) SELECT"
                " 'probe', transaction_id, account_id, asset_symbol, 'debit', 1, 0, created_at,"
                " chain_hash, 'free', 0 FROM entries WHERE id = 't18-c'"
            )
        )
        seq = connection.execute(sa.text("SELECT seq FROM entries WHERE id = 'probe'")).scalar_one()
        connection.execute(sa.text("DELETE FROM entries WHERE id = 'probe'"))
        return int(seq)

    assert await on_connection(url, next_seq, schema=False) == 47


@pytest.mark.parametrize(
    ("tampering", "refusal"),
    [
        pytest.param(
            "UPDATE entries SET amount = 31, balance_after = 124 WHERE id = 't08-d'",
            f"entry t08-d \\({ALICE} GOLD_COINS\\) is the first broken link of its chain "
            "\\(version 2\\)",
            id="edited-entry",
        ),
        pytest.param(
            "UPDATE transactions SET note = 'a shield' WHERE id = 't03'",
            f"entry t03-d \\({ALICE} GOLD_COINS\\) is the first broken link",
            id="edited-transaction",
        ),
        pytest.param(
            "UPDATE balances SET chain_hash = (SELECT chain_hash FROM entries WHERE id = 't13-c')"
            " WHERE account_id = 'system:revenue'",
            "the balance row of system:revenue GOLD_COINS does not record its chain's newest "
            "version-2 link",
            id="rewound-head",
        ),
        pytest.param(
            "DELETE FROM entries WHERE id = 't14-c'",
            "transaction t14 has 1 entries, not one debit and one credit",
            id="deleted-entry",
        ),
        pytest.param(
            "UPDATE balances SET balance = 38 WHERE account_id = '550e8400-e29b-41d4-a716-"
            "446655440000' AND asset_symbol = 'GOLD_COINS'",
            f"the balance row of {ALICE} GOLD_COINS states 38 but its chain's entries add up to 37",
            id="edited-balance",
        ),
    ],
)
async def test_the_upgrade_refuses_a_tampered_version_2_ledger(
    empty_database_url: str, tampering: str, refusal: str
) -> None:
    url = empty_database_url
    await at_0005(url, mixed_history())
    await on_connection(url, execute(tampering), schema=False)
    before = await on_connection(url, snapshot_0005, schema=False)

    with pytest.raises(RuntimeError, match=refusal):
        await on_connection(url, step("0006"))

    assert await on_connection(url, revision) == "0005"
    assert await on_connection(url, snapshot_0005, schema=False) == before  # nothing rewritten


async def test_a_reversal_of_more_than_its_kind_left_takes_the_rest_of_the_other_kind(
    empty_database_url: str,
) -> None:
    """At 0005 a top-up could be reversed from whatever the user had: here 70 of its 100 paid
    credits were left, and 50 free. The replay takes back the 70 paid, then 30 free, into the
    treasury; `wallet verify` accepts it, and the liability report counts both as reversed."""
    url = empty_database_url
    history = History()
    history.topup("t1", 1, ALICE, 100)
    history.spend("t2", 2, ALICE, 30)  # paid 30
    history.bonus("t3", 3, ALICE, 50)  # 70 paid + 50 free
    history.refund("t4", 4, "t1", 100)  # 0005 allowed it: 120 were available
    await at_0005(url, history)

    assert await on_connection(url, step("0006")) == "0006"

    ledger = await on_connection(url, read_ledger, schema=False)
    check_kinded_ledger(ledger)
    assert kinds_by_transaction(ledger)["t4"] == [
        (ALICE, "debit", "paid", 70, 50, 0),
        ("system:treasury", "credit", "paid", 70, -30, -30),
        (ALICE, "debit", "free", 30, 20, 0),
        ("system:treasury", "credit", "free", 30, 0, -30),
    ]
    await on_connection(url, step("head"))  # the service's verify and report read the newest schema
    database = Database(create_engine(Settings(database_url=url)))
    try:
        failed = [check.failures for check in await verify(database) if not check.is_clean]
        report = await Wallet(database).liabilities(
            asset_symbol="GOLD_COINS", at=None, since=None, until=None
        )
    finally:
        await database.close()
    assert failed == []
    assert report.outstanding == {Kind.PAID: 0, Kind.FREE: 20}
    assert {flow: report.moved[flow] for flow in (Flow.TOPUP, Flow.BONUS, Flow.SPEND)} == {
        Flow.TOPUP: (100, 0),
        Flow.BONUS: (0, 50),
        Flow.SPEND: (30, 0),
    }
    assert report.moved[Flow.REVERSAL] == (70, 30)


async def test_holds_and_transactions_of_one_moment_replay_as_the_service_allowed_them(
    empty_database_url: str,
) -> None:
    """One database batch gives its transactions and holds one time: a hold made at the
    moment of the top-up that funds it is made after it, and a release at the moment of a
    spend that needs what it released ends before it."""
    url = empty_database_url
    history = History()
    history.topup("t1", 1, BOB, 50)
    history.hold("h1", 1, BOB, 50, expires=at(100), status="released", ended=at(2))
    history.bonus("t2", 2, BOB, 10)
    history.spend("t3", 2, BOB, 55)  # needs h1's 50, released at this moment
    history.hold("h2", 3, BOB, 5, expires=at(3))  # expired the moment it was made: never held
    history.hold("h3", 3, BOB, 5, expires=FAR)  # paid 5
    await at_0005(url, history)

    assert await on_connection(url, step("0006")) == "0006"

    ledger = await on_connection(url, read_ledger, schema=False)
    check_kinded_ledger(ledger)
    # h2 reserved nothing (it never held): h3 gets Bob's last 5 paid coins.
    assert {h["id"]: h["paid_amount"] for h in ledger["holds"]} == {"h1": 50, "h2": 5, "h3": 5}
    assert kinds_by_transaction(ledger)["t3"] == [
        (BOB, "debit", "free", 10, 50, 50),
        (REVENUE, "credit", "free", 10, 10, 0),
        (BOB, "debit", "paid", 45, 5, 5),
        (REVENUE, "credit", "paid", 45, 55, 45),
    ]


async def test_the_upgrade_pages_through_a_history_longer_than_a_batch(
    empty_database_url: str,
) -> None:
    """5,003 transactions and 10,002 holds: the replay reads 5,000 transactions and 10,000
    holds at a time, so the refund of a mixed spend and the capture of a hold come a page after
    them and need what the first page wrote, and Alice's holds are made while the replay is
    busy with Bob (more than an hour of them), each once the one before it was released."""
    url = empty_database_url
    history = History()
    history.topup("a1", 1, ALICE, 1000)
    history.bonus("a2", 2, ALICE, 500)
    history.spend("a3", 3, ALICE, 700)  # free 500, paid 200
    history.hold("hx", 4, ALICE, 100, expires=FAR, status="captured", ended=at(6000), captured=90)
    for n in range(10_001):  # each of all Alice has available: 300 paid, less hx's 100
        made = 5 + n / 2
        history.hold(
            f"h{n}", made, ALICE, 200, expires=FAR, status="released", ended=at(made + 0.25)
        )
    for n in range(4998):  # Bob's paid coins in, and out
        if n % 2:
            history.spend(f"b{n}", 5 + n, BOB, 1)
        else:
            history.topup(f"b{n}", 5 + n, BOB, 1)
    history.refund("a4", 5999, "a3", 250)  # paid 200, free 50
    history.spend("a5", 6000, ALICE, 90, hold_id="hx")  # hx reserved paid 100 (no free left)
    await at_0005(url, history)

    assert await on_connection(url, step("0006")) == "0006"

    ledger = await on_connection(url, read_ledger, schema=False)
    check_kinded_ledger(ledger)
    paid = {t["id"]: t["paid_amount"] for t in ledger["transactions"]}
    assert (paid["a3"], paid["a4"], paid["a5"]) == (200, 200, 90)
    assert [h["paid_amount"] for h in ledger["holds"]] == [100] + [200] * 10_001
    alice = next(b for b in ledger["balances"] if b["account_id"] == ALICE)
    assert (alice["balance"], alice["paid"]) == (1000 + 500 - 700 + 250 - 90, 1000 - 200 + 200 - 90)


async def test_the_downgrade_merges_the_entries_back_and_the_upgrade_splits_them_again(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await at_0005(url, mixed_history())
    stored = await on_connection(url, snapshot_0005, schema=False)
    await on_connection(url, step("0006"))
    first = await on_connection(url, read_ledger, schema=False)

    assert await on_connection(url, step("0005", is_up=False)) == "0005"

    # The very rows 0005 stored: ids, amounts, balances after, version-2 links, heads, schema.
    assert await on_connection(url, snapshot_0005, schema=False) == stored

    assert await on_connection(url, step("0006")) == "0006"
    again = await on_connection(url, read_ledger, schema=False)
    check_kinded_ledger(again)
    assert kinds_by_transaction(again) == kinds_by_transaction(first)
    assert [(t["id"], t["paid_amount"]) for t in again["transactions"]] == [
        (t["id"], t["paid_amount"]) for t in first["transactions"]
    ]
    assert sorted(
        (b["account_id"], b["asset_symbol"], b["balance"], b["paid"]) for b in again["balances"]
    ) == sorted(
        (b["account_id"], b["asset_symbol"], b["balance"], b["paid"]) for b in first["balances"]
    )
    # The schema the split leaves (entries rewritten through a scratch table) is the one an
    # empty ledger's upgrade makes.
    split_schema = await on_connection(url, schema)
    await on_connection(url, step("0005", is_up=False))
    await on_connection(
        url,
        execute(
            "DELETE FROM entries",
            "DELETE FROM balances",
            "DELETE FROM transactions",
            "DELETE FROM holds",
            "DELETE FROM idempotency_keys",
        ),
        schema=False,
    )
    await on_connection(url, step("0006"))
    assert await on_connection(url, schema) == split_schema


async def test_the_downgrade_refuses_while_a_lot_exists(empty_database_url: str) -> None:
    url = empty_database_url
    await at_0005(url, mixed_history())
    await on_connection(url, step("0006"))
    await on_connection(
        url,
        execute(
            "INSERT INTO lots (account_id, asset_symbol, kind, expires_at, remaining) VALUES"
            f" ('{ALICE}', 'GOLD_COINS', 'free', '2027-01-01 00:00:00.000000', 0)"
        ),
        schema=False,
    )
    before = await on_connection(url, read_ledger, schema=False)

    with pytest.raises(RuntimeError, match="1 expiries, lots and lot moves need revision 0006"):
        await on_connection(url, step("0005", is_up=False))

    assert await on_connection(url, revision) == "0006"
    assert await on_connection(url, read_ledger, schema=False) == before


async def test_the_downgrade_refuses_a_tampered_version_3_ledger(empty_database_url: str) -> None:
    url = empty_database_url
    await at_0005(url, mixed_history())
    await on_connection(url, step("0006"))
    await on_connection(
        url,
        execute("UPDATE entries SET kind = 'paid', paid_after = 77 WHERE id = 't14-d'"),
        schema=False,
    )

    with pytest.raises(
        RuntimeError,
        match=f"entry t14-d \\({ALICE} GOLD_COINS\\) is the first broken link of its chain "
        "\\(version 3\\)",
    ):
        await on_connection(url, step("0005", is_up=False))
    assert await on_connection(url, revision) == "0006"


async def test_an_empty_ledger_steps_up_and_down(empty_database_url: str) -> None:
    url = empty_database_url
    await on_connection(url, step("0005"))
    empty = await on_connection(url, schema)
    assert await on_connection(url, step("0006")) == "0006"
    assert await on_connection(url, step("0005", is_up=False)) == "0005"
    assert await on_connection(url, schema) == empty
