"""`wallet seed`: the asset types, system accounts and demo users of the API contract. Opening
balances go through the ledger with fixed idempotency keys, so seeding twice changes nothing."""

from datetime import UTC, datetime

from wallet.domain.errors import WalletError
from wallet.domain.ledger import Action, Asset, Command, SystemAccount, UserId
from wallet.service.posting import post
from wallet.store import queries
from wallet.store.database import Database

ASSETS = (
    Asset("GOLD_COINS", "Gold Coins", "The main in-game currency."),
    Asset("DIAMONDS", "Diamonds", "The premium currency."),
    Asset(
        "LOYALTY_POINTS",
        "Loyalty Points",
        "Points earned by playing and buying.",
        free_lifetime_days=365,
    ),
)
SYSTEM_ACCOUNTS: dict[str, str] = {
    SystemAccount.TREASURY: "Treasury",
    SystemAccount.BONUS_POOL: "Bonus pool",
    SystemAccount.REVENUE: "Revenue",
}
ALICE = UserId("550e8400-e29b-41d4-a716-446655440000")
BOB = UserId("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
USERS = ((ALICE, "alice@example.com", "Alice"), (BOB, "bob@example.com", "Bob"))
OPENING_BALANCES = {"GOLD_COINS": 1000, "DIAMONDS": 10, "LOYALTY_POINTS": 500}


async def seed(database: Database) -> None:
    """Create whatever of the seed data is missing."""
    created_at = datetime.now(UTC)
    async with database.transaction(is_write=True) as connection:
        await queries.insert_assets(connection, ASSETS)
        await queries.insert_system_accounts(connection, SYSTEM_ACCOUNTS, created_at=created_at)
        for user_id, email, name in USERS:
            await queries.insert_user(
                connection, user_id=user_id, email=email, name=name, created_at=created_at
            )
    outcomes = await post(
        database,
        [
            Command(
                action=Action.TOPUP,
                user_id=user_id,
                asset_symbol=symbol,
                amount=amount,
                idempotency_key=f"seed:{user_id}:{symbol}",
            )
            for user_id, _, _ in USERS
            for symbol, amount in OPENING_BALANCES.items()
        ],
    )
    for outcome in outcomes:
        if isinstance(outcome, WalletError):
            raise outcome
