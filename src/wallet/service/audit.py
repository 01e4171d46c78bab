"""`wallet verify`: recomputes every balance from the ledger and checks every invariant."""

from dataclasses import dataclass, field

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
    ]
