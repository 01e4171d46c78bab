"""`wallet verify`: recomputes every balance from the ledger and checks every invariant."""

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncConnection

from wallet.domain.ledger import GENESIS_LINK, link
from wallet.store import audit
from wallet.store.database import Database


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def is_clean(self) -> bool:
        return not self.failures


async def verify(database: Database) -> list[Check]:
    """Run every check in one consistent read; each lists what it found wrong."""
    async with database.transaction(is_write=False, is_snapshot=True) as connection:
        sums = await audit.nonzero_asset_sums(connection)
        off = await audit.balances_off_ledger(connection)
        orphans = await audit.entries_without_balance(connection)
        pairs = await audit.broken_pairs(connection)
        chains = await audit.broken_chains(connection)
        links = await _broken_links(connection)
    return [
        Check("per-asset balances sum to zero", [f"{r.asset_symbol}: {r.total}" for r in sums]),
        Check(
            "balances equal their ledger replay",
            [
                f"{r.account_id} {r.asset_symbol}: balance {r.balance}, ledger {r.replayed}"
                for r in off
            ]
            + [f"{r.account_id} {r.asset_symbol}: entries without a balance" for r in orphans],
        ),
        Check(
            "each transaction has one debit and one credit", [f"transaction {r.id}" for r in pairs]
        ),
        Check(
            "balanceAfter chains replay",
            [f"entry {r.id} ({r.account_id} {r.asset_symbol})" for r in chains],
        ),
        Check("hash chains are unbroken", links),
    ]


async def _broken_links(connection: AsyncConnection) -> list[str]:
    """The first broken link of each (account, asset) chain, and every balance row whose newest
    link is not its chain's last: an entry edited, deleted or reordered outside the service."""
    broken: list[str] = []
    chain: tuple[str, str] | None = None
    previous = GENESIS_LINK
    head: str | None = None
    is_broken = False

    def check_head() -> None:
        if chain is not None and head != previous:
            broken.append(
                f"{chain[0]} {chain[1]}: the balance's newest link is not the last entry's"
            )

    async for entry, entry_head in audit.entries_by_chain(connection):
        if (entry.account_id, entry.asset_symbol) != chain:
            check_head()
            chain, previous, head, is_broken = (
                (entry.account_id, entry.asset_symbol),
                GENESIS_LINK,
                entry_head,
                False,
            )
        if not is_broken and link(previous, entry) != entry.chain_hash:
            broken.append(
                f"entry {entry.id} ({entry.account_id} {entry.asset_symbol}): first broken link"
            )
            is_broken = True
        previous = entry.chain_hash
    check_head()
    rows = await audit.linked_balances_without_entries(connection)
    return broken + [f"{r.account_id} {r.asset_symbol}: a newest link but no entry" for r in rows]
