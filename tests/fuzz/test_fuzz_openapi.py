"""schemathesis against the live app's own /openapi.json, on SQLite and on PostgreSQL, twice on
each: with an admin API key on every request, and with no key at all. Every one of schemathesis'
checks runs over every operation, with positive and negative data, in its examples, coverage,
fuzzing and (with a key) stateful phases: no answer is a 5xx or outside the document (status,
media type, body schema, headers), data the document admits is accepted and data it refuses is
refused, a missing key or a made-up one is refused (401), an undeclared method is a 405 whose
`Allow` lists the path's methods, and a resource just made can be read back. Afterwards
`wallet verify` finds the ledger whole.

A request the document admits may still be refused by a rule the document cannot state (a spend
larger than the balance, cursor together with offset, an id nobody has). REFUSALS lists each such
rule, per operation and status; schemathesis is told those statuses are expected there, and this
test then holds every such answer to the rule's own `code` (and, for validation errors, its
fields and messages) and to what the request itself must show for the rule (a float such as 2.0
where the answer names one, one user as a transfer's sender and receiver, the index of a batch's
failing operation), so an exemption covers its rule and nothing else; a validation error that
names several fields is held to a rule for each (a bonus with both expiries and an amount of 2.0
breaks two). Each rule's `why` says why the document cannot state it. Without a key the only such
answer is 401.

schemathesis' pytest loader (`schemathesis.pytest.from_fixture`) cannot run under pytest 9.2 (it
reads `Function._nodeid`, which pytest removed), so the test drives schemathesis' own engine, the
one `schemathesis run` uses, and reports each failing case with its request and response.

WALLET_FUZZ_SEED=<n> replays a run: a failure's message names the seed it ran with."""

import asyncio
import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
import schemathesis
from fuzz_checks import ALICE, API, ASSETS, BOB, app_client, ledger_state
from hypothesis import strategies as st
from schemathesis.checks import CHECKS as REGISTERED_CHECKS
from schemathesis.core.parameters import ParameterLocation
from schemathesis.engine import Status, StopReason, events, from_schema
from schemathesis.engine.recorder import Interaction, ScenarioRecorder
from schemathesis.generation.case import Case
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import is_unexpected_http_status_case

from wallet.domain.ledger import Flow, HoldStatus
from wallet.http.app import create_app
from wallet.settings import Settings

# Every check schemathesis 4.32 has (`schemathesis.checks.CHECKS`, asserted below, so an upgrade
# that brings a new one fails here until it is added), plus max_response_time, which is a limit
# rather than a registered check: set to the service's own request deadline.
ALL_CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "positive_data_acceptance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "allow_header_conformance",
    "ignored_auth",
    "use_after_free",
    "ensure_resource_availability",
    "object_level_authorization",
)
FUZZ_EXAMPLES_PER_OPERATION = 25
STATEFUL_EXAMPLES = 15  # scenarios of linked calls (with a key only), each of at most:
STATEFUL_STEPS = 8
FLOW_EXAMPLE = {"userId": ALICE, "assetSymbol": "GOLD_COINS", "amount": 3}
PUBLIC_OPERATIONS = frozenset({f"GET {API}/health", f"GET {API}/health/ready"})
# What the service answers to data the document refuses. With a key: a 4xx of the request's
# own making (a path the router cannot place is a 404; a method no route of the path has, 405).
# Never 401, 403 or 429 (the key is an unlimited admin one), nor a 409 or a 5xx.
REJECTIONS_WITH_KEY: tuple[str, ...] = ("400", "404", "405", "413", "415", "422")
# Without a key, a scoped operation refuses before it reads the request: 401. Only a path the
# router cannot place at all (404) or a method no route of the path has (405) comes first.
REJECTIONS_WITHOUT_KEY = ("401", "404", "405")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal of a request the document admits, for a rule the document cannot state: its
    status and `code`, for a validation_error the fields and messages it may name, and what the
    request itself must show for the rule to apply (`shown`, given the body sent and the answer)."""

    status: int
    code: str
    why: str
    errors: frozenset[tuple[str, str]] = frozenset()
    shown: Callable[[Any, Any], bool] | None = None

    def matches(self, sent: Any, answer: Any) -> bool:
        if not isinstance(answer, dict) or answer.get("code") != self.code:
            return False
        if self.errors:
            given = {(e.get("field"), e.get("message")) for e in answer.get("errors") or []}
            if not given or not given <= self.errors:
                return False
        return self.shown is None or self.shown(sent, answer)


MISSING = object()


def value_at(body: Any, field: str) -> Any:
    """The value a problem's `field` names in the body sent (MISSING if none). A field inside a
    batch operation is named as pydantic names it, with the operation's type between its index
    and its name (`operations.0.topup.amount`): that part must be the operation's own type."""
    value = body
    for part in field.split(".") if field else ():
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, dict) and value.get("type") == part:
            continue
        else:
            return MISSING
    return value


def named_fields(answer: Any) -> list[str]:
    return [str(error.get("field")) for error in answer.get("errors") or []]


def integral_floats_sent(sent: Any, answer: Any) -> bool:
    """Every field the answer names came as a float such as 2.0."""
    values = [value_at(sent, name) for name in named_fields(answer)]
    return bool(values) and all(isinstance(v, float) and v.is_integer() for v in values)


def metadata_over_4_kib_sent(sent: Any, answer: Any) -> bool:
    """Every field the answer names is metadata larger than 4096 bytes, measured as the service
    measures it (JSON, not ASCII-escaped, UTF-8)."""
    values = [value_at(sent, name) for name in named_fields(answer)]
    return bool(values) and all(
        isinstance(v, dict) and len(json.dumps(v, ensure_ascii=False).encode()) > 4096
        for v in values
    )


def transfer_to_oneself_sent(sent: Any, answer: Any) -> bool:
    """The transfer (the body, or the batch operation) that holds each named field names one user
    as sender and receiver."""
    transfers = [value_at(sent, name.rpartition(".")[0]) for name in named_fields(answer)]
    return bool(transfers) and all(
        isinstance(t, dict) and t.get("fromUserId") == t.get("toUserId") for t in transfers
    )


def expiry_sent(sent: Any, answer: Any) -> bool:
    """The bonus the answer names (the body, or the batch operation at `operationIndex`) asked for
    an expiry moment."""
    bonus = sent
    if isinstance(sent, dict) and "operations" in sent:
        if not names_an_operation(sent, answer):
            return False
        bonus = sent["operations"][answer["operationIndex"]]
    return isinstance(bonus, dict) and isinstance(bonus.get("expiresAt"), str)


def both_expiries_sent(sent: Any, answer: Any) -> bool:
    """The bonus that holds each field the answer names (the body, or a batch operation) asked
    for an expiry both in days and as a moment."""
    bonuses = [value_at(sent, name.rpartition(".")[0]) for name in named_fields(answer)]
    return bool(bonuses) and all(
        isinstance(b, dict) and b.get("expiresInDays") is not None and b.get("expiresAt")
        for b in bonuses
    )


def names_an_operation(sent: Any, answer: Any) -> bool:
    """A batch's failure names the operation that failed: an index of the operations sent."""
    index = answer.get("operationIndex")
    operations = sent.get("operations") if isinstance(sent, dict) else None
    return (
        isinstance(index, int)
        and not isinstance(index, bool)
        and isinstance(operations, list)
        and 0 <= index < len(operations)
    )


INTEGER_MESSAGE = "Input should be a valid integer"
USER_NOT_FOUND = Refusal(404, "user_not_found", "a user id the pattern admits but no user has")
ASSET_NOT_FOUND = Refusal(404, "asset_not_found", "an asset symbol no asset has")
TRANSACTION_NOT_FOUND = Refusal(
    404, "transaction_not_found", "a transaction id nobody has, or one of another user"
)
KEY_NOT_FOUND = Refusal(404, "key_not_found", "an API key id no key has")
USER_EXISTS = Refusal(409, "user_exists", "a user id that is taken")
KEY_REUSED = Refusal(
    409, "idempotency_key_reused", "an idempotency key used before for a different request"
)
INSUFFICIENT_FUNDS = Refusal(422, "insufficient_funds", "a spend larger than the balance")
CURSOR_WITH_OFFSET = Refusal(
    422,
    "validation_error",
    "cursor and offset together: each is optional, but not both (no parameter schema spans two "
    "parameters)",
    errors=frozenset({("offset", "cursor and offset cannot be used together")}),
)
OUT_OF_RANGE = (
    "Value error, must be a real moment from 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z"
)


def moment_outside_utc_years(*fields: str) -> Refusal:
    return Refusal(
        422,
        "validation_error",
        "a date-time of year 1 or 9999 whose offset puts it in UTC year 0 or 10000, where no "
        "timestamp of either database goes (a pattern cannot add an offset to a date)",
        errors=frozenset((name, OUT_OF_RANGE) for name in fields),
    )


MOMENT_OUTSIDE_UTC_YEARS = moment_outside_utc_years("at", "from", "to")
IDEMPOTENCY_KEY_RULES = Refusal(
    422,
    "validation_error",
    "no idempotency key in the body nor in the Idempotency-Key header, or two that differ (a rule "
    "across the body and a header, which no schema of either states)",
    errors=frozenset(
        {
            ("idempotencyKey", "an idempotency key is required"),
            ("idempotencyKey", "the Idempotency-Key header and the idempotencyKey field differ"),
        }
    ),
)


def integral_float(*fields: str) -> Refusal:
    return Refusal(
        422,
        "validation_error",
        f"an integral float such as 2.0 in {', '.join(fields)}: API.md refuses floats in integer "
        "fields, and JSON Schema (2020-12, OpenAPI 3.1) counts 2.0 as the integer 2",
        errors=frozenset((name, INTEGER_MESSAGE) for name in fields),
        shown=integral_floats_sent,
    )


METADATA_MESSAGE = "Value error, metadata is larger than 4096 bytes"
METADATA_OVER_4_KIB = Refusal(
    422,
    "validation_error",
    "metadata over 4 KiB as JSON (no schema keyword bounds the size of an object)",
    errors=frozenset({("metadata", METADATA_MESSAGE)}),
    shown=metadata_over_4_kib_sent,
)
FLOW_REFUSALS = (USER_NOT_FOUND, ASSET_NOT_FOUND, KEY_REUSED, IDEMPOTENCY_KEY_RULES)
# API-credits.md: a bonus's expiresAt must be in the future when the bonus is applied, and a bonus
# gives its expiry in days or as a moment, not both.
EXPIRY_MESSAGE = "expiresAt must be in the future"
BOTH_EXPIRIES_MESSAGE = "Value error, give expiresInDays or expiresAt, not both"
EXPIRY_IN_THE_PAST = Refusal(
    422,
    "validation_error",
    "a bonus's expiresAt not after the moment it is applied (a schema cannot compare with now)",
    errors=frozenset({("expiresAt", EXPIRY_MESSAGE)}),
    shown=expiry_sent,
)
BOTH_EXPIRIES = Refusal(
    422,
    "validation_error",
    "a bonus with both expiresInDays and expiresAt (no schema compares two fields)",
    errors=frozenset({("expiresAt", BOTH_EXPIRIES_MESSAGE)}),
    shown=both_expiries_sent,
)
ASSET_EXISTS = Refusal(409, "asset_exists", "an asset symbol that is taken")
LIFETIMES = ("freeLifetimeDays", "paidLifetimeDays")
FROM_AFTER_TO = Refusal(
    422,
    "validation_error",
    "a period whose `from` is after its `to` (or, without `to`, after `at`, or now): no "
    "parameter schema spans two parameters",
    errors=frozenset({("from", "from must not be after to")}),
)
LIST_USER_REFUSALS = (USER_NOT_FOUND, ASSET_NOT_FOUND, CURSOR_WITH_OFFSET)
TRANSFER_MESSAGE = "a transfer needs two different users"
TRANSFER_TO_ONESELF = Refusal(
    422,
    "validation_error",
    "a transfer whose receiver is its sender (no schema compares two fields)",
    errors=frozenset({("toUserId", TRANSFER_MESSAGE)}),
    shown=transfer_to_oneself_sent,
)
HOLD_NOT_FOUND = Refusal(404, "hold_not_found", "a hold id the pattern admits but no hold has")
HOLD_NOT_ACTIVE = Refusal(
    409, "hold_not_active", "a hold already captured, released or expired (the hold's state)"
)
CAPTURE_EXCEEDS_HOLD = Refusal(
    422, "capture_exceeds_hold", "a capture larger than the hold (the hold's amount)"
)
ORIGINAL_NOT_FOUND = Refusal(404, "transaction_not_found", "a transaction id nobody has, to refund")
REFUND_EXCEEDS_ORIGINAL = Refusal(
    409,
    "refund_exceeds_original",
    "a refund larger than what is left of the original (its amount less its refunds so far)",
)
NOT_REFUNDABLE = Refusal(
    422, "not_refundable", "a refund of a transfer, a refund or a reversal (the original's type)"
)
TRANSFER_SHORT_OF_FUNDS = Refusal(
    422, "insufficient_funds", "a transfer larger than what the sender has available"
)
HOLD_SHORT_OF_FUNDS = Refusal(
    422, "insufficient_funds", "a hold larger than what the user has available"
)
REVERSAL_SHORT_OF_FUNDS = Refusal(
    422,
    "insufficient_funds",
    "a reversal of a top-up or bonus larger than what the user has available of the kind it "
    "gave (paid credits for a top-up, free for a bonus)",
)
# A batch fails as its first failing operation does, naming it (`operationIndex`); the fields of
# an operation are named as `operations.<i>.<type>.<name>` (a transfer's check of its two users,
# made after validation, as `operations.<i>.toUserId`).
MAX_OPERATIONS = 100
OPERATION_TYPES = ("topup", "bonus", "spend", "transfer")


def in_operations(name: str, *types: str) -> list[str]:
    return [f"operations.{i}.{t}.{name}" for i in range(MAX_OPERATIONS) for t in types]


BATCH_REFUSALS = (
    Refusal(
        404,
        "user_not_found",
        "an operation's user id, which the pattern admits but no user has",
        shown=names_an_operation,
    ),
    Refusal(
        404,
        "asset_not_found",
        "an operation's asset symbol, which no asset has",
        shown=names_an_operation,
    ),
    Refusal(
        422,
        "insufficient_funds",
        "an operation's spend or transfer larger than the balance the earlier ones left",
        shown=names_an_operation,
    ),
    KEY_REUSED,
    IDEMPOTENCY_KEY_RULES,
    Refusal(
        422,
        "validation_error",
        "an integral float such as 2.0 in an operation's amount or a bonus's expiresInDays: "
        "API.md refuses floats in integer fields, and JSON Schema (2020-12, OpenAPI 3.1) counts "
        "2.0 as the integer 2",
        errors=frozenset(
            (name, INTEGER_MESSAGE)
            for name in (
                *in_operations("amount", *OPERATION_TYPES),
                *in_operations("expiresInDays", "bonus"),
            )
        ),
        shown=integral_floats_sent,
    ),
    moment_outside_utc_years(*in_operations("expiresAt", "bonus")),
    EXPIRY_IN_THE_PAST,  # named as `expiresAt`, with the operation's index
    Refusal(
        422,
        "validation_error",
        "a bonus operation with both expiresInDays and expiresAt (no schema compares two fields)",
        errors=frozenset(
            (name, BOTH_EXPIRIES_MESSAGE) for name in in_operations("expiresAt", "bonus")
        ),
        shown=both_expiries_sent,
    ),
    Refusal(
        422,
        "validation_error",
        "a top-up operation's metadata over 4 KiB as JSON (no schema keyword bounds the size of "
        "an object)",
        errors=frozenset((name, METADATA_MESSAGE) for name in in_operations("metadata", "topup")),
        shown=metadata_over_4_kib_sent,
    ),
    Refusal(
        422,
        "validation_error",
        "a transfer operation whose receiver is its sender (no schema compares two fields)",
        errors=frozenset(
            (f"operations.{i}.toUserId", TRANSFER_MESSAGE) for i in range(MAX_OPERATIONS)
        ),
        shown=transfer_to_oneself_sent,
    ),
)
# Per operation, the refusals of schema-valid requests that the rules above explain; any other
# non-2xx answer to schema-valid data (with a key) fails positive_data_acceptance.
REFUSALS: dict[str, tuple[Refusal, ...]] = {
    f"GET {API}/health": (),
    f"GET {API}/health/ready": (),
    f"GET {API}/assets": (),
    f"POST {API}/assets": (ASSET_EXISTS, integral_float(*LIFETIMES)),
    f"PATCH {API}/assets/{{symbol}}": (
        ASSET_NOT_FOUND,
        integral_float(*LIFETIMES),
    ),
    f"GET {API}/users": (CURSOR_WITH_OFFSET,),
    f"POST {API}/users": (USER_EXISTS,),
    f"GET {API}/users/{{userId}}": (USER_NOT_FOUND,),
    f"POST {API}/wallet/topup": (*FLOW_REFUSALS, integral_float("amount"), METADATA_OVER_4_KIB),
    f"POST {API}/wallet/bonus": (
        *FLOW_REFUSALS,
        integral_float("amount", "expiresInDays"),
        moment_outside_utc_years("expiresAt"),
        EXPIRY_IN_THE_PAST,
        BOTH_EXPIRIES,
    ),
    f"POST {API}/wallet/spend": (*FLOW_REFUSALS, integral_float("amount"), INSUFFICIENT_FUNDS),
    f"POST {API}/wallet/transfer": (
        *FLOW_REFUSALS,
        integral_float("amount"),
        TRANSFER_SHORT_OF_FUNDS,
        TRANSFER_TO_ONESELF,
    ),
    f"POST {API}/wallet/batch": BATCH_REFUSALS,
    f"POST {API}/wallet/holds": (
        USER_NOT_FOUND,
        ASSET_NOT_FOUND,
        KEY_REUSED,
        IDEMPOTENCY_KEY_RULES,
        integral_float("amount", "expiresInSeconds"),
        HOLD_SHORT_OF_FUNDS,
    ),
    f"POST {API}/wallet/holds/{{holdId}}/capture": (
        HOLD_NOT_FOUND,
        HOLD_NOT_ACTIVE,
        CAPTURE_EXCEEDS_HOLD,
        KEY_REUSED,
        IDEMPOTENCY_KEY_RULES,
        integral_float("amount"),
    ),
    f"POST {API}/wallet/holds/{{holdId}}/release": (
        HOLD_NOT_FOUND,
        HOLD_NOT_ACTIVE,
        KEY_REUSED,
        IDEMPOTENCY_KEY_RULES,
    ),
    f"GET {API}/wallet/holds/{{holdId}}": (HOLD_NOT_FOUND,),
    f"GET {API}/wallet/holds": (USER_NOT_FOUND, CURSOR_WITH_OFFSET),
    f"POST {API}/wallet/transactions/{{transactionId}}/refund": (
        ORIGINAL_NOT_FOUND,
        NOT_REFUNDABLE,
        REFUND_EXCEEDS_ORIGINAL,
        REVERSAL_SHORT_OF_FUNDS,
        KEY_REUSED,
        IDEMPOTENCY_KEY_RULES,
        integral_float("amount"),
    ),
    # `at` (any moment from year 1 to 9999 in UTC) adds no other refusal: a balance before the
    # first entry is 0.
    f"GET {API}/wallet/balance/{{userId}}/{{assetSymbol}}": (
        USER_NOT_FOUND,
        ASSET_NOT_FOUND,
        MOMENT_OUTSIDE_UTC_YEARS,
    ),
    f"GET {API}/wallet/balances/{{userId}}": (USER_NOT_FOUND, MOMENT_OUTSIDE_UTC_YEARS),
    # Nor do `from` and `to` (a `to` before `from` is an empty page).
    f"GET {API}/wallet/transactions/{{userId}}": (*LIST_USER_REFUSALS, MOMENT_OUTSIDE_UTC_YEARS),
    f"GET {API}/wallet/transactions/{{userId}}/{{transactionId}}": (
        USER_NOT_FOUND,
        TRANSACTION_NOT_FOUND,
    ),
    f"GET {API}/wallet/ledger/{{userId}}": LIST_USER_REFUSALS,
    f"GET {API}/ledger/checkpoint": (),
    f"GET {API}/reports/liabilities": (ASSET_NOT_FOUND, MOMENT_OUTSIDE_UTC_YEARS, FROM_AFTER_TO),
    f"POST {API}/keys": (integral_float("readsPerSecond", "writesPerSecond"),),
    f"GET {API}/keys": (CURSOR_WITH_OFFSET,),
    f"DELETE {API}/keys/{{keyId}}": (KEY_NOT_FOUND,),
}
UNAUTHENTICATED = Refusal(401, "unauthenticated", "no API key")
# API-ledger.md's refund path is also an instance of API.md's transaction path:
# /wallet/transactions/{transactionId}/refund is /wallet/transactions/{userId}/{transactionId}
# with the transaction id "refund". So GET there is served (404 transaction_not_found: no
# transaction has that id) and a 405 there rightly allows GET and POST, while the document's
# refund path lists POST only. The checks of undeclared methods cannot hold on this one path.
OVERLAPPED_OPERATIONS = frozenset({f"POST {API}/wallet/transactions/{{transactionId}}/refund"})
METHOD_CHECKS = ("unsupported_method", "allow_header_conformance")


def cursor(seq: int) -> str:
    """A cursor as the service makes them (its format is opaque to clients, not to this test)."""
    return str(seq)


# Placeholders in EXAMPLES for ids that exist only once the run's seed data is made (SeedData).
TRANSACTION = object()  # one of Alice's seed transactions
REVOCABLE_KEY = object()  # the id of a key made to be revoked
SPEND = object()  # a spend of Alice's, made to be refunded
HOLD_TO_CAPTURE = object()  # a hold of Alice's, made to be captured
HOLD_TO_RELEASE = object()  # a hold of Bob's, made to be released
# One request per operation that must succeed on the seed data: the examples phase sends them.
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("GET", f"{API}/health"): {},
    ("GET", f"{API}/health/ready"): {},
    ("POST", f"{API}/keys"): {
        "body": {
            "label": "fuzz-example",
            "scopes": ["wallet:read", "wallet:debit"],
            "readsPerSecond": 5,
            "writesPerSecond": 0,
        }
    },
    ("GET", f"{API}/keys"): {"query": {"limit": 1}},
    ("DELETE", f"{API}/keys/{{keyId}}"): {"path": {"keyId": REVOCABLE_KEY}},
    ("GET", f"{API}/assets"): {},
    ("POST", f"{API}/assets"): {
        "body": {
            "symbol": "FUZZ_GEMS",
            "name": "Gems",
            "description": "made by the fuzz run",
            "spendOrder": "paid_first",
            "freeLifetimeDays": 30,
            "paidLifetimeDays": None,
        }
    },
    ("PATCH", f"{API}/assets/{{symbol}}"): {
        "path": {"symbol": "DIAMONDS"},
        "body": {"spendOrder": "paid_first", "paidLifetimeDays": 3650, "freeLifetimeDays": None},
    },
    ("GET", f"{API}/users"): {"query": {"limit": 1, "cursor": cursor(99)}},
    ("POST", f"{API}/users"): {"body": {"email": "o'brien@example.com", "name": "O'Brien"}},
    ("GET", f"{API}/users/{{userId}}"): {"path": {"userId": ALICE}},
    ("POST", f"{API}/wallet/topup"): {
        "body": {**FLOW_EXAMPLE, "idempotencyKey": "example-topup", "metadata": {"order": "A-1"}}
    },
    ("POST", f"{API}/wallet/bonus"): {
        "body": {
            **FLOW_EXAMPLE,
            "idempotencyKey": "example-bonus",
            "reason": "streak",
            "expiresInDays": 30,
        }
    },
    ("POST", f"{API}/wallet/spend"): {
        "body": {**FLOW_EXAMPLE, "idempotencyKey": "example-spend", "description": "sword"}
    },
    ("GET", f"{API}/wallet/balance/{{userId}}/{{assetSymbol}}"): {
        "path": {"userId": BOB, "assetSymbol": "DIAMONDS"}
    },
    ("GET", f"{API}/wallet/balances/{{userId}}"): {
        "path": {"userId": BOB},
        "query": {"at": "2100-01-01T00:00:00+02:00"},
    },
    ("GET", f"{API}/wallet/transactions/{{userId}}"): {
        "path": {"userId": ALICE},
        "query": {
            "type": "topup",
            "assetSymbol": "GOLD_COINS",
            "limit": 2,
            "from": "2000-01-01T00:00:00Z",
            "to": "2100-01-01T00:00:00-05:00",
        },
    },
    ("GET", f"{API}/wallet/transactions/{{userId}}/{{transactionId}}"): {
        "path": {"userId": ALICE, "transactionId": TRANSACTION}
    },
    ("GET", f"{API}/wallet/ledger/{{userId}}"): {
        "path": {"userId": ALICE},
        "query": {"assetSymbol": "LOYALTY_POINTS", "offset": 0},
    },
    ("POST", f"{API}/wallet/transfer"): {
        "body": {
            "fromUserId": ALICE,
            "toUserId": BOB,
            "assetSymbol": "GOLD_COINS",
            "amount": 3,
            "idempotencyKey": "example-transfer",
            "description": "gift",
        }
    },
    ("POST", f"{API}/wallet/batch"): {
        "body": {
            "idempotencyKey": "example-batch",
            "operations": [
                {"type": "topup", **FLOW_EXAMPLE, "metadata": {"order": "A-2"}},
                {"type": "bonus", **FLOW_EXAMPLE, "userId": BOB, "reason": "streak"},
                {"type": "spend", **FLOW_EXAMPLE, "description": "shield"},
                {
                    "type": "transfer",
                    "fromUserId": BOB,
                    "toUserId": ALICE,
                    "assetSymbol": "GOLD_COINS",
                    "amount": 3,
                },
            ],
        }
    },
    ("POST", f"{API}/wallet/holds"): {
        "body": {
            **FLOW_EXAMPLE,
            "idempotencyKey": "example-hold",
            "expiresInSeconds": 600,
            "description": "escrow",
        }
    },
    ("POST", f"{API}/wallet/holds/{{holdId}}/capture"): {
        "path": {"holdId": HOLD_TO_CAPTURE},
        "body": {"idempotencyKey": "example-capture", "amount": 2, "description": "trade"},
    },
    ("POST", f"{API}/wallet/holds/{{holdId}}/release"): {
        "path": {"holdId": HOLD_TO_RELEASE},
        "body": {"idempotencyKey": "example-release"},
    },
    ("GET", f"{API}/wallet/holds/{{holdId}}"): {"path": {"holdId": HOLD_TO_CAPTURE}},
    ("GET", f"{API}/wallet/holds"): {
        "query": {"userId": ALICE, "status": "held", "limit": 2, "offset": 0}
    },
    ("POST", f"{API}/wallet/transactions/{{transactionId}}/refund"): {
        "path": {"transactionId": SPEND},
        "body": {"idempotencyKey": "example-refund", "amount": 4, "reason": "returned"},
    },
    ("GET", f"{API}/ledger/checkpoint"): {},
    ("GET", f"{API}/reports/liabilities"): {
        "query": {
            "assetSymbol": "GOLD_COINS",
            "at": "2100-01-01T00:00:00+02:00",
            "from": "2000-01-01T00:00:00Z",
            "to": "2100-01-01T00:00:00-05:00",
        }
    },
}


@dataclass(frozen=True, slots=True)
class SeedData:
    """Real rows for the run to name: each seed user's transactions (a spend and a transfer
    among them), holds, the admin key the run sends, and a key to revoke (not the run's own:
    revoking that would turn every later request into a 401)."""

    transactions: dict[str, list[str]]
    run_key: str
    run_key_id: str
    revocable_key_id: str
    spend_id: str
    holds: dict[str, str]  # label -> hold id: "capture" and "release" for EXAMPLES, and others

    @property
    def placeholders(self) -> dict[object, str]:
        return {
            TRANSACTION: self.transactions[ALICE][0],
            REVOCABLE_KEY: self.revocable_key_id,
            SPEND: self.spend_id,
            HOLD_TO_CAPTURE: self.holds["capture"],
            HOLD_TO_RELEASE: self.holds["release"],
        }


@dataclass
class FuzzRun:
    """What one schemathesis run did and found."""

    cases: Counter[tuple[str, str]] = field(default_factory=Counter)  # (phase, operation)
    statuses: dict[str, Counter[int]] = field(default_factory=dict)  # operation -> status
    checks: Counter[str] = field(default_factory=Counter)
    refusals: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    links_followed: Counter[str] = field(default_factory=Counter)  # operation reached by a link
    failures: list[str] = field(default_factory=list)
    stop_reason: StopReason | None = None

    def record(
        self,
        phase: str,
        recorder: ScenarioRecorder,
        judge: Callable[[Case[Any], Interaction], Refusal | str | None],
    ) -> None:
        for case_id, node in recorder.cases.items():
            label = node.value.operation.label
            interaction = recorder.interactions.get(case_id)
            if interaction is None:
                continue
            self.cases[phase, label] += 1
            if node.parent_id is not None and node.is_transition_applied:
                self.links_followed[label] += 1
            if interaction.response is not None:
                self.statuses.setdefault(label, Counter())[interaction.response.status_code] += 1
            results = recorder.checks.get(case_id, [])
            if any(result.name == "positive_data_acceptance" for result in results):
                # Schema-valid data refused with a status the config let through: by its rule?
                verdict = judge(node.value, interaction)
                if isinstance(verdict, Refusal):
                    self.refusals[label, verdict.status, verdict.why] += 1
                elif verdict is not None:
                    self.failures.append(verdict)
        for case_id, results in recorder.checks.items():
            for result in results:
                self.checks[result.name] += 1
                if result.status == Status.FAILURE:
                    self.failures.append(describe_failure(recorder, case_id, result))


def describe_failure(recorder: ScenarioRecorder, case_id: str, result: Any) -> str:
    """The check, what it found, and the exact request and response."""
    failure = result.failure_info.failure if result.failure_info else None
    found = f"{failure.title}: {failure.message}" if failure is not None else "?"
    node = recorder.cases.get(case_id)
    label = node.value.operation.label if node is not None else recorder.label
    interaction = recorder.interactions.get(case_id)
    if interaction is None:
        return f"{label} {result.name}: {found}"
    return f"{label} {result.name}: {found}\n{describe_interaction(interaction)}"


def describe_interaction(interaction: Interaction) -> str:
    request, response = interaction.request, interaction.response
    sent = (request.body or b"")[:2000]
    headers = {
        name: values
        for name, values in request.headers.items()
        if name.lower() in {"authorization", "x-api-key", "idempotency-key", "content-type"}
    }
    answer = "no response" if response is None else f"{response.status_code} "
    if response is not None:
        answer += f"{response.headers.get('content-type')} {response.content[:2000]!r}"
    return f"  request: {request.method} {request.uri} {headers} {sent!r}\n  response: {answer}"


def refusal_judge(is_keyed: bool) -> Callable[[Case[Any], Interaction], Refusal | str | None]:
    """Holds each non-2xx answer to schema-valid data to the rule that allows it: the rule, or
    the failure's description when there is none (None: not such an answer)."""

    def judge(case: Case[Any], interaction: Interaction) -> Refusal | str | None:
        response = interaction.response
        meta = case.meta
        if (
            response is None
            or response.status_code < 300
            or meta is None
            or not meta.generation.mode.is_positive
            or is_unexpected_http_status_case(case)
        ):
            return None
        label = case.operation.label
        is_public = label in PUBLIC_OPERATIONS
        allowed = REFUSALS[label] if is_keyed or is_public else (UNAUTHENTICATED,)
        try:
            answer = json.loads(response.content)
        except ValueError:
            answer = None
        try:
            sent = json.loads(interaction.request.body or b"null")
        except ValueError:
            sent = None
        for refusal in allowed:
            if refusal.status == response.status_code and refusal.matches(sent, answer):
                return refusal
        # pydantic reports every field's error at once: each must be one a rule explains.
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if isinstance(errors, list) and len(errors) > 1:
            explained = [
                next(
                    (
                        refusal
                        for refusal in allowed
                        if refusal.status == response.status_code
                        and refusal.matches(sent, {**answer, "errors": [error]})
                    ),
                    None,
                )
                for error in errors
            ]
            if all(explained):
                why = " | ".join(sorted({refusal.why for refusal in explained if refusal}))
                return Refusal(response.status_code, "validation_error", why)
        return (
            f"{label}: schema-valid request refused, and by no rule of REFUSALS "
            f"(a {response.status_code} there is let through only for: "
            f"{[r.code for r in allowed if r.status == response.status_code]})\n"
            f"{describe_interaction(interaction)}"
        )

    return judge


def operations_config(document: dict[str, Any], *, is_keyed: bool) -> list[dict[str, Any]]:
    """Per operation, the statuses schemathesis is to take as the answer to schema-valid data
    (2xx, and REFUSALS' statuses with a key; 401 without, where the document asks for a key) and
    to schema-invalid data."""
    operations = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            label = f"{method.upper()} {path}"
            is_scoped = bool(operation.get("security"))
            assert is_scoped != (label in PUBLIC_OPERATIONS), label
            if is_keyed or not is_scoped:
                accepted = ["2xx", *sorted({str(r.status) for r in REFUSALS[label]})]
                rejected = REJECTIONS_WITH_KEY
            else:
                accepted, rejected = ["401"], REJECTIONS_WITHOUT_KEY
            checks: dict[str, Any] = {
                "positive_data_acceptance": {"expected-statuses": accepted},
                "negative_data_rejection": {"expected-statuses": list(rejected)},
            }
            if label in OVERLAPPED_OPERATIONS:
                checks |= {name: {"enabled": False} for name in METHOD_CHECKS}
            operations.append({"include-name": label, "checks": checks})
    return operations


def config_for(
    document: dict[str, Any], settings: Settings, *, key: str | None, seed: int
) -> dict[str, Any]:
    return {
        "seed": seed,
        "generation": {
            "mode": "all",
            "max-examples": FUZZ_EXAMPLES_PER_OPERATION,
            "database": "none",  # no .hypothesis/ directory either
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            # Linked calls: the document has no links, schemathesis infers them (POST /users ->
            # GET /users/{userId}, a flow -> its transaction, GET /keys -> DELETE /keys/{keyId}):
            # what use_after_free and ensure_resource_availability look at. Without a key no
            # operation but health answers 2xx, so there is no link to follow.
            "stateful": {
                "enabled": key is not None,
                "max-steps": STATEFUL_STEPS,
                "generation": {"max-examples": STATEFUL_EXAMPLES},
            },
        },
        "checks": {"enabled": True, "max_response_time": settings.request_timeout_s},
        "operations": operations_config(document, is_keyed=key is not None),
        # The key in every request, as a client sends it; schemathesis takes it as the explicit
        # credentials, so ignored_auth also sends each operation once without it and once with a
        # made-up one. Without a key, schemathesis makes up credentials of its own now and then.
        **({"headers": {"Authorization": f"Bearer {key}"}} if key else {}),
        # No "max-time": with one the engine repeats its fuzzing phase until the time is up. The
        # run is bounded by the examples per operation instead.
        "cache": {"enabled": False},  # no .schemathesis/ directory left in the working tree
        # Hypothesis' deadline is already off in schemathesis; "too slow" would misfire on a
        # machine busy with other suites (the database is real). The other health checks stay on.
        "suppress-health-check": ["too_slow"],
    }


def real_data(schema: Any, *, seed: SeedData) -> None:
    """Hooks that point the run at real seed data: one explicit example per operation that must
    succeed (the examples phase), and about half of the generated ids, symbols, filters and flow
    bodies in the fuzzing and stateful phases, so the run reaches 200 and 201 answers, not only
    404s and 422s. Only the parts of a case generated valid are touched: a part made invalid on
    purpose reaches the service as made (and schemathesis judges an edited case again)."""
    transactions = seed.transactions
    pairs = [(user, transaction) for user, ids in transactions.items() for transaction in ids]
    users = st.sampled_from([ALICE, BOB])
    path_values = {
        "userId": users,
        "assetSymbol": st.sampled_from(ASSETS),
        "symbol": st.sampled_from(ASSETS),
        "holdId": st.sampled_from(sorted(seed.holds.values())),
    }
    # Moments before the seed, around it and after it: balances at them and pages between them;
    # and two that RFC 3339 writes in years 1 and 9999 but whose offsets put in UTC years 0 and
    # 10000 (the service must answer those too).
    moments = st.sampled_from(
        [
            "2000-01-01T00:00:00Z",
            datetime.now(UTC).isoformat(),
            "2100-01-01T00:00:00+02:00",
            "0001-01-01T00:00:00+01:00",
            "9999-12-31T23:59:59-01:00",
        ]
    )
    query_values = {
        "userId": users,
        "assetSymbol": st.sampled_from(ASSETS),
        "type": st.sampled_from([flow.value for flow in Flow]),
        "status": st.sampled_from([status.value for status in HoldStatus]),
        "cursor": st.sampled_from([cursor(seq) for seq in (1, 4, 99)]),
        "limit": st.integers(1, 5),
        "at": moments,
        "from": moments,
        "to": moments,
    }
    # A flow body that names real users and an asset, with an amount a seed balance covers and
    # a key, mostly fresh and sometimes one used before, so that flows apply (201), replay (200)
    # or conflict (409); its free text stays as generated. A batch's operations likewise. A
    # bonus's expiry is mostly one of the two ways or none, in the future. A new asset's symbol is
    # sometimes a seeded one (409 asset_exists).
    operation_values = {
        "userId": users,
        "fromUserId": users,
        "toUserId": users,
        "assetSymbol": path_values["assetSymbol"],
        "amount": st.integers(1, 5),
        "expiresInDays": st.one_of(st.none(), st.integers(1, 3650)),
        "expiresAt": st.sampled_from([None, None, "2100-01-01T00:00:00+02:00"]),
    }
    flow_values = {
        **operation_values,
        "symbol": path_values["symbol"],
        "idempotencyKey": st.one_of(
            st.uuids().map(lambda u: f"fuzz-{u}"), st.sampled_from(["fuzz-a", "fuzz-b"])
        ),
    }

    def real_operations(operations: Any) -> st.SearchStrategy[list[Any]] | None:
        if not isinstance(operations, list) or not all(isinstance(o, dict) for o in operations):
            return None
        edits = [
            st.fixed_dictionaries({n: v for n, v in operation_values.items() if n in operation})
            for operation in operations
        ]
        return st.tuples(*edits).map(
            lambda chosen: [{**o, **e} for o, e in zip(operations, chosen, strict=True)]
        )

    def real_body(body: Any) -> st.SearchStrategy[dict[str, Any] | None]:
        known = {name: strategy for name, strategy in flow_values.items() if name in body}
        operations = real_operations(body.get("operations"))
        if operations is not None:
            known["operations"] = operations
        return st.one_of(st.none(), st.fixed_dictionaries(known)) if known else st.none()

    def sometimes_real(
        values: Any, real: dict[str, st.SearchStrategy[Any]]
    ) -> st.SearchStrategy[dict[str, Any] | None]:
        known = {name: strategy for name, strategy in real.items() if name in values}
        if not isinstance(values, dict) or not known:
            return st.none()
        return st.one_of(st.none(), st.fixed_dictionaries(known))

    def before_add_examples(context: Any, examples: list[Any]) -> None:
        operation = context.operation
        example = EXAMPLES[operation.method.upper(), operation.path]
        real = seed.placeholders
        path_parameters = {
            name: real.get(value, value) for name, value in example.get("path", {}).items()
        }
        examples.append(
            operation.Case(
                path_parameters=path_parameters or None,
                query=example.get("query"),
                **({"body": example["body"]} if "body" in example else {}),
            )
        )

    def flatmap_case(_context: Any, case: Case[Any]) -> st.SearchStrategy[Case[Any]]:
        meta = case.meta
        if meta is None:
            return st.just(case)
        edits: dict[str, st.SearchStrategy[Any]] = {}
        path = case.path_parameters or {}
        if not meta.is_negative_at(ParameterLocation.PATH):
            if "transactionId" in path and "userId" in path:
                edits["path"] = st.one_of(
                    st.none(),
                    st.sampled_from(pairs).map(lambda p: {"userId": p[0], "transactionId": p[1]}),
                )
            elif "transactionId" in path:  # a refund: any user's
                edits["path"] = st.one_of(
                    st.none(),
                    st.sampled_from(pairs).map(lambda p: {"transactionId": p[1]}),
                )
            else:
                edits["path"] = sometimes_real(path, path_values)
        if not meta.is_negative_at(ParameterLocation.QUERY):
            edits["query"] = sometimes_real(case.query or {}, query_values)
        header = next((n for n in case.headers or {} if n.lower() == "idempotency-key"), None)
        if header is not None and not meta.is_negative_at(ParameterLocation.HEADER):
            # Mostly left out, so that the key of a real flow body is the only one.
            edits["drop_header"] = st.sampled_from([False, True, True, True])
        if isinstance(case.body, dict) and not meta.is_negative_at(ParameterLocation.BODY):
            edits["body"] = real_body(case.body)

        def edited(chosen: dict[str, Any]) -> Case[Any]:
            # New containers, never changed in place: schemathesis sees the edit and judges the
            # case again, and the same case edited twice comes out the same.
            if chosen.get("path"):
                case.path_parameters = {**path, **chosen["path"]}
            if chosen.get("query"):
                case.query = {**case.query, **chosen["query"]}
            if chosen.get("drop_header") and header is not None:
                headers = case.headers.copy()
                del headers[header]
                case.headers = headers
            if chosen.get("body") and isinstance(case.body, dict):
                case.body = {**case.body, **chosen["body"]}
            return case

        return st.fixed_dictionaries(edits).map(edited)

    # The schema's hooks, each named as the phase it serves.
    schema.hook(before_add_examples)
    schema.hook(flatmap_case)


def sparing_the_run_key(seed: SeedData) -> Callable[..., None]:
    """A before_call hook: the stateful phase follows GET /keys to DELETE /keys/{keyId} with
    ids from the list, the run's own key among them; that one DELETE is sent for the revocable
    key instead, so that the run keeps its credentials."""

    def before_call(_context: Any, case: Case[Any], _kwargs: dict[str, Any]) -> None:
        parameters = case.path_parameters or {}
        if case.operation.label == f"DELETE {API}/keys/{{keyId}}" and (
            parameters.get("keyId") == seed.run_key_id
        ):
            parameters["keyId"] = seed.revocable_key_id

    return before_call


def fuzz(settings: Settings, *, key: str | None, seed: SeedData, run_seed: int) -> FuzzRun:
    """Load the document from the real app, run schemathesis over it with the API key `key` on
    every request (or none), and stop the app."""
    app = create_app(settings)
    run = FuzzRun()
    config = config_for(app.openapi(), settings, key=key, seed=run_seed)
    judge = refusal_judge(key is not None)
    before_call = schemathesis.hook(sparing_the_run_key(seed))
    try:
        schema = schemathesis.openapi.from_asgi(
            "/openapi.json", app, config=schemathesis.Config.from_dict(config)
        )
        real_data(schema, seed=seed)
        for event in from_schema(schema).execute():
            if isinstance(event, events.ScenarioFinished):
                run.record(event.phase.value, event.recorder, judge)
            elif isinstance(event, events.NonFatalError | events.FatalError):
                run.failures.append(f"schemathesis error: {event!r}")
            elif isinstance(event, events.EngineFinished):
                run.stop_reason = event.stop_reason
    finally:
        schemathesis.hooks.unregister(before_call)
        # schemathesis runs the app's lifespan on its own event loop; end it (closing the pool).
        asgi.shutdown_lifespans()
    return run


# Rows made before the run, on top of the seed: (label, user, asset, amount) of each hold, and a
# spend and a transfer, so that captures, releases, refunds (and a transfer's not_refundable)
# have real ids to name.
SEED_HOLDS = (
    ("capture", ALICE, "GOLD_COINS", 5),
    ("release", BOB, "GOLD_COINS", 5),
    ("alice-points", ALICE, "LOYALTY_POINTS", 3),
    ("bob-diamonds", BOB, "DIAMONDS", 3),
)
SEED_SPEND = {**FLOW_EXAMPLE, "amount": 10, "idempotencyKey": "fuzz-seed-spend"}
SEED_TRANSFER = {
    "fromUserId": ALICE,
    "toUserId": BOB,
    "assetSymbol": "GOLD_COINS",
    "amount": 5,
    "idempotencyKey": "fuzz-seed-transfer",
}


async def seed_data(settings: Settings, *, key: str) -> SeedData:
    """A spend, a transfer and holds made for the run; then the ids of each seed user's
    transactions, an admin key for the run and a key to revoke."""
    async with app_client(settings, key=key) as client:
        response = await client.post(f"{API}/wallet/spend", json=SEED_SPEND)
        assert response.status_code == 201, response.text
        spend_id = response.json()["transactionId"]
        response = await client.post(f"{API}/wallet/transfer", json=SEED_TRANSFER)
        assert response.status_code == 201, response.text
        holds = {}
        for label, user, asset, amount in SEED_HOLDS:
            body = {
                "userId": user,
                "assetSymbol": asset,
                "amount": amount,
                "idempotencyKey": f"fuzz-seed-hold-{label}",
            }
            response = await client.post(f"{API}/wallet/holds", json=body)
            assert response.status_code == 201, response.text
            holds[label] = response.json()["holdId"]
        transactions = {}
        for user in (ALICE, BOB):
            response = await client.get(f"{API}/wallet/transactions/{user}")
            assert response.status_code == 200, response.text
            transactions[user] = [item["transactionId"] for item in response.json()["items"]]
        keys = {}
        for label, scope in (("fuzz-run", "admin"), ("fuzz-revocable", "wallet:read")):
            # 0: no rate budget, so that no 429 comes between the run and the service.
            body = {"label": label, "scopes": [scope], "readsPerSecond": 0, "writesPerSecond": 0}
            response = await client.post(f"{API}/keys", json=body)
            assert response.status_code == 201, response.text
            keys[label] = response.json()
    return SeedData(
        transactions=transactions,
        run_key=keys["fuzz-run"]["key"],
        run_key_id=keys["fuzz-run"]["keyId"],
        revocable_key_id=keys["fuzz-revocable"]["keyId"],
        spend_id=spend_id,
        holds=holds,
    )


def statuses_of(run: FuzzRun, labels: frozenset[str]) -> set[int]:
    return {status for label in labels for status in run.statuses.get(label, ())}


@pytest.mark.parametrize("auth", ["admin-key", "no-key"])
async def test_schemathesis_finds_no_failure_of_any_check(
    settings: Settings, database_url: str, admin_key: str, auth: str
) -> None:
    assert set(REGISTERED_CHECKS.get_all_names()) == set(ALL_CHECKS)
    seed = await seed_data(settings, key=admin_key)
    key = seed.run_key if auth == "admin-key" else None
    run_seed = int(os.environ.get("WALLET_FUZZ_SEED") or random.randrange(2**32))

    # The engine is synchronous and drives the app on a loop of its own: keep this loop free.
    run = await asyncio.to_thread(fuzz, settings, key=key, seed=seed, run_seed=run_seed)

    replay = f"WALLET_FUZZ_SEED={run_seed} replays this run"
    shown = "\n\n".join(run.failures[:20])
    assert run.failures == [], f"{len(run.failures)} failures ({replay}):\n\n{shown}"
    assert run.stop_reason == StopReason.COMPLETED, (run.stop_reason, replay)
    operations = frozenset(label for _, label in run.cases)
    assert operations == set(REFUSALS), sorted(operations)
    assert len(operations) == len(EXAMPLES) == 29, sorted(operations)
    for phase in ("examples", "coverage", "fuzzing"):
        assert {label for p, label in run.cases if p == phase} == operations, phase
    assert set(run.checks) == {*ALL_CHECKS, "max_response_time"}, run.checks
    assert sum(run.cases.values()) >= 1000, run.cases
    # Schema-valid data was refused, each time by a rule of REFUSALS (or for want of a key).
    assert run.refusals, run.statuses
    # The public operations answer as documented, with or without a key.
    assert statuses_of(run, PUBLIC_OPERATIONS) == {200, 405}, run.statuses
    scoped = operations - PUBLIC_OPERATIONS
    if key is not None:
        # Real data was reached: every operation answered a success at least once (its example),
        # and the stateful phase followed links from one answer to the next request.
        no_success = sorted(
            label for label, seen in run.statuses.items() if not any(s < 300 for s in seen)
        )
        assert no_success == [], run.statuses
        assert any(phase == "stateful" for phase, _ in run.cases), run.cases
        assert sum(run.links_followed.values()) > 0, run.cases
    else:
        # Without a key a scoped operation answers 401, whatever else is wrong with the request,
        # unless the router has no route for the path (404) or the method (405).
        assert all(401 in run.statuses[label] for label in scoped), run.statuses
        assert statuses_of(run, scoped) <= {401, 404, 405}, run.statuses
        assert {status for _, status, _ in run.refusals} == {401}, run.refusals
    after = await ledger_state(database_url)
    assert after.audit_failures == [], after.audit_failures
