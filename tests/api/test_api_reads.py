"""The reads of API.md: health, assets, users, balances, transactions, the ledger, and the
newest-first cursor pagination every list shares."""

import base64
from collections import defaultdict
from typing import Any

import httpx
from api_checks import (
    ALICE,
    API,
    ASSET_FIELDS,
    ASSET_NAMES,
    BALANCE_FIELDS,
    BOB,
    FREE_TEXT_FIELD,
    OPENING_BALANCES,
    SEED_ASSET_POLICIES,
    SEED_USERS,
    USER_FIELDS,
    assert_entry,
    assert_problem,
    assert_rfc3339_utc,
    assert_transaction,
    assert_validation_error,
    balances_of,
    create_user,
    flow_body,
    get_ok,
    ids,
    kinds_of,
    moves,
    post_flow,
    walk,
)

from wallet.service.seed import seed
from wallet.store.database import Database

ID_CHARACTERS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-")
LISTS = {
    "users": (f"{API}/users", "id"),
    "transactions": (f"{API}/wallet/transactions/{ALICE}", "transactionId"),
    "ledger": (f"{API}/wallet/ledger/{ALICE}", "entryId"),
}


async def post_ok(client: httpx.AsyncClient, flow: str, **fields: Any) -> dict[str, Any]:
    response = await post_flow(client, flow, flow_body(**fields))
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


# What each flow of some_history takes or gives of paid credits (API-credits.md): the spend of 150
# GOLD_COINS finds no free ones, the spend of 12 DIAMONDS takes the bonus's 5 free ones first.
PAID_IN_HISTORY = [200, 0, 150, 7, 0]


async def some_history(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """A few flows of Alice's over two assets, oldest first; and some of Bob's and new users."""
    created = [
        await post_ok(client, "topup", amount=200, metadata={"order": "A-7"}),
        await post_ok(client, "bonus", asset="DIAMONDS", amount=5, reason="streak"),
        await post_ok(client, "spend", amount=150, description="armour"),
        await post_ok(client, "spend", asset="DIAMONDS", amount=12),
        await post_ok(client, "bonus", amount=1),
    ]
    await post_ok(client, "topup", user_id=BOB, amount=9)
    for _ in range(3):
        await create_user(client)
    return created


async def test_health_is_ok_when_the_database_is(client: httpx.AsyncClient) -> None:
    assert await get_ok(client, f"{API}/health") == {"status": "ok", "database": "ok"}


async def test_assets_lists_the_seeded_asset_types(client: httpx.AsyncClient) -> None:
    assets = await get_ok(client, f"{API}/assets")

    assert isinstance(assets, list)
    for asset in assets:
        assert set(asset) == ASSET_FIELDS
        assert isinstance(asset["description"], str)
    assert {asset["symbol"]: asset["name"] for asset in assets} == ASSET_NAMES
    assert {
        asset["symbol"]: {name: asset[name] for name in SEED_ASSET_POLICIES[asset["symbol"]]}
        for asset in assets
    } == SEED_ASSET_POLICIES
    assert len(assets) == len(ASSET_NAMES)


async def test_seed_users_are_alice_and_bob(client: httpx.AsyncClient) -> None:
    for user_id, (email, name) in SEED_USERS.items():
        user = await get_ok(client, f"{API}/users/{user_id}")
        assert set(user) == USER_FIELDS
        assert (user["id"], user["email"], user["name"]) == (user_id, email, name)
        assert_rfc3339_utc(user["createdAt"])


async def test_seed_opening_balances_are_posted_through_the_ledger(
    client: httpx.AsyncClient,
) -> None:
    for user_id in SEED_USERS:
        history = await get_ok(client, f"{API}/wallet/transactions/{user_id}")
        ledger = await get_ok(client, f"{API}/wallet/ledger/{user_id}")

        assert await balances_of(client, user_id) == OPENING_BALANCES
        assert {(t["type"], t["assetSymbol"], t["amount"]) for t in history["items"]} == {
            ("topup", symbol, amount) for symbol, amount in OPENING_BALANCES.items()
        }
        assert len(history["items"]) == 3
        assert {
            (e["direction"], e["kind"], e["assetSymbol"], e["amount"], e["paidAfter"])
            for e in ledger["items"]
        } == {
            ("credit", "paid", symbol, amount, amount)
            for symbol, amount in OPENING_BALANCES.items()
        }
        for transaction in history["items"]:
            detail = await get_ok(
                client, f"{API}/wallet/transactions/{user_id}/{transaction['transactionId']}"
            )
            debit = next(e for e in detail["entries"] if e["direction"] == "debit")
            assert debit["account"] == "system:treasury"


async def test_seeding_again_changes_nothing(client: httpx.AsyncClient, database: Database) -> None:
    await some_history(client)
    before = {
        path: await get_ok(client, path, limit=500)
        for path in (
            f"{API}/users",
            f"{API}/assets",
            f"{API}/wallet/transactions/{ALICE}",
            f"{API}/wallet/ledger/{BOB}",
            f"{API}/wallet/balances/{ALICE}",
        )
    }

    await seed(database)

    assert {path: await get_ok(client, path, limit=500) for path in before} == before


async def test_balance_answers_user_asset_amount_held_and_available(
    client: httpx.AsyncClient,
) -> None:
    body = await get_ok(client, f"{API}/wallet/balance/{ALICE}/DIAMONDS")

    assert body == {
        "userId": ALICE,
        "assetSymbol": "DIAMONDS",
        "balance": 10,
        "paid": 10,  # the seed's top-up
        "free": 0,
        "held": 0,
        "available": 10,
        "nextExpiry": None,
    }


async def test_balance_of_an_asset_never_held_is_zero(client: httpx.AsyncClient) -> None:
    user = await create_user(client)

    for symbol in ASSET_NAMES:
        body = await get_ok(client, f"{API}/wallet/balance/{user['id']}/{symbol}")
        assert body == {
            "userId": user["id"],
            "assetSymbol": symbol,
            "balance": 0,
            "paid": 0,
            "free": 0,
            "held": 0,
            "available": 0,
            "nextExpiry": None,
        }


async def test_balances_list_every_asset_type_zeros_included(client: httpx.AsyncClient) -> None:
    user = await create_user(client)
    await post_ok(client, "topup", user_id=user["id"], asset="DIAMONDS", amount=4)

    body = await get_ok(client, f"{API}/wallet/balances/{user['id']}")

    assert set(body) == {"userId", "balances"}
    assert body["userId"] == user["id"]
    for row in body["balances"]:
        assert set(row) == BALANCE_FIELDS - {"userId"}
        assert (row["paid"], row["free"]) == (row["balance"], 0)  # a top-up's credits are paid
        assert (row["held"], row["available"], row["nextExpiry"]) == (0, row["balance"], None)
    assert len(body["balances"]) == len(ASSET_NAMES)
    assert {row["assetSymbol"]: row["balance"] for row in body["balances"]} == {
        "DIAMONDS": 4,
        "GOLD_COINS": 0,
        "LOYALTY_POINTS": 0,
    }


USER_READS = [
    f"{API}/wallet/balance/{{user}}/GOLD_COINS",
    f"{API}/wallet/balances/{{user}}",
    f"{API}/wallet/transactions/{{user}}",
    f"{API}/wallet/ledger/{{user}}",
    f"{API}/users/{{user}}",
]
UNKNOWN_ASSET_READS = [
    f"{API}/wallet/balance/{ALICE}/NOPE",
    f"{API}/wallet/balance/{ALICE}/gold_coins",
    f"{API}/wallet/transactions/{ALICE}?assetSymbol=NOPE",
    f"{API}/wallet/transactions/{ALICE}?assetSymbol=NOPE&type=spend",
    f"{API}/wallet/ledger/{ALICE}?assetSymbol=NOPE",
]


async def test_reads_of_an_unknown_user_or_a_system_account_are_user_not_found(
    client: httpx.AsyncClient,
) -> None:
    for path in USER_READS:
        for user_id in ("nobody-here", "x" * 64, "system:treasury", "system:revenue"):
            response = await client.get(path.format(user=user_id))
            assert_problem(response, 404, "user_not_found")


async def test_reads_of_an_unknown_asset_are_asset_not_found(client: httpx.AsyncClient) -> None:
    for path in UNKNOWN_ASSET_READS:
        assert_problem(await client.get(path), 404, "asset_not_found")


async def test_transactions_are_listed_newest_first_as_transactions(
    client: httpx.AsyncClient,
) -> None:
    created = await some_history(client)

    page = await get_ok(client, f"{API}/wallet/transactions/{ALICE}")

    assert page["nextCursor"] is None
    items = page["items"]
    assert len(items) == len(created) + 3  # and the three opening top-ups of the seed
    assert items[: len(created)] == created[::-1]
    transaction_ids = [item["transactionId"] for item in items]
    assert transaction_ids == sorted(set(transaction_ids), reverse=True)  # distinct, sortable
    client_key_id = (await get_ok(client, f"{API}/keys"))["items"][0]["keyId"]  # the newest
    for index, item in enumerate(items):
        assert_transaction(
            item,
            flow=item["type"],
            asset=item["assetSymbol"],
            amount=item["amount"],
            balance_after=item["balanceAfter"],
            key=item["idempotencyKey"],
            # The client's key made the history; the seed's top-ups were made by no key.
            created_by=client_key_id if index < len(created) else None,
            free_text=item[FREE_TEXT_FIELD[item["type"]]],
            # The seed's top-ups are paid credits.
            paid_amount=PAID_IN_HISTORY[::-1][index] if index < len(created) else item["amount"],
        )
    assert [item["type"] for item in items[len(created) :]] == ["topup"] * 3


async def test_transactions_filter_by_type_and_asset(client: httpx.AsyncClient) -> None:
    await some_history(client)
    path = f"{API}/wallet/transactions/{ALICE}"
    every = (await get_ok(client, path, limit=500))["items"]

    for flow in ("topup", "bonus", "spend"):
        page = await get_ok(client, path, type=flow)
        assert page["items"] == [t for t in every if t["type"] == flow]
        assert page["items"]
    for symbol in ASSET_NAMES:
        page = await get_ok(client, path, assetSymbol=symbol)
        assert page["items"] == [t for t in every if t["assetSymbol"] == symbol]
    page = await get_ok(client, path, type="spend", assetSymbol="DIAMONDS")
    assert page["items"] == [
        t for t in every if (t["type"], t["assetSymbol"]) == ("spend", "DIAMONDS")
    ]
    assert len(page["items"]) == 1
    filtered = await walk(client, path, "transactionId", 1, type="bonus")
    assert filtered == [t["transactionId"] for t in every if t["type"] == "bonus"]


async def test_transactions_with_an_unknown_type_are_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    for flow in ("refunds", "TOPUP", "hold", ""):
        response = await client.get(f"{API}/wallet/transactions/{ALICE}", params={"type": flow})
        assert_validation_error(response, "type")


# The entries of each flow of some_history, in order: one debit and one credit of each kind it
# moves, free before paid (the assets spend free credits first); and Alice's balance and paid part
# after each of her entries.
HISTORY_ENTRIES = [
    ([("system:treasury", "debit", "paid", 200), (ALICE, "credit", "paid", 200)], [(1200, 1200)]),
    ([("system:bonus_pool", "debit", "free", 5), (ALICE, "credit", "free", 5)], [(15, 10)]),
    ([(ALICE, "debit", "paid", 150), ("system:revenue", "credit", "paid", 150)], [(1050, 1050)]),
    (
        [
            (ALICE, "debit", "free", 5),
            ("system:revenue", "credit", "free", 5),
            (ALICE, "debit", "paid", 7),
            ("system:revenue", "credit", "paid", 7),
        ],
        [(10, 10), (3, 3)],
    ),
    ([("system:bonus_pool", "debit", "free", 1), (ALICE, "credit", "free", 1)], [(1051, 1050)]),
]


async def test_transaction_detail_has_a_debit_and_a_credit_of_each_kind_it_moves(
    client: httpx.AsyncClient,
) -> None:
    created = await some_history(client)

    for transaction, (expected, alices) in zip(created, HISTORY_ENTRIES, strict=True):
        detail = await get_ok(
            client, f"{API}/wallet/transactions/{ALICE}/{transaction['transactionId']}"
        )
        assert set(detail) == set(transaction) | {"entries"}
        assert {name: detail[name] for name in transaction} == transaction
        for entry in detail["entries"]:
            assert_entry(entry)
            assert entry["transactionId"] == transaction["transactionId"]
            assert entry["assetSymbol"] == transaction["assetSymbol"]
        assert moves(detail["entries"]) == expected
        own = [
            (e["balanceAfter"], e["paidAfter"]) for e in detail["entries"] if e["account"] == ALICE
        ]
        assert own == alices
        assert own[-1][0] == transaction["balanceAfter"]


async def test_transaction_of_another_user_is_not_found(client: httpx.AsyncClient) -> None:
    alices = await post_ok(client, "topup", amount=5)

    response = await client.get(f"{API}/wallet/transactions/{BOB}/{alices['transactionId']}")

    assert_problem(response, 404, "transaction_not_found")


async def test_unknown_transaction_is_not_found(client: httpx.AsyncClient) -> None:
    for transaction_id in ("01a213ca-8d5a-70bd-b315-173b45df56e8", "nope", "t" * 64):
        response = await client.get(f"{API}/wallet/transactions/{ALICE}/{transaction_id}")
        assert_problem(response, 404, "transaction_not_found")


async def test_transaction_of_an_unknown_user_is_user_not_found(
    client: httpx.AsyncClient,
) -> None:
    alices = await post_ok(client, "topup", amount=5)

    response = await client.get(f"{API}/wallet/transactions/nobody/{alices['transactionId']}")

    assert_problem(response, 404, "user_not_found")


async def test_ledger_is_newest_first_and_replays_each_balance_after_chain(
    client: httpx.AsyncClient,
) -> None:
    await some_history(client)
    await post_flow(client, "spend", flow_body(amount=10**6))  # refused: leaves no entry

    page = await get_ok(client, f"{API}/wallet/ledger/{ALICE}", limit=500)
    transactions = await get_ok(client, f"{API}/wallet/transactions/{ALICE}", limit=500)

    entries = page["items"]
    assert page["nextCursor"] is None
    for entry in entries:
        assert_entry(entry)
        assert entry["account"] == ALICE
    entry_ids = [entry["entryId"] for entry in entries]
    assert entry_ids == sorted(set(entry_ids), reverse=True)  # distinct, sortable ids
    # One entry per kind a transaction moves: the spend of 12 DIAMONDS has two of Alice's.
    assert list(dict.fromkeys(e["transactionId"] for e in entries)) == [
        t["transactionId"] for t in transactions["items"]
    ]
    assert len(entries) == len(transactions["items"]) + 1
    balance: dict[str, int] = defaultdict(int)
    paid: dict[str, int] = defaultdict(int)
    for entry in reversed(entries):
        sign = 1 if entry["direction"] == "credit" else -1
        balance[entry["assetSymbol"]] += sign * entry["amount"]
        if entry["kind"] == "paid":
            paid[entry["assetSymbol"]] += sign * entry["amount"]
        assert (entry["balanceAfter"], entry["paidAfter"]) == (
            balance[entry["assetSymbol"]],
            paid[entry["assetSymbol"]],
        ), entry
    assert dict(balance) == await balances_of(client, ALICE)
    assert dict(paid) == {
        symbol: (await kinds_of(client, ALICE, symbol))["paid"] for symbol in ASSET_NAMES
    }


async def test_ledger_filters_by_asset(client: httpx.AsyncClient) -> None:
    await some_history(client)
    path = f"{API}/wallet/ledger/{ALICE}"
    every = (await get_ok(client, path, limit=500))["items"]

    for symbol in ASSET_NAMES:
        page = await get_ok(client, path, assetSymbol=symbol)
        assert page["items"] == [e for e in every if e["assetSymbol"] == symbol]
        assert page["items"]


async def test_ledger_and_history_of_a_new_user_are_empty(client: httpx.AsyncClient) -> None:
    user = await create_user(client)

    for path in (f"{API}/wallet/transactions/{user['id']}", f"{API}/wallet/ledger/{user['id']}"):
        assert await get_ok(client, path) == {"items": [], "nextCursor": None}


async def test_created_user_answers_201_and_is_found_by_its_id(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        f"{API}/users", json={"id": "player-42", "email": "p42@example.com", "name": "Dora"}
    )

    assert response.status_code == 201, response.text
    user = response.json()
    assert set(user) == USER_FIELDS
    assert (user["id"], user["email"], user["name"]) == ("player-42", "p42@example.com", "Dora")
    assert_rfc3339_utc(user["createdAt"])
    assert await get_ok(client, f"{API}/users/player-42") == user


async def test_user_created_without_an_id_gets_one_made(client: httpx.AsyncClient) -> None:
    first = await create_user(client)
    second = await create_user(client)

    for user in (first, second):
        assert isinstance(user["id"], str)
        assert 1 <= len(user["id"]) <= 64
        assert set(user["id"]) <= ID_CHARACTERS
        assert not user["id"].startswith("system:")
        assert await get_ok(client, f"{API}/users/{user['id']}") == user
    assert first["id"] != second["id"]


async def test_ids_of_every_allowed_shape_are_accepted(client: httpx.AsyncClient) -> None:
    for user_id in ("a", "A" * 64, "user.name_1:x-2", "systemx", "System:capital"):
        user = await create_user(client, id=user_id)
        assert user["id"] == user_id


async def test_creating_an_existing_user_is_409_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    before = await get_ok(client, f"{API}/users/{ALICE}")

    response = await client.post(
        f"{API}/users", json={"id": ALICE, "email": "mallory@example.com", "name": "Mallory"}
    )

    assert_problem(response, 409, "user_exists")
    assert await get_ok(client, f"{API}/users/{ALICE}") == before


INVALID_NEW_USERS: list[tuple[dict[str, Any], str]] = [
    ({"email": "not-an-email", "name": "Eve"}, "email"),
    ({"email": "eve@", "name": "Eve"}, "email"),
    ({"email": 42, "name": "Eve"}, "email"),
    ({"name": "Eve"}, "email"),
    ({"email": "eve@example.com"}, "name"),
    ({"email": "eve@example.com", "name": "x" * 501}, "name"),
    ({"email": "eve@example.com", "name": None}, "name"),
    ({"id": "system:treasury", "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "system:new", "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "has space", "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "x" * 65, "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "x" * 10_000, "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "ünïcödé", "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "a/b", "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": "", "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"id": 7, "email": "eve@example.com", "name": "Eve"}, "id"),
    ({"email": "eve@example.com", "name": "Eve", "role": "admin"}, "role"),
]


async def test_invalid_new_user_is_a_validation_error_naming_the_field(
    client: httpx.AsyncClient,
) -> None:
    users_before = await get_ok(client, f"{API}/users", limit=500)

    for body, field in INVALID_NEW_USERS:
        assert_validation_error(await client.post(f"{API}/users", json=body), field)

    assert await get_ok(client, f"{API}/users", limit=500) == users_before


async def test_user_name_of_500_characters_is_accepted(client: httpx.AsyncClient) -> None:
    user = await create_user(client, name="é" * 500)

    assert user["name"] == "é" * 500


async def test_users_lists_users_newest_first_without_system_accounts(
    client: httpx.AsyncClient,
) -> None:
    created = [await create_user(client) for _ in range(3)]

    page = await get_ok(client, f"{API}/users")

    assert page["nextCursor"] is None
    for user in page["items"]:
        assert set(user) == USER_FIELDS
    assert page["items"][:3] == created[::-1]
    assert {user["id"] for user in page["items"][3:]} == {ALICE, BOB}
    assert len(page["items"]) == 5


async def test_lists_default_to_pages_of_50(client: httpx.AsyncClient) -> None:
    for _ in range(49):
        await create_user(client)

    first = await get_ok(client, f"{API}/users")
    second = await get_ok(client, f"{API}/users", cursor=first["nextCursor"])

    assert len(first["items"]) == 50
    assert len(second["items"]) == 1
    assert second["nextCursor"] is None


async def test_cursor_pagination_walks_every_item_exactly_once(
    client: httpx.AsyncClient,
) -> None:
    await some_history(client)

    for path, id_field in LISTS.values():
        every = await get_ok(client, path, limit=500)
        assert every["nextCursor"] is None
        expected = ids(every["items"], id_field)
        assert len(expected) >= 5
        for limit in range(1, len(expected) + 2):
            assert await walk(client, path, id_field, limit) == expected, f"{path} limit={limit}"


async def test_offset_skips_items_for_old_clients(client: httpx.AsyncClient) -> None:
    await some_history(client)

    for path, id_field in LISTS.values():
        expected = ids((await get_ok(client, path, limit=500))["items"], id_field)
        for offset in range(len(expected) + 2):
            page = await get_ok(client, path, offset=offset, limit=2)
            assert ids(page["items"], id_field) == expected[offset : offset + 2], (
                f"{path} offset={offset}"
            )
        assert ids((await get_ok(client, path, offset=0))["items"], id_field) == expected


async def test_offset_with_a_cursor_is_a_validation_error(client: httpx.AsyncClient) -> None:
    await some_history(client)

    for path, _ in LISTS.values():
        cursor = (await get_ok(client, path, limit=1))["nextCursor"]
        response = await client.get(path, params={"cursor": cursor, "offset": 1})
        problem = assert_problem(response, 422, "validation_error")
        assert {"offset", "cursor"} & {error["field"] for error in problem["errors"]}


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


BAD_CURSORS = ["garbage", "!!!", "", _b64("v2:5"), _b64("v1:-3"), _b64("v1:x"), "c" * 10_000]


async def test_cursor_not_made_by_the_service_is_a_validation_error(
    client: httpx.AsyncClient,
) -> None:
    for path, _ in LISTS.values():
        for cursor in BAD_CURSORS:
            response = await client.get(path, params={"cursor": cursor})
            assert_validation_error(response, "cursor")


async def test_limit_outside_1_to_500_is_a_validation_error(client: httpx.AsyncClient) -> None:
    for path, _ in LISTS.values():
        for limit in ("0", "501", "-1", "abc", "1.5", "99999999999999999999"):
            assert_validation_error(await client.get(path, params={"limit": limit}), "limit")
        for offset in ("-1", "abc"):
            assert_validation_error(await client.get(path, params={"offset": offset}), "offset")
        for limit in ("1", "500"):
            await get_ok(client, path, limit=limit)
