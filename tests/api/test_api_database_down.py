"""When the database cannot be reached: health says so in plain JSON, and every other request is a
503 database_unavailable problem, applied nowhere; its API key cannot be checked either, which
is no reason to call the key bad (401)."""

from collections.abc import AsyncIterator

import httpx
import pytest
from api_checks import ALICE, API, FLOWS, assert_problem, flow_body, post_flow

from app_clients import app_client
from wallet.domain.access import new_secret
from wallet.settings import Settings

UNREACHABLE = Settings(
    database_url="postgresql+asyncpg://postgres@127.0.0.1:1/none", database_timeout_s=1
)


@pytest.fixture
async def cut_off_client() -> AsyncIterator[httpx.AsyncClient]:
    """A client of the real app whose database does not answer, sending a well-formed API key
    (which only that database could confirm)."""
    async with app_client(UNREACHABLE, key=new_secret()) as http:
        yield http


async def test_health_is_503_unavailable_in_plain_json(
    cut_off_client: httpx.AsyncClient,
) -> None:
    response = await cut_off_client.get(f"{API}/health")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "unavailable", "database": "unavailable"}


async def test_flows_are_503_database_unavailable(cut_off_client: httpx.AsyncClient) -> None:
    for flow in FLOWS:
        response = await post_flow(cut_off_client, flow, flow_body())
        assert_problem(response, 503, "database_unavailable")


async def test_reads_and_user_creation_are_503_database_unavailable(
    cut_off_client: httpx.AsyncClient,
) -> None:
    reads = [
        f"{API}/assets",
        f"{API}/users",
        f"{API}/users/{ALICE}",
        f"{API}/wallet/balance/{ALICE}/GOLD_COINS",
        f"{API}/wallet/balances/{ALICE}",
        f"{API}/wallet/transactions/{ALICE}",
        f"{API}/wallet/ledger/{ALICE}",
    ]
    for path in reads:
        assert_problem(await cut_off_client.get(path), 503, "database_unavailable")
    created = await cut_off_client.post(f"{API}/users", json={"email": "a@b.co", "name": "A"})
    assert_problem(created, 503, "database_unavailable")
