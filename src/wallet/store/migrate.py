"""Brings the schema to the newest Alembic revision; migrations are the only way it is made."""

from functools import cache

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from wallet.domain.errors import WalletError
from wallet.store.database import Database


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", "wallet.store:migrations")
    config.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(rev)s_%%(slug)s")
    return config


async def migrate(database: Database) -> tuple[str | None, str]:
    """Apply every migration not yet applied; the revisions before and after."""
    async with database.transaction(is_write=True, is_schema_change=True) as connection:
        return await connection.run_sync(_upgrade)


def _upgrade(connection: Connection) -> tuple[str | None, str]:
    before = MigrationContext.configure(connection).get_current_revision()
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return before, head_revision()


@cache
def head_revision() -> str:
    """The newest migration this code ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def schema_state(database: Database) -> str | None:
    """None when the database answers and its schema is at the newest migration; else why not."""
    try:
        async with database.transaction(is_write=False) as connection:
            revision = await connection.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    except WalletError:
        return "the database cannot be reached"
    head = head_revision()
    if revision != head:
        return f"the schema is at revision {revision}, not {head}: run `wallet migrate`"
    return None
