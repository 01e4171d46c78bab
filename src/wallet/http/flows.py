"""The three flow endpoints' shared translation: request body to command, posted transaction to
response body. Both the framework routes and the lean path (lean.py) use it."""

from typing import Any

from wallet.domain.errors import InvalidRequest
from wallet.domain.ledger import Command, Flow, Transaction, UserId
from wallet.http import schemas

FLOW_REQUESTS: dict[Flow, type[schemas.FlowRequest]] = {
    Flow.TOPUP: schemas.TopupRequest,
    Flow.BONUS: schemas.BonusRequest,
    Flow.SPEND: schemas.SpendRequest,
}
FREE_TEXT_FIELD = {Flow.TOPUP: "metadata", Flow.BONUS: "reason", Flow.SPEND: "description"}


def command_from(
    flow: Flow, body: schemas.FlowRequest, *, header_key: str | None, created_by: str | None
) -> Command:
    """The command a validated request asks for, made with the API key `created_by`."""
    return Command(
        flow=flow,
        user_id=UserId(body.userId),
        asset_symbol=body.assetSymbol,
        amount=body.amount,
        idempotency_key=_idempotency_key(body.idempotencyKey, header_key),
        note=_note(body),
        metadata=body.metadata if isinstance(body, schemas.TopupRequest) else None,
        created_by=created_by,
    )


def _note(body: schemas.FlowRequest) -> str | None:
    if isinstance(body, schemas.BonusRequest):
        return body.reason
    if isinstance(body, schemas.SpendRequest):
        return body.description
    return None


def _idempotency_key(in_body: str | None, in_header: str | None) -> str:
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
    free_text = transaction.metadata if transaction.flow is Flow.TOPUP else transaction.note
    return {
        "transactionId": transaction.id,
        "type": transaction.flow.value,
        "status": "completed",
        "userId": transaction.user_id,
        "assetSymbol": transaction.asset_symbol,
        "amount": transaction.amount,
        "balanceAfter": transaction.balance_after,
        "idempotencyKey": transaction.idempotency_key,
        "createdBy": transaction.created_by,
        "createdAt": transaction.created_at,
        FREE_TEXT_FIELD[transaction.flow]: free_text,
    }
