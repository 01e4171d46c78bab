"""Operating the service (API-operations.md and the issue's defences): request ids, the headers
every answer carries, readiness, the metrics token, the docs served offline, the request deadline,
and one log line per request that never holds a secret or a body."""

import re
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
import structlog
from alembic import command
from api_checks import ALICE, API, assert_problem, flow_body, post_flow
from pydantic import SecretStr
from sqlalchemy import Connection

from app_clients import app_client, bearer
from wallet.settings import Settings
from wallet.store.database import Database, create_engine
from wallet.store.migrate import alembic_config


async def test_a_valid_request_id_is_kept_and_returned(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{API}/assets", headers={"X-Request-ID": "shop-eu:req.42_a-b"})
    assert response.headers["x-request-id"] == "shop-eu:req.42_a-b"

    problem = assert_problem(
        await client.get(f"{API}/users/nobody", headers={"X-Request-ID": "trace-7"}),
        404,
        "user_not_found",
    )
    assert problem["requestId"] == "trace-7"


@pytest.mark.parametrize("presented", [None, "", "has space", "x" * 129, "semi;colon"])
async def test_a_missing_or_invalid_request_id_is_replaced_by_one_made(
    client: httpx.AsyncClient, presented: str | None
) -> None:
    headers = {} if presented is None else {"X-Request-ID": presented}
    first = (await client.get(f"{API}/assets", headers=headers)).headers["x-request-id"]
    second = (await client.get(f"{API}/assets", headers=headers)).headers["x-request-id"]
    assert first != second
    assert presented not in (first, second)


async def test_every_answer_is_not_cached_nor_sniffed(client: httpx.AsyncClient) -> None:
    answers = [
        await client.get(f"{API}/assets"),
        await post_flow(client, "topup", flow_body()),
        await client.get(f"{API}/users/nobody"),
        await client.get(f"{API}/health"),
        await client.get("/no/such/route"),
    ]
    for response in answers:
        assert response.headers["cache-control"] == "no-store", response.request.url
        assert response.headers["x-content-type-options"] == "nosniff", response.request.url


async def test_ready_when_the_database_answers_at_the_newest_migration(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(f"{API}/health/ready")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_not_ready_when_the_schema_is_behind(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    database = Database(create_engine(Settings(database_url=url)))

    def upgrade_to_0002(connection: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = connection
        command.upgrade(config, "0002")

    async with database.transaction(is_write=True) as connection:
        await connection.run_sync(upgrade_to_0002)
    await database.close()

    async with app_client(Settings(database_url=url)) as http:
        response = await http.get(f"{API}/health/ready")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert "wallet migrate" in response.json()["reason"]


async def test_not_ready_when_the_database_cannot_be_reached() -> None:
    unreachable = Settings(
        database_url="postgresql://nobody@127.0.0.1:1/none", database_timeout_s=1
    )
    async with app_client(unreachable) as http:
        response = await http.get(f"{API}/health/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "the database cannot be reached"}


async def test_metrics_are_open_by_default_and_need_the_token_when_one_is_set(
    settings: Settings,
) -> None:
    async with app_client(settings) as http:
        response = await http.get("/metrics")
        assert response.status_code == 200
        assert "wallet_http_requests_total" in response.text

    guarded = settings.model_copy(update={"metrics_token": SecretStr("s3cret-token")})
    async with app_client(guarded) as http:
        assert_problem(await http.get("/metrics"), 401, "unauthenticated")
        assert_problem(await http.get("/metrics", headers=bearer("wrong")), 401, "unauthenticated")
        response = await http.get("/metrics", headers=bearer("s3cret-token"))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")


async def test_the_root_points_at_the_docs_and_health(client: httpx.AsyncClient) -> None:
    links = (await client.get("/")).json()
    for link in ("/docs", "/openapi.json", f"{API}/health", f"{API}/health/ready"):
        assert link in links.values()
        assert (await client.get(link)).status_code == 200, link


async def test_the_docs_load_their_assets_from_the_service_itself(
    client: httpx.AsyncClient,
) -> None:
    page = (await client.get("/docs")).text
    assert "https://" not in page
    assert "http://" not in page
    for asset in ("/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"):
        assert f'"{asset}"' in page or f"'{asset}'" in page
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 10_000, asset


async def test_a_request_past_its_deadline_is_503_and_its_flow_is_not_applied(
    settings: Settings, admin_key: str
) -> None:
    # The flow waits a whole second for its batch to fill; the deadline is a fifth of that.
    slow = settings.model_copy(update={"request_timeout_s": 0.2, "batch_max_wait_ms": 1000})
    body = flow_body(amount=7)
    async with app_client(slow, key=admin_key) as http:
        response = await post_flow(http, "topup", body)
        problem = assert_problem(response, 503, "request_timeout")
        assert response.headers["retry-after"] == "1"
        assert "same idempotency key" in problem["detail"]
    async with app_client(settings, key=admin_key) as http:
        balance = (await http.get(f"{API}/wallet/balance/{ALICE}/GOLD_COINS")).json()["balance"]
        assert balance == 1000
        # The key was never used: the retry applies it now.
        assert (await post_flow(http, "topup", body)).status_code == 201


async def test_one_log_line_per_request_without_secrets_or_bodies(
    settings: Settings, admin_key: str
) -> None:
    body = flow_body(amount=3, metadata={"card": "4111-1111-1111-1111"})
    # As the service's logging does: the request id is bound in the context.
    with structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs:
        async with app_client(settings, key=admin_key) as http:
            response = await post_flow(http, "topup", body, headers={"X-Request-ID": "log-1"})
            keys = (await http.get(f"{API}/keys")).json()["items"]
    lines = [event for event in logs if event.get("event") == "request"]
    assert len(lines) == 2  # the top-up and the list of keys
    line = lines[0]
    assert line["request_id"] == "log-1"
    assert line["method"] == "POST"
    assert line["route"] == f"{API}/wallet/topup"
    assert line["status"] == response.status_code == 201
    assert line["key_id"] in {k["keyId"] for k in keys}
    assert line["latency_ms"] > 0
    text = str(logs)
    assert admin_key not in text
    assert "4111-1111" not in text


async def test_an_unknown_path_is_404_and_counted_under_one_label(
    client: httpx.AsyncClient,
) -> None:
    assert_problem(await client.get("/api/v1/no/such/route/123"), 404, "not_found")
    metrics = (await client.get("/metrics")).text
    assert 'route="/api/v1/no/such/route/123"' not in metrics
    assert 'route="other"' in metrics


async def test_the_database_url_password_never_reaches_a_log_or_an_answer(
    tmp_path: Path,
) -> None:
    unreachable = Settings(
        database_url="postgresql://wallet:pa55word-xyz@127.0.0.1:1/none", database_timeout_s=1
    )
    assert "pa55word-xyz" not in repr(unreachable)
    assert "pa55word-xyz" not in str(unreachable)
    with structlog.testing.capture_logs() as logs:
        async with app_client(unreachable) as http:
            answers = [await http.get(f"{API}/health"), await http.get(f"{API}/health/ready")]
    assert all(a.status_code == 503 for a in answers)
    assert "pa55word-xyz" not in str(logs) + "".join(a.text for a in answers)


async def test_engines_hide_bound_values_from_errors(settings: Settings) -> None:
    database = Database(create_engine(settings))
    secret_email = "hidden-value@example.com"
    with pytest.raises(sa.exc.StatementError) as raised:
        async with database.engine.connect() as connection:
            await connection.execute(
                sa.text("SELECT * FROM no_such_table WHERE email = :email"), {"email": secret_email}
            )
    await database.close()
    assert secret_email not in str(raised.value)


async def test_an_undeclared_method_without_a_body_is_405_naming_the_allowed_ones(
    client: httpx.AsyncClient,
) -> None:
    for path, allowed in (
        (f"{API}/assets", "GET, POST"),
        (f"{API}/assets/GOLD_COINS", "PATCH"),
        (f"{API}/wallet/topup", "POST"),
    ):
        response = await client.put(path)
        assert_problem(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed


@pytest.mark.parametrize("email", ["x@y.test", "ops@localhost", "Dana.O'Neil+wallet@example.com"])
async def test_a_syntactically_valid_email_is_accepted(
    client: httpx.AsyncClient, email: str
) -> None:
    response = await client.post(f"{API}/users", json={"email": email, "name": "N"})
    assert response.status_code == 201, response.text
    assert response.json()["email"] == email


async def test_the_cursors_the_service_makes_are_what_its_document_declares(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    declared = {
        parameter["schema"]["anyOf"][0]["pattern"]
        for path in document["paths"].values()
        for operation in path.values()
        for parameter in operation.get("parameters", [])
        if parameter["name"] == "cursor"
    }
    assert len(declared) == 1
    pattern = re.compile(declared.pop())
    await client.post(f"{API}/keys", json={"label": "second", "scopes": ["wallet:read"]})
    for path in (f"{API}/users", f"{API}/wallet/transactions/{ALICE}", f"{API}/keys"):
        cursor = (await client.get(path, params={"limit": 1})).json()["nextCursor"]
        assert pattern.fullmatch(cursor), (path, cursor)
        assert (await client.get(path, params={"limit": 1, "cursor": cursor})).status_code == 200


async def test_a_405_names_every_method_of_its_path(client: httpx.AsyncClient) -> None:
    for method, path, allowed in (
        ("OPTIONS", f"{API}/keys", "GET, POST"),
        ("PATCH", f"{API}/users", "GET, POST"),
        ("PUT", f"{API}/keys/some-key", "DELETE"),
    ):
        response = await client.request(method, path)
        assert_problem(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed, (method, path)
