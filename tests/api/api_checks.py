"""What the API tests share: the facts API.md states (seed data, field sets), flow bodies with fresh
idempotency keys, and the checks every answer must pass (transactions, entries, problem+json)."""

import json
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import httpx

API = "/api/v1"
ALICE = "550e8400-e29b-41d4-a716-446655440000"  # the seed users, as API.md names them
BOB = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
FLOWS = ("topup", "bonus", "spend")
FREE_TEXT_FIELD = {"topup": "metadata", "bonus": "reason", "spend": "description"}
# API-ledger.md: what a refundable transaction shows of its refunds, and a spend of its hold.
REFUND_FIELDS = {"refundedAmount", "refunds"}
FLOW_FIELDS = {
    "topup": {"metadata", *REFUND_FIELDS},
    "bonus": {"reason", *REFUND_FIELDS},
    "spend": {"description", "holdId", *REFUND_FIELDS},
}
SAMPLE_FREE_TEXT: dict[str, Any] = {
    "topup": {"order": "A-1", "store": "web"},
    "bonus": "welcome back",
    "spend": "sword of dawn",
}
# Which account each flow takes the amount from and gives it to (None: the user).
DEBITED = {"topup": "system:treasury", "bonus": "system:bonus_pool", "spend": None}
CREDITED = {"topup": None, "bonus": None, "spend": "system:revenue"}

ASSET_NAMES = {
    "DIAMONDS": "Diamonds",
    "GOLD_COINS": "Gold Coins",
    "LOYALTY_POINTS": "Loyalty Points",
}
# The seed's opening balances are top-ups: paid credits, none of them expiring.
OPENING_BALANCES = {"DIAMONDS": 10, "GOLD_COINS": 1000, "LOYALTY_POINTS": 500}
ASSET_FIELDS = frozenset(
    {"symbol", "name", "description", "spendOrder", "freeLifetimeDays", "paidLifetimeDays"}
)
# API-credits.md: every seeded asset spends free credits first; only LOYALTY_POINTS gives its
# free credits a lifetime (365 days), and no asset's paid credits expire.
SEED_ASSET_POLICIES = {
    symbol: {
        "spendOrder": "free_first",
        "freeLifetimeDays": 365 if symbol == "LOYALTY_POINTS" else None,
        "paidLifetimeDays": None,
    }
    for symbol in ASSET_NAMES
}
SEED_USERS = {ALICE: ("alice@example.com", "Alice"), BOB: ("bob@example.com", "Bob")}
MAX_AMOUNT = 10**15
MAX_BODY_BYTES = 64 * 1024

TRANSACTION_FIELDS = frozenset(
    {
        "transactionId",
        "type",
        "status",
        "userId",
        "assetSymbol",
        "amount",
        "paidAmount",
        "freeAmount",
        "balanceAfter",
        "idempotencyKey",
        "createdBy",
        "createdAt",
    }
)
ENTRY_FIELDS = frozenset(
    {
        "entryId",
        "transactionId",
        "account",
        "assetSymbol",
        "direction",
        "kind",
        "amount",
        "balanceAfter",
        "paidAfter",
        "createdAt",
        "chainHash",
    }
)
HOLD_FIELDS = frozenset(
    {
        "holdId",
        "userId",
        "assetSymbol",
        "amount",
        "capturedAmount",
        "status",
        "expiresAt",
        "createdAt",
        "endedAt",
        "description",
        "createdBy",
    }
)
BALANCE_FIELDS = frozenset(
    {"userId", "assetSymbol", "balance", "paid", "free", "held", "available", "nextExpiry"}
)
USER_FIELDS = frozenset({"id", "email", "name", "createdAt"})
PROBLEM_FIELDS = frozenset({"type", "title", "status", "detail", "code", "requestId"})
PROBLEM_MEDIA_TYPE = "application/problem+json"
RFC3339_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z")
# What must never reach a client: stack traces, driver names, SQL, internal paths.
LEAKS = (
    "Traceback",
    'File "',
    "sqlalchemy",
    "asyncpg",
    "aiosqlite",
    "sqlite3",
    "SELECT ",
    "/work/",
)


def new_key() -> str:
    return f"test-{uuid.uuid4().hex}"


def flow_body(
    *,
    user_id: Any = ALICE,
    asset: Any = "GOLD_COINS",
    amount: Any = 10,
    key: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """A flow request body: Alice's GOLD_COINS unless told, with a fresh key unless given one
    (any of them may be a value of the wrong type, for a test of bad input)."""
    return {
        "userId": user_id,
        "assetSymbol": asset,
        "amount": amount,
        "idempotencyKey": key or new_key(),
        **extra,
    }


def flow_json_with_amount(amount_literal: str) -> str:
    """A flow body as JSON text, its amount written exactly as given (NaN, 1e400, 10^5000...)."""
    return json.dumps(flow_body(amount=0)).replace('"amount": 0', f'"amount": {amount_literal}')


def without(body: Mapping[str, Any], *fields: str) -> dict[str, Any]:
    return {name: value for name, value in body.items() if name not in fields}


async def post_flow(
    client: httpx.AsyncClient,
    flow: str,
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
) -> httpx.Response:
    """POST `body` to /wallet/`flow`: a flow, or a write of API-ledger.md ("transfer", "batch",
    "holds", "holds/<id>/capture", "transactions/<id>/refund"...)."""
    return await client.post(f"{API}/wallet/{flow}", json=body, headers=headers)


def created(response: httpx.Response) -> dict[str, Any]:
    """The body of a write's first answer: 201, not a replay."""
    assert response.status_code == 201, describe(response)
    assert "idempotent-replayed" not in response.headers, response.headers
    body: dict[str, Any] = response.json()
    return body


def assert_replayed(first: httpx.Response, again: httpx.Response) -> None:
    """`again` replays `first` (API.md): 200, Idempotent-Replayed, the same body."""
    assert again.status_code == 200, describe(again)
    assert again.headers["idempotent-replayed"] == "true", again.headers
    assert again.json() == first.json(), f"first: {first.text}\nagain: {again.text}"


def transfer_body(
    *,
    from_user: str = ALICE,
    to_user: str = BOB,
    asset: str = "GOLD_COINS",
    amount: Any = 10,
    key: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A transfer request body: GOLD_COINS from Alice to Bob unless told, with a fresh key."""
    return {
        "fromUserId": from_user,
        "toUserId": to_user,
        "assetSymbol": asset,
        "amount": amount,
        "idempotencyKey": key or new_key(),
        **extra,
    }


async def create_hold(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    """A new hold (a flow body: Alice's GOLD_COINS unless told, `expiresInSeconds` and
    `description` among `fields`)."""
    return created(await post_flow(client, "holds", flow_body(**fields)))


async def post_hold_action(
    client: httpx.AsyncClient, hold_id: str, action: str, **fields: Any
) -> httpx.Response:
    """Capture or release (`action`) a hold, with a fresh key unless `fields` give one."""
    body = {"idempotencyKey": new_key(), **fields}
    return await post_flow(client, f"holds/{hold_id}/{action}", body)


async def post_refund(
    client: httpx.AsyncClient, transaction_id: str, **fields: Any
) -> httpx.Response:
    """Refund or reverse a transaction, with a fresh key unless `fields` give one."""
    body = {"idempotencyKey": new_key(), **fields}
    return await post_flow(client, f"transactions/{transaction_id}/refund", body)


async def key_id_of(client: httpx.AsyncClient) -> str:
    """The id of the admin key `client` sends: the newest key (the seed's own is older)."""
    keys = await get_ok(client, f"{API}/keys")
    key_id: str = keys["items"][0]["keyId"]
    return key_id


async def post_raw(
    client: httpx.AsyncClient,
    path: str,
    content: bytes | str | AsyncIterator[bytes],
    *,
    content_type: str | None = "application/json",
) -> httpx.Response:
    """POST exactly these bytes (a str is sent as UTF-8, lone surrogates included)."""
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")
    headers = {} if content_type is None else {"Content-Type": content_type}
    return await client.post(path, content=content, headers=headers)


async def get_ok(client: httpx.AsyncClient, path: str, **params: Any) -> Any:
    response = await client.get(path, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def ids(items: list[dict[str, Any]], id_field: str) -> list[str]:
    return [item[id_field] for item in items]


async def walk(
    client: httpx.AsyncClient, path: str, id_field: str, limit: int, **params: Any
) -> list[str]:
    """Every item's id, following nextCursor page by page."""
    seen: list[str] = []
    cursor = None
    for _ in range(1000):
        query = {"limit": limit, **params} | ({"cursor": cursor} if cursor else {})
        page = await get_ok(client, path, **query)
        assert set(page) == {"items", "nextCursor"}
        assert len(page["items"]) <= limit
        seen += ids(page["items"], id_field)
        cursor = page["nextCursor"]
        if cursor is None:
            return seen
        assert isinstance(cursor, str)
        assert len(page["items"]) == limit
    raise AssertionError("the pages never ended")


async def balance_of(client: httpx.AsyncClient, user_id: str, asset: str) -> int:
    body = await get_ok(client, f"{API}/wallet/balance/{user_id}/{asset}")
    balance: int = body["balance"]
    return balance


async def balance_body(client: httpx.AsyncClient, user_id: str, asset: str) -> dict[str, Any]:
    """The balance of API-credits.md, its shape checked: balance = paid + free."""
    body: dict[str, Any] = await get_ok(client, f"{API}/wallet/balance/{user_id}/{asset}")
    assert set(body) == BALANCE_FIELDS, body
    assert (body["userId"], body["assetSymbol"]) == (user_id, asset)
    assert body["balance"] == body["paid"] + body["free"], body
    return body


async def standing_of(client: httpx.AsyncClient, user_id: str, asset: str) -> dict[str, int]:
    """What API-ledger.md's balance shows: balance, held and available."""
    body = await balance_body(client, user_id, asset)
    return {name: body[name] for name in ("balance", "held", "available")}


async def kinds_of(client: httpx.AsyncClient, user_id: str, asset: str) -> dict[str, int]:
    """The paid and free parts of a balance (API-credits.md)."""
    body = await balance_body(client, user_id, asset)
    return {name: body[name] for name in ("paid", "free")}


async def transactions_of(
    client: httpx.AsyncClient, user_id: str, **params: Any
) -> list[dict[str, Any]]:
    """One page (up to 500) of the user's transactions, newest first."""
    page = await get_ok(client, f"{API}/wallet/transactions/{user_id}", limit=500, **params)
    items: list[dict[str, Any]] = page["items"]
    return items


async def transaction_detail(
    client: httpx.AsyncClient, transaction_id: str, user_id: str = ALICE
) -> dict[str, Any]:
    detail: dict[str, Any] = await get_ok(
        client, f"{API}/wallet/transactions/{user_id}/{transaction_id}"
    )
    return detail


async def balances_of(client: httpx.AsyncClient, user_id: str) -> dict[str, int]:
    body = await get_ok(client, f"{API}/wallet/balances/{user_id}")
    return {row["assetSymbol"]: row["balance"] for row in body["balances"]}


async def account_state(client: httpx.AsyncClient, user_id: str) -> dict[str, Any]:
    """Everything the API shows of a user's money: balances (and their paid and free parts, and
    what expires next), transactions and ledger entries."""
    rows = (await get_ok(client, f"{API}/wallet/balances/{user_id}"))["balances"]
    return {
        "balances": await balances_of(client, user_id),
        "kinds": {
            row["assetSymbol"]: {name: row[name] for name in ("paid", "free", "nextExpiry")}
            for row in rows
        },
        "transactions": await get_ok(client, f"{API}/wallet/transactions/{user_id}", limit=500),
        "ledger": await get_ok(client, f"{API}/wallet/ledger/{user_id}", limit=500),
    }


async def create_user(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"email": f"{uuid.uuid4().hex[:10]}@example.com", "name": "Carol", **fields}
    response = await client.post(f"{API}/users", json=body)
    assert response.status_code == 201, response.text
    user: dict[str, Any] = response.json()
    return user


def assert_rfc3339_utc(text: Any) -> datetime:
    assert isinstance(text, str)
    assert RFC3339_UTC.fullmatch(text), text
    return datetime.fromisoformat(text)


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """The problem+json body of an error answer, after checking its shape (RFC 9457, API.md)."""
    assert response.status_code >= 400, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE, response.headers
    problem: dict[str, Any] = response.json()
    expected_fields = PROBLEM_FIELDS | (
        {"errors"} if problem.get("code") == "validation_error" else set()
    )
    if response.request.url.path == f"{API}/wallet/batch" and "operationIndex" in problem:
        # API-ledger.md: an atomic batch's failure names the operation that failed.
        assert type(problem["operationIndex"]) is int, problem
        expected_fields |= {"operationIndex"}
    assert set(problem) == expected_fields, problem
    assert problem["status"] == response.status_code
    for name in ("type", "title", "detail", "code"):
        assert isinstance(problem[name], str), problem
        assert problem[name], problem
    assert re.fullmatch(r"[a-z]+(_[a-z]+)*", problem["code"]), problem
    # API-operations.md: the request's id, in the body and the X-Request-ID header alike.
    assert problem["requestId"] == response.headers["x-request-id"], problem
    if "errors" in problem:
        assert problem["errors"], problem
        for error in problem["errors"]:
            assert isinstance(error["field"], str), problem
            assert error["field"], problem
    text = response.text
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked in {text}"
    return problem


def describe(response: httpx.Response) -> str:
    """The request and the answer, shortened, for assertion messages."""
    request = response.request
    try:
        sent = request.content[:300]
    except httpx.RequestNotRead:
        sent = b"(streamed)"
    return f"{request.method} {str(request.url)[:300]} {sent!r} -> {response.text[:500]}"


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert (response.status_code, _code_of(response)) == (status, code), describe(response)
    return problem_of(response)


def _code_of(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


def outcome(response: httpx.Response) -> tuple[int, str | None]:
    """The status and, for an error, its problem code (its shape checked)."""
    if response.status_code < 400:
        return response.status_code, None
    return response.status_code, problem_of(response)["code"]


def error_fields(problem: Mapping[str, Any]) -> set[str]:
    """The fields a validation_error names."""
    return {error["field"] for error in problem["errors"]}


def assert_validation_error(response: httpx.Response, field: str) -> dict[str, Any]:
    """422 validation_error whose `errors` name `field` (or a part of it, such as metadata.k)."""
    problem = assert_problem(response, 422, "validation_error")
    fields = error_fields(problem)
    assert any(f == field or f.startswith(f"{field}.") for f in fields), describe(response)
    return problem


def assert_transaction(
    body: Mapping[str, Any],
    *,
    flow: str,
    amount: int,
    balance_after: int,
    key: str,
    created_by: str | None,
    user_id: str = ALICE,
    asset: str = "GOLD_COINS",
    free_text: Any = None,
    refunded_amount: int = 0,
    refunds: tuple[str, ...] = (),
    hold_id: str | None = None,
    paid_amount: int | None = None,
) -> None:
    """A transaction of a flow exactly as API.md and API-ledger.md describe it, made by the API
    key `created_by`; `paid_amount` is by default all of it, but none of a bonus (API-credits.md:
    the seeded balances are top-ups, so paid)."""
    if paid_amount is None:
        paid_amount = 0 if flow == "bonus" else amount
    assert set(body) == TRANSACTION_FIELDS | FLOW_FIELDS[flow], body
    assert isinstance(body["transactionId"], str)
    assert body["transactionId"]
    assert type(body["amount"]) is int
    assert type(body["balanceAfter"]) is int
    assert {name: body[name] for name in body if name not in ("transactionId", "createdAt")} == {
        "type": flow,
        "status": "completed",
        "userId": user_id,
        "assetSymbol": asset,
        "amount": amount,
        "paidAmount": paid_amount,
        "freeAmount": amount - paid_amount,
        "balanceAfter": balance_after,
        "idempotencyKey": key,
        "createdBy": created_by,
        FREE_TEXT_FIELD[flow]: free_text,
        "refundedAmount": refunded_amount,
        "refunds": list(refunds),
        **({"holdId": hold_id} if flow == "spend" else {}),
    }
    assert_rfc3339_utc(body["createdAt"])


def assert_entry(entry: Mapping[str, Any]) -> None:
    """A ledger entry exactly as API.md describes it."""
    assert set(entry) == ENTRY_FIELDS, entry
    assert isinstance(entry["entryId"], str)
    assert entry["entryId"]
    assert isinstance(entry["transactionId"], str)
    assert entry["direction"] in ("debit", "credit")
    assert type(entry["amount"]) is int
    assert 1 <= entry["amount"] <= MAX_AMOUNT
    assert type(entry["balanceAfter"]) is int
    assert entry["kind"] in ("paid", "free")
    assert type(entry["paidAfter"]) is int
    if not entry["account"].startswith("system:"):  # a user's free part is never negative
        assert 0 <= entry["paidAfter"] <= entry["balanceAfter"], entry
    assert entry["assetSymbol"] in ASSET_NAMES
    assert_rfc3339_utc(entry["createdAt"])
    assert re.fullmatch("[0-9a-f]{64}", entry["chainHash"]), entry


def moves(entries: list[dict[str, Any]]) -> list[tuple[str, str, str, int]]:
    """A transaction's entries in order, as (account, direction, kind, amount)."""
    return [(e["account"], e["direction"], e["kind"], e["amount"]) for e in entries]
