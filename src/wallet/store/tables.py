"""The schema. The database enforces the ledger's invariants too: amounts are positive, user
balances (and their paid parts) never negative, each transaction has at most one debit and one
credit entry per kind, its paid and free amounts add up to its amount, keys are unique, refunds
never exceed what they refund, a hold is captured at most once and for at most its amount, no lot
goes below zero. Each entry carries its hash-chain link; each balance row, the newest link of its
chain."""

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
# 128 for a client's key, and ":99" for the transactions of an atomic batch.
KEY_LENGTH = 132
RETURNS = sa.text("type IN ('refund', 'reversal', 'expiry')")
SHARD_RULE = "shard = 0 OR (shard > 0 AND substr(account_id, 1, 7) = 'system:')"

assets = sa.Table(
    "assets",
    metadata,
    sa.Column("symbol", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("description", sa.String(500), nullable=False),
    sa.Column("spend_order", sa.String(10), nullable=False, server_default="free_first"),
    sa.Column("free_lifetime_days", sa.Integer()),
    sa.Column("paid_lifetime_days", sa.Integer()),
    sa.CheckConstraint("spend_order IN ('free_first', 'paid_first')", name="spend_order"),
    sa.CheckConstraint(
        "free_lifetime_days BETWEEN 1 AND 3650 AND paid_lifetime_days BETWEEN 1 AND 3650",
        name="lifetimes",
    ),
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
    # A system account has several rows per asset, so concurrent batches need not queue on one
    # row, and their sum has no 64-bit ceiling; a user has one, shard 0.
    sa.Column("shard", sa.Integer(), primary_key=True, server_default="0"),
    sa.Column("balance", sa.BigInteger(), nullable=False),
    # The link of this row's newest entry (GENESIS_LINK before the first): each row its chain.
    sa.Column("chain_hash", sa.String(64), nullable=False, server_default=GENESIS_LINK),
    # How many entries the chain has: a checkpoint names its newest link by this position.
    sa.Column("entry_count", sa.BigInteger(), nullable=False, server_default="0"),
    # The sum of the holds in status held, expired or not (reads subtract the expired ones).
    sa.Column("held", sa.BigInteger(), nullable=False, server_default="0"),
    # The paid part of the balance (the rest is free), and what its lots hold (credits that expire).
    sa.Column("paid", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("expiring", sa.BigInteger(), nullable=False, server_default="0"),
    sa.CheckConstraint(
        "balance >= 0 OR substr(account_id, 1, 7) = 'system:'", name="user_not_negative"
    ),
    sa.CheckConstraint(
        "(paid BETWEEN 0 AND balance AND expiring BETWEEN 0 AND balance)"
        " OR (substr(account_id, 1, 7) = 'system:' AND expiring = 0)",
        name="user_parts_within_balance",
    ),
    sa.CheckConstraint("entry_count >= 0", name="entry_count_not_negative"),
    sa.CheckConstraint("held >= 0", name="held_not_negative"),
    sa.CheckConstraint(SHARD_RULE, name="shard"),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    # A key is claimed here first, inside the flow's transaction, so concurrent requests with
    # one key queue on this row. A request the ledger's state refused keeps its claim with the
    # refusal, so a retry gets the same answer; any other failure deletes its claim.
    sa.Column("key", sa.String(KEY_LENGTH), primary_key=True),
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
        sa.String(KEY_LENGTH),
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
    sa.Column("to_user_id", sa.String(64), sa.ForeignKey("accounts.id")),  # a transfer's receiver
    sa.Column("hold_id", sa.String(36), sa.ForeignKey("holds.id"), unique=True),  # a capture's
    sa.Column("refund_of", sa.String(36), sa.ForeignKey("transactions.id")),
    sa.Column("refunded_amount", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("paid_amount", sa.BigInteger(), nullable=False),  # of `amount`; the rest is free
    sa.CheckConstraint(
        "type IN ('topup', 'bonus', 'spend', 'transfer', 'refund', 'reversal', 'expiry')",
        name="type",
    ),
    sa.CheckConstraint("paid_amount BETWEEN 0 AND amount", name="paid_within_amount"),
    sa.CheckConstraint(
        "(type <> 'topup' OR paid_amount = amount) AND (type <> 'bonus' OR paid_amount = 0)",
        name="issued_kind",
    ),
    sa.CheckConstraint(f"amount BETWEEN 1 AND {MAX_AMOUNT_SQL}", name="amount_range"),
    sa.CheckConstraint("balance_after >= 0", name="user_not_negative"),
    sa.CheckConstraint(
        "(type = 'transfer') = (to_user_id IS NOT NULL) AND to_user_id <> user_id",
        name="transfer_receiver",
    ),
    sa.CheckConstraint("hold_id IS NULL OR type = 'spend'", name="capture_is_spend"),
    sa.CheckConstraint(
        "(type IN ('refund', 'reversal')) = (refund_of IS NOT NULL)", name="refund_names_original"
    ),
    sa.CheckConstraint(
        "refunded_amount BETWEEN 0 AND amount"
        " AND (refunded_amount = 0 OR type IN ('topup', 'bonus', 'spend'))",
        name="refunded_within_amount",
    ),
    sa.Index("ix_transactions_user_seq", "user_id", "seq"),
    sa.Index("ix_transactions_user_asset_seq", "user_id", "asset_symbol", "seq"),
    sa.Index("ix_transactions_refund_of", "refund_of"),
    # The liability report's period: what refunds, reversals and expiries (the types no system
    # account's balance tells apart) moved of an asset between two moments, index only.
    sa.Index(
        "ix_transactions_returns_asset_created_at",
        "asset_symbol",
        "created_at",
        postgresql_include=["type", "amount", "paid_amount"],
        postgresql_where=RETURNS,
        sqlite_where=RETURNS,
    ),
)

holds = sa.Table(
    "holds",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("user_id", sa.String(64), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("captured_amount", sa.BigInteger(), nullable=False, server_default="0"),
    sa.Column("status", sa.String(8), nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("ended_at", Timestamp),
    sa.Column("description", sa.String(500)),
    sa.Column("created_by", sa.String(36), sa.ForeignKey("api_keys.id")),
    sa.Column(
        "idempotency_key",
        sa.String(KEY_LENGTH),
        sa.ForeignKey("idempotency_keys.key"),
        nullable=False,
        unique=True,
    ),
    sa.Column("request_fingerprint", sa.String(64), nullable=False),
    # The release's key and request (a capture's are on its transaction).
    sa.Column(
        "release_key", sa.String(KEY_LENGTH), sa.ForeignKey("idempotency_keys.key"), unique=True
    ),
    sa.Column("release_fingerprint", sa.String(64)),
    sa.Column("paid_amount", sa.BigInteger(), nullable=False),  # reserved of paid credits
    sa.CheckConstraint(f"amount BETWEEN 1 AND {MAX_AMOUNT_SQL}", name="amount_range"),
    sa.CheckConstraint("paid_amount BETWEEN 0 AND amount", name="paid_within_amount"),
    sa.CheckConstraint("status IN ('held', 'captured', 'released', 'expired')", name="status"),
    sa.CheckConstraint("(status = 'held') = (ended_at IS NULL)", name="ended_when_not_held"),
    sa.CheckConstraint(
        "captured_amount BETWEEN 0 AND amount AND (status = 'captured') = (captured_amount > 0)",
        name="captured_within_amount",
    ),
    sa.CheckConstraint(
        "(status = 'released') = (release_key IS NOT NULL)"
        " AND (release_key IS NULL) = (release_fingerprint IS NULL)",
        name="release_recorded",
    ),
    sa.CheckConstraint("substr(user_id, 1, 7) <> 'system:'", name="user_not_system"),
    sa.Index("ix_holds_user_seq", "user_id", "seq"),
    sa.Index("ix_holds_user_status_seq", "user_id", "status", "seq"),
    sa.Index("ix_holds_status_seq", "status", "seq"),
    # Active holds: what counts in `held`, and what the expiry sweeper looks for.
    sa.Index(
        "ix_holds_held_user_asset",
        "user_id",
        "asset_symbol",
        postgresql_where=sa.text("status = 'held'"),
        sqlite_where=sa.text("status = 'held'"),
    ),
    sa.Index(
        "ix_holds_held_expires_at",
        "expires_at",
        postgresql_where=sa.text("status = 'held'"),
        sqlite_where=sa.text("status = 'held'"),
    ),
)

entries = sa.Table(
    "entries",
    metadata,
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("transaction_id", sa.String(36), sa.ForeignKey("transactions.id"), nullable=False),
    sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), nullable=False),
    sa.Column("shard", sa.Integer(), nullable=False, server_default="0"),  # its balance row's
    sa.Column("direction", sa.String(6), nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.Column("balance_after", sa.BigInteger(), nullable=False),
    sa.Column("created_at", Timestamp, nullable=False),
    sa.Column("chain_hash", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(4), nullable=False),
    sa.Column("paid_after", sa.BigInteger(), nullable=False),  # the account's paid part after it
    sa.CheckConstraint("direction IN ('debit', 'credit')", name="direction"),
    sa.CheckConstraint("kind IN ('paid', 'free')", name="kind"),
    sa.CheckConstraint(SHARD_RULE, name="shard"),
    sa.CheckConstraint(
        "paid_after BETWEEN 0 AND balance_after OR substr(account_id, 1, 7) = 'system:'",
        name="user_paid_within_balance",
    ),
    sa.CheckConstraint(f"amount BETWEEN 1 AND {MAX_AMOUNT_SQL}", name="amount_range"),
    sa.CheckConstraint(
        "balance_after >= 0 OR substr(account_id, 1, 7) = 'system:'", name="user_not_negative"
    ),
    # One debit and one credit of each kind per transaction, no more.
    sa.UniqueConstraint("transaction_id", "kind", "direction"),
    sa.Index("ix_entries_account_seq", "account_id", "seq"),
    sa.Index("ix_entries_account_asset_seq", "account_id", "asset_symbol", "seq"),
    # Balance at a time: one look-up of the newest entry at or before it, per balance row.
    sa.Index(
        "ix_entries_account_asset_shard_created_at",
        "account_id",
        "asset_symbol",
        "shard",
        "created_at",
        "seq",
    ),
)

lots = sa.Table(
    "lots",
    metadata,
    # What remains of a user's credits of one asset and kind that expire at one moment.
    sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id"), primary_key=True),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), primary_key=True),
    sa.Column("kind", sa.String(4), primary_key=True),
    sa.Column("expires_at", Timestamp, primary_key=True),
    sa.Column("remaining", sa.BigInteger(), nullable=False),
    sa.CheckConstraint("kind IN ('paid', 'free')", name="kind"),
    sa.CheckConstraint("remaining >= 0", name="remaining_not_negative"),
    sa.CheckConstraint("substr(account_id, 1, 7) <> 'system:'", name="user_not_system"),
    # The expiry sweeper's: lots past their expiry that still hold credits.
    sa.Index(
        "ix_lots_due",
        "expires_at",
        postgresql_where=sa.text("remaining > 0"),
        sqlite_where=sa.text("remaining > 0"),
    ),
)

lot_moves = sa.Table(
    "lot_moves",
    metadata,
    # What each transaction took from (negative) or gave to (positive) a lot: a refund gives back
    # what its spend took, and `wallet verify` checks lots and expiries against these.
    sa.Column("seq", Sequence, primary_key=True, autoincrement=True),
    sa.Column("transaction_id", sa.String(36), sa.ForeignKey("transactions.id"), nullable=False),
    sa.Column("account_id", sa.String(64), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("asset_symbol", sa.String(32), sa.ForeignKey("assets.symbol"), nullable=False),
    sa.Column("kind", sa.String(4), nullable=False),
    sa.Column("expires_at", Timestamp, nullable=False),
    sa.Column("amount", sa.BigInteger(), nullable=False),
    sa.CheckConstraint("kind IN ('paid', 'free')", name="kind"),
    sa.CheckConstraint(
        f"amount <> 0 AND amount BETWEEN -{MAX_AMOUNT_SQL} AND {MAX_AMOUNT_SQL}",
        name="amount_range",
    ),
    sa.ForeignKeyConstraint(
        ["account_id", "asset_symbol", "kind", "expires_at"],
        ["lots.account_id", "lots.asset_symbol", "lots.kind", "lots.expires_at"],
        name="fk_lot_moves_lot_lots",
    ),
    sa.Index("ix_lot_moves_transaction_id", "transaction_id"),
)
