"""Brings the schema to the newest Alembic revision; migrations are the only way it is made."""

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection

from wallet.store.database import Database


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "wallet.store:migrations")
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    return config


async def migrate(database: Database) -> None:
    """Apply every migration not yet applied."""
    async with database.transaction(is_write=True) as connection:
        await connection.run_sync(_upgrade)


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
