"""Losing PostgreSQL and getting it back: a TCP proxy between the app and the database is closed
(new connections refused, open ones aborted) and reopened on the same port; the same app
answers 503 while it is gone and recovers by itself."""

import asyncio
import time
import uuid

import httpx
import pytest
import sqlalchemy as sa
from concurrent_load import (
    GOLD,
    FlowRequest,
    Reply,
    TcpProxy,
    assert_ledger_verifies,
    balance,
    in_process_client,
    send,
)

from app_clients import create_key
from wallet.service.seed import ALICE
from wallet.settings import Settings

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(90)]

TIMEOUT_S = 2.0
ANSWER_WITHIN_S = 4 * TIMEOUT_S


async def _health(client: httpx.AsyncClient) -> httpx.Response:
    return await asyncio.wait_for(client.get("/api/v1/health"), ANSWER_WITHIN_S)


async def _spend(client: httpx.AsyncClient, key: str) -> Reply:
    return await asyncio.wait_for(
        send(client, FlowRequest("spend", ALICE, GOLD, 7, key)), ANSWER_WITHIN_S
    )


async def _healthy_again(client: httpx.AsyncClient, *, within_s: float) -> httpx.Response:
    deadline = time.monotonic() + within_s
    response = await _health(client)
    for _ in range(int(within_s / 0.2)):
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
        response = await _health(client)
    return response


@pytest.mark.parametrize("batch_max_size", [1, 128], ids=["own-transactions", "group-commit"])
async def test_health_and_flows_recover_when_the_database_returns(
    postgres_database_url: str, batch_max_size: int
) -> None:
    key = await create_key(postgres_database_url)
    upstream_port = sa.make_url(postgres_database_url).port or 5432
    proxy = TcpProxy(upstream_port=upstream_port)
    await proxy.start()
    settings = Settings(
        database_url=proxy.url_for(postgres_database_url),
        database_pool_size=5,
        database_timeout_s=TIMEOUT_S,
        batch_max_size=batch_max_size,
    )
    try:
        async with in_process_client(settings, key=key) as client:
            response = await _health(client)
            assert response.status_code == 200, response.text
            first = await _spend(client, f"before-{uuid.uuid4().hex}")
            assert first.status == 201, first
            assert proxy.open_connections > 0, "the app reaches PostgreSQL through the proxy"

            await proxy.close()
            assert proxy.open_connections == 0
            response = await _health(client)
            assert response.status_code == 503, response.text
            assert response.json() == {"status": "unavailable", "database": "unavailable"}
            lost_key = f"during-{uuid.uuid4().hex}"
            refused = await _spend(client, lost_key)
            assert refused.status == 503, refused
            assert refused.code == "database_unavailable", refused

            accepted = proxy.accepted
            await proxy.start()
            response = await _healthy_again(client, within_s=15)
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ok", "database": "ok"}
            assert proxy.accepted > accepted, "the app connected anew"
            # The refused spend was not applied: its key runs it now, for the first time.
            retried = await _spend(client, lost_key)
            assert retried.status == 201, retried
            assert not retried.is_replayed
            assert await balance(client, ALICE, GOLD) == 1000 - 7 - 7
    finally:
        await proxy.close()
    await assert_ledger_verifies(postgres_database_url)
