"""Typed settings, read once from the environment (prefix WALLET_) at the edge and passed down."""

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service can be configured with."""

    model_config = SettingsConfigDict(env_prefix="WALLET_", frozen=True)

    database_url: str = Field(
        default="sqlite+aiosqlite:///wallet.db",
        description="SQLAlchemy URL: sqlite+aiosqlite:///FILE (default) or postgresql+asyncpg://...",
    )
    database_isolation: Literal["read_committed", "serializable"] = Field(
        default="read_committed",
        description="PostgreSQL isolation level of every transaction; serializable is how "
        "CockroachDB and YugabyteDB run, and what the service is tested under too.",
    )
    database_pool_size: int = Field(default=20, ge=1, le=500, description="Connections per worker.")
    database_timeout_s: float = Field(
        default=5.0, gt=0, description="Connect, pool-wait and statement timeout in seconds."
    )
    batch_max_size: int = Field(
        default=128,
        ge=1,
        le=1000,
        description="Most commands in one transaction; 1 turns group commit off.",
    )
    batch_max_wait_ms: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="Longest a command waits for others to share its transaction.",
    )
    lean_flows: bool = Field(
        default=True,
        description="Serve the three flow POSTs on the lean ASGI path (false: through FastAPI).",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error.")
