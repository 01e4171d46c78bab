"""The three flows of API.md: what a success answers (the transaction, made by the caller's API
key), what moves between which accounts, and the refusals (insufficient funds, a balance past
64 bits) that leave every balance, transaction and entry as it was."""

import httpx
import pytest
import sqlalchemy as sa
from api_checks import (
    ALICE,
    API,
    BOB,
    CREDITED,
    DEBITED,
    FLOWS,
    FREE_TEXT_FIELD,
    MAX_AMOUNT,
    OPENING_BALANCES,
    SAMPLE_FREE_TEXT,
    account_state,
    assert_entry,
    assert_problem,
    assert_rfc3339_utc,
    assert_transaction,
    balance_of,
    balances_of,
    create_user,
    flow_body,
    key_id_of,
    kinds_of,
    post_flow,
    post_raw,
    transaction_detail,
)

from app_clients import app_client
from wallet.settings import Settings
from wallet.store.database import Database
from wallet.store.tables import balances

MAX_BALANCE = 2**63 - 1
MIN_BALANCE = -(2**63)
# API-credits.md: a top-up gives paid credits, a bonus free ones; a spend of the seed's balance,
# which has no free credits, takes paid ones.
KIND_MOVED = {"topup": "paid", "bonus": "free", "spend": "paid"}


@pytest.mark.parametrize("flow", FLOWS)
async def test_flow_answers_201_with_the_transaction_and_moves_the_balance(
    client: httpx.AsyncClient, flow: str
) -> None:
    free_text = SAMPLE_FREE_TEXT[flow]
    body = flow_body(amount=250, **{FREE_TEXT_FIELD[flow]: free_text})

    response = await post_flow(client, flow, body)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    assert "idempotent-replayed" not in response.headers
    expected = 750 if flow == "spend" else 1250
    assert_transaction(
        response.json(),
        flow=flow,
        amount=250,
        balance_after=expected,
        key=body["idempotencyKey"],
        created_by=await key_id_of(client),
        free_text=free_text,
    )
    assert await balances_of(client, ALICE) == {**OPENING_BALANCES, "GOLD_COINS": expected}
    assert await kinds_of(client, ALICE, "GOLD_COINS") == (
        {"paid": 1000, "free": 250} if flow == "bonus" else {"paid": expected, "free": 0}
    )
    assert await balances_of(client, BOB) == OPENING_BALANCES


@pytest.mark.parametrize("flow", FLOWS)
async def test_flow_without_its_free_text_field_answers_it_as_null(
    client: httpx.AsyncClient, flow: str
) -> None:
    body = flow_body(asset="DIAMONDS", amount=3)

    response = await post_flow(client, flow, body)

    assert response.status_code == 201, response.text
    assert_transaction(
        response.json(),
        flow=flow,
        asset="DIAMONDS",
        amount=3,
        balance_after=7 if flow == "spend" else 13,
        key=body["idempotencyKey"],
        created_by=await key_id_of(client),
        free_text=None,
    )


@pytest.mark.parametrize("flow", FLOWS)
async def test_flow_posts_one_debit_and_one_credit_between_the_documented_accounts(
    client: httpx.AsyncClient, flow: str
) -> None:
    created = (await post_flow(client, flow, flow_body(user_id=BOB, amount=40))).json()

    detail = await transaction_detail(client, created["transactionId"], BOB)

    assert {name: detail[name] for name in created} == created
    entries = {entry["direction"]: entry for entry in detail["entries"]}
    assert len(detail["entries"]) == 2
    assert set(entries) == {"debit", "credit"}
    for entry in detail["entries"]:
        assert_entry(entry)
        assert entry["transactionId"] == created["transactionId"]
        assert entry["assetSymbol"] == "GOLD_COINS"
        assert entry["amount"] == 40
        assert entry["kind"] == KIND_MOVED[flow]
    assert entries["debit"]["account"] == (DEBITED[flow] or BOB)
    assert entries["credit"]["account"] == (CREDITED[flow] or BOB)
    user_entry = entries["debit"] if flow == "spend" else entries["credit"]
    assert user_entry["balanceAfter"] == created["balanceAfter"]
    assert user_entry["paidAfter"] == (1000 if flow == "bonus" else created["balanceAfter"])


async def test_balance_after_follows_successive_flows(client: httpx.AsyncClient) -> None:
    steps = [
        ("topup", 100, 1100, 1100),
        ("bonus", 50, 1150, 1100),
        ("spend", 1150, 0, 0),
        ("topup", 1, 1, 1),
    ]

    for flow, amount, expected, paid in steps:
        response = await post_flow(client, flow, flow_body(amount=amount))
        assert response.status_code == 201, response.text
        assert response.json()["balanceAfter"] == expected
        assert await balance_of(client, ALICE, "GOLD_COINS") == expected
        assert await kinds_of(client, ALICE, "GOLD_COINS") == {
            "paid": paid,
            "free": expected - paid,
        }


async def test_spend_over_balance_is_refused_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    before = await account_state(client, ALICE)

    response = await post_flow(client, "spend", flow_body(amount=1001))

    assert_problem(response, 422, "insufficient_funds")
    assert await account_state(client, ALICE) == before


async def test_spend_of_the_whole_balance_leaves_zero_and_one_more_unit_is_refused(
    client: httpx.AsyncClient,
) -> None:
    spent = await post_flow(client, "spend", flow_body(asset="DIAMONDS", amount=10))
    assert spent.status_code == 201, spent.text
    assert spent.json()["balanceAfter"] == 0
    before = await account_state(client, ALICE)

    response = await post_flow(client, "spend", flow_body(asset="DIAMONDS", amount=1))

    assert_problem(response, 422, "insufficient_funds")
    assert await account_state(client, ALICE) == before


async def test_spend_of_an_asset_never_held_is_insufficient_funds(
    client: httpx.AsyncClient,
) -> None:
    user = await create_user(client)

    response = await post_flow(client, "spend", flow_body(user_id=user["id"], amount=1))

    assert_problem(response, 422, "insufficient_funds")
    assert await balance_of(client, user["id"], "GOLD_COINS") == 0


@pytest.mark.parametrize("flow", ["topup", "bonus"])
async def test_largest_amount_is_accepted(client: httpx.AsyncClient, flow: str) -> None:
    body = flow_body(amount=MAX_AMOUNT)

    response = await post_flow(client, flow, body)

    assert response.status_code == 201, response.text
    assert response.json()["balanceAfter"] == MAX_AMOUNT + 1000
    assert await balance_of(client, ALICE, "GOLD_COINS") == MAX_AMOUNT + 1000


async def test_first_topup_of_a_new_user_creates_the_balance(client: httpx.AsyncClient) -> None:
    user = await create_user(client)
    body = flow_body(user_id=user["id"], asset="LOYALTY_POINTS", amount=70)

    response = await post_flow(client, "topup", body)

    assert response.status_code == 201, response.text
    assert response.json()["balanceAfter"] == 70
    assert await balances_of(client, user["id"]) == {
        "DIAMONDS": 0,
        "GOLD_COINS": 0,
        "LOYALTY_POINTS": 70,
    }


async def test_flow_accepts_json_with_a_charset_parameter(client: httpx.AsyncClient) -> None:
    body = flow_body(amount=5)
    raw = (
        f'{{"userId": "{ALICE}", "assetSymbol": "GOLD_COINS", "amount": 5, '
        f'"idempotencyKey": "{body["idempotencyKey"]}"}}'
    )

    response = await post_raw(
        client, f"{API}/wallet/topup", raw, content_type="application/json; charset=utf-8"
    )

    assert response.status_code == 201, response.text
    assert_transaction(
        response.json(),
        flow="topup",
        amount=5,
        balance_after=1005,
        key=body["idempotencyKey"],
        created_by=await key_id_of(client),
    )


async def test_transaction_ids_are_distinct_and_sort_in_the_order_of_creation(
    client: httpx.AsyncClient,
) -> None:
    created = [
        (await post_flow(client, flow, flow_body(amount=1))).json()
        for flow in ("topup", "bonus", "spend", "topup", "spend", "bonus")
    ]

    ids = [transaction["transactionId"] for transaction in created]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    times = [assert_rfc3339_utc(transaction["createdAt"]) for transaction in created]
    assert times == sorted(times)


async def _sums_of_balances_per_asset(database: Database) -> dict[str, tuple[int, int]]:
    """Per asset, the sums of every account's balance and of its paid part (in Python ints: SQL's
    SUM of 64-bit numbers overflows or turns numeric)."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(
            sa.select(balances.c.asset_symbol, balances.c.balance, balances.c.paid)
        )
        sums: dict[str, tuple[int, int]] = {}
        for symbol, balance, paid in rows:
            total, paid_total = sums.get(symbol, (0, 0))
            sums[symbol] = (total + balance, paid_total + paid)
        return sums


async def test_balances_of_all_accounts_sum_to_zero_per_asset_and_kind(
    client: httpx.AsyncClient, database: Database
) -> None:
    carol = await create_user(client)
    requests = [
        ("topup", flow_body(amount=300)),
        ("bonus", flow_body(user_id=BOB, asset="DIAMONDS", amount=7)),
        ("spend", flow_body(user_id=BOB, asset="LOYALTY_POINTS", amount=499)),
        ("topup", flow_body(user_id=carol["id"], asset="DIAMONDS", amount=2)),
        ("spend", flow_body(user_id=carol["id"], asset="DIAMONDS", amount=2)),
        ("spend", flow_body(user_id=BOB, asset="DIAMONDS", amount=12)),  # 7 free and 5 paid
        ("spend", flow_body(amount=5000)),  # refused: insufficient funds
    ]
    for flow, body in requests:
        await post_flow(client, flow, body)

    assert await _sums_of_balances_per_asset(database) == dict.fromkeys(OPENING_BALANCES, (0, 0))
    assert await kinds_of(client, BOB, "DIAMONDS") == {"paid": 5, "free": 0}


async def _set_balance(database: Database, account: str, asset: str, value: int) -> None:
    """Tamper with a balance, each of its rows (the ledger is left behind): the quick way to a
    64-bit edge."""
    async with database.transaction(is_write=True) as connection:
        result = await connection.execute(
            sa.update(balances)
            .where(balances.c.account_id == account, balances.c.asset_symbol == asset)
            .values(balance=value)
        )
    assert result.rowcount >= 1


async def _balance_rows(database: Database, account: str, asset: str) -> dict[int, int]:
    """The balance of each of the account's rows (shards) of the asset, in the database."""
    async with database.transaction(is_write=False) as connection:
        rows = await connection.execute(
            sa.select(balances.c.shard, balances.c.balance).where(
                balances.c.account_id == account, balances.c.asset_symbol == asset
            )
        )
    return dict(rows.all())


@pytest.mark.parametrize("flow", ["topup", "bonus"])
async def test_flow_that_would_take_a_user_balance_past_64_bits_is_refused(
    client: httpx.AsyncClient, database: Database, flow: str
) -> None:
    edge = MAX_BALANCE - 5
    await _set_balance(database, ALICE, "GOLD_COINS", edge)
    before = await account_state(client, ALICE)

    response = await post_flow(client, flow, flow_body(amount=10))

    assert_problem(response, 422, "balance_limit_exceeded")
    assert await account_state(client, ALICE) == before
    assert await _balance_rows(database, ALICE, "GOLD_COINS") == {0: edge}


@pytest.mark.parametrize(
    ("flow", "account", "edge", "moved"),
    [
        ("topup", "system:treasury", MIN_BALANCE + 5, -10),
        ("bonus", "system:bonus_pool", MIN_BALANCE + 5, -10),
        ("spend", "system:revenue", MAX_BALANCE - 5, 10),
    ],
    ids=["treasury-topup", "bonus-pool-bonus", "revenue-spend"],
)
async def test_flow_that_would_take_a_system_row_past_64_bits_goes_to_another_row(
    settings: Settings,
    admin_key: str,
    database: Database,
    flow: str,
    account: str,
    edge: int,
    moved: int,
) -> None:
    """A system account's balance has no 64-bit ceiling: when its balance row would pass 64
    bits, the flow is applied on another row of the account and the full row is left as is."""
    one_shard = settings.model_copy(update={"system_shards": 1})
    async with app_client(one_shard, key=admin_key) as client:
        # Each system account gets its row 0 first; then all its rows are set at the edge.
        for warm_up in ("topup", "bonus", "spend"):
            assert (await post_flow(client, warm_up, flow_body(amount=1))).status_code == 201
        await _set_balance(database, account, "GOLD_COINS", edge)
        full = await _balance_rows(database, account, "GOLD_COINS")
        before = await balance_of(client, ALICE, "GOLD_COINS")

        response = await post_flow(client, flow, flow_body(amount=10))

        assert response.status_code == 201, response.text
        assert await balance_of(client, ALICE, "GOLD_COINS") == before - moved
    after = await _balance_rows(database, account, "GOLD_COINS")
    new_rows = {shard: after[shard] for shard in after.keys() - full.keys()}
    assert list(new_rows.values()) == [moved]
    assert {shard: after[shard] for shard in full} == full


async def test_flow_up_to_the_64_bit_edge_is_accepted(
    client: httpx.AsyncClient, database: Database
) -> None:
    await _set_balance(database, ALICE, "GOLD_COINS", MAX_BALANCE - 10)

    response = await post_flow(client, "topup", flow_body(amount=10))

    assert response.status_code == 201, response.text
    assert response.json()["balanceAfter"] == MAX_BALANCE
    assert await balance_of(client, ALICE, "GOLD_COINS") == MAX_BALANCE
