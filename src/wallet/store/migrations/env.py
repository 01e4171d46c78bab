"""Alembic environment: on the connection `wallet migrate` passes, or on WALLET_DATABASE_URL."""

import asyncio

from alembic import context
from sqlalchemy import Connection

from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.tables import metadata


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_on_configured_database() -> None:
    database = Database(create_engine(Settings()))
    try:
        async with database.transaction(is_write=True, is_schema_change=True) as connection:
            await connection.run_sync(run_migrations)
    finally:
        await database.close()


shared_connection = context.config.attributes.get("connection")
if shared_connection is not None:
    run_migrations(shared_connection)
else:
    asyncio.run(run_on_configured_database())
