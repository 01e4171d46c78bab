"""Translation between request bodies and commands, and from what the ledger made to response
bodies; and the one handling of a flow request (top-up, bonus, spend), which both ways of
serving the flows call: the lean path (lean.py) and the framework routes."""

from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response

from wallet.domain.access import ApiKey
from wallet.domain.errors import InvalidRequest
from wallet.domain.ledger import Action, Command, Flow, Hold, Transaction, UserId
from wallet.http import schemas
from wallet.http.errors import validation_problem
from wallet.service.wallet import Wallet

FLOW_REQUESTS: dict[Action, type[schemas.FlowRequest]] = {
    Action.TOPUP: schemas.TopupRequest,
    Action.BONUS: schemas.BonusRequest,
    Action.SPEND: schemas.SpendRequest,
}
KEY_ADAPTER: TypeAdapter[str] = TypeAdapter(schemas.IdempotencyKey)
BATCH_ACTIONS = {
    "topup": Action.TOPUP,
    "bonus": Action.BONUS,
    "spend": Action.SPEND,
    "transfer": Action.TRANSFER,
}


async def serve_flow(
    wallet: Wallet,
    action: Action,
    payload: Any,
    *,
    header_key: str | None,
    api_key: ApiKey | None,
) -> Response:
    """The answer to a flow request whose body decoded to `payload`: the transaction (201, or 200
    for a replay) or a 422 naming every invalid field of the body and the Idempotency-Key header.
    Domain errors are raised, for the one table in errors.py."""
    details: list[Any] = []
    try:
        request = FLOW_REQUESTS[action].model_validate(payload)
    except ValidationError as error:
        details += [{**d, "loc": ("body", *d["loc"])} for d in error.errors()]
    if header_key is not None:
        try:
            KEY_ADAPTER.validate_python(header_key)
        except ValidationError as error:
            details += [{**d, "loc": ("header", "Idempotency-Key")} for d in error.errors()]
    if details:
        return validation_problem(details)
    command = command_from(
        action, request, header_key=header_key, created_by=api_key.id if api_key else None
    )
    posted = await wallet.execute(command)
    content = orjson.dumps(transaction_body(posted.transaction), option=orjson.OPT_UTC_Z)
    if posted.is_replay:
        return Response(content, 200, {"Idempotent-Replayed": "true"}, "application/json")
    return Response(content, 201, media_type="application/json")


def command_from(
    action: Action, body: schemas.FlowRequest, *, header_key: str | None, created_by: str | None
) -> Command:
    """The command a validated flow request asks for, made with the API key `created_by`."""
    return Command(
        action=action,
        user_id=UserId(body.userId),
        asset_symbol=body.assetSymbol,
        amount=body.amount,
        idempotency_key=idempotency_key(body.idempotencyKey, header_key),
        note=_note(body),
        metadata=body.metadata if isinstance(body, schemas.TopupRequest) else None,
        expires_in_s=body.expiresInSeconds if isinstance(body, schemas.HoldRequest) else None,
        created_by=created_by,
        **_credit_expiry(body),
    )


def transfer_command(
    body: schemas.TransferRequest | schemas.BatchTransfer, *, key: str, created_by: str | None
) -> Command:
    if body.fromUserId == body.toUserId:
        raise InvalidRequest("a transfer needs two different users", field="toUserId")
    return Command(
        action=Action.TRANSFER,
        user_id=UserId(body.fromUserId),
        to_user_id=UserId(body.toUserId),
        asset_symbol=body.assetSymbol,
        amount=body.amount,
        idempotency_key=key,
        note=body.description,
        created_by=created_by,
    )


def batch_command(body: schemas.BatchRequest, *, key: str, created_by: str | None) -> Command:
    """One command whose operations apply together or not at all; each operation's own key is
    given by the engine (`<key>:<i>`)."""
    operations = []
    for index, op in enumerate(body.operations):
        if isinstance(op, schemas.BatchTransfer):
            try:
                operations.append(transfer_command(op, key="", created_by=created_by))
            except InvalidRequest as error:
                error.field = f"operations.{index}.toUserId"
                raise
            continue
        operations.append(
            Command(
                action=BATCH_ACTIONS[op.type],
                user_id=UserId(op.userId),
                asset_symbol=op.assetSymbol,
                amount=op.amount,
                idempotency_key="",
                note=op.description if isinstance(op, schemas.BatchSpend) else _note(op),
                metadata=op.metadata if isinstance(op, schemas.BatchTopup) else None,
                created_by=created_by,
                **_credit_expiry(op),
            )
        )
    return Command(
        action=Action.BATCH,
        idempotency_key=key,
        operations=tuple(operations),
        created_by=created_by,
    )


def _credit_expiry(body: Any) -> dict[str, Any]:
    """A bonus's expiry, as the command's fields."""
    if isinstance(body, schemas.CreditExpiry):
        return {
            "credit_expires_in_days": body.expiresInDays,
            "credit_expires_at": body.expiresAt,
        }
    return {}


def _note(body: Any) -> str | None:
    if isinstance(body, schemas.BonusRequest | schemas.BatchBonus):
        return body.reason
    if isinstance(body, schemas.SpendRequest | schemas.HoldRequest):
        return body.description
    return None


def idempotency_key(in_body: str | None, in_header: str | None) -> str:
    if in_body is not None and in_header is not None and in_body != in_header:
        raise InvalidRequest(
            "the Idempotency-Key header and the idempotencyKey field differ", field="idempotencyKey"
        )
    key = in_body or in_header
    if key is None:
        raise InvalidRequest("an idempotency key is required", field="idempotencyKey")
    return key


def transaction_body(transaction: Transaction) -> dict[str, Any]:
    """The transaction as the API shows it, its fields in the order of the response models, so
    both HTTP paths and the reads give one order."""
    body: dict[str, Any] = {
        "transactionId": transaction.id,
        "type": transaction.flow.value,
        "status": "completed",
        "userId": transaction.user_id,
        "assetSymbol": transaction.asset_symbol,
        "amount": transaction.amount,
        "paidAmount": transaction.paid_amount,
        "freeAmount": transaction.free_amount,
        "balanceAfter": transaction.balance_after,
        "idempotencyKey": transaction.idempotency_key,
        "createdBy": transaction.created_by,
        "createdAt": transaction.created_at,
    }
    match transaction.flow:
        case Flow.TOPUP:
            body["metadata"] = transaction.metadata
        case Flow.BONUS:
            body["reason"] = transaction.note
        case Flow.SPEND:
            body["description"] = transaction.note
            body["holdId"] = transaction.hold_id
        case Flow.TRANSFER:
            body["toUserId"] = transaction.to_user_id
            body["description"] = transaction.note
            return body
        case Flow.REFUND | Flow.REVERSAL:
            body["refundOf"] = transaction.refund_of
            body["reason"] = transaction.note
            return body
        case Flow.EXPIRY:
            return body
    body["refundedAmount"] = transaction.refunded_amount
    body["refunds"] = list(transaction.refunds)
    return body


def hold_body(hold: Hold) -> dict[str, Any]:
    return {
        "holdId": hold.id,
        "userId": hold.user_id,
        "assetSymbol": hold.asset_symbol,
        "amount": hold.amount,
        "capturedAmount": hold.captured_amount,
        "status": hold.status.value,
        "expiresAt": hold.expires_at,
        "createdAt": hold.created_at,
        "endedAt": hold.ended_at,
        "description": hold.description,
        "createdBy": hold.created_by,
    }
