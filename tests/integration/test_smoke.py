from wallet.domain.ledger import Command, Flow, Posted, UserId
from wallet.service.seed import ALICE
from wallet.service.wallet import Wallet


async def test_spend_lowers_the_balance(wallet: Wallet) -> None:
    posted = await wallet.execute(
        Command(
            flow=Flow.SPEND,
            user_id=UserId(ALICE),
            asset_symbol="GOLD_COINS",
            amount=10,
            idempotency_key="smoke-1",
        )
    )
    assert isinstance(posted, Posted)
    assert posted.transaction.balance_after == 990
    assert await wallet.balance(user_id=ALICE, asset_symbol="GOLD_COINS") == 990
