"""The OpenAPI document the service serves agrees with docs/API.md: the same endpoints, every
documented answer, and API.md itself is the shared contract, byte for byte."""

import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_checks import (
    ENTRY_FIELDS,
    FREE_TEXT_FIELD,
    PROBLEM_MEDIA_TYPE,
    TRANSACTION_FIELDS,
    get_ok,
)

from wallet.http.app import create_app
from wallet.settings import Settings

REPO = Path(__file__).resolve().parents[2]
API_MD = REPO / "docs" / "API.md"
SHARED_API_MD = REPO.parent / "shared" / "API.md"
ENDPOINT_ROW = re.compile(r"^\| `(GET|POST|PUT|PATCH|DELETE) (/api/v1/[^`]*)` \|", re.MULTILINE)
LIST_PARAMETERS = {"limit", "cursor", "offset"}


def documented_endpoints() -> set[tuple[str, str]]:
    """The (method, path) rows of the endpoints table of API.md."""
    return {(method, path) for method, path in ENDPOINT_ROW.findall(API_MD.read_text())}


def documented_successes(method: str, path: str) -> set[int]:
    """The success statuses API.md gives this endpoint: a flow answers 201, or 200 on a replay."""
    if method == "POST":
        return {200, 201} if path.startswith("/api/v1/wallet/") else {201}
    return {200}


def documented_errors(method: str, path: str) -> set[int]:
    """The error statuses API.md gives this endpoint, from its conventions and tables."""
    statuses = {503}  # every request needs the database; health says so in plain JSON
    if method == "POST":  # a body: malformed, too large, not JSON, or breaking the rules
        statuses |= {400, 413, 415, 422}
    if "{userId}" in path:  # an unknown user, or an id that breaks the id rules
        statuses |= {404, 422}
    if path.startswith("/api/v1/wallet/") and method == "POST":
        statuses |= {404, 409}  # an unknown user or asset; a reused key
    if path == "/api/v1/users":
        statuses |= {409} if method == "POST" else {422}  # user_exists; bad paging parameters
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


async def test_openapi_paths_and_methods_are_the_endpoints_of_api_md(
    openapi: dict[str, Any],
) -> None:
    assert set(operations(openapi)) == documented_endpoints()


async def test_openapi_documents_every_error_status_of_api_md(openapi: dict[str, Any]) -> None:
    assert missing_statuses(openapi, documented_errors) == {}


async def test_openapi_documents_every_success_status_of_api_md(openapi: dict[str, Any]) -> None:
    assert missing_statuses(openapi, documented_successes) == {}


async def test_openapi_error_answers_are_problem_json(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    assert {"type", "title", "status", "detail", "code"} <= set(schemas["Problem"]["properties"])
    for (method, path), operation in operations(openapi).items():
        for status, response in operation["responses"].items():
            if int(status) < 400 or path == "/api/v1/health":
                continue
            content = response.get("content", {})
            assert PROBLEM_MEDIA_TYPE in content, f"{method} {path} {status}: {content}"
            schema = content[PROBLEM_MEDIA_TYPE]["schema"]
            assert schema == {"$ref": "#/components/schemas/Problem"}, f"{method} {path}"


async def test_openapi_health_unavailable_is_plain_json(openapi: dict[str, Any]) -> None:
    unavailable = openapi["paths"]["/api/v1/health"]["get"]["responses"]["503"]

    assert set(unavailable["content"]) == {"application/json"}


async def test_openapi_flows_take_the_documented_body_and_key_header(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]
    for flow, free_text in (("topup", "metadata"), ("bonus", "reason"), ("spend", "description")):
        operation = openapi["paths"][f"/api/v1/wallet/{flow}"]["post"]
        reference = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = schemas[reference.rsplit("/", 1)[-1]]
        assert set(body["properties"]) == {
            "userId",
            "assetSymbol",
            "amount",
            "idempotencyKey",
            free_text,
        }
        assert set(body["required"]) == {"userId", "assetSymbol", "amount"}
        headers = {p["name"] for p in operation.get("parameters", []) if p["in"] == "header"}
        assert headers == {"Idempotency-Key"}


async def test_openapi_lists_take_the_documented_query_parameters(
    openapi: dict[str, Any],
) -> None:
    expected = {
        "/api/v1/users": LIST_PARAMETERS,
        "/api/v1/wallet/transactions/{userId}": LIST_PARAMETERS | {"type", "assetSymbol"},
        "/api/v1/wallet/ledger/{userId}": LIST_PARAMETERS | {"assetSymbol"},
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

    for flow, free_text in FREE_TEXT_FIELD.items():
        created = openapi["paths"][f"/api/v1/wallet/{flow}"]["post"]["responses"]["201"]
        schema = schema_of(created["content"]["application/json"]["schema"]["$ref"])
        assert set(schema["properties"]) == TRANSACTION_FIELDS | {free_text}, flow
    assert set(schemas["EntryOut"]["properties"]) == ENTRY_FIELDS


async def test_interactive_docs_are_served(docs_client: httpx.AsyncClient) -> None:
    response = await docs_client.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


def test_api_md_is_the_shared_contract_byte_for_byte() -> None:
    if not SHARED_API_MD.exists():
        pytest.skip(f"no shared contract at {SHARED_API_MD} to compare docs/API.md with")
    assert API_MD.read_bytes() == SHARED_API_MD.read_bytes()
