"""`wallet verify`: recomputes every balance and every hash link from the ledger and checks every
invariant; a checkpoint records the newest link of every chain, so that a later verify can prove
the ledger still extends it (nothing kept in the database alone can show a truncation)."""

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.ledger import GENESIS_LINK, link
from wallet.store import audit
from wallet.store.database import Database
from wallet.store.ledger import as_utc

Chain = tuple[str, str, int]  # (account, asset, shard): one balance row's entries


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def is_clean(self) -> bool:
        return not self.failures


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The newest link of one (account, asset, shard) chain, and how many entries lead to it."""

    account: str
    asset_symbol: str
    chain_hash: str
    entries: int
    shard: int = 0  # a user's one balance row; a system account has several per asset


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The head of every chain with entries, read in one snapshot, by account, asset, shard."""

    at: datetime
    chains: list[ChainHead]


class InvalidCheckpoint(ValueError):
    """The text is not a checkpoint; the message says what is wrong with it."""


async def checkpoint(database: Database) -> Checkpoint:
    """The newest link and length of every chain, in one consistent read."""
    async with database.transaction(is_write=False, is_snapshot=True) as connection:
        rows = await audit.chain_heads(connection)
        # Taken after the read: every entry the checkpoint covers was made before `at`.
        at = datetime.now(UTC)
    return Checkpoint(
        at=at,
        chains=[
            ChainHead(r.account_id, r.asset_symbol, r.chain_hash, r.entry_count, r.shard)
            for r in rows
        ],
    )


def checkpoint_json(checkpoint: Checkpoint) -> dict[str, Any]:
    """The checkpoint as the API shows it: `{"at", "chains": [{"account", "assetSymbol",
    "shard", "chainHash", "entries"}]}`, `at` in RFC 3339, UTC."""
    return {
        "at": checkpoint.at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "chains": [
            {
                "account": chain.account,
                "assetSymbol": chain.asset_symbol,
                "shard": chain.shard,
                "chainHash": chain.chain_hash,
                "entries": chain.entries,
            }
            for chain in checkpoint.chains
        ],
    }


def parse_checkpoint(text: str | bytes) -> Checkpoint:
    """A checkpoint from its JSON (what `checkpoint_json` makes); InvalidCheckpoint otherwise."""
    try:
        document = json.loads(text)
    except (ValueError, UnicodeDecodeError) as error:
        raise InvalidCheckpoint(f"not JSON: {error}") from None
    if not isinstance(document, dict) or set(document) != {"at", "chains"}:
        raise InvalidCheckpoint('not a checkpoint: expected an object with "at" and "chains"')
    at = _parse_moment(document["at"])
    chains = document["chains"]
    if not isinstance(chains, list):
        raise InvalidCheckpoint('"chains" is not a list')
    heads = [_parse_chain(index, chain) for index, chain in enumerate(chains)]
    if len({_chain(head) for head in heads}) != len(heads):
        raise InvalidCheckpoint('"chains" names a chain twice')
    return Checkpoint(at=at, chains=heads)


def _parse_moment(value: object) -> datetime:
    try:
        if not isinstance(value, str):
            raise ValueError(value)
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidCheckpoint('"at" is not an RFC 3339 timestamp') from None
    if moment.tzinfo is None:
        raise InvalidCheckpoint('"at" has no time zone')
    return moment


def _parse_chain(index: int, chain: object) -> ChainHead:
    keys = {"account", "assetSymbol", "chainHash", "entries"}
    # Checkpoints taken before system accounts had several balance rows name no shard: 0.
    if not isinstance(chain, dict) or set(chain) - {"shard"} != keys:
        raise InvalidCheckpoint(
            f"chain {index} is not an object of {', '.join(sorted(keys))} and, optionally, shard"
        )
    account, asset, shard, chain_hash, entries = (
        chain["account"],
        chain["assetSymbol"],
        chain.get("shard", 0),
        chain["chainHash"],
        chain["entries"],
    )
    if not (isinstance(account, str) and account and isinstance(asset, str) and asset):
        raise InvalidCheckpoint(f"chain {index}: account and assetSymbol must be strings")
    if isinstance(shard, bool) or not isinstance(shard, int) or shard < 0:
        raise InvalidCheckpoint(f"chain {index}: shard must be a whole number from 0")
    if not (
        isinstance(chain_hash, str)
        and len(chain_hash) == len(GENESIS_LINK)
        and all(c in "0123456789abcdef" for c in chain_hash)
    ):
        raise InvalidCheckpoint(f"chain {index}: chainHash must be 64 lowercase hex digits")
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise InvalidCheckpoint(f"chain {index}: entries must be a whole number from 1")
    return ChainHead(account, asset, chain_hash, entries, shard)


def _chain(head: ChainHead) -> Chain:
    return (head.account, head.asset_symbol, head.shard)


def _named(chain: Chain) -> str:
    """A chain as findings name it: `account asset`, and `shard N` unless it is shard 0 (a
    user's only one)."""
    account, asset, shard = chain
    return f"{account} {asset}" if shard == 0 else f"{account} {asset} shard {shard}"


def _row_named(row: Any) -> str:
    """The chain of a found row (its account_id, asset_symbol and shard), as `_named` names it."""
    return _named((row.account_id, row.asset_symbol, row.shard))


async def verify(
    database: Database, *, checkpoint: Checkpoint | None = None, checkpoint_name: str = ""
) -> list[Check]:
    """Run every check in one consistent read; each lists what it found wrong. With a
    checkpoint, also check that every chain it records still leads through its link."""
    pinned = {_chain(c): c for c in checkpoint.chains} if checkpoint else {}
    async with database.transaction(is_write=False, is_snapshot=True) as connection:
        await audit.plan_for_whole_tables(connection)
        sums = await audit.asset_sums(connection)
        # Taken once the snapshot is: a hold active now was active in everything it shows.
        now = datetime.now(UTC)
        parts = await audit.user_parts_out_of_range(connection)
        off = await audit.balances_off_ledger(connection)
        orphans = await audit.entries_without_balance(connection)
        pairs = await audit.broken_pairs(connection)
        chains = await audit.broken_chains(connection)
        paid_heads = await audit.paid_off_chain_heads(connection)
        links, unextended = await _walk_chains(connection, pinned)
        counts = await audit.miscounted_chains(connection)
        held = await audit.held_off_holds(connection)
        hold_parts = await audit.holds_paid_out_of_range(connection)
        overreserved = await audit.overreserved_parts(connection, now=now)
        overcaptured = await audit.overcaptured_holds(connection)
        unmatched = await audit.captures_without_their_spend(connection)
        stray_captures = await audit.captures_of_holds_not_captured(connection)
        refunds = await audit.refunds_off_originals(connection)
        negative_lots = await audit.lots_below_zero(connection)
        lot_sums = await audit.lots_off_balances(connection)
        lot_parts = await audit.lots_above_their_part(connection)
        lot_moves = await audit.lots_off_their_moves(connection)
        expiries = await audit.expiries_off_lots(connection)
    checks = [
        Check(
            "per-asset balances sum to zero",
            [f"{r.asset_symbol}: {r.total}" for r in sums if r.total != 0],
        ),
        Check(
            "balance = paid + free for every user and asset",
            [
                f"{r.asset_symbol}: {kind} parts sum to {total}"
                for r in sums
                for kind, total in (("paid", r.paid), ("free", r.free))
                if total != 0
            ]
            + [
                f"{r.account_id} {r.asset_symbol}: paid {r.paid} of balance {r.balance}"
                for r in parts
            ],
        ),
        Check(
            "balances equal their ledger replay",
            [f"{_row_named(r)}: balance {r.balance}, ledger {r.replayed}" for r in off]
            + [f"{_row_named(r)}: entries without a balance" for r in orphans],
        ),
        Check(  # per kind it moves, of its amount and asset, between the accounts its type moves
            "each transaction has one debit and one credit", [f"transaction {r.id}" for r in pairs]
        ),
        Check(
            "balanceAfter chains replay",
            [f"entry {r.id} ({_row_named(r)})" for r in chains if r.is_balance_off]
            + [
                f"entry {r.id} ({_row_named(r)}): paidAfter does not follow"
                for r in chains
                if r.is_paid_off
            ]
            + [
                f"{_row_named(r)}: paid {r.paid}, newest paidAfter {r.paid_after}"
                for r in paid_heads
            ],
        ),
        Check("hash chains are unbroken", links),
        Check(
            "entry counts match their chains",
            [f"{_row_named(r)}: entry count {r.entry_count}, chain {r.entries}" for r in counts],
        ),
        Check(
            "held sums match the holds",
            [
                f"{r.account_id} {r.asset_symbol}: "
                + ("no balance row" if r.held is None else f"held {r.held}")
                + f", holds {r.holds}"
                for r in held
            ]
            + [f"hold {r.id}: paidAmount {r.paid_amount} of {r.amount}" for r in hold_parts]
            + [
                f"{r.account_id} {r.asset_symbol}: active holds reserve {r.reserved_paid} paid "
                f"of {r.paid} and {r.reserved_free} free of {r.free}"
                for r in overreserved
            ],
        ),
        Check(
            "captures match their holds",
            [f"hold {r.id}: captured {r.captured_amount} of {r.amount}" for r in overcaptured]
            + [
                f"hold {r.id}: captured {r.captured_amount}, but "
                + (
                    "its transaction is not a spend of that amount by its user in its asset, "
                    "of what it reserved"
                    if r.transactions == 1
                    else f"{r.transactions} transactions capture it"
                )
                for r in unmatched
            ]
            + [
                f"transaction {r.id}: captures hold {r.hold_id}, which is "
                + (r.status or "missing")
                for r in stray_captures
            ],
        ),
        Check(
            "refunds stay within their originals",
            [
                f"transaction {r.id}: amount {r.amount} ({r.paid_amount} paid), refundedAmount "
                f"{r.refunded_amount}, refunds {r.refunds} ({r.refunds_paid} paid)"
                for r in refunds
            ],
        ),
        Check(
            "no lot below zero",
            [f"{_lot(r)}: remaining {r.remaining}" for r in negative_lots],
        ),
        Check(
            "lots add up to their balances",
            [f"{r.account_id} {r.asset_symbol}: {_lot_sum(r)}" for r in lot_sums]
            + [
                f"{r.account_id} {r.asset_symbol}: {r.kind} lots {r.lots}, more than the "
                f"{r.kind} part {r.part}"
                for r in lot_parts
            ],
        ),
        Check(
            "lots replay their moves",
            [
                f"{_lot(r)}: "
                + ("no lot" if r.remaining is None else f"remaining {r.remaining}")
                + f", moves {r.moved}"
                for r in lot_moves
            ],
        ),
        Check(
            "expiries match the lots they ended",
            [
                f"transaction {r.id}: moved {r.paid_amount} paid and {r.amount - r.paid_amount}"
                f" free, took {r.paid_taken} paid and {r.free_taken} free from lots"
                + (
                    f", {r.strays} of its lot moves not taken from its user's lots expired by then"
                    if r.strays
                    else ""
                )
                for r in expiries
            ],
        ),
    ]
    if checkpoint is not None:
        checks.append(Check(f"the ledger extends checkpoint {checkpoint_name}", unextended))
    return checks


def _lot_sum(row: Any) -> str:
    """What is wrong with a balance's lots: no balance row, `expiring` is not their sum, or it
    is more than the balance."""
    if row.balance is None:
        return f"lots {row.lots}, no balance row"
    if row.expiring != row.lots:
        return f"expiring {row.expiring}, lots {row.lots}"
    return f"expiring {row.expiring}, more than the balance {row.balance}"


def _lot(row: Any) -> str:
    """A lot as findings name it: its user, asset, kind and moment of expiry."""
    at = as_utc(row.expires_at).isoformat().replace("+00:00", "Z")
    return f"{row.account_id} {row.asset_symbol} {row.kind} lot expiring {at}"


async def _walk_chains(
    connection: AsyncConnection, pinned: Mapping[Chain, ChainHead]
) -> tuple[list[str], list[str]]:
    """One pass over every chain, oldest entry first. Returns the broken links (the first of
    each chain, each balance row whose newest link is not its chain's last, each newest link
    recorded for a chain without entries: an entry or its transaction edited, deleted or
    reordered outside the service) and the chains that do not extend `pinned` (a checkpoint):
    truncated below its length, or with another link at its position (rewritten)."""
    broken: list[str] = []
    unextended: list[str] = []
    awaited = dict(pinned)  # the checkpoint's chains not yet walked
    chain: Chain | None = None
    previous = GENESIS_LINK
    head: str | None = None
    is_broken = False
    position = 0

    def end_chain() -> None:
        if chain is None:
            return
        if head != previous:
            broken.append(f"{_named(chain)}: the balance's newest link is not the last entry's")
        expected = awaited.pop(chain, None)
        if expected is not None and position < expected.entries:
            unextended.append(_truncated(chain, position, expected))

    async for entry, shard, transaction, entry_head in audit.entries_by_chain(connection):
        if (entry.account_id, entry.asset_symbol, shard) != chain:
            end_chain()
            chain = (entry.account_id, entry.asset_symbol, shard)
            previous, head, is_broken, position = GENESIS_LINK, entry_head, False, 0
        position += 1
        if not is_broken and (
            transaction is None or link(previous, entry, transaction) != entry.chain_hash
        ):
            missing = " (its transaction is missing)" if transaction is None else ""
            broken.append(f"entry {entry.id} ({_named(chain)}): first broken link{missing}")
            is_broken = True
        expected = awaited.get(chain)
        if (
            expected is not None
            and position == expected.entries
            and entry.chain_hash != expected.chain_hash
        ):
            unextended.append(
                f"{_named(chain)}: entry {position} ({entry.id}) is not the checkpoint's link"
                " (rewritten)"
            )
        previous = entry.chain_hash
    end_chain()
    unextended += [_truncated(chain, 0, expected) for chain, expected in awaited.items()]
    rows = await audit.linked_balances_without_entries(connection)
    broken += [f"{_row_named(r)}: a newest link but no entry" for r in rows]
    return broken, unextended


def _truncated(chain: Chain, entries: int, expected: ChainHead) -> str:
    return (
        f"{_named(chain)}: {entries} of the checkpoint's {expected.entries} entries left "
        "(truncated)"
    )
