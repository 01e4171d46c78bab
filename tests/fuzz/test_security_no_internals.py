"""No answer echoes the service's internals: no SQL, driver or ORM name, stack trace or internal
path reaches a client, in the 4xx answers to bad requests, in the 503s of a database that cannot
be reached or is not migrated, or in the 500 of a defect, whose cause is logged, never sent."""

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from fuzz_checks import ALICE, API, BOB, FLOWS, app_client, leaks

from wallet.domain.access import new_secret
from wallet.service.wallet import Wallet
from wallet.settings import Settings

UNREACHABLE = Settings(
    database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none", database_timeout_s=1
)
# A key a client was given before its database went away: the service cannot look it up now.
HELD_KEY = new_secret()
# What a defect's exception could carry: SQL, a driver's name, a path and a line of a traceback.
SECRET_CAUSE = (
    'SELECT balance FROM balances WHERE account_id = $1 (asyncpg) File "/work/main/src/wallet/'
    'store/queries.py", line 42, in balance_of'
)
Request = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


def flow(name: str = "topup", **fields: Any) -> dict[str, Any]:
    return {
        "userId": ALICE,
        "assetSymbol": "GOLD_COINS",
        "amount": 10,
        "idempotencyKey": f"internals-{name}",
        **fields,
    }


def post_raw(path: str, content: bytes, content_type: str = "application/json") -> Request:
    return lambda client: client.post(path, content=content, headers={"content-type": content_type})


def post_json(path: str, body: Any, **headers: str) -> Request:
    return lambda client: client.post(path, json=body, headers=headers)


def patch_json(path: str, body: Any) -> Request:
    return lambda client: client.patch(path, json=body)


def get(path: str, **params: Any) -> Request:
    return lambda client: client.get(path, params=params)


def transfer(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "fromUserId": ALICE,
        "toUserId": BOB,
        "assetSymbol": "GOLD_COINS",
        "amount": 10,
        "idempotencyKey": f"internals-{name}",
        **fields,
    }


def batch(name: str, *operations: dict[str, Any]) -> dict[str, Any]:
    return {"idempotencyKey": f"internals-{name}", "operations": list(operations)}


def operation(kind: str = "topup", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "userId": ALICE, "assetSymbol": "GOLD_COINS", "amount": 10, **fields}


# The writes of API 1.2 beside the three flows: each reaches the ledger, so each answers 503 when
# the database cannot be reached and 500 when the ledger fails.
WRITES_1_2 = (
    (f"{API}/wallet/transfer", transfer("transfer")),
    (f"{API}/wallet/batch", batch("batch", operation(), operation("spend"))),
    (f"{API}/wallet/holds", flow("hold")),
    (f"{API}/wallet/holds/some-hold/capture", {"idempotencyKey": "internals-capture"}),
    (f"{API}/wallet/holds/some-hold/release", {"idempotencyKey": "internals-release"}),
    (f"{API}/wallet/transactions/some-id/refund", {"idempotencyKey": "internals-refund"}),
)
# The writes of API 1.3: assets made and changed (method, path, body).
WRITES_1_3 = (
    ("POST", f"{API}/assets", {"symbol": "INTERNALS", "name": "Internals"}),
    ("PATCH", f"{API}/assets/GOLD_COINS", {"description": "changed"}),
)


# (what is wrong, the request, the status API.md gives it)
BAD_REQUESTS: list[tuple[str, Request, int]] = [
    ("not JSON", post_raw(f"{API}/wallet/topup", b"{'userId': 1,"), 400),
    ("not UTF-8", post_raw(f"{API}/wallet/spend", b'{"userId": "\xff\xfe"}'), 400),
    ("NaN", post_raw(f"{API}/wallet/bonus", json.dumps(flow()).replace("10", "NaN").encode()), 400),
    ("nested too deep", post_raw(f"{API}/wallet/topup", b"[" * 30_000 + b"]" * 30_000), 400),
    ("too large", post_raw(f"{API}/wallet/topup", b" " * (64 * 1024 + 1)), 413),
    ("not JSON media", post_raw(f"{API}/wallet/topup", b"userId=1", "text/plain"), 415),
    ("users not JSON", post_raw(f"{API}/users", b"<xml/>", "application/xml"), 415),
    ("amount a float", post_json(f"{API}/wallet/topup", flow(amount=1.5)), 422),
    ("amount 2^64", post_json(f"{API}/wallet/topup", flow(amount=2**64)), 422),
    ("missing fields", post_json(f"{API}/wallet/spend", {"userId": ALICE}), 422),
    ("extra field", post_json(f"{API}/wallet/topup", flow(sql="SELECT 1")), 422),
    ("malformed id", post_json(f"{API}/wallet/topup", flow(userId="a b")), 422),
    ("NUL in free text", post_json(f"{API}/wallet/bonus", flow(reason="a\x00b")), 422),
    ("free text too long", post_json(f"{API}/wallet/spend", flow(description="x" * 501)), 422),
    ("metadata too large", post_json(f"{API}/wallet/topup", flow(metadata={"k": "v" * 5000})), 422),
    ("keys differ", post_json(f"{API}/wallet/topup", flow(), **{"Idempotency-Key": "other"}), 422),
    ("no key", post_json(f"{API}/wallet/topup", flow(idempotencyKey=None)), 422),
    ("unknown user", post_json(f"{API}/wallet/topup", flow(userId="nobody")), 404),
    ("unknown asset", post_json(f"{API}/wallet/topup", flow(assetSymbol="NOPE")), 404),
    ("short of funds", post_json(f"{API}/wallet/spend", flow("spend", amount=10**15)), 422),
    ("system account", post_json(f"{API}/wallet/bonus", flow(userId="system:treasury")), 404),
    (
        "user exists",
        post_json(f"{API}/users", {"id": BOB, "email": "b@example.com", "name": "B"}),
        409,
    ),
    ("invalid email", post_json(f"{API}/users", {"email": "not an email", "name": "N"}), 422),
    (
        "system id",
        post_json(f"{API}/users", {"id": "system:x", "email": "s@x.io", "name": "S"}),
        422,
    ),
    ("unknown route", get(f"{API}/wallet/nothing"), 404),
    ("unknown user read", get(f"{API}/users/nobody"), 404),
    ("malformed user read", get(f"{API}/wallet/balances/a%20b"), 422),
    ("unknown asset read", get(f"{API}/wallet/balance/{ALICE}/NOPE"), 404),
    ("unknown transaction", get(f"{API}/wallet/transactions/{ALICE}/nope"), 404),
    ("limit out of range", get(f"{API}/users", limit=0), 422),
    ("cursor with offset", get(f"{API}/users", cursor="djE6MQ==", offset=1), 422),
    ("cursor not ours", get(f"{API}/wallet/ledger/{ALICE}", cursor="SELECT"), 422),
    ("unknown type", get(f"{API}/wallet/transactions/{ALICE}", type="hold"), 422),
    # API 1.2: transfers, batches, holds, refunds, the past.
    (
        "transfer to oneself",
        post_json(f"{API}/wallet/transfer", transfer("self", toUserId=ALICE)),
        422,
    ),
    (
        "transfer to nobody",
        post_json(f"{API}/wallet/transfer", transfer("nobody", toUserId="x")),
        404,
    ),
    (
        "transfer short of funds",
        post_json(f"{API}/wallet/transfer", transfer("short", amount=10**15)),
        422,
    ),
    ("transfer float", post_json(f"{API}/wallet/transfer", transfer("float", amount=1.5)), 422),
    ("batch empty", post_json(f"{API}/wallet/batch", batch("empty")), 422),
    (
        "batch unknown type",
        post_json(f"{API}/wallet/batch", batch("type", operation("refund"))),
        422,
    ),
    (
        "batch extra field",
        post_json(f"{API}/wallet/batch", batch("extra", operation(sql="SELECT 1"))),
        422,
    ),
    (
        "batch unknown user",
        post_json(f"{API}/wallet/batch", batch("user", operation(), operation(userId="nobody"))),
        404,
    ),
    (
        "batch short of funds",
        post_json(f"{API}/wallet/batch", batch("bshort", operation("spend", amount=10**15))),
        422,
    ),
    (
        "hold too long",
        post_json(f"{API}/wallet/holds", flow("long", expiresInSeconds=604_801)),
        422,
    ),
    ("hold short of funds", post_json(f"{API}/wallet/holds", flow("hshort", amount=10**15)), 422),
    (
        "capture of nothing",
        post_json(f"{API}/wallet/holds/nope/capture", {"idempotencyKey": "internals-c"}),
        404,
    ),
    (
        "release of nothing",
        post_json(f"{API}/wallet/holds/nope/release", {"idempotencyKey": "internals-r"}),
        404,
    ),
    (
        "malformed hold id",
        post_json(f"{API}/wallet/holds/a%20b/release", {"idempotencyKey": "internals-m"}),
        422,
    ),
    ("capture no key", post_json(f"{API}/wallet/holds/nope/capture", {}), 422),
    (
        "refund of nothing",
        post_json(f"{API}/wallet/transactions/nope/refund", {"idempotencyKey": "internals-f"}),
        404,
    ),
    (
        "refund float",
        post_json(
            f"{API}/wallet/transactions/nope/refund",
            {"idempotencyKey": "internals-g", "amount": 2.5},
        ),
        422,
    ),
    ("unknown hold read", get(f"{API}/wallet/holds/nope"), 404),
    ("unknown hold status", get(f"{API}/wallet/holds", status="active"), 422),
    ("holds of nobody", get(f"{API}/wallet/holds", userId="nobody"), 404),
    (
        "time without offset",
        get(f"{API}/wallet/balance/{ALICE}/GOLD_COINS", at="2020-01-01T00:00:00"),
        422,
    ),
    ("not a time", get(f"{API}/wallet/transactions/{ALICE}", **{"from": "yesterday"}), 422),
    # API 1.3: expiring bonuses, assets, the liability report.
    (
        "bonus expired already",
        post_json(f"{API}/wallet/bonus", flow("expired", expiresAt="2000-01-01T00:00:00Z")),
        422,
    ),
    (
        "bonus with two expiries",
        post_json(
            f"{API}/wallet/bonus",
            flow("expiries", expiresAt="2100-01-01T00:00:00Z", expiresInDays=3),
        ),
        422,
    ),
    (
        "bonus expiry too far",
        post_json(f"{API}/wallet/bonus", flow("far", expiresInDays=3651)),
        422,
    ),
    ("asset exists", post_json(f"{API}/assets", {"symbol": "GOLD_COINS", "name": "G"}), 409),
    ("asset symbol malformed", post_json(f"{API}/assets", {"symbol": "a b", "name": "N"}), 422),
    (
        "asset spend order unknown",
        post_json(f"{API}/assets", {"symbol": "X1", "name": "N", "spendOrder": "newest"}),
        422,
    ),
    ("asset name to null", patch_json(f"{API}/assets/GOLD_COINS", {"name": None}), 422),
    (
        "asset lifetime float",
        patch_json(f"{API}/assets/GOLD_COINS", {"freeLifetimeDays": 1.5}),
        422,
    ),
    ("change of no asset", patch_json(f"{API}/assets/NOPE", {"name": "N"}), 404),
    ("report of no asset", get(f"{API}/reports/liabilities", assetSymbol="NOPE"), 404),
    ("report without an asset", get(f"{API}/reports/liabilities"), 422),
    (
        "report from after to",
        get(
            f"{API}/reports/liabilities",
            assetSymbol="GOLD_COINS",
            **{"from": "2030-01-01T00:00:00Z", "to": "2020-01-01T00:00:00Z"},
        ),
        422,
    ),
]
READS = (
    f"{API}/assets",
    f"{API}/users",
    f"{API}/users/{ALICE}",
    f"{API}/wallet/balance/{ALICE}/GOLD_COINS",
    f"{API}/wallet/balances/{ALICE}",
    f"{API}/wallet/transactions/{ALICE}",
    f"{API}/wallet/transactions/{ALICE}/some-id",
    f"{API}/wallet/ledger/{ALICE}",
    f"{API}/wallet/balance/{ALICE}/GOLD_COINS?at=2020-01-01T00:00:00Z",
    f"{API}/wallet/balances/{ALICE}?at=2020-01-01T00:00:00Z",
    f"{API}/wallet/holds",
    f"{API}/wallet/holds/some-hold",
    f"{API}/ledger/checkpoint",
    f"{API}/reports/liabilities?assetSymbol=GOLD_COINS",
)


def sent_text(request: httpx.Request) -> list[str]:
    """The strings a request carried, so that an echo of them is not taken for a leak."""
    try:
        body = json.loads(request.content) if request.content else None
    except (ValueError, RecursionError):
        body = None
    texts = [value for value in _strings(body) if value]
    return [*texts, *(value for _, value in request.url.params.multi_items())]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def assert_problem_without_internals(response: httpx.Response, status: int, code: str) -> None:
    """The documented status and code, as problem+json, showing nothing of the service's insides."""
    request = f"{response.request.method} {str(response.request.url)[:200]}"
    assert response.status_code == status, f"{request} -> {response.status_code} {response.text}"
    assert response.headers["content-type"] == "application/problem+json", request
    problem = response.json()
    assert problem["status"] == status
    assert problem["code"] == code, f"{request} -> {response.text}"
    found = leaks(response.text, *sent_text(response.request))
    assert found == [], f"{request} -> {response.text}: {found}"
    assert leaks(" ".join(f"{k}: {v}" for k, v in response.headers.items())) == []


@pytest.mark.parametrize("lean_flows", [True, False], ids=["lean-flows", "framework-flows"])
async def test_bad_requests_get_their_4xx_without_internals(
    database_url: str, admin_key: str, lean_flows: bool
) -> None:
    settings = Settings(database_url=database_url, lean_flows=lean_flows)
    async with app_client(settings, key=admin_key, raise_app_exceptions=False) as client:
        for what, send, status in BAD_REQUESTS:
            response = await send(client)
            request = f"{what}: {response.request.method} {str(response.request.url)[:100]}"
            assert response.status_code == status, f"{request} -> {response.text[:500]}"
            assert response.headers["content-type"] == "application/problem+json", request
            found = leaks(response.text, *sent_text(response.request))
            assert found == [], f"{request} -> {response.text}: {found}"


async def test_an_unreachable_database_is_503_without_internals() -> None:
    for lean_flows in (True, False):
        settings = UNREACHABLE.model_copy(update={"lean_flows": lean_flows})
        async with app_client(settings, key=HELD_KEY, raise_app_exceptions=False) as client:
            health = await client.get(f"{API}/health")
            assert (health.status_code, health.json()) == (
                503,
                {"status": "unavailable", "database": "unavailable"},
            )
            for path in READS:
                response = await client.get(path)
                assert_problem_without_internals(response, 503, "database_unavailable")
            for name in FLOWS:
                response = await client.post(f"{API}/wallet/{name}", json=flow(name))
                assert_problem_without_internals(response, 503, "database_unavailable")
            for path, body in WRITES_1_2:
                response = await client.post(path, json=body)
                assert_problem_without_internals(response, 503, "database_unavailable")
            for method, path, body in WRITES_1_3:
                response = await client.request(method, path, json=body)
                assert_problem_without_internals(response, 503, "database_unavailable")
            response = await client.post(f"{API}/users", json={"email": "a@b.io", "name": "A"})
            assert_problem_without_internals(response, 503, "database_unavailable")


@pytest.mark.parametrize("database", ["missing directory", "not migrated"])
async def test_a_broken_sqlite_database_is_503_without_internals(
    tmp_path: Path, database: str
) -> None:
    file = tmp_path / "absent" / "wallet.db" if database == "missing directory" else tmp_path / "x"
    settings = Settings(database_url=f"sqlite+aiosqlite:///{file}", database_timeout_s=1)
    async with app_client(settings, key=HELD_KEY, raise_app_exceptions=False) as client:
        for path in READS:
            assert_problem_without_internals(await client.get(path), 503, "database_unavailable")
        for name in FLOWS:
            response = await client.post(f"{API}/wallet/{name}", json=flow(name))
            assert_problem_without_internals(response, 503, "database_unavailable")
        for path, body in WRITES_1_2:
            response = await client.post(path, json=body)
            assert_problem_without_internals(response, 503, "database_unavailable")
        for method, path, body in WRITES_1_3:
            response = await client.request(method, path, json=body)
            assert_problem_without_internals(response, 503, "database_unavailable")


@pytest.mark.parametrize(
    "cause",
    [
        RuntimeError(SECRET_CAUSE),
        sa.exc.ProgrammingError(SECRET_CAUSE, {"account_id": ALICE}, Exception("asyncpg")),
    ],
    ids=["defect", "bad SQL"],
)
async def test_a_defect_is_a_bare_500_whose_cause_is_not_sent(
    database_url: str, admin_key: str, monkeypatch: pytest.MonkeyPatch, cause: Exception
) -> None:
    async def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise cause

    # What the routes below call: a balance is read through `standings` (balance and held),
    # a balance at a time through `balances_at`.
    for method in (
        *("execute", "standings", "balances_at", "history", "holds", "create_user"),
        *("create_asset", "change_asset", "liabilities"),
    ):
        monkeypatch.setattr(Wallet, method, fail)
    for lean_flows in (True, False):
        settings = Settings(database_url=database_url, lean_flows=lean_flows)
        # Captured, the cause is kept for the assertion below (and not rendered to the console).
        with structlog.testing.capture_logs() as logged:
            async with app_client(settings, key=admin_key, raise_app_exceptions=False) as client:
                requests = [
                    client.get(f"{API}/wallet/balance/{ALICE}/GOLD_COINS"),
                    client.get(f"{API}/wallet/balance/{ALICE}/GOLD_COINS?at=2020-01-01T00:00:00Z"),
                    client.get(f"{API}/wallet/transactions/{ALICE}"),
                    client.get(f"{API}/wallet/holds"),
                    client.post(f"{API}/users", json={"email": "d@example.com", "name": "D"}),
                    *(client.post(f"{API}/wallet/{name}", json=flow(name)) for name in FLOWS),
                    *(client.post(path, json=body) for path, body in WRITES_1_2),
                    *(client.request(m, path, json=body) for m, path, body in WRITES_1_3),
                    client.get(f"{API}/reports/liabilities?assetSymbol=GOLD_COINS"),
                ]
                for sending in requests:
                    assert_problem_without_internals(await sending, 500, "internal_error")
        causes = [entry.get("exc_info") for entry in logged if entry["log_level"] == "error"]
        assert causes == [cause] * len(requests)
