"""The bare ASGI app that calibrates `wallet bench`: it answers a spend's POST with a fixed 201
body shaped like a spend's answer, and its health check, and does nothing else. Loaded by the same
client on the same machine in the same run, it shows the most uvicorn and the client allow, so the
table can give the wallet's rates as a share of it."""

from starlette.types import Receive, Scope, Send

from wallet.bench.server import HEALTH_PATH

SPEND_PATH = "/api/v1/wallet/spend"
SPEND_ANSWER = (
    b'{"transactionId":"019400a0-0000-7000-8000-000000000001","type":"spend",'
    b'"status":"completed","userId":"bench-user-000000","assetSymbol":"GOLD_COINS","amount":1,'
    b'"paidAmount":1,"freeAmount":0,"balanceAfter":999999999999,'
    b'"idempotencyKey":"bench-00000000-0-0-1","createdBy":"019400a0-0000-7000-8000-000000000002",'
    b'"createdAt":"2026-01-01T00:00:00.000000Z","description":null,"holdId":null,'
    b'"refundedAmount":0,"refunds":[]}'
)
HEALTHY = b'{"status":"ok"}'


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Read the request, then answer it: served with `--lifespan off`, so HTTP only."""
    while (await receive()).get("more_body"):
        pass
    match scope["method"], scope["path"]:
        case "POST", path if path == SPEND_PATH:
            status, body = 201, SPEND_ANSWER
        case "GET", path if path == HEALTH_PATH:
            status, body = 200, HEALTHY
        case _:
            status, body = 404, b""
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
