"""The OpenAPI document the service serves agrees with docs/API.md: the same endpoints, every
documented answer, the scope each needs, and docs/API.md carries the shared contract files
(API.md, then API-operations.md, version 1.1, then API-ledger.md, version 1.2, then
API-credits.md, version 1.3) verbatim."""

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_checks import (
    ASSET_FIELDS,
    BALANCE_FIELDS,
    ENTRY_FIELDS,
    FLOW_FIELDS,
    HOLD_FIELDS,
    PROBLEM_MEDIA_TYPE,
    TRANSACTION_FIELDS,
    get_ok,
)

from wallet.http.app import create_app
from wallet.http.errors import STATUS_OF
from wallet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
API_MD = REPO / "docs" / "API.md"
# The shared contract files, in the order docs/API.md carries them, each verbatim.
SHARED_CONTRACT = [
    REPO.parent / "shared" / name
    for name in ("API.md", "API-operations.md", "API-ledger.md", "API-credits.md")
]
METHOD = "GET|POST|PUT|PATCH|DELETE"
# An endpoint's method and path, less any query it shows ("?userId=&status=", "?at=<RFC 3339>")...
ENDPOINT = rf"`({METHOD}) (/api/v1/[^`?]*)(?:\?[^`]*)?`"
# ... in a row of an endpoints table (API.md's, API-operations.md's keys table, the holds
# table of API-ledger.md) ...
ENDPOINT_ROW = re.compile(rf"^\| {ENDPOINT} \|", re.MULTILINE)
# ... or given in prose: "`GET /api/v1/health/ready` answers ...", "`POST /api/v1/wallet/transfer`
# `{fromUserId, ...}` → `201`", "`GET /api/v1/ledger/checkpoint` (scope `admin`) → ...".
ENDPOINT_IN_PROSE = re.compile(rf"{ENDPOINT}(?: answers | `\{{| →| \(scope )")
# API-operations.md: every endpoint needs an API key but these.
PUBLIC_ENDPOINTS = {("GET", "/api/v1/health"), ("GET", "/api/v1/health/ready")}
LIST_PARAMETERS = {"limit", "cursor", "offset"}
# A status and the error code the contract gives with it: "`409 asset_exists`".
STATUS_AND_CODE = re.compile(r"`(\d{3}) ([a-z]+(?:_[a-z]+)*)`")
# API-credits.md: what a period of the liability report counts, paid and free.
LIABILITY_PERIOD_FIELDS = {"from", "to"} | {
    f"{moved}{kind}"
    for moved in ("issued", "spent", "refunded", "reversed", "expired")
    for kind in ("Paid", "Free")
}
ASSET_POLICY_FIELDS = {"spendOrder", "freeLifetimeDays", "paidLifetimeDays"}


def documented_endpoints() -> set[tuple[str, str]]:
    """The (method, path) of every endpoint docs/API.md gives: its tables' rows, and the ones its
    prose introduces."""
    text = API_MD.read_text()
    return set(ENDPOINT_ROW.findall(text)) | set(ENDPOINT_IN_PROSE.findall(text))


def documented_scope(method: str, path: str) -> str | list[str] | None:
    """The scope API-operations.md's table gives an endpoint (for an atomic batch, the scopes of
    its operations, one of which lets it past the gate); None for a public one."""
    if (method, path) in PUBLIC_ENDPOINTS:
        return None
    if path.startswith("/api/v1/keys") or path == "/api/v1/ledger/checkpoint":
        return "admin"
    if path.startswith("/api/v1/assets") and method != "GET":  # API-credits.md
        return "admin"
    if method == "GET":
        return "wallet:read"
    if path == "/api/v1/users":
        return "users:write"
    if path == "/api/v1/wallet/batch":
        return ["wallet:credit", "wallet:debit"]
    return {
        "topup": "wallet:credit",
        "bonus": "wallet:credit",
        "spend": "wallet:debit",
        "transfer": "wallet:debit",
        "holds": "wallet:debit",
        "capture": "wallet:debit",
        "release": "wallet:debit",
        "refund": "wallet:refund",
    }[path.rsplit("/", 1)[-1]]


def documented_successes(method: str, path: str) -> set[int]:
    """The success statuses the contract gives this endpoint: a write of the wallet answers 201,
    or 200 on a replay (a release 200 either way); a revocation answers 204."""
    if path.endswith("/release"):
        return {200}
    if method == "POST":
        return {200, 201} if path.startswith("/api/v1/wallet/") else {201}
    if method == "DELETE":
        return {204}
    return {200}


def documented_errors(method: str, path: str) -> set[int]:
    """The error statuses the contract gives this endpoint, from its conventions and tables."""
    statuses = {503}  # every request needs the database; health says so in plain JSON
    if documented_scope(method, path) is not None:  # API-operations.md: the key and its budget
        statuses |= {401, 403, 429}
    if method in ("POST", "PATCH"):  # a body: malformed, too large, not JSON, or breaking the rules
        statuses |= {400, 413, 415, 422}
    if "{userId}" in path:  # an unknown user, or an id that breaks the id rules
        statuses |= {404, 422}
    if "{holdId}" in path or "{transactionId}" in path:  # hold_not_found, transaction_not_found
        statuses |= {404, 422}
    if path.startswith("/api/v1/wallet/") and method == "POST":
        # An unknown user, asset, hold or transaction; a reused key, hold_not_active,
        # refund_exceeds_original; insufficient_funds, capture_exceeds_hold, not_refundable.
        statuses |= {404, 409, 422}
    if path == "/api/v1/wallet/holds" and method == "GET":
        statuses |= {422}  # bad paging parameters or status filter
    if path == "/api/v1/users":
        statuses |= {409} if method == "POST" else {422}  # user_exists; bad paging parameters
    if path == "/api/v1/keys" and method == "GET":
        statuses |= {422}  # bad paging parameters
    if path == "/api/v1/keys/{keyId}":
        statuses |= {404}  # key_not_found
    if path == "/api/v1/assets" and method == "POST":
        statuses |= {409}  # asset_exists
    if path == "/api/v1/assets/{symbol}":
        statuses |= {404}  # asset_not_found
    if path == "/api/v1/reports/liabilities":
        statuses |= {404, 422}  # asset_not_found; no asset, a bad moment, or `from` after `to`
    return statuses


def missing_statuses(
    openapi: dict[str, Any], documented: Callable[[str, str], set[int]]
) -> dict[str, list[int]]:
    """Per operation, the documented statuses its OpenAPI responses leave out."""
    missing = {
        f"{method} {path}": sorted(
            documented(method, path) - {int(status) for status in operation["responses"]}
        )
        for (method, path), operation in operations(openapi).items()
    }
    return {endpoint: gaps for endpoint, gaps in missing.items() if gaps}


@pytest.fixture
async def docs_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app: its documents are the same on every backend, so one is enough."""
    app = create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://wallet.test"
        ) as client,
    ):
        yield client


@pytest.fixture
async def openapi(docs_client: httpx.AsyncClient) -> dict[str, Any]:
    document: dict[str, Any] = await get_ok(docs_client, "/openapi.json")
    return document


def operations(openapi: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method.upper(), path): operation
        for path, item in openapi["paths"].items()
        for method, operation in item.items()
        if method in {"get", "post", "put", "patch", "delete"}
    }


def test_api_md_endpoints_table_is_read() -> None:
    endpoints = documented_endpoints()

    assert ("GET", "/api/v1/health") in endpoints
    assert ("POST", "/api/v1/wallet/spend") in endpoints
    assert ("GET", "/api/v1/wallet/transactions/{userId}/{transactionId}") in endpoints
    # API-operations.md's keys table, and the readiness its prose introduces.
    assert {("POST", "/api/v1/keys"), ("GET", "/api/v1/keys")} <= endpoints
    assert ("DELETE", "/api/v1/keys/{keyId}") in endpoints
    assert ("GET", "/api/v1/health/ready") in endpoints
    # API-ledger.md's holds table, its query left out, and the endpoints its prose introduces.
    assert {
        ("POST", "/api/v1/wallet/holds"),
        ("POST", "/api/v1/wallet/holds/{holdId}/capture"),
        ("POST", "/api/v1/wallet/holds/{holdId}/release"),
        ("GET", "/api/v1/wallet/holds/{holdId}"),
        ("GET", "/api/v1/wallet/holds"),
    } <= endpoints
    assert {
        ("POST", "/api/v1/wallet/transfer"),
        ("POST", "/api/v1/wallet/batch"),
        ("POST", "/api/v1/wallet/transactions/{transactionId}/refund"),
        ("GET", "/api/v1/ledger/checkpoint"),
    } <= endpoints
    # API-credits.md's assets table (scopes after the endpoint) and its report, query left out.
    assert {
        ("POST", "/api/v1/assets"),
        ("PATCH", "/api/v1/assets/{symbol}"),
        ("GET", "/api/v1/reports/liabilities"),
    } <= endpoints
    assert not any("?" in path for _, path in endpoints)


async def test_openapi_paths_and_methods_are_the_endpoints_of_api_md(
    openapi: dict[str, Any],
) -> None:
    assert set(operations(openapi)) == documented_endpoints()


async def test_openapi_documents_every_error_status_of_api_md(openapi: dict[str, Any]) -> None:
    assert missing_statuses(openapi, documented_errors) == {}


async def test_openapi_documents_every_success_status_of_api_md(openapi: dict[str, Any]) -> None:
    assert missing_statuses(openapi, documented_successes) == {}


async def test_openapi_declares_the_scope_each_endpoint_needs(openapi: dict[str, Any]) -> None:
    schemes = set(openapi["components"]["securitySchemes"])
    for (method, path), operation in operations(openapi).items():
        scope = documented_scope(method, path)
        if scope is None:
            assert operation["security"] == [], f"{method} {path}"
            continue
        assert operation["security"], f"{method} {path}"
        scopes = [scope] if isinstance(scope, str) else scope
        for requirement in operation["security"]:
            assert set(requirement) <= schemes, f"{method} {path}: {requirement}"
            assert list(requirement.values()) in [[[s]] for s in scopes], f"{method} {path}"
        assert operation["x-required-scope"] == scope, f"{method} {path}"


async def test_openapi_version_is_the_newest_contracts(openapi: dict[str, Any]) -> None:
    versions = re.findall(
        r"^# Wallet service HTTP API, version (\d+(?:\.\d+)*)", API_MD.read_text(), re.MULTILINE
    )
    assert versions, "docs/API.md names no contract version"
    newest = [*versions[-1].split("."), "0", "0"][:3]  # 1.1 is 1.1.0
    assert openapi["info"]["version"] == ".".join(newest)


async def test_openapi_error_answers_are_problem_json(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert {"type", "title", "status", "detail", "code", "requestId"} <= set(
        schemas["Problem"]["properties"]
    )
    for (method, path), operation in operations(openapi).items():
        for status, response in operation["responses"].items():
            if int(status) < 400 or (method, path) in PUBLIC_ENDPOINTS:  # plain JSON: below
                continue
            content = response.get("content", {})
            assert PROBLEM_MEDIA_TYPE in content, f"{method} {path} {status}: {content}"
            schema = content[PROBLEM_MEDIA_TYPE]["schema"]
            assert schema == {"$ref": "#/components/schemas/Problem"}, f"{method} {path}"


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/health/ready"])
async def test_openapi_health_unavailable_is_plain_json(openapi: dict[str, Any], path: str) -> None:
    unavailable = openapi["paths"][path]["get"]["responses"]["503"]

    assert set(unavailable["content"]) == {"application/json"}


async def test_openapi_flows_take_the_documented_body_and_key_header(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]
    # API-credits.md: a bonus may say when its credits expire.
    for flow, extra in (
        ("topup", {"metadata"}),
        ("bonus", {"reason", "expiresInDays", "expiresAt"}),
        ("spend", {"description"}),
    ):
        operation = openapi["paths"][f"/api/v1/wallet/{flow}"]["post"]
        reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = schemas[reference.rsplit("/", 1)[-1]]
        assert set(body["properties"]) == {"userId", "assetSymbol", "amount", "idempotencyKey"} | (
            extra
        )
        assert set(body["required"]) == {"userId", "assetSymbol", "amount"}
        headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
        assert headers == {"Idempotency-Key"}


async def test_openapi_flows_document_the_key_header_as_the_other_writes_do(
    openapi: dict[str, Any],
) -> None:
    # The flow routes declare their header apart (they take it as sent and validate it with the
    # body), so it must read exactly as the header of the writes the framework validates.
    transfer = openapi["paths"]["/api/v1/wallet/transfer"]["post"]["parameters"]
    for flow in ("topup", "bonus", "spend"):
        assert openapi["paths"][f"/api/v1/wallet/{flow}"]["post"]["parameters"] == transfer


@pytest.mark.parametrize(
    ("path", "fields", "required"),
    [
        (
            "/api/v1/wallet/transfer",
            {"fromUserId", "toUserId", "assetSymbol", "amount", "idempotencyKey", "description"},
            {"fromUserId", "toUserId", "assetSymbol", "amount"},
        ),
        (
            "/api/v1/wallet/holds",
            {"userId", "assetSymbol", "amount", "idempotencyKey"}
            | {"expiresInSeconds", "description"},
            {"userId", "assetSymbol", "amount"},
        ),
        (
            "/api/v1/wallet/holds/{holdId}/capture",
            {"idempotencyKey", "amount", "description"},
            set(),
        ),
        ("/api/v1/wallet/holds/{holdId}/release", {"idempotencyKey"}, set()),
        (
            "/api/v1/wallet/transactions/{transactionId}/refund",
            {"idempotencyKey", "amount", "reason"},
            set(),
        ),
        ("/api/v1/wallet/batch", {"idempotencyKey", "operations"}, {"operations"}),
    ],
    ids=["transfer", "hold", "capture", "release", "refund", "batch"],
)
async def test_openapi_ledger_writes_take_the_documented_body_and_key_header(
    openapi: dict[str, Any], path: str, fields: set[str], required: set[str]
) -> None:
    operation = openapi["paths"][path]["post"]
    reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = openapi["components"]["schemas"][reference.rsplit("/", 1)[-1]]

    assert set(body["properties"]) == fields
    assert set(body.get("required", [])) == required
    headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
    assert headers == {"Idempotency-Key"}


async def test_openapi_lists_take_the_documented_query_parameters(
    openapi: dict[str, Any],
) -> None:
    expected = {
        "/api/v1/users": LIST_PARAMETERS,
        "/api/v1/keys": LIST_PARAMETERS,
        "/api/v1/wallet/transactions/{userId}": LIST_PARAMETERS
        | {"type", "assetSymbol", "from", "to"},
        "/api/v1/wallet/ledger/{userId}": LIST_PARAMETERS | {"assetSymbol"},
        "/api/v1/wallet/holds": LIST_PARAMETERS | {"userId", "status"},
        "/api/v1/wallet/balance/{userId}/{assetSymbol}": {"at"},
        "/api/v1/wallet/balances/{userId}": {"at"},
        "/api/v1/reports/liabilities": {"assetSymbol", "at", "from", "to"},
    }
    for path, names in expected.items():
        parameters = openapi["paths"][path]["get"]["parameters"]
        assert {p["name"] for p in parameters if p["in"] == "query"} == names, path


async def test_openapi_describes_transactions_and_entries_with_their_documented_fields(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]

    def schema_of(reference: str) -> dict[str, Any]:
        found: dict[str, Any] = schemas[reference.rsplit("/", 1)[-1]]
        return found

    for flow, fields in FLOW_FIELDS.items():
        created = openapi["paths"][f"/api/v1/wallet/{flow}"]["post"]["responses"]["201"]
        schema = schema_of(created["content"]["application/json"]["schema"]["$ref"])
        assert set(schema["properties"]) == TRANSACTION_FIELDS | fields, flow
    transfer = openapi["paths"]["/api/v1/wallet/transfer"]["post"]["responses"]["201"]
    schema = schema_of(transfer["content"]["application/json"]["schema"]["$ref"])
    assert set(schema["properties"]) == TRANSACTION_FIELDS | {"toUserId", "description"}
    for name in ("RefundTransaction", "ReversalTransaction"):
        assert set(schemas[name]["properties"]) == TRANSACTION_FIELDS | {"refundOf", "reason"}
    # API-credits.md: the service's own expiry transactions carry nothing more.
    assert set(schemas["ExpiryTransaction"]["properties"]) == TRANSACTION_FIELDS
    assert schemas["ExpiryTransaction"]["properties"]["type"]["const"] == "expiry"
    assert set(schemas["EntryOut"]["properties"]) == ENTRY_FIELDS


async def test_openapi_describes_holds_balances_and_checkpoints_with_their_documented_fields(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]

    def properties(path: str, method: str = "get", status: str = "201") -> set[str]:
        answer = openapi["paths"][path][method]["responses"][status]["content"]
        name = answer["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        return set(schemas[name]["properties"])

    assert properties("/api/v1/wallet/holds", "post") == HOLD_FIELDS
    assert properties("/api/v1/wallet/holds/{holdId}", status="200") == HOLD_FIELDS
    assert properties("/api/v1/wallet/holds/{holdId}/release", "post", "200") == HOLD_FIELDS
    capture = "/api/v1/wallet/holds/{holdId}/capture"
    assert properties(capture, "post") == {"hold", "transaction"}
    assert properties("/api/v1/wallet/batch", "post") == {"transactions"}
    assert properties("/api/v1/ledger/checkpoint", status="200") == {"at", "chains"}
    assert set(schemas["ChainHead"]["properties"]) == {
        "account",
        "assetSymbol",
        "shard",
        "chainHash",
        "entries",
    }
    assert set(schemas["Balance"]["properties"]) == BALANCE_FIELDS
    assert set(schemas["BalanceAt"]["properties"]) == {
        *("userId", "assetSymbol", "balance", "paid", "free", "at")
    }
    assert set(schemas["AssetBalance"]["properties"]) == BALANCE_FIELDS - {"userId"}
    assert set(schemas["AssetBalanceAt"]["properties"]) == {
        "assetSymbol",
        "balance",
        "paid",
        "free",
    }
    assert set(schemas["NextExpiry"]["properties"]) == {"amount", "expiresAt"}
    assert {"operationIndex"} <= set(schemas["Problem"]["properties"])


async def test_openapi_describes_the_asset_endpoints_and_the_liability_report_as_documented(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]

    def schema_of(content: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = schemas[
            content["application/json"]["schema"]["$ref"].rsplit("/")[-1]
        ]
        return found

    create = openapi["paths"]["/api/v1/assets"]["post"]
    asked = schema_of(create["requestBody"]["content"])
    assert set(asked["properties"]) == ASSET_FIELDS
    assert set(asked["required"]) == {"symbol", "name"}
    assert set(schema_of(create["responses"]["201"]["content"])["properties"]) == ASSET_FIELDS
    change = openapi["paths"]["/api/v1/assets/{symbol}"]["patch"]
    asked = schema_of(change["requestBody"]["content"])
    assert set(asked["properties"]) == {"name", "description"} | ASSET_POLICY_FIELDS
    assert "required" not in asked  # only the fields given change
    assert set(schema_of(change["responses"]["200"]["content"])["properties"]) == ASSET_FIELDS
    listed = openapi["paths"]["/api/v1/assets"]["get"]["responses"]["200"]["content"]
    item = listed["application/json"]["schema"]["items"]["$ref"].rsplit("/")[-1]
    assert set(schemas[item]["properties"]) == ASSET_FIELDS
    for name in ASSET_POLICY_FIELDS:
        assert name in schemas[item]["required"]

    report = openapi["paths"]["/api/v1/reports/liabilities"]["get"]
    required = {p["name"] for p in report["parameters"] if p.get("required")}
    assert required == {"assetSymbol"}
    answer = schema_of(report["responses"]["200"]["content"])
    assert set(answer["properties"]) == {"assetSymbol", "at", "outstanding", "period"}
    assert set(schemas["Outstanding"]["properties"]) == {"paid", "free"}
    assert set(schemas["LiabilityPeriod"]["properties"]) == LIABILITY_PERIOD_FIELDS


async def test_openapi_asset_change_admits_null_only_for_the_lifetimes(
    openapi: dict[str, Any],
) -> None:
    def admits_null(schema: dict[str, Any]) -> bool:
        return schema.get("type") == "null" or any(map(admits_null, schema.get("anyOf", [])))

    properties = openapi["components"]["schemas"]["AssetChange"]["properties"]

    nullable = {name for name, schema in properties.items() if admits_null(schema)}
    assert nullable == {"freeLifetimeDays", "paidLifetimeDays"}
    # A field left out is left as it is: no field has a default.
    assert not [name for name, schema in properties.items() if "default" in schema]


def test_every_status_and_error_code_the_contract_names_is_one_the_service_answers() -> None:
    answered = {(status, error.code) for error, status in STATUS_OF.items()}
    named: set[tuple[int, str]] = set()
    for shared in SHARED_CONTRACT:
        if not shared.exists():
            pytest.skip(f"no shared contract at {shared} to read the error codes of")
        named |= {(int(s), code) for s, code in STATUS_AND_CODE.findall(shared.read_text())}

    assert (409, "asset_exists") in named  # API-credits.md's, read like the others
    assert named - answered == set()


async def test_openapi_describes_the_key_endpoints_bodies_as_documented(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]

    def schema_of(content: dict[str, Any]) -> dict[str, Any]:
        found: dict[str, Any] = schemas[
            content["application/json"]["schema"]["$ref"].rsplit("/")[-1]
        ]
        return found

    create = openapi["paths"]["/api/v1/keys"]["post"]
    asked = schema_of(create["requestBody"]["content"])
    assert set(asked["properties"]) == {"label", "scopes", "readsPerSecond", "writesPerSecond"}
    assert set(asked["required"]) == {"label", "scopes"}
    created = schema_of(create["responses"]["201"]["content"])
    assert set(created["properties"]) == {
        *("keyId", "key", "label", "scopes"),
        *("readsPerSecond", "writesPerSecond", "createdAt"),
    }
    listed = schema_of(openapi["paths"]["/api/v1/keys"]["get"]["responses"]["200"]["content"])
    item = schemas[listed["properties"]["items"]["items"]["$ref"].rsplit("/")[-1]]
    assert "key" not in item["properties"]  # never the secret again
    assert "revokedAt" in item["properties"]


async def test_interactive_docs_are_served(docs_client: httpx.AsyncClient) -> None:
    response = await docs_client.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


def test_api_md_carries_each_shared_contract_file_verbatim_in_order() -> None:
    for shared in SHARED_CONTRACT:
        if not shared.exists():
            pytest.skip(f"no shared contract at {shared} to compare docs/API.md with")
    text = API_MD.read_bytes()
    end = 0
    for shared in SHARED_CONTRACT:
        start = text.find(shared.read_bytes(), end)
        assert start >= 0, f"docs/API.md does not carry {shared} verbatim (after the one before)"
        end = start + len(shared.read_bytes())
