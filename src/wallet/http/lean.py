"""The flow endpoints without the framework's per-request cost.

POST /api/v1/wallet/{topup,bonus,spend} is the hot path: a profile under load showed the
framework's routing, middleware and dependency resolution taking about half of a worker. Here
those three are served as bare ASGI: the body is read and decoded as BodyLimits does (limits.py)
and handled by serve_flow (flows.py), which the framework routes call too. Those routes stay the
source of the OpenAPI document, and serve the flows with WALLET_LEAN_FLOWS=false."""

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from wallet.domain.ledger import Action
from wallet.http.errors import problem
from wallet.http.flows import FLOW_REQUESTS, serve_flow
from wallet.http.gate import api_key_of
from wallet.http.limits import decode_json, read_json_body
from wallet.service.wallet import Wallet

FLOW_PATHS = {f"/api/v1/wallet/{action.value}": action for action in FLOW_REQUESTS}
KEY_HEADER = b"idempotency-key"


class LeanFlows:
    """Serves the three flow POSTs itself and passes every other request to `app`. Domain errors
    are raised to the gate (gate.py), which answers them from the one table in errors.py."""

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
            payload = decode_json(body)
        except (ValueError, RecursionError):
            return problem(400, "malformed_json", "the body is not valid JSON")
        return await serve_flow(
            self.wallet(),
            flow,
            payload,
            header_key=_header(scope, KEY_HEADER),
            api_key=api_key_of(scope),
        )


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
