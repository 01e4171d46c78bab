"""The checkpoint of API-ledger.md: for an admin only, the newest link and length of every
chain (an account's balance row of an asset: a user has one, a system account several), the same
links the ledger entries show."""

import re
from collections import Counter
from typing import Any

import httpx
import pytest
from api_checks import (
    ALICE,
    API,
    ASSET_NAMES,
    BOB,
    assert_problem,
    assert_rfc3339_utc,
    create_hold,
    create_user,
    created,
    flow_body,
    get_ok,
    post_flow,
    post_refund,
    transactions_of,
    transfer_body,
)

from app_clients import bearer, create_key
from wallet.domain.access import Scope
from wallet.settings import Settings

CHECKPOINT = f"{API}/ledger/checkpoint"
SYSTEM_ACCOUNTS = ("system:bonus_pool", "system:revenue", "system:treasury")


Chain = tuple[str, str, int]  # (account, asset, shard)


async def checkpoint(client: httpx.AsyncClient) -> dict[Chain, dict[str, Any]]:
    """The checkpoint's chains by (account, asset, shard), after checking its shape."""
    body = await get_ok(client, CHECKPOINT)
    assert set(body) == {"at", "chains"}, body
    assert_rfc3339_utc(body["at"])
    chains = body["chains"]
    for chain in chains:
        assert set(chain) == {"account", "assetSymbol", "shard", "chainHash", "entries"}, chain
        assert re.fullmatch("[0-9a-f]{64}", chain["chainHash"]), chain
        assert type(chain["entries"]) is int
        assert chain["entries"] >= 1
        assert type(chain["shard"]) is int
        assert chain["shard"] == 0 or chain["account"] in SYSTEM_ACCOUNTS, chain
    names = [(chain["account"], chain["assetSymbol"], chain["shard"]) for chain in chains]
    assert names == sorted(set(names))  # each chain once, by account, asset, then shard
    return {(chain["account"], chain["assetSymbol"], chain["shard"]): chain for chain in chains}


async def ledger_of(client: httpx.AsyncClient, user_id: str, asset: str) -> list[dict[str, Any]]:
    page = await get_ok(client, f"{API}/wallet/ledger/{user_id}", assetSymbol=asset, limit=500)
    assert page["nextCursor"] is None
    entries: list[dict[str, Any]] = page["items"]
    return entries


async def some_history(client: httpx.AsyncClient) -> str:
    """Flows of every type between Alice, Bob and a new user; the new user's id."""
    carol = await create_user(client)
    spend = created(await post_flow(client, "spend", flow_body(amount=30)))
    created(await post_flow(client, "bonus", flow_body(user_id=BOB, asset="DIAMONDS", amount=2)))
    # 2 free and 3 paid: two entries of each of the two accounts (API-credits.md)
    created(await post_flow(client, "spend", flow_body(user_id=BOB, asset="DIAMONDS", amount=5)))
    created(await post_flow(client, "transfer", transfer_body(to_user=carol["id"], amount=7)))
    created(await post_refund(client, spend["transactionId"], amount=10))
    hold = await create_hold(client, user_id=BOB, amount=20)
    capture = f"holds/{hold['holdId']}/capture"
    created(await post_flow(client, capture, {"idempotencyKey": f"cap-{hold['holdId']}"}))
    return str(carol["id"])


async def test_the_checkpoint_is_for_admin_keys_only(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    url = settings.database_url.get_secret_value()
    for scope in (Scope.WALLET_READ, Scope.WALLET_CREDIT, Scope.WALLET_REFUND):
        key = await create_key(url, scope)
        response = await client.get(CHECKPOINT, headers=bearer(key))
        problem = assert_problem(response, 403, "insufficient_scope")
        assert "admin" in problem["detail"]
    response = await client.get(CHECKPOINT, headers={"Authorization": ""})
    assert_problem(response, 401, "unauthenticated")


async def test_each_users_chain_ends_at_their_newest_entry(client: httpx.AsyncClient) -> None:
    carol = await some_history(client)

    chains = await checkpoint(client)

    for user in (ALICE, BOB, carol):
        for asset in ASSET_NAMES:
            entries = await ledger_of(client, user, asset)
            chain = chains.get((user, asset, 0))
            if not entries:
                assert chain is None, (user, asset)
                continue
            assert chain is not None, (user, asset)
            assert chain["chainHash"] == entries[0]["chainHash"], (user, asset)
            assert chain["entries"] == len(entries), (user, asset)


async def test_the_chains_hold_every_entry_of_every_transaction(
    client: httpx.AsyncClient,
) -> None:
    carol = await some_history(client)

    chains = await checkpoint(client)

    users = {account for account, _, _ in chains if not account.startswith("system:")}
    assert users == {ALICE, BOB, carol}
    assert {account for account, _, _ in chains} - users == set(SYSTEM_ACCOUNTS)
    # A debit and a credit of each kind a transaction moves.
    transactions = {
        t["transactionId"]: (t["assetSymbol"], 2 * ((t["paidAmount"] > 0) + (t["freeAmount"] > 0)))
        for user in users
        for t in await transactions_of(client, user)
    }
    per_asset: Counter[str] = Counter()
    for (_, asset, _), chain in chains.items():
        per_asset[asset] += chain["entries"]
    expected: Counter[str] = Counter()
    for asset, entries in transactions.values():
        expected[asset] += entries
    assert per_asset == expected
    assert 4 in {entries for _, entries in transactions.values()}


@pytest.mark.parametrize("flow", ["topup", "spend"])
async def test_a_new_entry_advances_its_chains_and_no_other(
    client: httpx.AsyncClient, flow: str
) -> None:
    before = await checkpoint(client)

    created(await post_flow(client, flow, flow_body(asset="LOYALTY_POINTS", amount=3)))

    after = await checkpoint(client)
    other = "system:treasury" if flow == "topup" else "system:revenue"
    users = (ALICE, "LOYALTY_POINTS", 0)
    # The other side went to one of the system account's rows, whichever the batch took.
    (others,) = {name for name in after if after[name] != before.get(name)} - {users}
    assert others[:2] == (other, "LOYALTY_POINTS")
    moved = {users, others}
    assert {name: after[name] for name in after if name not in moved} == {
        name: before[name] for name in before if name not in moved
    }
    newest = (await ledger_of(client, ALICE, "LOYALTY_POINTS"))[0]
    assert after[users]["chainHash"] == newest["chainHash"]
    for name in moved:
        entries = before[name]["entries"] if name in before else 0
        assert after[name]["entries"] == entries + 1, name
        assert after[name]["chainHash"] != before.get(name, {}).get("chainHash")
