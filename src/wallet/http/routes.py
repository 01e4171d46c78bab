"""The routes of API.md. They translate HTTP to service calls and back; errors are raised, never
caught here, and mapped in one place (errors.py)."""

from datetime import UTC
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import PlainValidator

from wallet.domain.access import ApiKey, Scope
from wallet.domain.errors import InsufficientScope, InvalidRequest
from wallet.domain.ledger import (
    Action,
    Asset,
    Command,
    Entry,
    Flow,
    HoldStatus,
    Posted,
    SpendOrder,
    Standing,
    User,
)
from wallet.http import schemas
from wallet.http.flows import (
    batch_command,
    command_from,
    hold_body,
    idempotency_key,
    serve_flow,
    transaction_body,
    transfer_command,
)
from wallet.http.gate import PUBLIC, api_key_of, requires
from wallet.service.access import Access
from wallet.service.audit import checkpoint, checkpoint_json
from wallet.service.wallet import PageRequest, Wallet, liabilities_body
from wallet.store.migrate import schema_state

router = APIRouter(prefix="/api/v1")
# A cursor is the position of the last item shown; up to 18 digits stays inside 64 bits, and
# the pattern in the document is exactly what is accepted.
CURSOR_PATTERN = r"^[0-9]{1,18}$"

UserIdPath = Annotated[
    str, Path(min_length=1, max_length=64, pattern=schemas.ID_PATTERN, description="A user's id.")
]
AssetPath = Annotated[
    str,
    Path(
        min_length=1, max_length=32, pattern=schemas.NO_NUL_PATTERN, description="An asset symbol."
    ),
]
KeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=128,
        pattern=schemas.ID_PATTERN,
        description="The idempotency key, if not in the body.",
    ),
]


def _as_sent(documented: Any) -> PlainValidator:
    """A flow route's parameter, documented as `documented` but handed over as the client sent
    it: the framework would validate it first, in its own order and words; serve_flow (flows.py)
    validates it as it does on the lean path (lean.py)."""
    return PlainValidator(lambda value: value, json_schema_input_type=documented)


SentKeyHeader = Annotated[
    Any,
    _as_sent(schemas.IdempotencyKey | None),
    Header(alias="Idempotency-Key", description="The idempotency key, if not in the body."),
]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size.")]
Cursor = Annotated[
    str | None,
    Query(
        pattern=CURSOR_PATTERN,
        description="nextCursor of the previous page (opaque: pass it back as it came).",
    ),
]
Offset = Annotated[
    int | None, Query(ge=0, le=1_000_000, description="For old clients; not with cursor.")
]
AssetFilter = Annotated[
    str | None, Query(min_length=1, max_length=32, pattern=schemas.NO_NUL_PATTERN)
]
HoldIdPath = Annotated[
    str, Path(min_length=1, max_length=64, pattern=schemas.ID_PATTERN, description="A hold's id.")
]
TransactionIdPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=64,
        pattern=schemas.NO_NUL_PATTERN,
        description="A transaction's id.",
    ),
]
At = Annotated[
    schemas.Moment | None,
    Query(description="RFC 3339 with an offset: the balance as it was at that moment."),
]
# What each operation of an atomic batch needs of the key.
BATCH_SCOPES = {
    "topup": Scope.WALLET_CREDIT,
    "bonus": Scope.WALLET_CREDIT,
    "spend": Scope.WALLET_DEBIT,
    "transfer": Scope.WALLET_DEBIT,
}


def _problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers a route can give."""
    schema = {"$ref": "#/components/schemas/Problem"}
    return {
        status: {
            "description": "A problem",
            "content": {"application/problem+json": {"schema": schema}},
        }
        for status in statuses
    }


READ_PROBLEMS = _problems(404, 422, 503)


def _flow_responses(model: Any) -> dict[int | str, dict[str, Any]]:
    replay = {
        "model": model,
        "description": "A replay: this key already applied this request; nothing ran again.",
        "headers": {
            "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
        },
    }
    return {200: replay, **_problems(400, 404, 409, 413, 415, 422, 503)}


def _wallet(request: Request) -> Wallet:
    wallet: Wallet = request.app.state.wallet
    return wallet


def _access(request: Request) -> Access:
    access: Access = request.app.state.access
    return access


def _page(limit: int, cursor: str | None, offset: int | None) -> PageRequest:
    if cursor is not None and offset is not None:
        raise InvalidRequest("cursor and offset cannot be used together", field="offset")
    return PageRequest(limit=limit, before=_decode_cursor(cursor), offset=offset)


def _encode_cursor(seq: int | None) -> str | None:
    return None if seq is None else str(seq)


def _decode_cursor(cursor: str | None) -> int | None:
    return None if cursor is None else int(cursor)  # CURSOR_PATTERN has checked it


def _user_body(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "name": user.name, "createdAt": user.created_at}


def _created_by(request: Request) -> str | None:
    api_key = api_key_of(request.scope)
    return api_key.id if api_key else None


def _standing_body(standing: Standing) -> dict[str, Any]:
    next_expiry = standing.next_expiry
    return {
        "assetSymbol": standing.asset_symbol,
        "balance": standing.balance,
        "paid": standing.paid,
        "free": standing.free,
        "held": standing.held,
        "available": standing.available,
        "nextExpiry": None
        if next_expiry is None
        else {"amount": next_expiry[0], "expiresAt": next_expiry[1]},
    }


def _asset_body(asset: Asset) -> dict[str, Any]:
    return {
        "symbol": asset.symbol,
        "name": asset.name,
        "description": asset.description,
        "spendOrder": asset.spend_order.value,
        "freeLifetimeDays": asset.free_lifetime_days,
        "paidLifetimeDays": asset.paid_lifetime_days,
    }


def _entry_body(entry: Entry) -> dict[str, Any]:
    return {
        "entryId": entry.id,
        "transactionId": entry.transaction_id,
        "account": entry.account_id,
        "assetSymbol": entry.asset_symbol,
        "direction": entry.direction.value,
        "kind": entry.kind.value,
        "amount": entry.amount,
        "balanceAfter": entry.balance_after,
        "paidAfter": entry.paid_after,
        "createdAt": entry.created_at,
        "chainHash": entry.chain_hash,
    }


async def _execute(request: Request, response: Response, command: Command) -> Posted:
    """Run the command; a replay answers 200 with Idempotent-Replayed."""
    posted = await _wallet(request).execute(command)
    if posted.is_replay:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return posted


async def _serve_flow(request: Request, action: Action, body: Any, key: Any) -> Response:
    return await serve_flow(
        _wallet(request), action, body, header_key=key, api_key=api_key_of(request.scope)
    )


@router.get(
    "/health",
    response_model=schemas.Health,
    responses={503: {"model": schemas.Health, "description": "The database cannot be reached."}},
    openapi_extra=PUBLIC,
)
async def health(request: Request) -> Any:
    if await _wallet(request).database.is_reachable():
        return {"status": "ok", "database": "ok"}
    return JSONResponse({"status": "unavailable", "database": "unavailable"}, status_code=503)


@router.get(
    "/health/ready",
    response_model=schemas.Ready,
    responses={503: {"model": schemas.Ready, "description": "Not ready; `reason` says why."}},
    response_model_exclude_none=True,
    openapi_extra=PUBLIC,
)
async def ready(request: Request) -> Any:
    """Ready for traffic: the database answers and its schema is at the newest migration."""
    reason = await schema_state(_wallet(request).database)
    if reason is None:
        return {"status": "ready"}
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


@router.get(
    "/assets",
    response_model=list[schemas.AssetOut],
    responses=_problems(503),
    openapi_extra=requires(Scope.WALLET_READ),
)
async def list_assets(request: Request) -> Any:
    return [_asset_body(asset) for asset in await _wallet(request).assets()]


@router.post(
    "/assets",
    status_code=201,
    response_model=schemas.AssetOut,
    responses=_problems(400, 409, 413, 415, 422, 503),
    openapi_extra=requires(Scope.ADMIN),
)
async def create_asset(request: Request, body: schemas.NewAsset) -> Any:
    """A new asset; `409 asset_exists` when the symbol is taken."""
    asset = Asset(
        body.symbol,
        body.name,
        body.description,
        SpendOrder(body.spendOrder),
        body.freeLifetimeDays,
        body.paidLifetimeDays,
    )
    return _asset_body(await _wallet(request).create_asset(asset))


@router.patch(
    "/assets/{symbol}",
    response_model=schemas.AssetOut,
    responses=_problems(400, 404, 413, 415, 422, 503),
    openapi_extra=requires(Scope.ADMIN),
)
async def change_asset(request: Request, symbol: AssetPath, body: schemas.AssetChange) -> Any:
    """Change the fields given; lifetimes apply to credits granted afterwards."""
    changes = {
        _ASSET_FIELDS[name]: value for name, value in body.model_dump(exclude_unset=True).items()
    }
    if "spend_order" in changes:
        changes["spend_order"] = SpendOrder(changes["spend_order"])
    return _asset_body(await _wallet(request).change_asset(symbol=symbol, changes=changes))


_ASSET_FIELDS = {
    "name": "name",
    "description": "description",
    "spendOrder": "spend_order",
    "freeLifetimeDays": "free_lifetime_days",
    "paidLifetimeDays": "paid_lifetime_days",
}


@router.get(
    "/users",
    response_model=schemas.UserPage,
    responses=_problems(422, 503),
    openapi_extra=requires(Scope.WALLET_READ),
)
async def list_users(
    request: Request, limit: Limit = 50, cursor: Cursor = None, offset: Offset = None
) -> Any:
    users, next_seq = await _wallet(request).users(page=_page(limit, cursor, offset))
    return {"items": [_user_body(u) for u in users], "nextCursor": _encode_cursor(next_seq)}


@router.post(
    "/users",
    status_code=201,
    response_model=schemas.UserOut,
    responses=_problems(400, 409, 413, 415, 422, 503),
    openapi_extra=requires(Scope.USERS_WRITE),
)
async def create_user(request: Request, body: schemas.NewUser) -> Any:
    user = await _wallet(request).create_user(user_id=body.id, email=body.email, name=body.name)
    return _user_body(user)


@router.get(
    "/users/{userId}",
    response_model=schemas.UserOut,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def get_user(request: Request, userId: UserIdPath) -> Any:
    return _user_body(await _wallet(request).user(user_id=userId))


@router.post(
    "/wallet/topup",
    status_code=201,
    response_model=schemas.TopupTransaction,
    responses=_flow_responses(schemas.TopupTransaction),
    summary="Purchase: treasury → user",
    openapi_extra=requires(Scope.WALLET_CREDIT),
)
async def topup(
    request: Request,
    body: Annotated[Any, _as_sent(schemas.TopupRequest), Body()],
    key: SentKeyHeader = None,
) -> Response:
    return await _serve_flow(request, Action.TOPUP, body, key)


@router.post(
    "/wallet/bonus",
    status_code=201,
    response_model=schemas.BonusTransaction,
    responses=_flow_responses(schemas.BonusTransaction),
    summary="Free credits: bonus pool → user",
    openapi_extra=requires(Scope.WALLET_CREDIT),
)
async def bonus(
    request: Request,
    body: Annotated[Any, _as_sent(schemas.BonusRequest), Body()],
    key: SentKeyHeader = None,
) -> Response:
    return await _serve_flow(request, Action.BONUS, body, key)


@router.post(
    "/wallet/spend",
    status_code=201,
    response_model=schemas.SpendTransaction,
    responses=_flow_responses(schemas.SpendTransaction),
    summary="User → revenue; 422 insufficient_funds when short",
    openapi_extra=requires(Scope.WALLET_DEBIT),
)
async def spend(
    request: Request,
    body: Annotated[Any, _as_sent(schemas.SpendRequest), Body()],
    key: SentKeyHeader = None,
) -> Response:
    return await _serve_flow(request, Action.SPEND, body, key)


@router.post(
    "/wallet/transfer",
    status_code=201,
    response_model=schemas.TransferTransaction,
    responses=_flow_responses(schemas.TransferTransaction),
    summary="User → user; 422 insufficient_funds when the sender is short",
    openapi_extra=requires(Scope.WALLET_DEBIT),
)
async def transfer(
    request: Request, response: Response, body: schemas.TransferRequest, key: KeyHeader = None
) -> Any:
    command = transfer_command(
        body,
        key=idempotency_key(body.idempotencyKey, key),
        created_by=_created_by(request),
    )
    return transaction_body((await _execute(request, response, command)).transaction)


@router.post(
    "/wallet/batch",
    status_code=201,
    response_model=schemas.BatchOut,
    responses=_flow_responses(schemas.BatchOut),
    summary="Up to 100 flows that all apply, in order, or none does",
    description="Operation i's transaction has the idempotency key `<idempotencyKey>:<i>`. "
    "A failure answers with the first failing operation's status and code, and its "
    "`operationIndex`; nothing is recorded. The key needs the scope of every operation.",
    openapi_extra=requires(Scope.WALLET_CREDIT, Scope.WALLET_DEBIT),
)
async def batch(
    request: Request, response: Response, body: schemas.BatchRequest, key: KeyHeader = None
) -> Any:
    api_key = api_key_of(request.scope)
    for index, op in enumerate(body.operations):
        needed = BATCH_SCOPES[op.type]
        if api_key is not None and not api_key.allows(needed):
            raise InsufficientScope(f"operation {index} ({op.type}) needs the scope {needed.value}")
    command = batch_command(
        body, key=idempotency_key(body.idempotencyKey, key), created_by=_created_by(request)
    )
    posted = await _execute(request, response, command)
    return {"transactions": [transaction_body(t) for t in posted.transactions]}


@router.post(
    "/wallet/holds",
    status_code=201,
    response_model=schemas.HoldOut,
    responses=_flow_responses(schemas.HoldOut),
    summary="Reserve part of a balance; 422 insufficient_funds when not available",
    openapi_extra=requires(Scope.WALLET_DEBIT),
)
async def create_hold(
    request: Request, response: Response, body: schemas.HoldRequest, key: KeyHeader = None
) -> Any:
    command = command_from(Action.HOLD, body, header_key=key, created_by=_created_by(request))
    posted = await _execute(request, response, command)
    assert posted.hold is not None
    return hold_body(posted.hold)


@router.post(
    "/wallet/holds/{holdId}/capture",
    status_code=201,
    response_model=schemas.Capture,
    responses=_flow_responses(schemas.Capture),
    summary="Spend (part of) a hold; the rest is released",
    openapi_extra=requires(Scope.WALLET_DEBIT),
)
async def capture_hold(
    request: Request,
    response: Response,
    holdId: HoldIdPath,
    body: schemas.CaptureRequest,
    key: KeyHeader = None,
) -> Any:
    command = Command(
        action=Action.CAPTURE,
        idempotency_key=idempotency_key(body.idempotencyKey, key),
        reference=holdId,
        amount=body.amount,
        note=body.description,
        created_by=_created_by(request),
    )
    posted = await _execute(request, response, command)
    assert posted.hold is not None
    return {"hold": hold_body(posted.hold), "transaction": transaction_body(posted.transaction)}


@router.post(
    "/wallet/holds/{holdId}/release",
    response_model=schemas.HoldOut,
    responses=_problems(400, 404, 409, 413, 415, 422, 503),
    summary="End a hold; nothing moves",
    description="A replay answers 200 too, with Idempotent-Replayed: true.",
    openapi_extra=requires(Scope.WALLET_DEBIT),
)
async def release_hold(
    request: Request,
    response: Response,
    holdId: HoldIdPath,
    body: schemas.ReleaseRequest,
    key: KeyHeader = None,
) -> Any:
    command = Command(
        action=Action.RELEASE,
        idempotency_key=idempotency_key(body.idempotencyKey, key),
        reference=holdId,
        created_by=_created_by(request),
    )
    posted = await _execute(request, response, command)
    assert posted.hold is not None
    return hold_body(posted.hold)


@router.get(
    "/wallet/holds/{holdId}",
    response_model=schemas.HoldOut,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def get_hold(request: Request, holdId: HoldIdPath) -> Any:
    return hold_body(await _wallet(request).hold(hold_id=holdId))


@router.get(
    "/wallet/holds",
    response_model=schemas.HoldPage,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def list_holds(
    request: Request,
    userId: Annotated[
        str | None, Query(min_length=1, max_length=64, pattern=schemas.ID_PATTERN)
    ] = None,
    status: HoldStatus | None = None,
    limit: Limit = 50,
    cursor: Cursor = None,
    offset: Offset = None,
) -> Any:
    items, next_seq = await _wallet(request).holds(
        user_id=userId, status=status, page=_page(limit, cursor, offset)
    )
    return {"items": [hold_body(h) for h in items], "nextCursor": _encode_cursor(next_seq)}


@router.post(
    "/wallet/transactions/{transactionId}/refund",
    status_code=201,
    response_model=schemas.RefundOrReversal,
    responses=_flow_responses(schemas.RefundOrReversal),
    summary="Refund a spend, or reverse a top-up or bonus",
    openapi_extra=requires(Scope.WALLET_REFUND),
)
async def refund(
    request: Request,
    response: Response,
    transactionId: TransactionIdPath,
    body: schemas.RefundRequest,
    key: KeyHeader = None,
) -> Any:
    command = Command(
        action=Action.REFUND,
        idempotency_key=idempotency_key(body.idempotencyKey, key),
        reference=transactionId,
        amount=body.amount,
        note=body.reason,
        created_by=_created_by(request),
    )
    return transaction_body((await _execute(request, response, command)).transaction)


@router.get(
    "/wallet/balance/{userId}/{assetSymbol}",
    response_model=schemas.Balance | schemas.BalanceAt,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def balance(
    request: Request, userId: UserIdPath, assetSymbol: AssetPath, at: At = None
) -> Any:
    if at is not None:
        ((_, amount, paid),) = await _wallet(request).balances_at(
            user_id=userId, at=at, asset_symbol=assetSymbol
        )
        return {
            "userId": userId,
            "assetSymbol": assetSymbol,
            "balance": amount,
            "paid": paid,
            "free": amount - paid,
            "at": at.astimezone(UTC),
        }
    (standing,) = await _wallet(request).standings(user_id=userId, asset_symbol=assetSymbol)
    return {"userId": userId, **_standing_body(standing)}


@router.get(
    "/wallet/balances/{userId}",
    response_model=schemas.Balances | schemas.BalancesAt,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def balances(request: Request, userId: UserIdPath, at: At = None) -> Any:
    if at is not None:
        rows_at = await _wallet(request).balances_at(user_id=userId, at=at)
        return {
            "userId": userId,
            "balances": [
                {"assetSymbol": symbol, "balance": amount, "paid": paid, "free": amount - paid}
                for symbol, amount, paid in rows_at
            ],
            "at": at.astimezone(UTC),
        }
    rows = await _wallet(request).standings(user_id=userId)
    return {"userId": userId, "balances": [_standing_body(s) for s in rows]}


@router.get(
    "/wallet/transactions/{userId}",
    response_model=schemas.TransactionPage,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def transactions(
    request: Request,
    userId: UserIdPath,
    limit: Limit = 50,
    cursor: Cursor = None,
    offset: Offset = None,
    type: Annotated[Flow | None, Query(description="Only this type.")] = None,
    assetSymbol: AssetFilter = None,
    since: Annotated[
        schemas.Moment | None,
        Query(alias="from", description="RFC 3339: created at or after it."),
    ] = None,
    until: Annotated[
        schemas.Moment | None, Query(alias="to", description="RFC 3339: created at or before it.")
    ] = None,
) -> Any:
    items, next_seq = await _wallet(request).history(
        user_id=userId,
        flow=type,
        asset_symbol=assetSymbol,
        since=since,
        until=until,
        page=_page(limit, cursor, offset),
    )
    return {"items": [transaction_body(t) for t in items], "nextCursor": _encode_cursor(next_seq)}


@router.get(
    "/wallet/transactions/{userId}/{transactionId}",
    response_model=schemas.AnyTransactionDetail,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def transaction(
    request: Request,
    userId: UserIdPath,
    transactionId: TransactionIdPath,
) -> Any:
    found, found_entries = await _wallet(request).transaction(
        user_id=userId, transaction_id=transactionId
    )
    return {**transaction_body(found), "entries": [_entry_body(e) for e in found_entries]}


@router.get(
    "/wallet/ledger/{userId}",
    response_model=schemas.EntryPage,
    responses=READ_PROBLEMS,
    openapi_extra=requires(Scope.WALLET_READ),
)
async def ledger(
    request: Request,
    userId: UserIdPath,
    limit: Limit = 50,
    cursor: Cursor = None,
    offset: Offset = None,
    assetSymbol: AssetFilter = None,
) -> Any:
    items, next_seq = await _wallet(request).ledger(
        user_id=userId, asset_symbol=assetSymbol, page=_page(limit, cursor, offset)
    )
    return {"items": [_entry_body(e) for e in items], "nextCursor": _encode_cursor(next_seq)}


@router.get(
    "/ledger/checkpoint",
    response_model=schemas.Checkpoint,
    responses=_problems(503),
    summary="The newest link of every hash chain, to keep outside the database",
    description="`wallet verify --checkpoint FILE` proves that the ledger still extends a "
    "checkpoint kept this way (docs/LEDGER.md).",
    openapi_extra=requires(Scope.ADMIN),
)
async def ledger_checkpoint(request: Request) -> Any:
    return checkpoint_json(await checkpoint(_wallet(request).database))


@router.get(
    "/reports/liabilities",
    response_model=schemas.Liabilities,
    responses=READ_PROBLEMS,
    summary="What the platform owes its users of an asset, and what moved in a period",
    description="`outstanding`: the paid and free credits users hold at `at` (default now). "
    "`period`: the credits each type of transaction moved after `from` (default "
    "1970-01-01T00:00:00Z) and up to `to` (default `at`), so that outstanding at `to` = "
    "outstanding at `from` + issued - spent + refunded - reversed - expired.",
    openapi_extra=requires(Scope.WALLET_READ),
)
async def liabilities(
    request: Request,
    assetSymbol: Annotated[str, Query(min_length=1, max_length=32, pattern=schemas.NO_NUL_PATTERN)],
    at: Annotated[
        schemas.Moment | None,
        Query(description="RFC 3339: what users hold at that moment (default now)."),
    ] = None,
    since: Annotated[
        schemas.Moment | None, Query(alias="from", description="RFC 3339: after it.")
    ] = None,
    until: Annotated[
        schemas.Moment | None, Query(alias="to", description="RFC 3339: at or before it.")
    ] = None,
) -> Any:
    return liabilities_body(
        await _wallet(request).liabilities(
            asset_symbol=assetSymbol, at=at, since=since, until=until
        )
    )


def _key_body(key: ApiKey) -> dict[str, Any]:
    return {
        "keyId": key.id,
        "label": key.label,
        "scopes": sorted(key.scopes),
        "readsPerSecond": key.reads_per_second,
        "writesPerSecond": key.writes_per_second,
        "createdAt": key.created_at,
        "revokedAt": key.revoked_at,
    }


@router.post(
    "/keys",
    status_code=201,
    response_model=schemas.CreatedKey,
    responses=_problems(400, 413, 415, 422, 503),
    openapi_extra=requires(Scope.ADMIN),
)
async def create_key(request: Request, body: schemas.NewKey) -> Any:
    """A new API key; its secret `key` is in this response only."""
    key, secret = await _access(request).create_key(
        label=body.label,
        scopes=frozenset(body.scopes),
        reads_per_second=body.readsPerSecond,
        writes_per_second=body.writesPerSecond,
    )
    body_out = _key_body(key)
    del body_out["revokedAt"]
    return {"keyId": key.id, "key": secret, **body_out}


@router.get(
    "/keys",
    response_model=schemas.KeyPage,
    responses=_problems(422, 503),
    openapi_extra=requires(Scope.ADMIN),
)
async def list_keys(
    request: Request, limit: Limit = 50, cursor: Cursor = None, offset: Offset = None
) -> Any:
    keys, next_seq = await _access(request).keys(page=_page(limit, cursor, offset))
    return {"items": [_key_body(k) for k in keys], "nextCursor": _encode_cursor(next_seq)}


@router.delete(
    "/keys/{keyId}",
    status_code=204,
    responses=_problems(404, 422, 503),
    openapi_extra=requires(Scope.ADMIN),
)
async def revoke_key(
    request: Request,
    keyId: Annotated[str, Path(min_length=1, max_length=36, pattern=schemas.ID_PATTERN)],
) -> Response:
    """Revoke a key: within 2 seconds every worker refuses it."""
    await _access(request).revoke_key(key_id=keyId)
    return Response(status_code=204)
