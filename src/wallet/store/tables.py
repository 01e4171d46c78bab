"""The schema. The database enforces the ledger's invariants too: amounts are positive, user
balances never negative, each transaction has one debit and one credit entry, keys are unique.
Each entry carries its hash-chain link; each balance row, the newest link of its chain."""

import sqlalchemy as sa

from wallet.domain.ledger import GENESIS_LINK

metadata = sa.MetaData(
    naming_convention={
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only autoincrements an INTEGER PRIMARY KEY; it is 64-bit there anyway.
Sequence = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Timestamp = sa.DateTime(timezone=True)
MAX_AMOUNT_SQL = "1000000000000000"

assets = sa.Table(
    "assets",
    metadata,
    sa.Column("symbol", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("description", sa.String(500), nullable=False),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("is_system", sa.Boolean(), nullable=False),
    sa.Column("email", sa.String(320)),
    sa.Column("name", sa.String(500), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.CheckConstraint("length(id) BETWEEN 1 AND 64", name="id_length"),
    sa.CheckConstraint("is_system = (substr(id, 1, 7) = 'system:')", name="system_prefix"),
    sa.CheckConstraint("is_system OR email IS NOT NULL", name="user_has_email"),
)

balances = sa.Table(
    "balances",
    metadata,
    sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), primary_key=True),
    sa.Column("balance", sa.BigInteger(), nullable=False),
    # The link of this account and asset's newest entry (GENESIS_LINK before the first).
    sa.Column("chain_hash", sa.String(64), nullable=False, server_default=GENESIS_LINK),
    sa.CheckConstraint(
        "balance >= 0 OR substr(account_id, 1, 7) = 'system:'", name="user_not_negative"
    ),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    # A key is claimed here first, inside the flow's transaction, so concurrent requests with
    # one key queue on this row. A request the ledger's state refused keeps its claim with the
    # refusal, so a retry gets the same answer; any other failure deletes its claim.
    sa.Column("key", sa.String(128), primary_key=True),
    sa.Column("request_fingerprint", sa.String(64)),
    sa.Column("refusal_code", sa.String(64)),
    sa.Column("refusal_detail", sa.String(500)),
    sa.CheckConstraint(
        "(refusal_code IS NULL) = (request_fingerprint IS NULL)"
        " AND (refusal_code IS NULL) = (refusal_detail IS NULL)",
        name="refusal_complete",
    ),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("label", sa.String(100), nullable=False),
    # SHA-256 of the key, hex; the key itself is never stored.
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("scopes", sa.String(200), nullable=False),  # space-separated
    sa.Column("reads_per_second", sa.Integer(), nullable=False),
    sa.Column("writes_per_second", sa.Integer(), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("revoked_at", Timestamp),
    sa.CheckConstraint("length(key_hash) = 64", name="key_hash_length"),
    sa.CheckConstraint("length(scopes) > 0", name="has_scope"),
    sa.CheckConstraint("reads_per_second >= 0 AND writes_per_second >= 0", name="budgets"),
)

transactions = sa.Table(
    "transactions",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("user_id", sa.String(64), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("balance_after", sa.BigInteger(), nullable=False),
    sa.Column(
        "idempotency_key",
        sa.String(128),
        sa.ForeignKey("idempotency_keys.key"),
        nullable=False,
        unique=True,
    ),
    # Digest of the request, to tell a retry (same request) from a reuse of its key (409).
    sa.Column("request_fingerprint", sa.String(64), nullable=False),
    sa.Column("note", sa.String(500)),
    sa.Column("metadata", sa.JSON()),
    sa.Column("created_at", Timestamp, nullable=False),
    # The API key that made it; null for rows older than keys, and with auth disabled.
    sa.Column("created_by", sa.String(36), sa.ForeignKey("api_keys.id")),
    sa.CheckConstraint("type IN ('topup', 'bonus', 'spend')", name="type"),
    sa.CheckConstraint(f"amount BETWEEN 1 AND {MAX_AMOUNT_SQL}", name="amount_range"),
    sa.CheckConstraint("balance_after >= 0", name="user_not_negative"),
    sa.Index("ix_transactions_user_seq", "user_id", "seq"),
    sa.Index("ix_transactions_user_asset_seq", "user_id", "asset_symbol", "seq"),
)

entries = sa.Table(
    "entries",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("transaction_id", sa.String(36), sa.ForeignKey("transactions.id"), nullable=False),
    sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), nullable=False),
    sa.Column("direction", sa.String(6), nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("balance_after", sa.BigInteger(), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("chain_hash", sa.String(64), nullable=False),
    sa.CheckConstraint("direction IN ('debit', 'credit')", name="direction"),
    sa.CheckConstraint(f"amount BETWEEN 1 AND {MAX_AMOUNT_SQL}", name="amount_range"),
    sa.CheckConstraint(
        "balance_after >= 0 OR substr(account_id, 1, 7) = 'system:'", name="user_not_negative"
    ),
    # One debit and one credit per transaction, no more.
    sa.UniqueConstraint("transaction_id", "direction"),
    sa.Index("ix_entries_account_seq", "account_id", "seq"),
    sa.Index("ix_entries_account_asset_seq", "account_id", "asset_symbol", "seq"),
)
