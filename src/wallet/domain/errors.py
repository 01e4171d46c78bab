"""Domain errors, each with the stable `code` clients branch on."""


class WalletError(Exception):
    """Base of every error the service reports to a client."""

    code = "wallet_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.operation_index: int | None = None  # in an atomic batch, the operation that failed


class UnknownUser(WalletError):
    code = "user_not_found"


class UnknownAsset(WalletError):
    code = "asset_not_found"


class UnknownTransaction(WalletError):
    code = "transaction_not_found"


class UnknownHold(WalletError):
    code = "hold_not_found"


class UserExists(WalletError):
    code = "user_exists"


class AssetExists(WalletError):
    code = "asset_exists"


class IdempotencyKeyReused(WalletError):
    code = "idempotency_key_reused"


class InvalidRequest(WalletError):
    """A request that breaks a rule the schema alone cannot express."""

    code = "validation_error"

    def __init__(self, detail: str, *, field: str) -> None:
        super().__init__(detail)
        self.field = field


class Conflict(WalletError):
    """A write the database refused on a constraint the service did not foresee."""

    code = "conflict"


class DatabaseUnavailable(WalletError):
    code = "database_unavailable"


class NothingExpired(WalletError):
    """The sweeper's expiry found nothing to move: another got there first."""

    code = "nothing_expired"


class Refusal(WalletError):
    """A refusal made by the ledger's state: final, stored under its idempotency key like a
    success, so a retry gets the same answer (`is_replay` then says so)."""

    def __init__(self, detail: str, *, is_replay: bool = False) -> None:
        super().__init__(detail)
        self.is_replay = is_replay


class Unauthenticated(WalletError):
    code = "unauthenticated"


class InsufficientScope(WalletError):
    code = "insufficient_scope"


class UnknownKey(WalletError):
    code = "key_not_found"


class RateLimited(WalletError):
    code = "rate_limited"


class RequestTimeout(WalletError):
    code = "request_timeout"


class InsufficientFunds(Refusal):
    code = "insufficient_funds"


class BalanceLimitExceeded(Refusal):
    code = "balance_limit_exceeded"


class HoldNotActive(Refusal):
    code = "hold_not_active"


class CaptureExceedsHold(Refusal):
    code = "capture_exceeds_hold"


class RefundExceedsOriginal(Refusal):
    code = "refund_exceeds_original"


class NotRefundable(Refusal):
    code = "not_refundable"


REFUSALS: dict[str, type[Refusal]] = {
    refusal.code: refusal
    for refusal in (
        InsufficientFunds,
        BalanceLimitExceeded,
        HoldNotActive,
        CaptureExceedsHold,
        RefundExceedsOriginal,
        NotRefundable,
    )
}
