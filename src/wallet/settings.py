"""Typed settings, read once from the environment (prefix WALLET_) at the edge and passed down."""

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The async driver each plain URL scheme maps to: libpq and hosting panels write postgres:// and
# postgresql://, and sqlite:///FILE is what most tools print.
ASYNC_SCHEMES = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


SYSTEM_SHARDS = 8


class Settings(BaseSettings):
    """Everything the service can be configured with."""

    model_config = SettingsConfigDict(env_prefix="WALLET_", frozen=True)

    database_url: SecretStr = Field(
        default=SecretStr("sqlite+aiosqlite:///wallet.db"),
        description="Database URL: sqlite:///FILE (default wallet.db) or "
        "postgresql://USER:PASSWORD@HOST:PORT/DB (postgres:// and the +asyncpg and +aiosqlite "
        "forms too). Secret: never logged.",
    )
    database_isolation: Literal["read_committed", "serializable"] = Field(
        default="read_committed",
        description="PostgreSQL isolation level of every transaction; serializable is how "
        "CockroachDB and YugabyteDB run, and what the service is tested under too.",
    )
    database_pool_size: int = Field(
        default=20, ge=1, le=500, description="PostgreSQL connections per worker process."
    )
    database_timeout_s: float = Field(
        default=5.0, gt=0, description="Connect, pool-wait and statement timeout in seconds."
    )
    batch_max_size: int = Field(
        default=128,
        ge=1,
        le=1000,
        description="Most flow requests in one transaction; 1 turns group commit off.",
    )
    batch_max_wait_ms: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="Longest a flow request waits for others to share its transaction, in ms.",
    )
    batches_in_flight: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Most batches one worker posts at once on PostgreSQL, each on its own "
        "connection (at most the pool size); SQLite, one writer, posts one at a time.",
    )
    system_shards: int = Field(
        default=SYSTEM_SHARDS,
        ge=1,
        le=1024,
        description="Balance rows per system account and asset that writers spread over, so "
        "concurrent batches do not queue on one row; change it at any time, no migration.",
    )
    lean_flows: bool = Field(
        default=True,
        description="Serve the three flow POSTs on the lean ASGI path (false: through FastAPI).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level of log lines written."
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Worker processes of `wallet serve`; unset: the CPU count on PostgreSQL, "
        "1 on SQLite (one writer).",
    )
    request_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Deadline of one request in seconds; past it the client gets 503 "
        "request_timeout and a retry with the same idempotency key gives the definite answer.",
    )
    auth_disabled: bool = Field(
        default=False,
        description="Turn API key checks off, for local demos only (logged as a warning).",
    )
    default_reads_per_second: int = Field(
        default=1000, ge=0, description="Read budget of a new key, per second; 0: unlimited."
    )
    default_writes_per_second: int = Field(
        default=1000, ge=0, description="Write budget of a new key, per second; 0: unlimited."
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="redis://HOST:PORT/DB shared by every worker and instance for rate limits; "
        "unset: each process keeps its own budgets.",
    )
    metrics_token: SecretStr | None = Field(
        default=None,
        description="When set, GET /metrics needs `Authorization: Bearer <token>`.",
    )

    otel_exporter_otlp_endpoint: str | None = Field(
        default=None,
        validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT",
        description="OpenTelemetry's own variable (no WALLET_ prefix): when set, traces go to "
        "this OTLP/HTTP collector; the other OTEL_* variables apply too.",
    )

    @field_validator("database_url", mode="before")
    @classmethod
    def _async_driver(cls, value: object) -> object:
        """postgres://, postgresql:// and sqlite:/// name the async driver the service uses."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if not isinstance(text, str):
            return value
        scheme, separator, rest = text.partition("://")
        if not separator or scheme not in ASYNC_SCHEMES:
            raise ValueError(
                "must be postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///FILE, "
                f"not a URL of scheme {scheme!r}"
                if separator
                else "must be postgresql://USER:PASSWORD@HOST:PORT/DB or sqlite:///FILE"
            )
        return f"{ASYNC_SCHEMES[scheme]}://{rest}"

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("must be redis://HOST:PORT/DB (or rediss://, unix://)")
        return value

    @property
    def database_backend(self) -> str:
        """`postgresql` or `sqlite`."""
        return self.database_url.get_secret_value().split("+", 1)[0].split(":", 1)[0]
