"""Rate limits (API-operations.md): each key has a budget of reads and of writes per second, with
bursts up to twice that; over it, 429 with Retry-After and the draft RateLimit fields, and the
refused request changes nothing. With Redis, two workers share one budget."""

import asyncio
import re
import time

import httpx
import pytest
import redis
from api_checks import ALICE, API, assert_problem, flow_body, post_flow
from pydantic import SecretStr

from app_clients import app_client, bearer, create_key
from wallet.domain.access import Scope
from wallet.http.rate_limits import WINDOW_S
from wallet.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
POLICY = re.compile(r'"(reads|writes)";q=(\d+);w=2')
REMAINING = re.compile(r'"(reads|writes)";r=(\d+);t=(\d+)')


def fields_of(pattern: re.Pattern[str], header: str) -> re.Match[str]:
    """A RateLimit header's fields, after checking the header has the shape `pattern` gives."""
    match = pattern.fullmatch(header)
    assert match is not None, header
    return match


async def window_start() -> None:
    """Budgets are counted per window of 2 s aligned to the clock (the sliding window counter
    weighs the previous window in, rounding down): each test sends its counted requests from a
    window's start, after its set-up, so they fall in one window and the counts are exact."""
    await asyncio.sleep(WINDOW_S - time.time() % WINDOW_S)


@pytest.fixture(scope="module")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as error:
        pytest.skip(f"Redis not reachable at {REDIS_URL}: {error}")
    return REDIS_URL


async def test_writes_past_the_burst_are_429_and_change_nothing(
    settings: Settings, admin_key: str
) -> None:
    url = settings.database_url.get_secret_value()
    limited = await create_key(url, Scope.ADMIN, writes_per_second=2)
    async with app_client(settings, key=limited) as http:
        await window_start()
        allowed = [await post_flow(http, "topup", flow_body(amount=1)) for _ in range(4)]
        assert [a.status_code for a in allowed] == [201] * 4  # a burst of twice the budget
        refused_body = flow_body(amount=1)
        refused = await post_flow(http, "topup", refused_body)

        assert_problem(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
        assert fields_of(POLICY, refused.headers["ratelimit-policy"]).groups() == ("writes", "4")
        assert fields_of(REMAINING, refused.headers["ratelimit"]).group(2) == "0"
        # Reads have a budget of their own, unlimited for this key: no fields on them.
        read = await http.get(f"{API}/wallet/balance/{ALICE}/GOLD_COINS")
        assert read.status_code == 200
        assert "ratelimit" not in read.headers
        assert read.json()["balance"] == 1004
    async with app_client(settings, key=admin_key) as http:
        # The refused key was not recorded: it applies now, under an unlimited key.
        assert (await post_flow(http, "topup", refused_body)).status_code == 201


async def test_allowed_answers_carry_the_policy_and_what_remains(
    settings: Settings,
) -> None:
    url = settings.database_url.get_secret_value()
    key = await create_key(url, Scope.WALLET_READ, reads_per_second=10)
    async with app_client(settings, key=key) as http:
        await window_start()
        remaining = []
        for _ in range(3):
            response = await http.get(f"{API}/assets")
            assert response.status_code == 200
            assert fields_of(POLICY, response.headers["ratelimit-policy"]).groups() == (
                "reads",
                "20",
            )
            remaining.append(int(fields_of(REMAINING, response.headers["ratelimit"]).group(2)))
    assert remaining == [19, 18, 17]


async def test_budgets_set_by_the_key_endpoint_apply(client: httpx.AsyncClient) -> None:
    created = await client.post(
        f"{API}/keys", json={"label": "slow", "scopes": ["wallet:read"], "readsPerSecond": 1}
    )
    slow = bearer(created.json()["key"])
    await window_start()
    statuses = [(await client.get(f"{API}/assets", headers=slow)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_two_workers_share_one_budget_through_redis(
    settings: Settings, redis_url: str
) -> None:
    url = settings.database_url.get_secret_value()
    key = await create_key(url, Scope.ADMIN, writes_per_second=1)
    shared = settings.model_copy(update={"redis_url": SecretStr(redis_url)})
    async with app_client(shared, key=key) as first, app_client(shared, key=key) as second:
        await window_start()
        statuses = []
        for worker in (first, second, first, second):
            statuses.append((await post_flow(worker, "topup", flow_body(amount=1))).status_code)
    assert statuses == [201, 201, 429, 429]


async def test_without_redis_each_worker_keeps_its_own_budget(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    key = await create_key(url, Scope.ADMIN, writes_per_second=1)
    async with app_client(settings, key=key) as first, app_client(settings, key=key) as second:
        await window_start()
        statuses = []
        for worker in (first, first, first, second, second, second):
            statuses.append((await post_flow(worker, "topup", flow_body(amount=1))).status_code)
    assert statuses == [201, 201, 429, 201, 201, 429]


async def test_an_unreachable_redis_lets_requests_through(settings: Settings) -> None:
    url = settings.database_url.get_secret_value()
    key = await create_key(url, Scope.ADMIN, writes_per_second=1)
    nowhere = settings.model_copy(update={"redis_url": SecretStr("redis://127.0.0.1:1/0")})
    async with app_client(nowhere, key=key) as http:
        statuses = [
            (await post_flow(http, "topup", flow_body(amount=1))).status_code for _ in range(3)
        ]
    assert statuses == [201, 201, 201]
