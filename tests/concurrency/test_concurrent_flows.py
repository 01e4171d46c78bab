"""Many clients at once through the real app on PostgreSQL, in both of its modes: with group commit
off each request runs its own transaction on its own pooled connection, so they contend on the
same rows and the same idempotency keys; with it on (the default) requests that arrive together
share transactions, and duplicates of one key can meet inside one batch."""

import asyncio
import random
import uuid
from collections import Counter

import httpx
import pytest
from concurrent_load import (
    ASSETS,
    GOLD,
    ConnectionPeak,
    FlowRequest,
    assert_ledger_verifies,
    balance,
    check_load,
    check_order_of_application,
    in_process_client,
    mixed_requests,
    new_user,
    new_users,
    run_wallet_command,
    send,
    send_all,
    transactions_of,
    without_request_id,
)

from wallet.service.seed import ALICE
from wallet.settings import Settings

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(120)]


def _runs_side_by_side(settings: Settings) -> bool:
    return settings.batch_max_size == 1


def _key(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex}"


async def test_concurrent_spends_never_overdraw(app_settings: Settings, api_key: str) -> None:
    peak = ConnectionPeak()
    async with in_process_client(app_settings, key=api_key, peak=peak) as client:
        user = await new_user(client, label="spender")
        topup = await send(client, FlowRequest("topup", user, GOLD, 500, _key("fund")))
        assert topup.status == 201, topup

        spends = [FlowRequest("spend", user, GOLD, 10, _key("spend")) for _ in range(100)]
        replies = await send_all(client, spends)

        statuses = Counter(r.status for r in replies)
        assert statuses == {201: 50, 422: 50}, [str(r) for r in replies if r.status >= 500][:5]
        refused = [r for r in replies if r.status == 422]
        assert {r.code for r in refused} == {"insufficient_funds"}
        assert not any(r.is_replayed for r in refused), "each key was refused for the first time"
        applied = [r for r in replies if r.status == 201]
        # Each spend saw the one before it: the balances after them are 490, 480, ..., 0.
        assert sorted(r.body["balanceAfter"] for r in applied) == list(range(0, 500, 10))
        assert await balance(client, user, GOLD) == 0

        history = await transactions_of(client, user, flow="spend")
        assert len(history) == 50
        assert {t["transactionId"] for t in history} == {r.body["transactionId"] for r in applied}
        assert all(t["amount"] == 10 for t in history)
        # Newest first is the order of application: 0, 10, ..., 490 going back in time.
        assert [t["balanceAfter"] for t in history] == list(range(0, 500, 10))

        # A refusal is final (API-operations.md): with funds again, the refused spends sent
        # again, all at once, are each their first refusal replayed, and move nothing.
        refill = await send(client, FlowRequest("topup", user, GOLD, 500, _key("refill")))
        assert refill.status == 201, refill
        again = await send_all(client, [r.request for r in refused])
        assert all(r.status == 422 and r.is_replayed for r in again), [
            str(r) for r in again if r.status != 422 or not r.is_replayed
        ][:5]
        assert [without_request_id(r.body) for r in again] == [
            without_request_id(r.body) for r in refused
        ]
        assert await balance(client, user, GOLD) == 500
        assert len(await transactions_of(client, user, flow="spend")) == 50
        await check_order_of_application(client, user)
    if _runs_side_by_side(app_settings):
        assert peak.highest > 10, "the spends ran their transactions side by side"
    await assert_ledger_verifies(app_settings.database_url.get_secret_value())


async def test_concurrent_duplicates_of_one_key_apply_once(
    app_settings: Settings, api_key: str
) -> None:
    peak = ConnectionPeak()
    async with in_process_client(app_settings, key=api_key, peak=peak) as client:
        spend = FlowRequest("spend", ALICE, GOLD, 10, _key("same"))
        replies = await send_all(client, [spend] * 50)

        assert Counter(r.status for r in replies) == {201: 1, 200: 49}, [
            str(r) for r in replies if r.status not in (200, 201)
        ][:5]
        (applied,) = [r for r in replies if r.status == 201]
        replays = [r for r in replies if r.status == 200]
        assert not applied.is_replayed
        assert all(r.is_replayed for r in replays)
        assert {r.body["transactionId"] for r in replies} == {applied.body["transactionId"]}
        assert all(r.body == applied.body for r in replays), "a replay is the stored response"
        assert applied.body["balanceAfter"] == 990
        assert await balance(client, ALICE, GOLD) == 990
        history = await transactions_of(client, ALICE, flow="spend")
        assert [t["transactionId"] for t in history] == [applied.body["transactionId"]]
    if _runs_side_by_side(app_settings):
        assert peak.highest > 10, "the duplicates waited on each other in the database"
    await assert_ledger_verifies(app_settings.database_url.get_secret_value())


async def test_concurrent_reuse_of_one_key_for_two_requests_applies_one(
    app_settings: Settings, api_key: str
) -> None:
    async with in_process_client(app_settings, key=api_key) as client:
        user = await new_user(client, label="reuse")
        reused = _key("reused")
        ten = FlowRequest("topup", user, GOLD, 10, reused)
        twenty_five = FlowRequest("topup", user, GOLD, 25, reused)
        replies = await send_all(client, [ten, twenty_five] * 25)

        assert not [r for r in replies if r.status >= 500], [str(r) for r in replies][:5]
        (applied,) = [r for r in replies if r.status == 201]
        winner = applied.request
        same = [r for r in replies if r.request == winner and r is not applied]
        other = [r for r in replies if r.request != winner]
        assert len(same) == 24
        assert len(other) == 25
        assert all(r.status == 200 and r.is_replayed for r in same), [str(r) for r in same][:5]
        assert all(r.body["transactionId"] == applied.body["transactionId"] for r in same)
        assert all(r.status == 409 and r.code == "idempotency_key_reused" for r in other), [
            str(r) for r in other
        ][:5]
        assert await balance(client, user, GOLD) == winner.amount
        history = await transactions_of(client, user)
        assert [t["transactionId"] for t in history] == [applied.body["transactionId"]]
    await assert_ledger_verifies(app_settings.database_url.get_secret_value())


async def test_concurrent_first_topups_of_a_new_user_all_apply(
    app_settings: Settings, api_key: str
) -> None:
    async with in_process_client(app_settings, key=api_key) as client:
        user = await new_user(client, label="first")
        topups = [
            FlowRequest("topup", user, GOLD, amount, _key("first")) for amount in range(1, 51)
        ]
        replies = await send_all(client, topups)

        assert [r.status for r in replies] == [201] * 50, [
            str(r) for r in replies if r.status != 201
        ][:5]
        total = sum(range(1, 51))
        after = sorted(r.body["balanceAfter"] for r in replies)
        assert len(set(after)) == 50, "each top-up saw the ones before it"
        assert after[-1] == total
        assert await balance(client, user, GOLD) == total
        assert len(await transactions_of(client, user)) == 50
    await assert_ledger_verifies(app_settings.database_url.get_secret_value())


async def test_concurrent_first_topups_of_many_new_users_all_apply(
    app_settings: Settings, api_key: str
) -> None:
    async with in_process_client(app_settings, key=api_key) as client:
        users = await new_users(client, label="newcomer", count=50)
        topups = [
            FlowRequest("topup", user, ASSETS[index % len(ASSETS)], index + 1, _key("first"))
            for index, user in enumerate(users)
        ]
        replies = await send_all(client, topups)

        assert [r.status for r in replies] == [201] * 50, [
            str(r) for r in replies if r.status != 201
        ][:5]
        assert all(r.body["balanceAfter"] == r.request.amount for r in replies)
        for topup in topups:
            response = await client.get(f"/api/v1/wallet/balances/{topup.user_id}")
            assert response.status_code == 200, response.text
            held = {b["assetSymbol"]: b["balance"] for b in response.json()["balances"]}
            assert held == {a: topup.amount if a == topup.asset else 0 for a in ASSETS}
    await assert_ledger_verifies(app_settings.database_url.get_secret_value())


async def test_mixed_concurrent_load_keeps_every_invariant(
    app_settings: Settings, api_key: str
) -> None:
    rng = random.Random(20261125)
    assets = (GOLD, "DIAMONDS")
    peak = ConnectionPeak()
    async with in_process_client(app_settings, key=api_key, peak=peak) as client:
        users = await new_users(client, label="mixed", count=20)
        requests = mixed_requests(rng, users, count=600, duplicate_share=0.15, assets=assets)
        # Under SERIALIZABLE, one transaction per request and 64 clients on the system accounts'
        # rows, a transaction can lose every rerun for RETRY_FOR_S and be answered 503: not a
        # final answer, so the client sends it again with its key, as the contract says.
        is_serializable = app_settings.database_isolation == "serializable"
        replies = await send_all(
            client, requests, concurrency=64, retries_when_unavailable=2 if is_serializable else 0
        )

        report = await check_load(client, replies, users=users, assets=assets)
    # The load did what it is for: overdrawing spends refused, concurrent duplicates replayed.
    assert report.applied > 300, report
    assert report.codes["insufficient_funds"] > 0, report
    assert report.refusals_replayed > 0, report
    assert report.statuses[200] > 0, report
    assert report.duplicated_keys > 50, report
    if _runs_side_by_side(app_settings):
        assert peak.highest > 10, "the requests ran their transactions side by side"

    await assert_ledger_verifies(app_settings.database_url.get_secret_value())
    exit_code, output = await run_wallet_command(
        "verify", database_url=app_settings.database_url.get_secret_value()
    )
    assert exit_code == 0, output


async def test_a_request_the_database_refuses_fails_alone(
    app_settings: Settings, api_key: str
) -> None:
    """PostgreSQL text cannot hold a NUL character: a spend whose description has one must not
    take down the requests in flight with it (with group commit, those sharing its batch)."""
    async with in_process_client(app_settings, key=api_key) as client:
        user = await new_user(client, label="bystander")
        topups = [FlowRequest("topup", user, GOLD, 5, _key("bystander")) for _ in range(20)]
        poisoned = {
            **FlowRequest("spend", ALICE, GOLD, 1, _key("nul")).body(),
            "description": "a\x00b",
        }

        async def send_poisoned() -> httpx.Response:
            return await client.post("/api/v1/wallet/spend", json=poisoned)

        bad, replies = await asyncio.gather(send_poisoned(), send_all(client, topups))

        assert [r.status for r in replies] == [201] * 20, [str(r) for r in replies][:3]
        assert await balance(client, user, GOLD) == 100
        assert bad.status_code < 500, bad.text
        assert await balance(client, ALICE, GOLD) == 1000 - (bad.status_code == 201)
    await assert_ledger_verifies(app_settings.database_url.get_secret_value())
