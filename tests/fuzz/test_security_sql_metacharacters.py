"""Strings that reach SQL are only ever bound parameters: SQL metacharacters in every text field of
every request body, every path segment and every query parameter, on SQLite and PostgreSQL, get
the answer API.md gives any other string of their shape. Free text is stored and echoed exactly;
ids and symbols name nothing (404) or break the id rules (422); LIKE wildcards match no other row.
Afterwards every table is still there, `wallet verify` is clean and the balances moved only by the
flows that were accepted."""

import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fuzz_checks import (
    ALICE,
    API,
    ASSETS,
    BOB,
    FLOWS,
    LedgerState,
    app_client,
    leaks,
    ledger_state,
)

from wallet.domain.ledger import Asset
from wallet.settings import Settings
from wallet.store import queries
from wallet.store.database import Database, create_engine

SQL_METACHARACTERS = (
    "' OR 1=1 --",
    "' OR '1'='1",
    "'; DROP TABLE entries; --",
    '"; DROP TABLE balances; --',
    "' UNION SELECT id, email, name FROM accounts --",
    "1; UPDATE balances SET balance = 0",
    "'||pg_sleep(5)||'",
    "\\",
    "\\'; --",
    "%",
    "_",
    "%_%",
    '"',
    "'",
    "$1",
    "$$; --",
    ":name",
    "?",
    "%s",
    "{0}",
    "); --",
    "*/ --",
    "NULL",
    "\u2018\u2019\u201c\u201d",  # curly quotes
    "\u02bc OR 1=1 --",  # modifier letter apostrophe
    "\uff07 OR \uff071\uff07=\uff071",  # fullwidth apostrophes
    "O\u2019Brien \u00a0\u2014 \U0001d11e \U0001f600",  # right quote, nbsp, dash, non-BMP
)
# Shapes from API.md: user ids and keys are 1-64 (keys 1-128) characters of [A-Za-z0-9_.:-].
ID_RULE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
KEY_RULE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
MAX_SYMBOL = 32  # the service's bound on asset symbols; a longer one is a validation_error
# API-credits.md: a new asset's symbol is 1-32 characters of [A-Za-z0-9_.:-].
SYMBOL_RULE = re.compile(r"[A-Za-z0-9_.:-]{1,32}")
# A slash in a path segment is a path separator once the server decodes it (routing answers, not
# the wallet), so path segments get every string but those.
PATH_SAFE = tuple(value for value in SQL_METACHARACTERS if "/" not in value)
# Near misses of real rows, spelled with LIKE wildcards: an `=` finds none of them.
WILDCARD_USERS = (ALICE[:-1] + "_", ALICE[:8] + "%", ALICE.replace("-", "_"), "%", "_")
WILDCARD_ASSETS = ("GOLD_COIN_", "GOLD%", "%COINS", "%", "_", "%_%", "GOLD\\_COINS", "_OLD_COINS")
SYSTEM_ACCOUNTS = ("system:treasury", "system:bonus_pool", "system:revenue")
ALL_INPUTS = SQL_METACHARACTERS + WILDCARD_USERS + WILDCARD_ASSETS
# Which account each flow takes the amount from and gives it to (None: the user), as API.md says.
DEBITED = {"topup": "system:treasury", "bonus": "system:bonus_pool", "spend": None}
CREDITED = {"topup": None, "bonus": None, "spend": "system:revenue"}
FREE_TEXT_FIELD = {"topup": "metadata", "bonus": "reason", "spend": "description"}


@dataclass
class Accepted:
    """What the service applied, to account for every balance change: one move (debited account,
    credited account, asset, amount) per transaction."""

    moves: list[tuple[str, str, str, int]] = field(default_factory=list)

    def add(self, flow: str, body: dict[str, Any]) -> None:
        user = body["userId"]
        self.move(
            DEBITED[flow] or user, CREDITED[flow] or user, body["assetSymbol"], body["amount"]
        )

    def move(self, debited: str, credited: str, asset: str, amount: int) -> None:
        self.moves.append((debited, credited, asset, amount))

    def balances_after(self, before: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
        balances = dict(before)
        for debited, credited, asset, amount in self.moves:
            for account, sign in ((debited, -1), (credited, 1)):
                balances[account, asset] = balances.get((account, asset), 0) + sign * amount
        return balances


def segment(value: str) -> str:
    return quote(value, safe="")


def expected_for_user_id(value: str) -> tuple[int, str]:
    """An id of the right shape names no one (404); any other is a validation error (422)."""
    return (404, "user_not_found") if ID_RULE.fullmatch(value) else (422, "validation_error")


def expected_for_asset(value: str) -> tuple[int, str]:
    return (404, "asset_not_found") if len(value) <= MAX_SYMBOL else (422, "validation_error")


def answer(response: httpx.Response) -> tuple[int, str | None]:
    """The status and problem code, after checking the answer is no 5xx and leaks nothing but
    what this module sent (free text and unknown ids are echoed back, and they spell SQL)."""
    request = f"{response.request.method} {response.request.url}"
    assert response.status_code < 500, f"{request} -> {response.status_code} {response.text}"
    assert leaks(response.text, *ALL_INPUTS) == [], f"{request} -> {response.text}"
    if response.status_code < 400:
        return response.status_code, None
    assert response.headers["content-type"] == "application/problem+json", response.text
    code: str = response.json()["code"]
    return response.status_code, code


def assert_answer(response: httpx.Response, expected: tuple[int, str | None]) -> dict[str, Any]:
    got = answer(response)
    request = f"{response.request.method} {response.request.url} {response.request.content!r}"
    assert got == expected, f"{request} -> {response.text}"
    body: dict[str, Any] = response.json()
    return body


def assert_ledger_intact(before: LedgerState, after: LedgerState, accepted: Accepted) -> None:
    """Every table is still there, the audit is clean, and only the accepted flows moved money."""
    assert after.tables == before.tables
    assert {"accounts", "assets", "balances", "entries", "transactions"} <= after.tables
    assert after.audit_failures == []
    assert after.transactions == before.transactions + len(accepted.moves)
    assert after.entries == before.entries + 2 * len(accepted.moves)
    assert after.balances == accepted.balances_after(before.balances)


def flow_body(key: str, *, amount: int = 1, **fields: Any) -> dict[str, Any]:
    return {
        "userId": ALICE,
        "assetSymbol": "GOLD_COINS",
        "amount": amount,
        "idempotencyKey": key,
        **fields,
    }


@pytest.fixture(params=[True, False], ids=["lean-flows", "framework-flows"])
async def flow_client(
    request: pytest.FixtureRequest, database_url: str, admin_key: str
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app on both paths that serve the flows: the lean ASGI one and FastAPI's routes."""
    settings = Settings(database_url=database_url, lean_flows=request.param)
    async with app_client(settings, key=admin_key) as client:
        yield client


async def test_free_text_with_sql_metacharacters_is_stored_and_echoed_exactly(
    flow_client: httpx.AsyncClient, database_url: str
) -> None:
    before = await ledger_state(database_url)
    accepted = Accepted()
    for number, text in enumerate(SQL_METACHARACTERS):
        free_text: dict[str, Any] = {
            "topup": {text: text, "order": "A-1"},
            "bonus": text,
            "spend": text,
        }
        for flow in FLOWS:
            name = FREE_TEXT_FIELD[flow]
            body = flow_body(f"meta-{flow}-{number}", **{name: free_text[flow]})
            created = assert_answer(
                await flow_client.post(f"{API}/wallet/{flow}", json=body), (201, None)
            )
            accepted.add(flow, body)
            assert created[name] == free_text[flow]
            replayed = await flow_client.post(f"{API}/wallet/{flow}", json=body)
            assert assert_answer(replayed, (200, None)) == created
            detail = assert_answer(
                await flow_client.get(
                    f"{API}/wallet/transactions/{ALICE}/{created['transactionId']}"
                ),
                (200, None),
            )
            assert detail[name] == free_text[flow]
    listed = assert_answer(
        await flow_client.get(f"{API}/wallet/transactions/{ALICE}", params={"limit": 500}),
        (200, None),
    )
    echoed = {(t["type"], str(t[FREE_TEXT_FIELD[t["type"]]])) for t in listed["items"]}
    for text in SQL_METACHARACTERS:
        assert ("bonus", text) in echoed
        assert ("spend", text) in echoed
    assert_ledger_intact(before, await ledger_state(database_url), accepted)


async def test_sql_metacharacters_in_flow_ids_symbols_and_keys_get_the_documented_answer(
    flow_client: httpx.AsyncClient, database_url: str
) -> None:
    before = await ledger_state(database_url)
    accepted = Accepted()
    for number, text in enumerate(SQL_METACHARACTERS + WILDCARD_USERS + SYSTEM_ACCOUNTS):
        for flow in FLOWS:
            body = flow_body(f"user-{flow}-{number}", userId=text)
            response = await flow_client.post(f"{API}/wallet/{flow}", json=body)
            assert_answer(response, expected_for_user_id(text))
    for number, text in enumerate(SQL_METACHARACTERS + WILDCARD_ASSETS):
        for flow in FLOWS:
            body = flow_body(f"asset-{flow}-{number}", assetSymbol=text)
            response = await flow_client.post(f"{API}/wallet/{flow}", json=body)
            assert_answer(response, expected_for_asset(text))
    for text in SQL_METACHARACTERS:
        for flow in FLOWS:
            # Keys are one namespace for all flows: the string itself first, then suffixed.
            key = text if flow == "topup" else f"{text}.{flow}"
            body = flow_body(key)
            response = await flow_client.post(f"{API}/wallet/{flow}", json=body)
            if KEY_RULE.fullmatch(key):
                assert assert_answer(response, (201, None))["idempotencyKey"] == key
                accepted.add(flow, body)
            else:
                assert_answer(response, (422, "validation_error"))
            replay = await flow_client.post(
                f"{API}/wallet/{flow}",
                json={name: value for name, value in body.items() if name != "idempotencyKey"},
                headers=[(b"Idempotency-Key", key.encode())],  # the key's UTF-8 bytes, as given
            )
            if KEY_RULE.fullmatch(key):  # the same key and request again, in the header
                assert assert_answer(replay, (200, None))["idempotencyKey"] == key
            else:
                assert_answer(replay, (422, "validation_error"))
    assert_ledger_intact(before, await ledger_state(database_url), accepted)


async def test_sql_metacharacters_in_new_users_are_stored_exactly_or_refused(
    client: httpx.AsyncClient, database_url: str
) -> None:
    before = await ledger_state(database_url)
    for number, text in enumerate(SQL_METACHARACTERS):
        body = {"email": f"meta{number}@example.com", "name": text}
        created = assert_answer(await client.post(f"{API}/users", json=body), (201, None))
        assert created["name"] == text
        fetched = await client.get(f"{API}/users/{created['id']}")
        assert assert_answer(fetched, (200, None)) == created

        body = {"id": text, "email": f"id{number}@example.com", "name": "Mallory"}
        response = await client.post(f"{API}/users", json=body)
        if ID_RULE.fullmatch(text):
            assert assert_answer(response, (201, None))["id"] == text
            fetched = await client.get(f"{API}/users/{segment(text)}")
            assert assert_answer(fetched, (200, None))["id"] == text
        else:
            assert_answer(response, (422, "validation_error"))
    # An address is shown, never sent to: any local part without '@' or white space is stored
    # exactly as sent (the schema's pattern says so), SQL metacharacters included.
    for local in ("o'reilly", "x'or'1'='1", "$1", "100%_off", "{0}", "a--", "a;b", "a)b", "';--"):
        body = {"email": f"{local}@example.com", "name": "Eve"}
        created = assert_answer(await client.post(f"{API}/users", json=body), (201, None))
        assert created["email"] == body["email"]
    for local in ("' OR 1=1 --", "a\tb", "a@b"):
        body = {"email": f"{local}@example.com", "name": "Eve"}
        response = await client.post(f"{API}/users", json=body)
        assert_answer(response, (422, "validation_error"))
    assert_ledger_intact(before, await ledger_state(database_url), Accepted())


async def test_sql_metacharacters_in_path_segments_name_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    before = await ledger_state(database_url)
    listed = assert_answer(await client.get(f"{API}/wallet/transactions/{ALICE}"), (200, None))
    real_transaction = listed["items"][0]["transactionId"]
    near_transactions = (real_transaction[:-1] + "_", real_transaction[:-1] + "%", "%", "_")
    for text in PATH_SAFE + WILDCARD_USERS + SYSTEM_ACCOUNTS:
        expected = expected_for_user_id(text)
        user = segment(text)
        for path in (
            f"{API}/users/{user}",
            f"{API}/wallet/balance/{user}/GOLD_COINS",
            f"{API}/wallet/balances/{user}",
            f"{API}/wallet/transactions/{user}",
            f"{API}/wallet/transactions/{user}/{real_transaction}",
            f"{API}/wallet/ledger/{user}",
        ):
            assert_answer(await client.get(path), expected)
    for text in PATH_SAFE + WILDCARD_ASSETS:
        response = await client.get(f"{API}/wallet/balance/{ALICE}/{segment(text)}")
        assert_answer(response, expected_for_asset(text))
    for text in PATH_SAFE + near_transactions:
        response = await client.get(f"{API}/wallet/transactions/{ALICE}/{segment(text)}")
        assert_answer(response, (404, "transaction_not_found"))
    assert_ledger_intact(before, await ledger_state(database_url), Accepted())


async def test_sql_metacharacters_in_query_parameters_match_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    before = await ledger_state(database_url)
    for text in SQL_METACHARACTERS + WILDCARD_ASSETS:
        for path in (
            f"{API}/wallet/transactions/{ALICE}",
            f"{API}/wallet/ledger/{ALICE}",
            f"{API}/reports/liabilities",
        ):
            response = await client.get(path, params={"assetSymbol": text})
            assert_answer(response, expected_for_asset(text))
    for text in (*SQL_METACHARACTERS, "topup%", "%", "_", "TOPUP"):
        response = await client.get(f"{API}/wallet/transactions/{ALICE}", params={"type": text})
        assert_answer(response, (422, "validation_error"))
    for text in SQL_METACHARACTERS:
        for path in (
            f"{API}/users",
            f"{API}/wallet/transactions/{ALICE}",
            f"{API}/wallet/ledger/{ALICE}",
            f"{API}/wallet/holds",
        ):
            response = await client.get(path, params={"cursor": text})
            assert_answer(response, (422, "validation_error"))
        # Moments are RFC 3339 or refused; hold states are a closed set.
        report = f"{API}/reports/liabilities"
        for path, name, others in (
            (f"{API}/wallet/balance/{ALICE}/GOLD_COINS", "at", {}),
            (f"{API}/wallet/balances/{ALICE}", "at", {}),
            (f"{API}/wallet/transactions/{ALICE}", "from", {}),
            (f"{API}/wallet/transactions/{ALICE}", "to", {}),
            (f"{API}/wallet/holds", "status", {}),
            *((report, name, {"assetSymbol": "GOLD_COINS"}) for name in ("at", "from", "to")),
        ):
            response = await client.get(path, params={**others, name: text})
            assert_answer(response, (422, "validation_error"))
    for text in SQL_METACHARACTERS + WILDCARD_USERS + SYSTEM_ACCOUNTS:
        response = await client.get(f"{API}/wallet/holds", params={"userId": text})
        assert_answer(response, expected_for_user_id(text))
    # The real symbol filters to exactly that asset, so the 404s above are not a broken filter.
    for asset in ASSETS:
        for path in (f"{API}/wallet/transactions/{BOB}", f"{API}/wallet/ledger/{BOB}"):
            page = assert_answer(await client.get(path, params={"assetSymbol": asset}), (200, None))
            assert page["items"]
            assert {item["assetSymbol"] for item in page["items"]} == {asset}
    assert_ledger_intact(before, await ledger_state(database_url), Accepted())


async def test_forged_cursors_are_refused_or_read_as_positions(
    settings: Settings, database_url: str, admin_key: str
) -> None:
    """A cursor is opaque but a client can forge one: its position reaches SQL as a bound
    integer, and one out of range or not a number is a 422 (or reads as a position), not a 5xx."""
    before = await ledger_state(database_url)
    forged = (
        "v1:0",
        "v1:-1",
        f"v1:{2**63 - 1}",
        f"v1:{2**63}",
        f"v1:{10**30}",
        "v1:1:2",
        "v1:' OR 1=1 --",
        "v1:1; DROP TABLE entries",
        "v2:1",
        "v1:",
    )
    # raise_app_exceptions=False: a crash shows as the 500 answer a client would get.
    async with app_client(settings, key=admin_key, raise_app_exceptions=False) as client:
        raw = ("9" * 19, str(2**63), "-1", "1e3", "\uff11", " 1", "1 ", "1\n", "0x10")
        encoded = tuple(base64.urlsafe_b64encode(text.encode()).decode() for text in forged)
        for cursor in raw + encoded + forged:
            for path in (
                f"{API}/users",
                f"{API}/wallet/transactions/{ALICE}",
                f"{API}/wallet/ledger/{ALICE}",
            ):
                response = await client.get(path, params={"cursor": cursor})
                assert answer(response) in {(200, None), (422, "validation_error")}, cursor
    assert_ledger_intact(before, await ledger_state(database_url), Accepted())


async def test_sql_metacharacters_in_new_and_changed_assets_are_stored_exactly_or_refused(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """A new asset's name and description are stored and listed as sent; its symbol is one of the
    id rules' shape or refused, and a symbol in a change's path or the report's query names only
    the asset that has it."""
    before = await ledger_state(database_url)
    made: set[str] = set()
    for number, text in enumerate(SQL_METACHARACTERS):
        body = {"symbol": f"META_{number}", "name": text, "description": text}
        asset = assert_answer(await client.post(f"{API}/assets", json=body), (201, None))
        assert (asset["name"], asset["description"]) == (text, text)
        changed = {"name": f"{text}.", "description": f"{text}!"}
        response = await client.patch(f"{API}/assets/META_{number}", json=changed)
        assert assert_answer(response, (200, None)) == {**asset, **changed}
    for text in dict.fromkeys(SQL_METACHARACTERS + WILDCARD_ASSETS):  # "_" is in both
        response = await client.post(f"{API}/assets", json={"symbol": text, "name": "Decoy"})
        if SYMBOL_RULE.fullmatch(text):  # "_" or "GOLD_COIN_": a new symbol, not a pattern
            assert assert_answer(response, (201, None))["symbol"] == text
            made.add(text)
        else:
            assert_answer(response, (422, "validation_error"))
    listed = await client.get(f"{API}/assets")
    assert_answer(listed, (200, None))
    by_symbol = {asset["symbol"]: asset for asset in listed.json()}
    assert by_symbol["GOLD_COINS"]["name"] == "Gold Coins"  # no decoy's change reached it
    assert made <= set(by_symbol)
    for number, text in enumerate(SQL_METACHARACTERS):
        assert by_symbol[f"META_{number}"]["name"] == f"{text}."
    for text in PATH_SAFE + WILDCARD_ASSETS:
        response = await client.patch(f"{API}/assets/{segment(text)}", json={"name": "Changed"})
        if text in made:
            assert assert_answer(response, (200, None))["symbol"] == text
        else:
            assert_answer(response, expected_for_asset(text))
        report = await client.get(f"{API}/reports/liabilities", params={"assetSymbol": text})
        if text in made:  # nothing issued of a new asset, whatever its symbol matches
            owed = assert_answer(report, (200, None))["outstanding"]
            assert owed == {"paid": 0, "free": 0}
        else:
            assert_answer(report, expected_for_asset(text))
    gold = await client.get(f"{API}/reports/liabilities", params={"assetSymbol": "GOLD_COINS"})
    assert assert_answer(gold, (200, None))["outstanding"] == {"paid": 2000, "free": 0}
    assert_ledger_intact(before, await ledger_state(database_url), Accepted())


async def add_assets(database_url: str, symbols: tuple[str, ...]) -> None:
    """Asset types whose symbols are LIKE patterns of the seed's, "%" among them, which
    POST /api/v1/assets refuses: written to the store directly."""
    database = Database(create_engine(Settings(database_url=database_url)))
    try:
        async with database.transaction(is_write=True) as connection:
            await queries.insert_assets(
                connection,
                [Asset(symbol, f"Decoy {symbol}", "A LIKE pattern") for symbol in symbols],
            )
    finally:
        await database.close()


async def test_real_ids_and_symbols_spelled_as_like_patterns_match_only_themselves(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """A user and an asset whose names are wildcards of others' see only their own rows."""
    decoy_assets = ("%", "_", "GOLD_COIN_", "%COINS")
    await add_assets(database_url, decoy_assets)
    decoy_users = (ALICE[:-1] + "_", ALICE.replace("-", "_"), "_", "__")
    for number, user in enumerate(decoy_users):
        body = {"id": user, "email": f"decoy{number}@example.com", "name": "Decoy"}
        assert (
            assert_answer(await client.post(f"{API}/users", json=body), (201, None))["id"] == user
        )
    before = await ledger_state(database_url)
    accepted = Accepted()

    for user in decoy_users:
        for path in (f"{API}/wallet/transactions/{user}", f"{API}/wallet/ledger/{user}"):
            assert assert_answer(await client.get(path), (200, None))["items"] == []
        balances = assert_answer(await client.get(f"{API}/wallet/balances/{user}"), (200, None))
        assert {row["balance"] for row in balances["balances"]} == {0}
    for asset in decoy_assets:
        for path in (f"{API}/wallet/transactions/{ALICE}", f"{API}/wallet/ledger/{ALICE}"):
            page = assert_answer(await client.get(path, params={"assetSymbol": asset}), (200, None))
            assert page["items"] == [], asset
        balance = await client.get(f"{API}/wallet/balance/{ALICE}/{segment(asset)}")
        assert assert_answer(balance, (200, None))["balance"] == 0
    alice = assert_answer(await client.get(f"{API}/wallet/balances/{ALICE}"), (200, None))
    assert {row["assetSymbol"]: row["balance"] for row in alice["balances"]} == {
        **dict.fromkeys(decoy_assets, 0),
        "DIAMONDS": 10,
        "GOLD_COINS": 1000,
        "LOYALTY_POINTS": 500,
    }

    # Flows on the decoys move the decoys' balances alone.
    for number, (user, asset) in enumerate(zip(decoy_users, decoy_assets, strict=True)):
        for flow, amount in (("topup", 7), ("spend", 3)):
            body = {**flow_body(f"decoy-{flow}-{number}", amount=amount), "userId": user}
            body["assetSymbol"] = asset
            created = assert_answer(
                await client.post(f"{API}/wallet/{flow}", json=body), (201, None)
            )
            accepted.add(flow, body)
            assert (created["userId"], created["assetSymbol"]) == (user, asset)
        page = assert_answer(await client.get(f"{API}/wallet/transactions/{user}"), (200, None))
        assert {(t["userId"], t["assetSymbol"]) for t in page["items"]} == {(user, asset)}
    assert_ledger_intact(before, await ledger_state(database_url), accepted)


async def hold_of(client: httpx.AsyncClient, key: str, **fields: Any) -> dict[str, Any]:
    response = await client.post(f"{API}/wallet/holds", json=flow_body(key, **fields))
    return assert_answer(response, (201, None))


async def test_free_text_with_sql_metacharacters_in_the_writes_of_1_2_is_stored_exactly(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Transfers, holds, captures, refunds and atomic batches store their free text as sent
    and echo it in their answers and reads."""
    before = await ledger_state(database_url)
    accepted = Accepted()
    for number, text in enumerate(SQL_METACHARACTERS):
        body = {
            "fromUserId": ALICE,
            "toUserId": BOB,
            "assetSymbol": "GOLD_COINS",
            "amount": 1,
            "idempotencyKey": f"meta-transfer-{number}",
            "description": text,
        }
        sent = assert_answer(await client.post(f"{API}/wallet/transfer", json=body), (201, None))
        accepted.move(ALICE, BOB, "GOLD_COINS", 1)
        assert sent["description"] == text
        replayed = await client.post(f"{API}/wallet/transfer", json=body)
        assert assert_answer(replayed, (200, None)) == sent
        for user in (ALICE, BOB):
            path = f"{API}/wallet/transactions/{user}/{sent['transactionId']}"
            assert assert_answer(await client.get(path), (200, None))["description"] == text

        hold = await hold_of(client, f"meta-hold-{number}", description=text)
        assert hold["description"] == text
        read = assert_answer(await client.get(f"{API}/wallet/holds/{hold['holdId']}"), (200, None))
        assert read == hold
        capture = {"idempotencyKey": f"meta-capture-{number}", "description": text}
        captured = assert_answer(
            await client.post(f"{API}/wallet/holds/{hold['holdId']}/capture", json=capture),
            (201, None),
        )
        accepted.move(ALICE, "system:revenue", "GOLD_COINS", 1)
        assert captured["hold"]["description"] == text
        assert captured["transaction"]["description"] == text
        spend_id = captured["transaction"]["transactionId"]

        refund = {"idempotencyKey": f"meta-refund-{number}", "reason": text}
        refunded = assert_answer(
            await client.post(f"{API}/wallet/transactions/{spend_id}/refund", json=refund),
            (201, None),
        )
        accepted.move("system:revenue", ALICE, "GOLD_COINS", 1)
        assert refunded["reason"] == text
        path = f"{API}/wallet/transactions/{ALICE}/{refunded['transactionId']}"
        assert assert_answer(await client.get(path), (200, None))["reason"] == text

        gold = {"userId": ALICE, "assetSymbol": "GOLD_COINS", "amount": 1}
        free_text = (
            ("topup", "metadata", {text: text, "order": "A-1"}),
            ("bonus", "reason", text),
            ("spend", "description", text),
        )
        operations = [{"type": kind, **gold, name: value} for kind, name, value in free_text]
        operations.append(
            {
                "type": "transfer",
                "fromUserId": ALICE,
                "toUserId": BOB,
                "assetSymbol": "GOLD_COINS",
                "amount": 1,
                "description": text,
            }
        )
        body = {"idempotencyKey": f"meta-batch-{number}", "operations": operations}
        made = assert_answer(await client.post(f"{API}/wallet/batch", json=body), (201, None))
        for kind, _, _ in free_text:
            accepted.add(kind, {**gold})
        accepted.move(ALICE, BOB, "GOLD_COINS", 1)
        echoed = [
            (t["type"], t[name])
            for t, name in zip(
                made["transactions"],
                ("metadata", "reason", "description", "description"),
                strict=True,
            )
        ]
        assert echoed == [(kind, value) for kind, _, value in free_text] + [("transfer", text)]
        replayed = await client.post(f"{API}/wallet/batch", json=body)
        assert assert_answer(replayed, (200, None)) == made
    assert_ledger_intact(before, await ledger_state(database_url), accepted)


async def test_sql_metacharacters_in_the_ids_and_symbols_of_1_2_writes_name_nothing(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """A user id or asset symbol with SQL metacharacters in a transfer, a hold or a batch's
    operation names no one (404, a batch's naming the operation) or breaks the id rules (422);
    so do hold and transaction ids in paths, and nothing moves."""
    before = await ledger_state(database_url)
    hold = await hold_of(client, "meta-real-hold")
    listed = assert_answer(await client.get(f"{API}/wallet/transactions/{ALICE}"), (200, None))
    real_transaction = listed["items"][0]["transactionId"]
    for number, text in enumerate(SQL_METACHARACTERS + WILDCARD_USERS + SYSTEM_ACCOUNTS):
        expected = expected_for_user_id(text)
        for sender, receiver in ((text, BOB), (ALICE, text)):
            body = {
                "fromUserId": sender,
                "toUserId": receiver,
                "assetSymbol": "GOLD_COINS",
                "amount": 1,
                "idempotencyKey": f"user-transfer-{number}-{sender == text}",
            }
            response = await client.post(f"{API}/wallet/transfer", json=body)
            assert_answer(response, expected)
        response = await client.post(
            f"{API}/wallet/holds", json=flow_body(f"user-hold-{number}", userId=text)
        )
        assert_answer(response, expected)
        operations = [
            {"type": "topup", "userId": ALICE, "assetSymbol": "GOLD_COINS", "amount": 1},
            {"type": "bonus", "userId": text, "assetSymbol": "GOLD_COINS", "amount": 1},
        ]
        body = {"idempotencyKey": f"user-batch-{number}", "operations": operations}
        problem = assert_answer(await client.post(f"{API}/wallet/batch", json=body), expected)
        if expected[0] == 404:
            assert problem["operationIndex"] == 1
    for number, text in enumerate(SQL_METACHARACTERS + WILDCARD_ASSETS):
        expected = expected_for_asset(text)
        body = {
            "fromUserId": ALICE,
            "toUserId": BOB,
            "assetSymbol": text,
            "amount": 1,
            "idempotencyKey": f"asset-transfer-{number}",
        }
        assert_answer(await client.post(f"{API}/wallet/transfer", json=body), expected)
        response = await client.post(
            f"{API}/wallet/holds", json=flow_body(f"asset-hold-{number}", assetSymbol=text)
        )
        assert_answer(response, expected)
    near_holds = (hold["holdId"][:-1] + "_", hold["holdId"][:-1] + "%", "%", "_")
    for number, text in enumerate(PATH_SAFE + near_holds):
        expected = (404, "hold_not_found") if ID_RULE.fullmatch(text) else (422, "validation_error")
        path = f"{API}/wallet/holds/{segment(text)}"
        assert_answer(await client.get(path), expected)
        for action in ("capture", "release"):
            body = {"idempotencyKey": f"path-{action}-{number}"}
            assert_answer(await client.post(f"{path}/{action}", json=body), expected)
    near_transactions = (real_transaction[:-1] + "_", real_transaction[:-1] + "%", "%", "_")
    for number, text in enumerate(PATH_SAFE + near_transactions):
        response = await client.post(
            f"{API}/wallet/transactions/{segment(text)}/refund",
            json={"idempotencyKey": f"path-refund-{number}"},
        )
        assert_answer(response, (404, "transaction_not_found"))
    # The real hold is still held, untouched by its near misses.
    read = assert_answer(await client.get(f"{API}/wallet/holds/{hold['holdId']}"), (200, None))
    assert read == hold
    assert_ledger_intact(before, await ledger_state(database_url), Accepted())
