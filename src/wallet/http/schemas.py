"""Request and response bodies of the HTTP contract. Bounds are checked here, at the edge, so
nothing malformed reaches the database."""

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    MISSING,
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

from wallet.domain.access import Scope
from wallet.domain.ledger import MAX_AMOUNT, MAX_HOLD_S, SYSTEM_PREFIX

ID_PATTERN = r"^[A-Za-z0-9_.:-]+$"
# PostgreSQL text cannot hold NUL, so every other string refuses it at the edge.
NO_NUL_PATTERN = r"^[^\x00]*$"
MAX_METADATA_BYTES = 4096
# An address is stored to be shown, never sent to: any local part and domain without '@',
# white space or NUL. The schema carries this pattern, so what it admits is exactly what is
# accepted (special-use domains such as example.test included). White space is spelled out (it
# is Unicode's White_Space, the validator's `\s`): `\s` of the document's ECMA 262 patterns is
# another set (it has U+FEFF and lacks U+0085).
WHITE_SPACE = r"\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
EMAIL_PATTERN = rf"^[^@{WHITE_SPACE}\x00]{{1,64}}@[^@{WHITE_SPACE}\x00]{{1,255}}$"


# RFC 3339's date-time (section 5.6), `T` and `Z` in either case; no leap second.
MOMENT_PATTERN = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,6})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


def _moment(value: object) -> object:
    """An RFC 3339 date-time as a UTC datetime; nothing else (no Unix times, no space for `T`)."""
    if not isinstance(value, str) or not re.fullmatch(MOMENT_PATTERN, value):
        raise ValueError("must be an RFC 3339 date-time such as 2026-12-01T10:00:00Z")
    try:
        return datetime.fromisoformat(value.upper()).astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            "must be a real moment from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"
        ) from None


def _not_system(value: str) -> str:
    if value.startswith(SYSTEM_PREFIX):
        raise ValueError(f"ids beginning with {SYSTEM_PREFIX!r} name system accounts")
    return value


def _small_metadata(value: dict[str, str]) -> dict[str, str]:
    if len(json.dumps(value, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    return value


UserIdText = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=ID_PATTERN)]
# The document states the system prefix rule in the pattern itself (a look-ahead, which JSON
# Schema's ECMA 262 patterns have and the validator's regex engine has not: it checks the prefix
# in _not_system), so that the pattern shown is exactly what is accepted.
NEW_USER_ID_PATTERN = rf"^(?!{SYSTEM_PREFIX}){ID_PATTERN[1:]}"
NewUserId = Annotated[
    UserIdText,
    AfterValidator(_not_system),
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": 64, "pattern": NEW_USER_ID_PATTERN}
    ),
]
Moment = Annotated[
    datetime,
    BeforeValidator(_moment),
    WithJsonSchema({"type": "string", "format": "date-time", "pattern": MOMENT_PATTERN}),
]
IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=ID_PATTERN)]
AssetSymbol = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=NO_NUL_PATTERN)]
Amount = Annotated[int, Field(strict=True, ge=1, le=MAX_AMOUNT, description="Smallest units.")]
FreeText = Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL_PATTERN)]
MetadataText = Annotated[str, StringConstraints(pattern=NO_NUL_PATTERN)]
# Stated as propertyNames and additionalProperties: the patternProperties the framework would
# write leave a key with NUL to "anything goes", which the service refuses.
Metadata = Annotated[
    dict[MetadataText, MetadataText],
    AfterValidator(_small_metadata),
    WithJsonSchema(
        {
            "type": "object",
            "propertyNames": {"pattern": NO_NUL_PATTERN},
            "additionalProperties": {"type": "string", "pattern": NO_NUL_PATTERN},
        }
    ),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FlowRequest(Strict):
    userId: UserIdText
    assetSymbol: AssetSymbol
    amount: Amount
    idempotencyKey: IdempotencyKey | None = Field(
        default=None,
        description="Or the Idempotency-Key header; if both are given they must match.",
    )


class TopupRequest(FlowRequest):
    metadata: Metadata | None = Field(
        default=None, description="String keys and values, at most 4 KiB."
    )


LifetimeDays = Annotated[int, Field(strict=True, ge=1, le=3650)]


class CreditExpiry(Strict):
    expiresInDays: LifetimeDays | None = Field(
        default=None, description="The credits expire this many days from now."
    )
    expiresAt: Moment | None = Field(
        default=None,
        description="The credits expire at this moment (in the future). Without it or "
        "expiresInDays, the asset's lifetime for free credits applies.",
    )

    @field_validator("expiresAt")
    @classmethod
    def _one_expiry(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is not None and info.data.get("expiresInDays") is not None:
            raise ValueError("give expiresInDays or expiresAt, not both")
        return value


class BonusRequest(FlowRequest, CreditExpiry):
    reason: FreeText | None = None


class SpendRequest(FlowRequest):
    description: FreeText | None = None


class TransferRequest(Strict):
    fromUserId: UserIdText
    toUserId: UserIdText
    assetSymbol: AssetSymbol
    amount: Amount
    idempotencyKey: IdempotencyKey | None = Field(
        default=None,
        description="Or the Idempotency-Key header; if both are given they must match.",
    )
    description: FreeText | None = None


class HoldRequest(FlowRequest):
    expiresInSeconds: Annotated[int, Field(strict=True, ge=1, le=MAX_HOLD_S)] = Field(
        default=900, description="How long the hold lasts unless captured or released."
    )
    description: FreeText | None = None


class KeyedRequest(Strict):
    idempotencyKey: IdempotencyKey | None = Field(
        default=None,
        description="Or the Idempotency-Key header; if both are given they must match.",
    )


class CaptureRequest(KeyedRequest):
    amount: Amount | None = Field(default=None, description="Default: the hold's whole amount.")
    description: FreeText | None = None


class ReleaseRequest(KeyedRequest):
    pass


class RefundRequest(KeyedRequest):
    amount: Amount | None = Field(default=None, description="Default: what is left to refund.")
    reason: FreeText | None = None


class BatchTopup(Strict):
    type: Literal["topup"]
    userId: UserIdText
    assetSymbol: AssetSymbol
    amount: Amount
    metadata: Metadata | None = None


class BatchBonus(CreditExpiry):
    type: Literal["bonus"]
    userId: UserIdText
    assetSymbol: AssetSymbol
    amount: Amount
    reason: FreeText | None = None


class BatchSpend(Strict):
    type: Literal["spend"]
    userId: UserIdText
    assetSymbol: AssetSymbol
    amount: Amount
    description: FreeText | None = None


class BatchTransfer(Strict):
    type: Literal["transfer"]
    fromUserId: UserIdText
    toUserId: UserIdText
    assetSymbol: AssetSymbol
    amount: Amount
    description: FreeText | None = None


BatchOperation = Annotated[
    BatchTopup | BatchBonus | BatchSpend | BatchTransfer, Field(discriminator="type")
]


class BatchRequest(KeyedRequest):
    operations: list[BatchOperation] = Field(min_length=1, max_length=100)


class NewUser(Strict):
    id: NewUserId | None = Field(default=None, description="Made by the service when absent.")
    email: Annotated[str, StringConstraints(max_length=320, pattern=EMAIL_PATTERN)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=NO_NUL_PATTERN)]


class UserOut(BaseModel):
    id: str
    email: str
    name: str
    createdAt: datetime


SpendOrderName = Literal["free_first", "paid_first"]
AssetName = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=NO_NUL_PATTERN)]


class NewAsset(Strict):
    symbol: Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=ID_PATTERN)]
    name: AssetName
    description: FreeText = ""
    spendOrder: SpendOrderName = "free_first"
    freeLifetimeDays: LifetimeDays | None = Field(
        default=None, description="Free credits granted without an expiry expire after it."
    )
    paidLifetimeDays: LifetimeDays | None = Field(
        default=None, description="Paid credits expire after it; by default they never do."
    )


class AssetChange(Strict):
    """Only the fields given change; a lifetime of null means none."""

    name: AssetName | MISSING = MISSING
    description: FreeText | MISSING = MISSING
    spendOrder: SpendOrderName | MISSING = MISSING
    freeLifetimeDays: LifetimeDays | MISSING | None = MISSING
    paidLifetimeDays: LifetimeDays | MISSING | None = MISSING


class AssetOut(BaseModel):
    symbol: str
    name: str
    description: str
    spendOrder: SpendOrderName
    freeLifetimeDays: int | None
    paidLifetimeDays: int | None


class TransactionBase(BaseModel):
    transactionId: str
    type: Literal["topup", "bonus", "spend", "transfer", "refund", "reversal", "expiry"]
    status: Literal["completed"]
    userId: str
    assetSymbol: str
    amount: int
    paidAmount: int = Field(description="How much of `amount` is paid credits.")
    freeAmount: int = Field(description="How much of `amount` is free credits.")
    balanceAfter: int = Field(
        description="The balance of the asset right after this transaction of the user whose "
        "list it is (a transfer's sender in the transfer's own response)."
    )
    idempotencyKey: str
    createdBy: str | None = Field(
        description="The id of the API key that made it; null when auth was disabled, and on "
        "transactions older than API keys."
    )
    createdAt: datetime


RefundedAmount = Annotated[int, Field(description="The sum of its refunds or reversals so far.")]
Refunds = Annotated[
    list[str], Field(description="The ids of its refunds or reversals, oldest first.")
]


class TopupTransaction(TransactionBase):
    type: Literal["topup"]
    metadata: dict[str, str] | None
    refundedAmount: RefundedAmount
    refunds: Refunds


class BonusTransaction(TransactionBase):
    type: Literal["bonus"]
    reason: str | None
    refundedAmount: RefundedAmount
    refunds: Refunds


class SpendTransaction(TransactionBase):
    type: Literal["spend"]
    description: str | None
    holdId: str | None = Field(description="The hold this spend captured, if any.")
    refundedAmount: RefundedAmount
    refunds: Refunds


class TransferTransaction(TransactionBase):
    type: Literal["transfer"]
    toUserId: str = Field(description="The receiver; `userId` is the sender.")
    description: str | None


class RefundTransaction(TransactionBase):
    type: Literal["refund"]
    refundOf: str = Field(description="The spend it gives back.")
    reason: str | None


class ReversalTransaction(TransactionBase):
    type: Literal["reversal"]
    refundOf: str = Field(description="The top-up or bonus it takes back.")
    reason: str | None


class ExpiryTransaction(TransactionBase):
    """Credits past their expiry, moved out by the service: free to system:bonus_pool, paid to
    system:revenue."""

    type: Literal["expiry"]


TRANSACTION_MODELS: tuple[type[TransactionBase], ...] = (
    TopupTransaction,
    BonusTransaction,
    SpendTransaction,
    TransferTransaction,
    RefundTransaction,
    ReversalTransaction,
    ExpiryTransaction,
)
AnyTransaction = Annotated[
    TopupTransaction
    | BonusTransaction
    | SpendTransaction
    | TransferTransaction
    | RefundTransaction
    | ReversalTransaction
    | ExpiryTransaction,
    Field(discriminator="type"),
]


class EntryOut(BaseModel):
    entryId: str
    transactionId: str
    account: str
    assetSymbol: str
    direction: Literal["debit", "credit"]
    kind: Literal["paid", "free"]
    amount: int
    balanceAfter: int
    paidAfter: int = Field(description="The paid part of the account's balance after it.")
    createdAt: datetime
    chainHash: str = Field(
        description="This entry's link in its account's chain (docs/LEDGER.md, version 2)."
    )


Entries = Annotated[list[EntryOut], Field(description="Both sides, in the order written.")]


class TopupDetail(TopupTransaction):
    entries: Entries


class BonusDetail(BonusTransaction):
    entries: Entries


class SpendDetail(SpendTransaction):
    entries: Entries


class TransferDetail(TransferTransaction):
    entries: Entries


class RefundDetail(RefundTransaction):
    entries: Entries


class ReversalDetail(ReversalTransaction):
    entries: Entries


class ExpiryDetail(ExpiryTransaction):
    entries: Entries


AnyTransactionDetail = Annotated[
    TopupDetail
    | BonusDetail
    | SpendDetail
    | TransferDetail
    | RefundDetail
    | ReversalDetail
    | ExpiryDetail,
    Field(discriminator="type"),
]


RefundOrReversal = Annotated[RefundTransaction | ReversalTransaction, Field(discriminator="type")]


class HoldOut(BaseModel):
    holdId: str
    userId: str
    assetSymbol: str
    amount: int
    capturedAmount: int
    status: Literal["held", "captured", "released", "expired"]
    expiresAt: datetime
    createdAt: datetime
    endedAt: datetime | None
    description: str | None
    createdBy: str | None


class Capture(BaseModel):
    hold: HoldOut
    transaction: SpendTransaction


class BatchOut(BaseModel):
    transactions: list[AnyTransaction]


class HoldPage(BaseModel):
    items: list[HoldOut]
    nextCursor: str | None


class ChainHead(BaseModel):
    account: str
    assetSymbol: str
    shard: int = Field(
        description="The balance row: a system account has several per asset, each its own "
        "chain; users 0."
    )
    chainHash: str
    entries: int = Field(description="How many entries the chain has; chainHash is the last's.")


class Checkpoint(BaseModel):
    at: datetime
    chains: list[ChainHead]


class UserPage(BaseModel):
    items: list[UserOut]
    nextCursor: str | None


class TransactionPage(BaseModel):
    items: list[AnyTransaction]
    nextCursor: str | None


class EntryPage(BaseModel):
    items: list[EntryOut]
    nextCursor: str | None


class NextExpiry(BaseModel):
    amount: int
    expiresAt: datetime


class AssetBalance(BaseModel):
    assetSymbol: str
    balance: int = Field(description="paid + free.")
    paid: int
    free: int
    held: int = Field(description="The sum of the user's active holds of the asset.")
    available: int = Field(
        description="balance - held - credits past their expiry not yet moved out: what a "
        "spend, transfer or hold can use."
    )
    nextExpiry: NextExpiry | None = Field(description="The credits that expire next, if any.")


class Balance(BaseModel):
    userId: str
    assetSymbol: str
    balance: int = Field(description="paid + free.")
    paid: int
    free: int
    held: int = Field(description="The sum of the user's active holds of the asset.")
    available: int = Field(
        description="balance - held - credits past their expiry not yet moved out."
    )
    nextExpiry: NextExpiry | None = Field(description="The credits that expire next, if any.")


class AssetBalanceAt(BaseModel):
    assetSymbol: str
    balance: int = Field(description="The balance right after the last entry at or before `at`.")
    paid: int
    free: int


class BalanceAt(BaseModel):
    userId: str
    assetSymbol: str
    balance: int = Field(description="The balance right after the last entry at or before `at`.")
    paid: int
    free: int
    at: datetime


class Balances(BaseModel):
    userId: str
    balances: list[AssetBalance]


class BalancesAt(BaseModel):
    userId: str
    balances: list[AssetBalanceAt]
    at: datetime


class Outstanding(BaseModel):
    paid: int
    free: int


class LiabilityPeriod(BaseModel):
    from_: datetime = Field(alias="from")
    to: datetime
    issuedPaid: int
    issuedFree: int
    spentPaid: int
    spentFree: int
    refundedPaid: int
    refundedFree: int
    reversedPaid: int
    reversedFree: int
    expiredPaid: int
    expiredFree: int


class Liabilities(BaseModel):
    assetSymbol: str
    at: datetime
    outstanding: Outstanding = Field(description="What the platform owes its users at `at`.")
    period: LiabilityPeriod = Field(description="What moved after `from`, up to `to`.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    database: Literal["ok", "unavailable"]


class FieldError(BaseModel):
    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem; `code` is stable and meant for clients to branch on."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    requestId: str | None = Field(description="The request's X-Request-ID.")
    errors: list[FieldError] | None = Field(default=None, description="With validation_error only.")
    operationIndex: int | None = Field(
        default=None, description="In an atomic batch's failure: the operation that failed."
    )


class Ready(BaseModel):
    status: Literal["ready", "unavailable"]
    reason: str | None = Field(default=None, description="Why the service is not ready.")


KeyLabel = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=NO_NUL_PATTERN)]
Budget = Annotated[
    int, Field(strict=True, ge=0, le=1_000_000, description="Per second; 0: unlimited.")
]


class NewKey(Strict):
    label: KeyLabel
    scopes: list[Scope] = Field(min_length=1, max_length=len(Scope))
    readsPerSecond: Budget | None = Field(default=None, description="Default: the service's.")
    writesPerSecond: Budget | None = Field(default=None, description="Default: the service's.")


class KeyOut(BaseModel):
    keyId: str
    label: str
    scopes: list[Scope]
    readsPerSecond: int
    writesPerSecond: int
    createdAt: datetime
    revokedAt: datetime | None


class CreatedKey(BaseModel):
    keyId: str
    key: str = Field(description="The secret: shown in this response only, never again.")
    label: str
    scopes: list[Scope]
    readsPerSecond: int
    writesPerSecond: int
    createdAt: datetime


class KeyPage(BaseModel):
    items: list[KeyOut]
    nextCursor: str | None
