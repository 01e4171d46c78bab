"""The database `wallet bench` works on: the run's, with a timeout long enough for bulk loads,
VACUUM and verify, its pool closed after each piece of work (each runs in an event loop of its
own)."""

from collections.abc import Awaitable
from typing import TypeVar

from wallet.settings import Settings
from wallet.store.database import Database, create_engine

LONG_TIMEOUT_S = 3600.0  # bulk loads, VACUUM and verify on 10M entries outlast the API's timeout
T = TypeVar("T")


def open_database(settings: Settings) -> Database:
    update = {"database_timeout_s": max(settings.database_timeout_s, LONG_TIMEOUT_S)}
    engine = create_engine(settings.model_copy(update=update))
    return Database(engine, system_shards=settings.system_shards)


async def run_on(database: Database, work: Awaitable[T]) -> T:
    try:
        return await work
    finally:
        await database.close()
