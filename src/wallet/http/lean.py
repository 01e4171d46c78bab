"""The flow endpoints without the framework's per-request cost.

POST /api/v1/wallet/{topup,bonus,spend} is the hot path: a profile under load showed the
framework's routing, middleware and dependency resolution taking about half of a worker. Here
those three are served as bare ASGI with the same request models, the same translation
(flows.py) and the same problem+json errors as the framework routes, which stay the reference
and the source of the OpenAPI document (WALLET_LEAN_FLOWS=false serves through them)."""

from collections.abc import Callable
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wallet.domain.errors import WalletError
from wallet.domain.ledger import Action
from wallet.http import schemas
from wallet.http.errors import problem, unexpected_problem, validation_problem, wallet_problem
from wallet.http.flows import FLOW_REQUESTS, command_from, transaction_body
from wallet.http.gate import api_key_of
from wallet.http.limits import decode_json, read_json_body
from wallet.service.wallet import Wallet

FLOW_PATHS = {f"/api/v1/wallet/{action.value}": action for action in FLOW_REQUESTS}
KEY_HEADER = b"idempotency-key"
key_adapter: TypeAdapter[str] = TypeAdapter(schemas.IdempotencyKey)


class LeanFlows:
    """Serves the three flow POSTs itself and passes every other request to `app`."""

    def __init__(self, app: ASGIApp, wallet: Callable[[], Wallet]) -> None:
        self.app = app
        self.wallet = wallet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        flow = FLOW_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if flow is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        response = await self._serve(flow, scope, receive)
        if response is not None:
            await response(scope, receive, send)

    async def _serve(self, flow: Action, scope: Scope, receive: Receive) -> Response | None:
        body = await read_json_body(scope, receive)
        if not isinstance(body, bytes):
            return body
        try:
            decoded = decode_json(body)
        except (ValueError, RecursionError):
            return problem(400, "malformed_json", "the body is not valid JSON")
        details: list[Any] = []
        try:
            request = FLOW_REQUESTS[flow].model_validate(decoded)
        except ValidationError as error:
            details += [{**d, "loc": ("body", *d["loc"])} for d in error.errors()]
        header_key = _header(scope, KEY_HEADER)
        if header_key is not None:
            try:
                key_adapter.validate_python(header_key)
            except ValidationError as error:
                details += [{**d, "loc": ("header", "Idempotency-Key")} for d in error.errors()]
        if details:
            return validation_problem(details)
        try:
            key = api_key_of(scope)
            command = command_from(
                flow, request, header_key=header_key, created_by=key.id if key else None
            )
            posted = await self.wallet().execute(command)
        except WalletError as error:
            return wallet_problem(error)
        except Exception as error:
            return unexpected_problem(error)
        content = orjson.dumps(transaction_body(posted.transaction), option=orjson.OPT_UTC_Z)
        if posted.is_replay:
            return Response(content, 200, {"Idempotent-Replayed": "true"}, "application/json")
        return Response(content, 201, media_type="application/json")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
