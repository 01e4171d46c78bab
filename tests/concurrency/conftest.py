"""What the concurrency tests share: the app's settings in both of its modes (each request in
its own transaction, or group commit), and an admin key of that database."""

import pytest
from concurrent_load import GROUP_COMMIT, OWN_TRANSACTIONS

from app_clients import create_key
from wallet.settings import Settings


@pytest.fixture(params=[OWN_TRANSACTIONS, GROUP_COMMIT])
def app_settings(request: pytest.FixtureRequest, postgres_database_url: str) -> Settings:
    if request.param == OWN_TRANSACTIONS:
        return Settings(database_url=postgres_database_url, database_pool_size=30, batch_max_size=1)
    settings = Settings(database_url=postgres_database_url, database_pool_size=30)
    assert settings.batch_max_size > 1, "group commit is the default"
    return settings


@pytest.fixture
async def api_key(app_settings: Settings) -> str:
    """An admin key of the database, unlimited: these tests are about concurrency."""
    return await create_key(app_settings.database_url.get_secret_value())
