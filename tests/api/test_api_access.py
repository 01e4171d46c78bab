"""API keys and scopes (API-operations.md): every route declares the scope it needs or that it is
public, and each is tried with no key, a revoked key, a key lacking the scope and one having it;
the key endpoints; revocation reaching another worker within 2 seconds; `createdBy`."""

import asyncio
import re
import time
from typing import Any

import httpx
import pytest
import structlog
from api_checks import ALICE, API, assert_problem, flow_body, new_key, post_flow
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.routing import BaseRoute, Route

from app_clients import app_client, bearer, create_key
from wallet.domain.access import Scope
from wallet.http.app import create_app
from wallet.http.gate import required_scope, scoped
from wallet.settings import Settings

KEY = re.compile(r"wk_[A-Za-z0-9_-]{43}")
PATH_VALUES = {
    "userId": ALICE,
    "assetSymbol": "GOLD_COINS",
    "transactionId": "01a213cc-6477-716a-bb08-b23f082a45d5",
    "keyId": "01a213cc-0000-7000-8000-000000000000",
    "holdId": "01a213cc-1111-7000-8000-000000000000",
    "path": "swagger-ui.css",
    "symbol": "GOLD_COINS",
}


def routing_table() -> list[tuple[str, str, frozenset[Scope] | None]]:
    """(method, concrete path, scopes a key needs one of) for every method of every route the
    app serves."""
    app = create_app(Settings(database_url="sqlite:///unused.db"))
    table = []
    for route in (context.route for context in iter_route_contexts(app.routes)):
        path = getattr(route, "path", "")
        if path == "/docs/assets":
            path += "/{path}"
        methods = getattr(route, "methods", None) or {"GET"}
        for method in sorted(methods - {"HEAD"}):
            table.append((method, path.format(**PATH_VALUES), required_scope(route)))
    return table


ROUTES = routing_table()
SCOPED = [(m, p, s) for m, p, s in ROUTES if s is not None]
PUBLIC = [(m, p) for m, p, s in ROUTES if s is None]


def test_the_routing_table_covers_the_contract() -> None:
    hold = f"{API}/wallet/holds/{PATH_VALUES['holdId']}"
    expected = {
        ("POST", f"{API}/wallet/topup"): {Scope.WALLET_CREDIT},
        ("POST", f"{API}/wallet/bonus"): {Scope.WALLET_CREDIT},
        ("POST", f"{API}/wallet/spend"): {Scope.WALLET_DEBIT},
        ("POST", f"{API}/wallet/transfer"): {Scope.WALLET_DEBIT},
        ("POST", f"{API}/wallet/holds"): {Scope.WALLET_DEBIT},
        ("POST", f"{hold}/capture"): {Scope.WALLET_DEBIT},
        ("POST", f"{hold}/release"): {Scope.WALLET_DEBIT},
        ("POST", f"{API}/wallet/transactions/{PATH_VALUES['transactionId']}/refund"): {
            Scope.WALLET_REFUND
        },
        # An atomic batch: a key with either passes the gate; the route checks each operation.
        ("POST", f"{API}/wallet/batch"): {Scope.WALLET_CREDIT, Scope.WALLET_DEBIT},
        ("POST", f"{API}/users"): {Scope.USERS_WRITE},
        ("DELETE", f"{API}/keys/{PATH_VALUES['keyId']}"): {Scope.ADMIN},
        ("GET", f"{API}/ledger/checkpoint"): {Scope.ADMIN},
        # API-credits.md: assets are made and changed by admins; the report is a read.
        ("POST", f"{API}/assets"): {Scope.ADMIN},
        ("PATCH", f"{API}/assets/{PATH_VALUES['symbol']}"): {Scope.ADMIN},
        ("GET", f"{API}/assets"): {Scope.WALLET_READ},
        ("GET", f"{API}/reports/liabilities"): {Scope.WALLET_READ},
    }
    table = {(m, p): s for m, p, s in SCOPED}
    assert {route: set(table.get(route) or ()) for route in expected} == expected
    assert all(
        s == {Scope.WALLET_READ}
        for m, p, s in SCOPED
        if m == "GET" and "/keys" not in p and "/ledger/" not in p
    )
    assert set(PUBLIC) == {
        ("GET", f"{API}/health"),
        ("GET", f"{API}/health/ready"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/assets/swagger-ui.css"),
        ("GET", "/metrics"),
        ("GET", "/"),
    }


def test_a_route_that_declares_no_scope_fails_the_build() -> None:
    async def endpoint() -> None:
        return None

    undeclared: list[BaseRoute] = [APIRoute("/api/v1/new", endpoint), Route("/new", endpoint)]
    for route in undeclared:
        with pytest.raises(LookupError, match="declares no scope"):
            scoped([route])


async def _send(http: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> httpx.Response:
    body: dict[str, Any] | None = {} if method in ("POST", "PATCH") else None
    return await http.request(method, path, json=body, **kwargs)


@pytest.fixture
async def keys(settings: Settings) -> dict[str, str]:
    """An admin key, keys for every scope alone, and a revoked admin key."""
    url = settings.database_url.get_secret_value()
    made = {scope.value: await create_key(url, scope) for scope in Scope}
    async with app_client(settings, key=made["admin"]) as http:
        response = await http.post(f"{API}/keys", json={"label": "doomed", "scopes": ["admin"]})
        revoked = response.json()
        assert (await http.delete(f"{API}/keys/{revoked['keyId']}")).status_code == 204
    made["revoked"] = revoked["key"]
    return made


async def test_every_scoped_route_refuses_no_key_a_revoked_key_and_a_key_without_its_scope(
    settings: Settings, keys: dict[str, str]
) -> None:
    async with app_client(settings) as http:
        for method, path, needed in SCOPED:
            for headers in ({}, bearer(keys["revoked"]), bearer("wk_" + "A" * 43)):
                response = await _send(http, method, path, headers=headers)
                assert_problem(response, 401, "unauthenticated")
                assert response.headers["www-authenticate"] == "Bearer"
            for scope in Scope:
                if scope in needed or scope is Scope.ADMIN:
                    continue
                response = await _send(http, method, path, headers=bearer(keys[scope.value]))
                problem = assert_problem(response, 403, "insufficient_scope")
                assert all(s.value in problem["detail"] for s in needed)


async def test_every_scoped_route_admits_a_key_with_its_scope_and_an_admin_key(
    settings: Settings, keys: dict[str, str]
) -> None:
    async with app_client(settings) as http:
        for method, path, needed in SCOPED:
            for key in (*(keys[s.value] for s in needed), keys["admin"]):
                response = await _send(http, method, path, headers=bearer(key))
                assert response.status_code not in (401, 403), (method, path, response.text)


async def test_public_routes_need_no_key(settings: Settings) -> None:
    async with app_client(settings) as http:
        for method, path in PUBLIC:
            response = await _send(http, method, path)
            assert response.status_code == 200, (method, path, response.text)


async def test_the_key_may_come_as_x_api_key(settings: Settings, keys: dict[str, str]) -> None:
    async with app_client(settings) as http:
        assert (await http.get(f"{API}/assets", headers={"X-API-Key": keys["admin"]})).is_success
        response = await http.get(f"{API}/assets", headers={"Authorization": "Basic eDp5"})
        assert_problem(response, 401, "unauthenticated")


async def test_keys_are_created_shown_once_listed_without_secrets_and_revoked(
    client: httpx.AsyncClient,
) -> None:
    body = {"label": "shop-eu", "scopes": ["wallet:read", "wallet:debit"], "writesPerSecond": 7}
    response = await client.post(f"{API}/keys", json=body)

    assert response.status_code == 201, response.text
    created = response.json()
    assert set(created) == {
        "keyId",
        "key",
        "label",
        "scopes",
        "readsPerSecond",
        "writesPerSecond",
        "createdAt",
    }
    assert KEY.fullmatch(created["key"])
    assert created["label"] == "shop-eu"
    assert sorted(created["scopes"]) == ["wallet:debit", "wallet:read"]
    assert created["writesPerSecond"] == 7
    assert created["readsPerSecond"] == Settings().default_reads_per_second

    listed = (await client.get(f"{API}/keys")).json()
    assert created["key"] not in str(listed)
    mine = next(k for k in listed["items"] if k["keyId"] == created["keyId"])
    assert mine["revokedAt"] is None
    assert "key" not in mine

    assert (await client.delete(f"{API}/keys/{created['keyId']}")).status_code == 204
    listed = (await client.get(f"{API}/keys")).json()
    mine = next(k for k in listed["items"] if k["keyId"] == created["keyId"])
    assert mine["revokedAt"] is not None
    response = await client.get(f"{API}/assets", headers=bearer(created["key"]))
    assert_problem(response, 401, "unauthenticated")


async def test_revoking_an_unknown_key_is_key_not_found(client: httpx.AsyncClient) -> None:
    assert_problem(await client.delete(f"{API}/keys/no-such-key"), 404, "key_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {"label": "x", "scopes": []},
        {"label": "x", "scopes": ["root"]},
        {"label": "", "scopes": ["admin"]},
        {"label": "x", "scopes": ["admin"], "readsPerSecond": -1},
        {"label": "x", "scopes": ["admin"], "writesPerSecond": 1.5},
        {"scopes": ["admin"]},
    ],
)
async def test_a_bad_new_key_is_a_validation_error(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    assert_problem(await client.post(f"{API}/keys", json=body), 422, "validation_error")


async def test_revocation_reaches_another_worker_within_2_seconds(
    settings: Settings, admin_key: str
) -> None:
    async with app_client(settings, key=admin_key) as first, app_client(settings) as second:
        created = (await first.post(f"{API}/keys", json={"label": "x", "scopes": ["admin"]})).json()
        victim = bearer(created["key"])
        assert (await second.get(f"{API}/assets", headers=victim)).is_success  # now cached
        assert (await first.delete(f"{API}/keys/{created['keyId']}")).status_code == 204
        revoked_at = time.monotonic()
        while (await second.get(f"{API}/assets", headers=victim)).is_success:
            assert time.monotonic() - revoked_at < 2, "the revoked key still works after 2 s"
            await asyncio.sleep(0.05)


async def test_transactions_record_the_key_that_made_them(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    key = await create_key(url, Scope.WALLET_CREDIT)
    keys_listed = (await client.get(f"{API}/keys")).json()["items"]
    response = await post_flow(client, "topup", flow_body(), headers=bearer(key))
    assert response.status_code == 201, response.text
    made = response.json()

    newest_key = keys_listed[0]["keyId"]  # create_key's key is the newest
    assert made["createdBy"] == newest_key
    read_back = (
        await client.get(f"{API}/wallet/transactions/{ALICE}/{made['transactionId']}")
    ).json()
    assert read_back["createdBy"] == newest_key
    seeded = (await client.get(f"{API}/wallet/transactions/{ALICE}?limit=500")).json()["items"]
    assert {t["createdBy"] for t in seeded if t["idempotencyKey"].startswith("seed:")} == {None}


async def test_a_retry_under_a_rotated_key_replays(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    old, new = await create_key(url, Scope.WALLET_CREDIT), await create_key(url, Scope.ADMIN)
    body = flow_body(key=new_key())
    first = await post_flow(client, "topup", body, headers=bearer(old))
    retry = await post_flow(client, "topup", body, headers=bearer(new))

    assert (first.status_code, retry.status_code) == (201, 200)
    assert retry.json() == first.json()


async def test_with_auth_disabled_requests_pass_without_a_key_and_are_logged(
    settings: Settings,
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with app_client(settings.model_copy(update={"auth_disabled": True})) as http:
            response = await post_flow(http, "topup", flow_body())
    assert response.status_code == 201, response.text
    assert response.json()["createdBy"] is None
    warnings = [e for e in logs if e["log_level"] == "warning" and "auth disabled" in e["event"]]
    assert len(warnings) == 2  # one at start, one for the request let through


async def test_revocation_is_immediate_in_the_worker_that_revoked(
    client: httpx.AsyncClient,
) -> None:
    created = (await client.post(f"{API}/keys", json={"label": "x", "scopes": ["admin"]})).json()
    victim = bearer(created["key"])
    assert (await client.get(f"{API}/assets", headers=victim)).is_success  # now cached
    assert (await client.delete(f"{API}/keys/{created['keyId']}")).status_code == 204
    assert_problem(await client.get(f"{API}/assets", headers=victim), 401, "unauthenticated")
