"""paid and free credits: kinds on entries, transactions and holds; lots of expiring credits;
asset spend orders and lifetimes; hash chain version 3

The history already stored gets its kinds by a replay, oldest transaction first (by `seq`), with
the holds made, captured, released and expired in between by time: a top-up gives paid credits, a
bonus free ones, a spend, transfer or hold takes free first, then paid (the only spend order there
was), a capture what its hold reserved, a refund gives back paid first what its spend took, a
reversal takes back the kind its original gave first, then the other (version 1.2 took it from
the whole balance; the service's reversals take back one kind). A transaction that moves both kinds gets four
entries where it had two, so the entries are written again, in order, into a scratch table and
swapped in; the first kind's entries keep the stored ids. Before anything is rewritten each chain's
stored links are checked with version 2: a chain already broken (an entry edited, deleted or
reordered behind the service's back) stops the migration, naming the entry, so the version-3
links never bless tampering. The downgrade merges each transaction's entries back into one debit
and one credit, and refuses while the ledger holds what 0005 cannot represent (expiries, lots).
Both link encodings are frozen copies: docs/LEDGER.md defines them, and the domain's `link` may
change after this shipped. Memory stays flat: rows are read and written BATCH at a time, and what
is kept is per account and asset (and per hold held at once).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 05:00:00
"""

import hashlib
import heapq
import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import uuid_utils
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MAX_AMOUNT_SQL = "1000000000000000"
HAS_CREDITS = sa.text("remaining > 0")
RETURNS = sa.text("type IN ('refund', 'reversal', 'expiry')")


def upgrade() -> None:
    timestamp = sa.DateTime(timezone=True)
    with op.batch_alter_table("assets") as batch:
        batch.add_column(
            sa.Column("spend_order", sa.String(10), nullable=False, server_default="free_first")
        )
        batch.add_column(sa.Column("free_lifetime_days", sa.Integer()))
        batch.add_column(sa.Column("paid_lifetime_days", sa.Integer()))
        batch.create_check_constraint(
            op.f("ck_assets_spend_order"), "spend_order IN ('free_first', 'paid_first')"
        )
        batch.create_check_constraint(
            op.f("ck_assets_lifetimes"),
            "free_lifetime_days BETWEEN 1 AND 3650 AND paid_lifetime_days BETWEEN 1 AND 3650",
        )
    op.create_table(
        "lots",
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("asset_symbol", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(4), nullable=False),
        sa.Column("expires_at", timestamp, nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind IN ('paid', 'free')", name=op.f("ck_lots_kind")),
        sa.CheckConstraint("remaining >= 0", name=op.f("ck_lots_remaining_not_negative")),
        sa.CheckConstraint(
            "substr(account_id, 1, 7) <> 'system:'", name=op.f("ck_lots_user_not_system")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_lots_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["asset_symbol"], ["assets.symbol"], name=op.f("fk_lots_asset_symbol_assets")
        ),
        sa.PrimaryKeyConstraint(
            "account_id", "asset_symbol", "kind", "expires_at", name=op.f("pk_lots")
        ),
    )
    op.create_index(
        "ix_lots_due",
        "lots",
        ["expires_at"],
        postgresql_where=HAS_CREDITS,
        sqlite_where=HAS_CREDITS,
    )
    op.create_table(
        "lot_moves",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("transaction_id", sa.String(36), nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("asset_symbol", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(4), nullable=False),
        sa.Column("expires_at", timestamp, nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("kind IN ('paid', 'free')", name=op.f("ck_lot_moves_kind")),
        sa.CheckConstraint(
            f"amount <> 0 AND amount BETWEEN -{MAX_AMOUNT_SQL} AND {MAX_AMOUNT_SQL}",
            name=op.f("ck_lot_moves_amount_range"),
        ),
        sa.ForeignKeyConstraint(
            ["transaction_id"],
            ["transactions.id"],
            name=op.f("fk_lot_moves_transaction_id_transactions"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_lot_moves_account_id_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["asset_symbol"], ["assets.symbol"], name=op.f("fk_lot_moves_asset_symbol_assets")
        ),
        sa.ForeignKeyConstraint(
            ["account_id", "asset_symbol", "kind", "expires_at"],
            ["lots.account_id", "lots.asset_symbol", "lots.kind", "lots.expires_at"],
            name="fk_lot_moves_lot_lots",
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_lot_moves")),
    )
    op.create_index("ix_lot_moves_transaction_id", "lot_moves", ["transaction_id"])
    with op.batch_alter_table("balances") as batch:
        batch.add_column(sa.Column("paid", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("expiring", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("transactions") as batch:
        batch.add_column(sa.Column("paid_amount", sa.BigInteger()))
    with op.batch_alter_table("holds") as batch:
        batch.add_column(sa.Column("paid_amount", sa.BigInteger()))
    with op.batch_alter_table("entries") as batch:
        batch.add_column(sa.Column("kind", sa.String(4)))
        batch.add_column(sa.Column("paid_after", sa.BigInteger()))

    _split_history()

    with op.batch_alter_table("balances") as batch:
        batch.create_check_constraint(
            op.f("ck_balances_user_parts_within_balance"),
            "(paid BETWEEN 0 AND balance AND expiring BETWEEN 0 AND balance)"
            " OR (substr(account_id, 1, 7) = 'system:' AND expiring = 0)",
        )
    with op.batch_alter_table("transactions") as batch:
        batch.alter_column("paid_amount", existing_type=sa.BigInteger(), nullable=False)
        batch.drop_constraint(op.f("ck_transactions_type"), type_="check")
        batch.create_check_constraint(
            op.f("ck_transactions_type"),
            "type IN ('topup', 'bonus', 'spend', 'transfer', 'refund', 'reversal', 'expiry')",
        )
        batch.create_check_constraint(
            op.f("ck_transactions_paid_within_amount"), "paid_amount BETWEEN 0 AND amount"
        )
        batch.create_check_constraint(
            op.f("ck_transactions_issued_kind"),
            "(type <> 'topup' OR paid_amount = amount) AND (type <> 'bonus' OR paid_amount = 0)",
        )
    op.create_index(
        "ix_transactions_returns_asset_created_at",
        "transactions",
        ["asset_symbol", "created_at"],
        postgresql_include=["type", "amount", "paid_amount"],
        postgresql_where=RETURNS,
        sqlite_where=RETURNS,
    )
    with op.batch_alter_table("holds") as batch:
        batch.alter_column("paid_amount", existing_type=sa.BigInteger(), nullable=False)
        batch.create_check_constraint(
            op.f("ck_holds_paid_within_amount"), "paid_amount BETWEEN 0 AND amount"
        )
    # The entries' constraints are made in _split_history (_constrain_entries), while the table
    # is empty between the old rows and the split ones.
    op.execute("UPDATE assets SET free_lifetime_days = 365 WHERE symbol = 'LOYALTY_POINTS'")


GENESIS_LINK = "0" * 64  # the link before an account's first entry
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NEVER = datetime.max.replace(tzinfo=UTC)
BATCH = 10_000  # entries read, and rows written, per statement: memory stays flat
TRANSACTIONS_PER_PAGE = BATCH // 2  # two entries each at revision 0005
# Transactions are replayed in `seq` order, which follows time within each account (its balance
# row is locked while a transaction is made) but only roughly across accounts: so a hold is made
# in the replay just before its user's next transaction, or once the replay is this far past it.
SETTLE_AFTER = timedelta(hours=1)
SCRATCH = "entries_0006_split"  # the split entries, before they replace the stored ones
HOLDS_BY_TIME = "ix_holds_0006_by_time"  # the replay's order of holds; dropped when it is done
PAID, FREE = "paid", "free"
SYSTEM_PREFIX = "system:"
TREASURY, BONUS_POOL, REVENUE = "system:treasury", "system:bonus_pool", "system:revenue"
TAMPERED = (
    "the stored ledger was changed behind the service's back; restore it (or have it audited) "
    "before migrating"
)
UNTOLD = (
    "the replay cannot tell which credits were paid and which free; have the ledger audited "
    "(`wallet verify`) before migrating"
)

# The columns the data steps read and write: as they are at revision 0005, with what 0006 adds.
entries = sa.table(
    "entries",
    sa.column("seq", sa.BigInteger()),
    sa.column("id", sa.String()),
    sa.column("transaction_id", sa.String()),
    sa.column("account_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("direction", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("balance_after", sa.BigInteger()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("chain_hash", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("paid_after", sa.BigInteger()),
)
transactions = sa.table(
    "transactions",
    sa.column("seq", sa.BigInteger()),
    sa.column("id", sa.String()),
    sa.column("type", sa.String()),
    sa.column("user_id", sa.String()),
    sa.column("to_user_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("hold_id", sa.String()),
    sa.column("refund_of", sa.String()),
    sa.column("idempotency_key", sa.String()),
    sa.column("note", sa.String()),
    sa.column("metadata", sa.JSON()),
    sa.column("created_by", sa.String()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("paid_amount", sa.BigInteger()),
)
holds = sa.table(
    "holds",
    sa.column("seq", sa.BigInteger()),
    sa.column("id", sa.String()),
    sa.column("user_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("amount", sa.BigInteger()),
    sa.column("status", sa.String()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("ended_at", sa.DateTime(timezone=True)),
    sa.column("expires_at", sa.DateTime(timezone=True)),
    sa.column("paid_amount", sa.BigInteger()),
)
balances = sa.table(
    "balances",
    sa.column("account_id", sa.String()),
    sa.column("asset_symbol", sa.String()),
    sa.column("balance", sa.BigInteger()),
    sa.column("chain_hash", sa.String()),
)
ENTRY_COLUMNS = [column.name for column in entries.c]

Key = tuple[str, str]  # an account and an asset: one balance, one chain


def _constrain_entries() -> None:
    """The entries' constraints at 0006 (moved here from upgrade(): the new unique constraint
    must be in place before the split rows go in, and the table is empty in between)."""
    with op.batch_alter_table("entries") as batch:
        batch.alter_column("kind", existing_type=sa.String(4), nullable=False)
        batch.alter_column("paid_after", existing_type=sa.BigInteger(), nullable=False)
        batch.create_check_constraint(op.f("ck_entries_kind"), "kind IN ('paid', 'free')")
        batch.create_check_constraint(
            op.f("ck_entries_user_paid_within_balance"),
            "paid_after BETWEEN 0 AND balance_after OR substr(account_id, 1, 7) = 'system:'",
        )
        batch.drop_constraint(op.f("uq_entries_transaction_id_direction"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_entries_transaction_id_kind_direction"),
            ["transaction_id", "kind", "direction"],
        )


def _split_history() -> None:
    """Give the ledger's history its kinds: replay it, write every entry again (two or four per
    transaction) with its kind, its paid part after it and a version-3 link, and record the paid
    parts of transactions, holds and balances. Raises, before anything commits, on a chain that
    is broken or a history whose kinds cannot be told."""
    connection = op.get_bind()
    if _is_empty(connection):
        _constrain_entries()
        return
    replay = _Replay(connection)
    replay.run()
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("TRUNCATE entries"))
    else:
        connection.execute(sa.text("DELETE FROM entries"))
    _constrain_entries()
    scratch = replay.scratch
    for start in range(0, replay.seq, BATCH):  # the new seqs run from 1 to replay.seq
        connection.execute(
            sa.insert(entries).from_select(
                ENTRY_COLUMNS,
                sa.select(scratch).where(scratch.c.seq > start, scratch.c.seq <= start + BATCH),
            )
        )
    scratch.drop(connection)
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text(
                "SELECT setval(pg_get_serial_sequence('entries', 'seq'), max(seq)) FROM entries"
            )
        )


def _is_empty(connection: sa.Connection) -> bool:
    """True when the ledger holds nothing at all: no transaction, entry or hold, and every
    balance row as it was made."""
    probes = (
        "SELECT 1 FROM transactions LIMIT 1",
        "SELECT 1 FROM entries LIMIT 1",
        "SELECT 1 FROM holds LIMIT 1",
        "SELECT 1 FROM balances WHERE balance <> 0 OR entry_count <> 0"
        " OR chain_hash <> :genesis LIMIT 1",
    )
    return all(
        connection.execute(sa.text(probe), {"genesis": GENESIS_LINK}).first() is None
        for probe in probes
    )


@dataclass(slots=True)
class _Hold:
    id: str
    seq: int
    key: Key
    amount: int
    created_at: datetime
    ends_at: datetime  # when it stops reserving: ended (marked) or expired, whichever first
    is_captured: bool  # then its capture ends it, at `ends_at`
    free: int = 0  # what it reserves of each kind
    paid: int = 0

    @property
    def is_ever_active(self) -> bool:
        return self.is_captured or self.ends_at > self.created_at


@dataclass(slots=True)
class _Chain:
    """One account's position in one asset as the replay goes, and its chain's links."""

    balance: int = 0
    paid: int = 0  # the paid part of `balance`; the rest is free
    entries: int = 0  # entries written
    stored: str = GENESIS_LINK  # the newest stored link checked (of the version replaced)
    linked: str = GENESIS_LINK  # the newest link written (of the new version)
    last_seq: int = 0  # the stored seq of the newest entry checked
    reserved_free: int = 0  # what the holds active at the replay's moment reserve
    reserved_paid: int = 0
    pending: deque[_Hold] | None = None  # holds read but not made yet, oldest first
    ending: list[tuple[datetime, bool, int, str]] | None = None  # active holds' ends (a heap)

    def available(self, kind: str) -> int:
        if kind == PAID:
            return self.paid - self.reserved_paid
        return self.balance - self.paid - self.reserved_free


class _Replay:
    """The upgrade's data step: transactions in `seq` order, each user's holds made and ended in
    between by time; the split entries go to a scratch table in their new order."""

    def __init__(self, connection: sa.Connection) -> None:
        self.connection = connection
        self.scratch = _scratch_table()
        self.chains: dict[Key, _Chain] = {}
        self.live: dict[str, _Hold] = {}  # the holds reserving at the replay's moment, by id
        self.waiting: list[tuple[datetime, int, Key]] = []  # holds read, not made yet (a heap)
        self.hold_rows: list[Any] = []  # a page of holds, in order of creation
        self.hold_next = 0  # the next of `hold_rows` to read
        self.holds_done = False
        self.latest = datetime.min.replace(tzinfo=UTC)  # the newest transaction replayed so far
        self.seq = 0  # the last new entry's seq
        self.entries_read = 0
        # Per page of transactions:
        self.originals: dict[str, tuple[str, int]] = {}  # refunded or in this page: type, paid
        self.refunded: dict[str, int] = {}  # per original: refunded so far, in replay order
        self.new_entries: list[dict[str, Any]] = []
        self.paid_amounts: list[tuple[int, int]] = []  # transaction seq, paid amount
        self.hold_paid: list[tuple[int, int]] = []  # hold seq, paid amount

    def run(self) -> None:
        connection = self.connection
        self.scratch.create(connection)
        op.create_index(HOLDS_BY_TIME, "holds", ["created_at", "seq"])
        stored_entries = connection.execute(
            sa.select(sa.func.count()).select_from(entries)
        ).scalar_one()
        after = 0
        while page := _read_transactions(connection, after):
            grouped = _read_entries(connection, page[0].seq, page[-1].seq)
            self.entries_read += sum(map(len, grouped.values()))
            self._look_up_originals(page)
            for transaction in page:
                self._replay(transaction, grouped.pop(transaction.seq, []))
            after = page[-1].seq
            self._settle(self.latest - SETTLE_AFTER)
            self._flush()
        self._pull_holds(NEVER)
        self._settle(NEVER)
        self._flush()
        if self.entries_read != stored_entries:
            _name_orphan(connection)
        self._write_balances()
        op.drop_index(HOLDS_BY_TIME, table_name="holds")

    def _chain(self, key: Key) -> _Chain:
        chain = self.chains.get(key)
        if chain is None:
            chain = self.chains[key] = _Chain()
        return chain

    def _look_up_originals(self, page: list[Any]) -> None:
        """The paid parts of the spends this page's refunds give back, and what earlier pages
        refunded of them (those in this page are added as it is replayed)."""
        self.originals.clear()
        self.refunded.clear()
        wanted = sorted({t.refund_of for t in page if t.type == "refund" and t.refund_of})
        if not wanted:
            return
        earlier = transactions.c.seq < page[0].seq
        found = self.connection.execute(
            sa.select(transactions.c.id, transactions.c.type, transactions.c.paid_amount).where(
                transactions.c.id.in_(wanted), earlier
            )
        )
        self.originals.update((row.id, (row.type, row.paid_amount)) for row in found)
        total = sa.func.sum(transactions.c.amount)
        refunds = self.connection.execute(
            sa.select(transactions.c.refund_of, total.label("total"))
            .where(transactions.c.refund_of.in_(wanted), transactions.c.type == "refund", earlier)
            .group_by(transactions.c.refund_of)
        )
        self.refunded.update((row.refund_of, int(row.total)) for row in refunds)

    def _replay(self, transaction: Any, rows: list[Any]) -> None:
        t = transaction
        moment = _utc(t.created_at)
        self.latest = max(self.latest, moment)
        self._pull_holds(self.latest)
        header = _header(t)
        for row in rows:  # each chain's stored links first: a changed row is named as such
            chain = self._chain((row.account_id, row.asset_symbol))
            _check_link(chain, row, _link_v2(chain.stored, _entry_fields(row), header), 2)
        debits = [row for row in rows if row.direction == "debit"]
        credits = [row for row in rows if row.direction == "credit"]
        if (
            len(rows) != 2
            or len(debits) != 1
            or len(credits) != 1
            or any(row.amount != t.amount or row.asset_symbol != t.asset_symbol for row in rows)
        ):
            raise RuntimeError(
                f"transaction {t.id} has {len(rows)} entries, not one debit and one credit of "
                f"its {t.amount} {t.asset_symbol}: {TAMPERED}"
            )
        sides = [
            (row, self.chains[(row.account_id, row.asset_symbol)])
            for row in (debits[0], credits[0])
        ]
        for row, chain in sides:
            if not row.account_id.startswith(SYSTEM_PREFIX):
                self._advance(chain, moment)
        moves = self._kinds(t, debits[0].account_id, credits[0].account_id, sides[0][1])
        paid_amount = sum(amount for kind, amount in moves if kind == PAID)
        header_v3 = {**header, "freeAmount": t.amount - paid_amount, "paidAmount": paid_amount}
        for index, (kind, amount) in enumerate(moves):
            for (row, chain), sign in zip(sides, (-1, 1), strict=True):
                chain.balance += sign * amount
                if kind == PAID:
                    chain.paid += sign * amount
                self._write_entry(row, chain, kind, amount, header_v3, is_first=index == 0)
        for row, chain in sides:
            if chain.balance != row.balance_after:
                raise RuntimeError(
                    f"entry {row.id} ({row.account_id} {row.asset_symbol}) states a balance of "
                    f"{row.balance_after} after it, but its chain's entries add up to "
                    f"{chain.balance}: {TAMPERED}"
                )
            if not row.account_id.startswith(SYSTEM_PREFIX) and not (
                0 <= chain.paid <= chain.balance
            ):  # cannot happen: every take is checked against what is there
                raise AssertionError(
                    f"transaction {t.id} leaves {row.account_id} a paid part of "
                    f"{chain.paid} of {chain.balance}"
                )
        self.paid_amounts.append((t.seq, paid_amount))
        self.originals[t.id] = (t.type, paid_amount)

    def _write_entry(
        self,
        row: Any,
        chain: _Chain,
        kind: str,
        amount: int,
        header: dict[str, Any],
        *,
        is_first: bool,
    ) -> None:
        """One new entry: the first kind's keeps the stored entry's id; the second kind's gets a
        new one (a version 7 UUID of the entry's time, as the service makes them)."""
        self.seq += 1
        created_at = row.created_at
        if is_first:
            entry_id = row.id
        else:
            nanoseconds = (_utc(created_at) - EPOCH) // timedelta(microseconds=1) * 1000
            entry_id = str(uuid_utils.uuid7(nanoseconds=nanoseconds))
        fields = {
            "id": entry_id,
            "account": row.account_id,
            "assetSymbol": row.asset_symbol,
            "direction": row.direction,
            "amount": amount,
            "balanceAfter": chain.balance,
            "createdAt": _timestamp(created_at),
        }
        chain.linked = _link_v3(chain.linked, fields, kind, chain.paid, header)
        chain.entries += 1
        self.new_entries.append(
            {
                "seq": self.seq,
                "id": entry_id,
                "transaction_id": row.transaction_id,
                "account_id": row.account_id,
                "asset_symbol": row.asset_symbol,
                "direction": row.direction,
                "amount": amount,
                "balance_after": chain.balance,
                "created_at": created_at,
                "chain_hash": chain.linked,
                "kind": kind,
                "paid_after": chain.paid,
            }
        )

    def _kinds(
        self, t: Any, debited: str, credited: str, debited_chain: _Chain
    ) -> list[tuple[str, int]]:
        """What the transaction moves of each kind, in the order it takes them."""
        user, amount = t.user_id, t.amount
        expected = {
            "topup": (TREASURY, user),
            "bonus": (BONUS_POOL, user),
            "spend": (user, REVENUE),
            "transfer": (user, t.to_user_id),
            "refund": (REVENUE, user),
            "reversal": (user, credited if credited in (TREASURY, BONUS_POOL) else None),
        }
        if t.type not in expected:
            raise RuntimeError(f"transaction {t.id} is of type {t.type!r}, unknown at 0005")
        if (debited, credited) != expected[t.type]:
            raise RuntimeError(
                f"transaction {t.id}, a {t.type} of {user}, debits {debited} and credits "
                f"{credited}: {TAMPERED}"
            )
        match t.type:
            case "topup":
                return [(PAID, amount)]
            case "bonus":
                return [(FREE, amount)]
            case "spend" if t.hold_id is not None:
                return self._capture(t, debited_chain)
            case "spend" | "transfer":
                return self._take(t, debited_chain)
            case "refund":
                return self._give_back(t)
        # Version 1.2 took a reversal from the whole balance: the kind its original gave first,
        # then, for what the user no longer had of it, the other kind.
        kind = PAID if credited == TREASURY else FREE
        other = FREE if kind == PAID else PAID
        available, other_available = debited_chain.available(kind), debited_chain.available(other)
        own = min(amount, max(available, 0))
        if amount - own > other_available:
            raise RuntimeError(
                f"reversal {t.id} of {t.created_at:%Y-%m-%d %H:%M:%S} takes back {amount} "
                f"{t.asset_symbol} of {user}, more than the {available} {kind} and "
                f"{other_available} {other} credits the replay finds available to them then: "
                f"{UNTOLD}"
            )
        return _moved((kind, own), (other, amount - own))

    def _take(self, t: Any, chain: _Chain) -> list[tuple[str, int]]:
        """A spend's or transfer's kinds: free first, then paid, of what is available."""
        free_available, paid_available = chain.available(FREE), chain.available(PAID)
        free = min(t.amount, max(free_available, 0))
        paid = t.amount - free
        if paid > paid_available:
            raise RuntimeError(
                f"{t.type} {t.id} of {t.created_at:%Y-%m-%d %H:%M:%S} takes {t.amount} "
                f"{t.asset_symbol} of {t.user_id}, more than the {free_available} free and "
                f"{paid_available} paid credits the replay finds available to them then: "
                f"{UNTOLD}"
            )
        return _moved((FREE, free), (PAID, paid))

    def _capture(self, t: Any, chain: _Chain) -> list[tuple[str, int]]:
        """A capture's kinds: what its hold reserved, free first; the hold ends."""
        hold = self.live.get(t.hold_id)
        if hold is None and chain.pending:  # made at the capture's moment: make it now
            made = next((h for h in chain.pending if h.id == t.hold_id), None)
            if made is not None:
                chain.pending.remove(made)
                self._make_hold(chain, made)
                hold = self.live.get(t.hold_id)
        if hold is None or hold.key != (t.user_id, t.asset_symbol):
            raise RuntimeError(
                f"capture {t.id} names hold {t.hold_id}, which the replay does not find held "
                f"by {t.user_id} ({t.asset_symbol}) at {t.created_at:%Y-%m-%d %H:%M:%S}: "
                f"{TAMPERED}"
            )
        del self.live[hold.id]
        chain.reserved_free -= hold.free
        chain.reserved_paid -= hold.paid
        free = min(t.amount, hold.free)
        paid = t.amount - free
        if paid > hold.paid:
            raise RuntimeError(
                f"capture {t.id} takes {t.amount}, more than the {hold.amount} its hold "
                f"{hold.id} reserved: {TAMPERED}"
            )
        return _moved((FREE, free), (PAID, paid))

    def _give_back(self, t: Any) -> list[tuple[str, int]]:
        """A refund's kinds: what its spend took, paid first."""
        original = self.originals.get(t.refund_of)
        if original is None or original[0] != "spend":
            raise RuntimeError(
                f"refund {t.id} gives back {t.refund_of}, which is not a spend made before it: "
                f"{TAMPERED}"
            )
        paid_taken = original[1]
        before = self.refunded.get(t.refund_of, 0)
        paid = min(paid_taken - min(paid_taken, before), t.amount)
        self.refunded[t.refund_of] = before + t.amount
        return _moved((PAID, paid), (FREE, t.amount - paid))

    def _pull_holds(self, until: datetime) -> None:
        """Read the holds made up to `until` into their users' queues."""
        while True:
            if self.hold_next == len(self.hold_rows):
                if self.holds_done:
                    return
                self._read_holds()
                if not self.hold_rows:
                    self.holds_done = True
                    return
            row = self.hold_rows[self.hold_next]
            created = _utc(row.created_at)
            if created > until:
                return
            self.hold_next += 1
            expires = _utc(row.expires_at)
            ended = None if row.ended_at is None else _utc(row.ended_at)
            is_captured = row.status == "captured"
            if ended is None:
                ends = expires  # held, or expired and not marked yet
            elif is_captured:
                ends = ended  # at its capture, which ends it
            else:
                ends = min(ended, expires)
            key = (row.user_id, row.asset_symbol)
            chain = self._chain(key)
            if chain.pending is None:
                chain.pending = deque()
            chain.pending.append(
                _Hold(row.id, row.seq, key, row.amount, created, ends, is_captured)
            )
            heapq.heappush(self.waiting, (created, row.seq, key))

    def _read_holds(self) -> None:
        query = sa.select(holds).order_by(holds.c.created_at, holds.c.seq).limit(BATCH)
        if self.hold_rows:
            last = self.hold_rows[-1]
            query = query.where(
                sa.tuple_(holds.c.created_at, holds.c.seq)
                > sa.tuple_(
                    sa.literal(last.created_at, sa.DateTime(timezone=True)),
                    sa.literal(last.seq, sa.BigInteger()),
                )
            )
        self.hold_rows = list(self.connection.execute(query))
        self.hold_next = 0

    def _settle(self, until: datetime) -> None:
        """Make the holds read that were made before `until`, whoever they are for."""
        while self.waiting and self.waiting[0][0] < until:
            _, _, key = heapq.heappop(self.waiting)
            self._advance(self.chains[key], until)

    def _advance(self, chain: _Chain, moment: datetime) -> None:
        """Bring a user's holds up to `moment`: make those made before it, and end those that
        ended at or before it (a captured one ends at its capture), in order of time."""
        pending = chain.pending
        while pending and pending[0].created_at < moment:
            hold = pending.popleft()
            self._end_holds(chain, hold.created_at)
            self._make_hold(chain, hold)
        self._end_holds(chain, moment)

    def _end_holds(self, chain: _Chain, moment: datetime) -> None:
        ending = chain.ending
        while ending and (ending[0][0] < moment or (ending[0][0] == moment and not ending[0][1])):
            hold = self.live.pop(heapq.heappop(ending)[3], None)
            if hold is not None:
                chain.reserved_free -= hold.free
                chain.reserved_paid -= hold.paid

    def _make_hold(self, chain: _Chain, hold: _Hold) -> None:
        """A hold reserves free first, then paid, of what is available when it is made."""
        free_available, paid_available = chain.available(FREE), chain.available(PAID)
        hold.free = min(hold.amount, max(free_available, 0))
        hold.paid = hold.amount - hold.free
        self.hold_paid.append((hold.seq, hold.paid))
        if not hold.is_ever_active:  # released or expired the moment it was made
            return
        if hold.paid > paid_available:
            raise RuntimeError(
                f"hold {hold.id} of {hold.key[0]} ({hold.key[1]}), made at "
                f"{hold.created_at:%Y-%m-%d %H:%M:%S}, reserves {hold.amount}, more than the "
                f"{free_available} free and {paid_available} paid credits the replay finds "
                f"available to them then: {UNTOLD}"
            )
        chain.reserved_free += hold.free
        chain.reserved_paid += hold.paid
        if chain.ending is None:
            chain.ending = []
        heapq.heappush(chain.ending, (hold.ends_at, hold.is_captured, hold.seq, hold.id))
        self.live[hold.id] = hold

    def _flush(self) -> None:
        if self.new_entries:
            self.connection.execute(sa.insert(self.scratch), self.new_entries)
            self.new_entries.clear()
        _write_paid_amounts(self.connection, transactions, self.paid_amounts)
        self.paid_amounts.clear()
        _write_paid_amounts(self.connection, holds, self.hold_paid)
        self.hold_paid.clear()

    def _write_balances(self) -> None:
        """Check each balance row against its chain as replayed, and record its paid part, its
        chain's length and its newest link."""
        heads: list[tuple[str, str, int | None, int, str]] = []
        for account, asset, balance, stored in self.connection.execute(
            sa.select(
                balances.c.account_id,
                balances.c.asset_symbol,
                balances.c.balance,
                balances.c.chain_hash,
            )
        ):
            chain = self.chains.pop((account, asset), None)
            if chain is None or not chain.entries:
                if stored != GENESIS_LINK:
                    raise RuntimeError(
                        f"the balance row of {account} {asset} records a newest link but its "
                        f"chain has no entry: {TAMPERED}"
                    )
                if balance != 0:
                    raise RuntimeError(
                        f"the balance row of {account} {asset} states {balance} but its chain "
                        f"has no entry: {TAMPERED}"
                    )
                continue
            _check_head(account, asset, stored, chain, 2)
            if balance != chain.balance:
                raise RuntimeError(
                    f"the balance row of {account} {asset} states {balance} but its chain's "
                    f"entries add up to {chain.balance}: {TAMPERED}"
                )
            heads.append((account, asset, chain.paid, chain.entries, chain.linked))
        for (account, asset), chain in self.chains.items():
            if chain.entries:
                raise RuntimeError(f"{account} {asset} has entries but no balance row: {TAMPERED}")
        for start in range(0, len(heads), BATCH):
            _write_heads(self.connection, heads[start : start + BATCH])


def _moved(*parts: tuple[str, int]) -> list[tuple[str, int]]:
    return [(kind, amount) for kind, amount in parts if amount]


def _scratch_table() -> sa.Table:
    """The split entries, in their new order; the entries table's columns, no constraint."""
    return sa.Table(
        SCRATCH,
        sa.MetaData(),
        sa.Column(
            "seq",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=False,
        ),
        sa.Column("id", sa.String(36)),
        sa.Column("transaction_id", sa.String(36)),
        sa.Column("account_id", sa.String(64)),
        sa.Column("asset_symbol", sa.String(32)),
        sa.Column("direction", sa.String(6)),
        sa.Column("amount", sa.BigInteger()),
        sa.Column("balance_after", sa.BigInteger()),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("chain_hash", sa.String(64)),
        sa.Column("kind", sa.String(4)),
        sa.Column("paid_after", sa.BigInteger()),
    )


def _read_transactions(connection: sa.Connection, after: int) -> list[Any]:
    """The next page of transactions by `seq`: the primary key's order, so each page costs
    the same."""
    return list(
        connection.execute(
            sa.select(transactions)
            .where(transactions.c.seq > after)
            .order_by(transactions.c.seq)
            .limit(TRANSACTIONS_PER_PAGE)
        )
    )


def _read_entries(connection: sa.Connection, first: int, last: int) -> dict[int, list[Any]]:
    """The entries of the transactions from seq `first` to `last`, by transaction seq, each
    transaction's in seq order (through the index on their transaction id)."""
    grouped: dict[int, list[Any]] = {}
    for row in connection.execute(
        sa.select(entries, transactions.c.seq.label("t_seq"))
        .select_from(entries.join(transactions, transactions.c.id == entries.c.transaction_id))
        .where(transactions.c.seq.between(first, last))
        .order_by(transactions.c.seq, entries.c.seq)
    ):
        grouped.setdefault(row.t_seq, []).append(row)
    return grouped


def _name_orphan(connection: sa.Connection) -> None:
    orphan = connection.execute(
        sa.select(
            entries.c.id, entries.c.account_id, entries.c.asset_symbol, entries.c.transaction_id
        )
        .where(~sa.exists().where(transactions.c.id == entries.c.transaction_id))
        .limit(1)
    ).first()
    if orphan is None:  # cannot happen: every other entry was read with its transaction
        raise AssertionError("entries were added while the ledger was migrated")
    raise RuntimeError(
        f"entry {orphan.id} ({orphan.account_id} {orphan.asset_symbol}) names transaction "
        f"{orphan.transaction_id}, which does not exist: {TAMPERED}"
    )


def _check_link(chain: _Chain, row: Any, link: str, version: int) -> None:
    """Check a stored entry, the next of its chain in the replay, against its stored link."""
    if row.seq <= chain.last_seq:
        raise RuntimeError(
            f"entry {row.id} ({row.account_id} {row.asset_symbol}) comes before an entry of an "
            f"older transaction in its chain: the chain is not in the order of its "
            f"transactions; {TAMPERED}"
        )
    if link != row.chain_hash:
        raise RuntimeError(
            f"entry {row.id} ({row.account_id} {row.asset_symbol}) is the first broken link of "
            f"its chain (version {version}): {TAMPERED}"
        )
    chain.stored = row.chain_hash
    chain.last_seq = row.seq


def _check_head(account: str, asset: str, stored: str, chain: _Chain, version: int) -> None:
    if stored != chain.stored:
        raise RuntimeError(
            f"the balance row of {account} {asset} does not record its chain's newest "
            f"version-{version} link: {TAMPERED}"
        )


# The PostgreSQL statements of _write_paid_amounts: one per table, all rows of a batch at once.
PAID_AMOUNTS_BY_UNNEST = {
    "transactions": "UPDATE transactions SET paid_amount = v.paid FROM unnest("
    "CAST(:seqs AS bigint[]), CAST(:paid AS bigint[])) AS v(seq, paid)"
    " WHERE transactions.seq = v.seq",
    "holds": "UPDATE holds SET paid_amount = v.paid FROM unnest("
    "CAST(:seqs AS bigint[]), CAST(:paid AS bigint[])) AS v(seq, paid) WHERE holds.seq = v.seq",
}


def _write_paid_amounts(
    connection: sa.Connection, table: sa.TableClause, values: list[tuple[int, int]]
) -> None:
    """Set the paid_amount of rows (of transactions or holds) named by their seq."""
    for start in range(0, len(values), BATCH):
        chunk = values[start : start + BATCH]
        if connection.dialect.name == "postgresql":
            connection.execute(
                sa.text(PAID_AMOUNTS_BY_UNNEST[table.name]),
                {"seqs": [seq for seq, _ in chunk], "paid": [paid for _, paid in chunk]},
            )
        else:
            connection.execute(
                sa.update(table)
                .where(table.c.seq == sa.bindparam("row_seq"))
                .values(paid_amount=sa.bindparam("paid")),
                [{"row_seq": seq, "paid": paid} for seq, paid in chunk],
            )


def _write_heads(
    connection: sa.Connection, heads: list[tuple[str, str, int | None, int, str]]
) -> None:
    """Each balance row's paid part, chain length and newest link; paid is None to keep it."""
    if not heads:
        return
    if connection.dialect.name == "postgresql":
        connection.execute(
            sa.text(
                "UPDATE balances SET paid = coalesce(v.paid, balances.paid),"
                " entry_count = v.count, chain_hash = v.link"
                " FROM unnest(CAST(:accounts AS text[]), CAST(:symbols AS text[]),"
                " CAST(:paid AS bigint[]), CAST(:counts AS bigint[]), CAST(:links AS text[]))"
                " AS v(account, symbol, paid, count, link)"
                " WHERE balances.account_id = v.account AND balances.asset_symbol = v.symbol"
            ),
            {
                "accounts": [head[0] for head in heads],
                "symbols": [head[1] for head in heads],
                "paid": [head[2] for head in heads],
                "counts": [head[3] for head in heads],
                "links": [head[4] for head in heads],
            },
        )
        return
    connection.execute(
        sa.text(
            "UPDATE balances SET paid = coalesce(:paid, paid), entry_count = :count,"
            " chain_hash = :link WHERE account_id = :account AND asset_symbol = :symbol"
        ),
        [
            {"account": a, "symbol": s, "paid": paid, "count": count, "link": link}
            for a, s, paid, count, link in heads
        ],
    )


def _utc(moment: datetime) -> datetime:
    """SQLite hands timestamps back without a zone; every stored timestamp is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _timestamp(moment: datetime) -> str:
    return _utc(moment).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _entry_fields(row: Any) -> dict[str, Any]:
    """A stored entry's members in both encodings (version 3 adds its kind and paid part)."""
    return {
        "id": row.id,
        "account": row.account_id,
        "assetSymbol": row.asset_symbol,
        "direction": row.direction,
        "amount": row.amount,
        "balanceAfter": row.balance_after,
        "createdAt": _timestamp(row.created_at),
    }


def _header(row: Any) -> dict[str, Any]:
    """A transaction's header as version 2 links it (version 3 adds its free and paid amounts)."""
    return {
        "id": row.id,
        "type": row.type,
        "userId": row.user_id,
        "toUserId": row.to_user_id,
        "assetSymbol": row.asset_symbol,
        "amount": row.amount,
        "holdId": row.hold_id,
        "refundOf": row.refund_of,
        "idempotencyKey": row.idempotency_key,
        "note": row.note,
        "metadata": None if row.metadata is None else dict(row.metadata),
        "createdBy": row.created_by,
        "createdAt": _timestamp(row.created_at),
    }


def _digest(record: dict[str, Any]) -> str:
    """SHA-256 of one line of JSON: keys sorted, no white space, UTF-8."""
    content = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(content.encode()).hexdigest()


def _link_v2(previous: str, entry: dict[str, Any], header: dict[str, Any]) -> str:
    """Version 2, frozen as docs/LEDGER.md defines it (and 0005 wrote it)."""
    return _digest({"v": 2, "previous": previous, "entry": entry, "transaction": header})


def _link_v3(
    previous: str, entry: dict[str, Any], kind: str, paid_after: int, header: dict[str, Any]
) -> str:
    """Version 3, frozen as docs/LEDGER.md defines it (`link_content` in the domain at 0006):
    version 2 with the entry's kind and paid part after it, and the transaction's free and paid
    amounts (`header` has them)."""
    return _digest(
        {
            "v": 3,
            "previous": previous,
            "entry": {**entry, "kind": kind, "paidAfter": paid_after},
            "transaction": header,
        }
    )


def downgrade() -> None:
    # Money movements 0005 cannot represent are never dropped: such a ledger stays at 0006.
    connection = op.get_bind()
    newer = sum(
        connection.execute(sa.text(statement)).scalar_one()
        for statement in (
            "SELECT count(*) FROM transactions WHERE type = 'expiry'",
            "SELECT count(*) FROM lots",
            "SELECT count(*) FROM lot_moves",
        )
    )
    if newer:
        raise RuntimeError(
            f"{newer} expiries, lots and lot moves need revision 0006; the downgrade would lose "
            "them"
        )
    if not _is_empty(connection):
        _merge_history(connection)
    op.drop_index("ix_transactions_returns_asset_created_at", table_name="transactions")
    with op.batch_alter_table("entries") as batch:
        batch.drop_constraint(op.f("uq_entries_transaction_id_kind_direction"), type_="unique")
        batch.create_unique_constraint(
            op.f("uq_entries_transaction_id_direction"), ["transaction_id", "direction"]
        )
        batch.drop_constraint(op.f("ck_entries_user_paid_within_balance"), type_="check")
        batch.drop_constraint(op.f("ck_entries_kind"), type_="check")
        batch.drop_column("paid_after")
        batch.drop_column("kind")
    with op.batch_alter_table("holds") as batch:
        batch.drop_constraint(op.f("ck_holds_paid_within_amount"), type_="check")
        batch.drop_column("paid_amount")
    with op.batch_alter_table("transactions") as batch:
        batch.drop_constraint(op.f("ck_transactions_issued_kind"), type_="check")
        batch.drop_constraint(op.f("ck_transactions_paid_within_amount"), type_="check")
        batch.drop_constraint(op.f("ck_transactions_type"), type_="check")
        batch.create_check_constraint(
            op.f("ck_transactions_type"),
            "type IN ('topup', 'bonus', 'spend', 'transfer', 'refund', 'reversal')",
        )
        batch.drop_column("paid_amount")
    with op.batch_alter_table("balances") as batch:
        batch.drop_constraint(op.f("ck_balances_user_parts_within_balance"), type_="check")
        batch.drop_column("expiring")
        batch.drop_column("paid")
    op.drop_index("ix_lot_moves_transaction_id", table_name="lot_moves")
    op.drop_table("lot_moves")
    op.drop_index("ix_lots_due", table_name="lots")
    op.drop_table("lots")
    with op.batch_alter_table("assets") as batch:
        batch.drop_constraint(op.f("ck_assets_lifetimes"), type_="check")
        batch.drop_constraint(op.f("ck_assets_spend_order"), type_="check")
        batch.drop_column("paid_lifetime_days")
        batch.drop_column("free_lifetime_days")
        batch.drop_column("spend_order")


def _merge_history(connection: sa.Connection) -> None:
    """Merge each transaction's entries back into one debit and one credit of its amount, each
    stating its account's balance after the transaction, and link them again with version 2.
    Every chain's version-3 links are checked first: a broken chain stops the downgrade."""
    chains: dict[Key, _Chain] = {}
    # seq, amount, balance and paid part after (the latter dropped next, kept within bounds), link
    updates: list[tuple[int, int, int, int, str]] = []
    deletes: list[int] = []
    stored_entries = connection.execute(
        sa.select(sa.func.count()).select_from(entries)
    ).scalar_one()
    read = 0
    after = 0
    while page := _read_transactions(connection, after):
        grouped = _read_entries(connection, page[0].seq, page[-1].seq)
        read += sum(map(len, grouped.values()))
        for t in page:
            rows = grouped.pop(t.seq, [])
            header = _header(t)
            header_v3 = {
                **header,
                "freeAmount": t.amount - t.paid_amount,
                "paidAmount": t.paid_amount,
            }
            for row in rows:
                key = (row.account_id, row.asset_symbol)
                chain = chains.get(key)
                if chain is None:
                    chain = chains[key] = _Chain()
                link = _link_v3(
                    chain.stored, _entry_fields(row), row.kind, row.paid_after, header_v3
                )
                _check_link(chain, row, link, 3)
            for direction in ("debit", "credit"):
                side = [row for row in rows if row.direction == direction]
                if (
                    not side
                    or len({(row.account_id, row.asset_symbol) for row in side}) != 1
                    or sum(row.amount for row in side) != t.amount
                ):
                    raise RuntimeError(
                        f"the {direction} entries of transaction {t.id} do not add up to its "
                        f"{t.amount} in one account: {TAMPERED}"
                    )
                kept, last = side[0], side[-1]
                chain = chains[(kept.account_id, kept.asset_symbol)]
                merged = {
                    **_entry_fields(kept),
                    "amount": t.amount,
                    "balanceAfter": last.balance_after,
                }
                chain.linked = _link_v2(chain.linked, merged, header)
                chain.entries += 1
                updates.append(
                    (kept.seq, t.amount, last.balance_after, last.paid_after, chain.linked)
                )
                deletes.extend(row.seq for row in side[1:])
        after = page[-1].seq
        _write_merged(connection, updates, deletes)
        updates.clear()
        deletes.clear()
    if read != stored_entries:
        _name_orphan(connection)
    heads: list[tuple[str, str, int | None, int, str]] = []
    for account, asset, stored in connection.execute(
        sa.select(balances.c.account_id, balances.c.asset_symbol, balances.c.chain_hash)
    ):
        chain = chains.pop((account, asset), _Chain())  # none: no entry, the genesis link
        _check_head(account, asset, stored, chain, 3)
        if chain.entries:
            heads.append((account, asset, None, chain.entries, chain.linked))
    if chains:
        account, asset = next(iter(chains))
        raise RuntimeError(f"{account} {asset} has entries but no balance row: {TAMPERED}")
    for start in range(0, len(heads), BATCH):
        _write_heads(connection, heads[start : start + BATCH])


def _write_merged(
    connection: sa.Connection, updates: list[tuple[int, int, int, int, str]], deletes: list[int]
) -> None:
    if connection.dialect.name == "postgresql":
        if deletes:
            connection.execute(
                sa.text("DELETE FROM entries WHERE seq = ANY(CAST(:seqs AS bigint[]))"),
                {"seqs": deletes},
            )
        if updates:
            connection.execute(
                sa.text(
                    "UPDATE entries SET amount = v.amount, balance_after = v.balance_after,"
                    " paid_after = v.paid_after, chain_hash = v.link"
                    " FROM unnest(CAST(:seqs AS bigint[]), CAST(:amounts AS bigint[]),"
                    " CAST(:balances AS bigint[]), CAST(:paid AS bigint[]),"
                    " CAST(:links AS text[])) AS v(seq, amount, balance_after, paid_after, link)"
                    " WHERE entries.seq = v.seq"
                ),
                {
                    "seqs": [u[0] for u in updates],
                    "amounts": [u[1] for u in updates],
                    "balances": [u[2] for u in updates],
                    "paid": [u[3] for u in updates],
                    "links": [u[4] for u in updates],
                },
            )
        return
    if deletes:
        connection.execute(
            sa.text("DELETE FROM entries WHERE seq = :seq"), [{"seq": seq} for seq in deletes]
        )
    if updates:
        connection.execute(
            sa.text(
                "UPDATE entries SET amount = :amount, balance_after = :balance_after,"
                " paid_after = :paid_after, chain_hash = :link WHERE seq = :seq"
            ),
            [
                {
                    "seq": seq,
                    "amount": amount,
                    "balance_after": balance_after,
                    "paid_after": paid_after,
                    "link": link,
                }
                for seq, amount, balance_after, paid_after, link in updates
            ],
        )
