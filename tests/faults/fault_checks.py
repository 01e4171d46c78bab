"""The checks of a fault run: what its record and the ledger it left must show, each breach
filed as a violation under a category (the driver's ANSWERS, LEDGER, ...), and its summary."""

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fault_driver import (
    ANSWERS,
    BALANCES,
    BONUS_POOL,
    CATEGORIES,
    CLIENT_TIMEOUT_S,
    CLOCK_ORIGIN,
    FREE_TEXT_FIELD,
    HANGS,
    HOLDS,
    IDEMPOTENCY,
    KEY_PREFIX,
    LEDGER,
    OUTAGES,
    RECOVERY,
    REFUSALS,
    REVENUE,
    TREASURY,
    VERIFY,
    Attempt,
    Cluster,
    Fault,
    Operation,
    Recorder,
    run_wallet_command,
)

# What a transaction of each type moves: (debited, credited) of its user (and receiver).
USER = "user"
RECEIVER = "receiver"
MOVES = {
    "topup": (TREASURY, USER),
    "bonus": (BONUS_POOL, USER),
    "spend": (USER, REVENUE),
    "transfer": (USER, RECEIVER),
    "refund": (REVENUE, USER),
}
REVERSED_TO = {"topup": TREASURY, "bonus": BONUS_POOL}  # a reversal's credited account
# The one kind of credit a transaction of these types moves: a top-up gives paid credits and
# a bonus free ones; a reversal takes back what its original gave.
ISSUED_KIND = {"topup": "paid", "bonus": "free"}
EXPIRY_MARGIN_S = 1.0  # holds expiring this close to a read of `held` are left out of its check


@dataclass
class Violations:
    """Every breach found, by category."""

    found: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, category: str, message: str) -> None:
        assert category in CATEGORIES, category
        self.found[category].append(message)

    @property
    def total(self) -> int:
        return sum(len(found) for found in self.found.values())

    def report(self, *categories: str, limit: int = 12) -> str:
        lines = []
        for category in categories:
            found = self.found.get(category, [])
            lines += [f"{category}: {message}" for message in found[:limit]]
            if len(found) > limit:
                lines.append(f"{category}: ... and {len(found) - limit} more")
        return "\n".join(lines)


def _amount(operation: Operation, made: dict[str, Any]) -> int | None:
    """The amount the operation moves or holds: as sent, or a capture's and a refund's default
    (all of the hold; what is left of the original, at most all of it)."""
    if operation.amount is not None:
        return operation.amount
    assert operation.reference is not None
    if operation.flow == "capture":
        return int(operation.reference["amount"])
    amount = made.get("amount")
    fits = isinstance(amount, int) and 1 <= amount <= operation.reference["amount"]
    return amount if fits else None


def _refund_type(operation: Operation) -> str:
    assert operation.reference is not None
    return "refund" if operation.reference["type"] == "spend" else "reversal"


def _issued_kind(operation: Operation) -> str | None:
    """The one kind of credit the operation moves, if it moves one kind only."""
    if operation.flow == "refund":
        assert operation.reference is not None
        return ISSUED_KIND.get(operation.reference["type"])
    return ISSUED_KIND.get(operation.flow)


def _has_its_kinds(body: dict[str, Any], operation: Operation) -> bool:
    """The transaction's paid and free amounts make its amount, all of one kind where the
    operation moves only one."""
    paid, free = body.get("paidAmount"), body.get("freeAmount")
    if not (isinstance(paid, int) and isinstance(free, int) and min(paid, free) >= 0):
        return False
    only = _issued_kind(operation)
    return paid + free == body.get("amount") and only in (None, "paid" if free == 0 else "free")


def _is_transaction(body: dict[str, Any], operation: Operation, *, kind: str, user_id: str) -> bool:
    """A transaction body of this type, user, asset, amount and key, with a balance after it
    and the kinds of credit it moved."""
    return (
        isinstance(body.get("transactionId"), str)
        and (
            body.get("type"),
            body.get("userId"),
            body.get("assetSymbol"),
            body.get("amount"),
            body.get("idempotencyKey"),
        )
        == (kind, user_id, operation.asset, _amount(operation, body), operation.key)
        and isinstance(body.get("balanceAfter"), int)
        and body["balanceAfter"] >= 0
        and _has_its_kinds(body, operation)
    )


def _is_hold(body: dict[str, Any], operation: Operation, hold_id: str | None) -> bool:
    return (
        isinstance(body.get("holdId"), str)
        and hold_id in (None, body["holdId"])
        and (body.get("userId"), body.get("assetSymbol")) == (operation.user_id, operation.asset)
        and isinstance(body.get("expiresAt"), str)
    )


def _describes(operation: Operation, body: dict[str, Any]) -> bool:
    """The 2xx body is the answer to the operation's request."""
    free_text = body.get(FREE_TEXT_FIELD.get(operation.flow, ""))
    match operation.flow:
        case "topup" | "bonus" | "spend" | "transfer":
            return (
                _is_transaction(body, operation, kind=operation.flow, user_id=operation.user_id)
                and free_text == operation.free_text
                and body.get("toUserId") == operation.to_user_id
            )
        case "hold":
            return (
                _is_hold(body, operation, None)
                and body.get("amount") == operation.amount
                and free_text == operation.free_text
            )
        case "capture":
            hold, transaction = body.get("hold") or {}, body.get("transaction") or {}
            return (
                _is_hold(hold, operation, operation.reference_id)
                and hold.get("status") == "captured"
                and hold.get("capturedAmount") == _amount(operation, transaction)
                and _is_transaction(transaction, operation, kind="spend", user_id=operation.user_id)
                and transaction.get("holdId") == operation.reference_id
                and transaction.get("description") == operation.free_text
            )
        case "release":
            return _is_hold(body, operation, operation.reference_id) and (
                body.get("status") == "released"
            )
        case "refund":
            return (
                _is_transaction(
                    body, operation, kind=_refund_type(operation), user_id=operation.user_id
                )
                and body.get("refundOf") == operation.reference_id
                and free_text == operation.free_text
            )
    return False


def _identity(operation: Operation, body: dict[str, Any] | None) -> str | None:
    """What a success made: its transaction's id, or the hold's for a hold or a release."""
    if body is None:
        return None
    if operation.flow in ("hold", "release"):
        return body.get("holdId")
    return (
        (body.get("transaction") or {}).get("transactionId")
        if operation.flow == "capture"
        else (body.get("transactionId"))
    )


def check_answers(recorder: Recorder, violations: Violations) -> None:
    """Every answer keeps the contract; no request hangs; each key is applied at most once and
    every success and replay of a key carries the same transaction or hold."""
    for operation in recorder.operations:
        for attempt in operation.attempts:
            if attempt.error is not None and attempt.error.startswith("timeout"):
                violations.add(
                    HANGS, f"no answer within {CLIENT_TIMEOUT_S} s: {operation.describe()}"
                )
            if attempt.status is None:
                continue
            if attempt.status == 503:
                if attempt.code != "database_unavailable":
                    violations.add(ANSWERS, f"503 of another code: {operation.describe()}")
            elif attempt.status >= 500:
                violations.add(ANSWERS, f"{attempt.status}: {operation.describe()}")
            elif operation.is_refusal(attempt):
                continue
            elif attempt.is_success:
                assert attempt.body is not None
                if not _describes(operation, attempt.body):
                    violations.add(ANSWERS, f"2xx not of its request: {operation.describe()}")
                # A release answers 200, the first time too; the others 201, and 200 replayed.
                is_wrong = (
                    attempt.status != 200
                    if operation.flow == "release"
                    else attempt.is_replayed != (attempt.status == 200)
                )
                if is_wrong:
                    violations.add(ANSWERS, f"status or replay header: {operation.describe()}")
            else:
                violations.add(ANSWERS, f"{attempt.status}: {operation.describe()}")
        _check_key(operation, violations)


def _check_key(operation: Operation, violations: Violations) -> None:
    """One key: applied at most once, one transaction (or hold) in all its successes, and
    replayed as its first success when it is sent again after the run."""
    successes = operation.successes
    made = [a for a in successes if not a.is_replayed]
    if len(made) > 1:
        violations.add(IDEMPOTENCY, f"applied {len(made)} times: {operation.describe()}")
    if successes and not made:
        # A replay without its first is fine when that answer was lost (a worker died, ...).
        lost = [a for a in operation.answers() if a.status is None or a.status >= 500]
        if not lost:
            violations.add(IDEMPOTENCY, f"replayed but never applied: {operation.describe()}")
    ids = {_identity(operation, a.body) for a in successes}
    if len(ids) > 1:
        violations.add(IDEMPOTENCY, f"one key, {len(ids)} things made: {operation.describe()}")
    _check_refusal(operation, violations)
    if not successes:
        return
    first = successes[0].body
    replays = operation.answers(phases=("replay",))
    final = replays[-1] if replays else None
    if final is None or final.status != 200 or not final.is_replayed or final.body != first:
        violations.add(
            IDEMPOTENCY,
            f"a final retry is not the first success again (first: {first}): "
            f"{operation.describe()}",
        )


def _without_request_id(body: dict[str, Any] | None) -> dict[str, Any] | None:
    """A problem body but its requestId, which names the one request answered."""
    return None if body is None else {k: v for k, v in body.items() if k != "requestId"}


def _check_refusal(operation: Operation, violations: Violations) -> None:
    """One key the ledger refused for its state (insufficient_funds, hold_not_active,
    capture_exceeds_hold, refund_exceeds_original, not_refundable): a refusal is final
    (API-operations.md), so it is made once, never followed by a success, each later request
    of the key replays it (Idempotent-Replayed) with the same body, and so does a retry sent
    after the run."""
    refusals = operation.refusals
    if not refusals:
        return
    if operation.successes:
        violations.add(REFUSALS, f"refused, and applied too: {operation.describe()}")
    made = [a for a in refusals if not a.is_replayed]
    if len(made) > 1:
        violations.add(
            REFUSALS, f"refused {len(made)} times, not once then replayed: {operation.describe()}"
        )
    if not made:
        # A replayed refusal without its first is fine when that answer was lost.
        lost = [a for a in operation.answers() if a.status is None or a.status >= 500]
        if not lost:
            violations.add(REFUSALS, f"refusal replayed but never made: {operation.describe()}")
    first = _without_request_id(refusals[0].body)
    if any(_without_request_id(a.body) != first for a in refusals):
        violations.add(REFUSALS, f"one key, different refusals: {operation.describe()}")
    replays = operation.answers(phases=("replay",))
    final = replays[-1] if replays else None
    if (
        final is None
        or final.status != refusals[0].status
        or not final.is_replayed
        or _without_request_id(final.body) != first
    ):
        violations.add(
            REFUSALS,
            f"a final retry is not the first refusal again (first: {first}): "
            f"{operation.describe()}",
        )


def check_undetermined(recorder: Recorder, violations: Violations) -> None:
    for operation in recorder.operations:
        if not operation.has_definite_answer:
            violations.add(
                RECOVERY, f"no definite answer even when settled: {operation.describe()}"
            )


def _decided_unheard(operation: Operation) -> list[Attempt]:
    """For a key the ledger decided (applied it, or refused it for good) although no request
    of it heard the decision made (a first success or refusal, not a replay): the answers
    before the first replay of it (one of them, or a lost request, is the one that made it)."""
    answers = operation.answers()
    decided = [a for a in answers if a.is_success or operation.is_refusal(a)]
    if not decided or any(operation.is_made(a) for a in answers):
        return []
    return answers[: answers.index(decided[0])]


def check_503s_were_not_applied(
    recorder: Recorder, faults: Sequence[Fault], violations: Violations
) -> None:
    """A 503 means "not applied" (nor refused: nothing stored under the key), unless the
    database connection broke during the commit: a key whose requests were all answered 503
    (none lost) before a replay of a success or of a refusal must have met a fault that cuts
    connections."""
    windows = [
        (f.injected_at - 0.5, (f.lifted_at or f.injected_at) + 3.0)
        for f in faults
        if f.may_break_commits
    ]
    for operation in recorder.operations:
        before = _decided_unheard(operation)
        if not before or any(a.status is None for a in before):
            continue  # no key decided unheard, or a lost request may be the one that decided
        if not any(
            a.started_at <= end and a.ended_at >= start for a in before for start, end in windows
        ):
            violations.add(
                ANSWERS,
                "answered 503 database_unavailable, yet applied or refused (a retry was a "
                f"replay) while no fault cut the database connections: {operation.describe()}",
            )


def _moves(transaction: dict[str, Any], operation: Operation) -> tuple[str, str]:
    """The accounts an acknowledged transaction debits and credits."""
    kind = transaction["type"]
    if kind == "reversal":
        assert operation.reference is not None
        return transaction["userId"], REVERSED_TO[operation.reference["type"]]
    debited, credited = MOVES[kind]
    accounts = {USER: transaction["userId"], RECEIVER: transaction.get("toUserId")}
    return accounts.get(debited, debited), accounts.get(credited, credited)


async def check_ledger(cluster: Cluster, recorder: Recorder, violations: Violations) -> None:
    """Every key answered with a transaction is in the ledger once, as announced, with a debit
    and a credit entry of each kind it moved; every hold and release answered is in the holds
    once; nothing else of the run is there; every key refused keeps its refusal, and no other
    key of the run holds one; per asset, and per kind, the balances sum to zero; no user
    balance nor its paid part is negative, nor the paid part above the balance; each user's
    balances and their paid parts are the replay of the transactions announced to them
    (transfers, captures, refunds and reversals included); refunds never exceed their
    original; each hold ended as announced, at most once; `held` is the sum of the holds
    announced and not ended."""
    operations = recorder.operations
    sent = {op.key: op for op in operations}
    moving = {op.key: op for op in operations if op.transaction is not None}
    placed = {op.key: op for op in operations if op.flow == "hold" and op.successes}
    released = {op.key: op for op in operations if op.flow == "release" and op.successes}
    refused = {op.key: op for op in operations if op.refusals}
    users = {op.user_id for op in operations} | {op.to_user_id for op in operations}
    connection = await cluster.connect()
    try:
        rows = await connection.fetch(
            "SELECT id, type, user_id, to_user_id, asset_symbol, amount, paid_amount, note,"
            " metadata, idempotency_key, hold_id, refund_of, refunded_amount"
            " FROM transactions WHERE idempotency_key LIKE $1",
            KEY_PREFIX + "%",
        )
        entry_rows = await connection.fetch(
            "SELECT e.transaction_id, e.account_id, e.asset_symbol, e.direction, e.kind, e.amount"
            " FROM entries e JOIN transactions t ON t.id = e.transaction_id"
            " WHERE t.idempotency_key LIKE $1",
            KEY_PREFIX + "%",
        )
        hold_rows = await connection.fetch(
            "SELECT id, user_id, asset_symbol, amount, captured_amount, status,"
            " expires_at <= now() AS is_due, idempotency_key, release_key FROM holds"
            " WHERE idempotency_key LIKE $1 OR release_key LIKE $1",
            KEY_PREFIX + "%",
        )
        refusal_rows = await connection.fetch(
            "SELECT key, refusal_code FROM idempotency_keys"
            " WHERE key LIKE $1 AND refusal_code IS NOT NULL",
            KEY_PREFIX + "%",
        )
        sums = await connection.fetch(
            "SELECT asset_symbol, sum(balance) AS total, sum(paid) AS paid FROM balances"
            " GROUP BY asset_symbol"
        )
        negative = await connection.fetch(
            "SELECT account_id, asset_symbol, balance, paid FROM balances"
            " WHERE (balance < 0 OR paid < 0 OR paid > balance)"
            " AND account_id NOT LIKE 'system:%'"
        )
        user_balances = await connection.fetch(
            "SELECT account_id, asset_symbol, balance, paid, held FROM balances"
            " WHERE account_id = ANY($1::text[])",
            sorted(u for u in users if u is not None),
        )
    finally:
        await connection.close()

    by_key: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_key[row["idempotency_key"]].append(row)
    by_id = {row["id"]: row for row in rows}
    entries: dict[str, list[Any]] = defaultdict(list)
    for row in entry_rows:
        entries[row["transaction_id"]].append(row)

    for key, operation in moving.items():
        transaction = operation.transaction
        assert transaction is not None
        found = by_key.get(key, [])
        if len(found) != 1:
            violations.add(LEDGER, f"in the ledger {len(found)} times: {operation.describe()}")
            continue
        row = found[0]
        stored_metadata = None if row["metadata"] is None else json.loads(row["metadata"])
        note = None if operation.flow == "topup" else operation.free_text
        metadata = operation.free_text if operation.flow == "topup" else None
        reference = operation.reference_id if operation.reference else None
        got = (
            row["id"],
            row["type"],
            row["user_id"],
            row["to_user_id"],
            row["asset_symbol"],
            row["amount"],
            row["paid_amount"],
            row["note"],
            stored_metadata,
            row["hold_id"],
            row["refund_of"],
        )
        wanted = (
            transaction["transactionId"],
            transaction["type"],
            operation.user_id,
            operation.to_user_id,
            operation.asset,
            _amount(operation, transaction),
            transaction["paidAmount"],
            note,
            metadata,
            reference if operation.flow == "capture" else None,
            reference if operation.flow == "refund" else None,
        )
        if got != wanted:
            violations.add(LEDGER, f"ledger row {dict(row)} differs: {operation.describe()}")
        debited, credited = _moves(transaction, operation)
        found_entries = sorted(
            (e["kind"], e["direction"], e["account_id"], e["asset_symbol"], e["amount"])
            for e in entries.get(row["id"], [])
        )
        moved = {"paid": row["paid_amount"], "free": row["amount"] - row["paid_amount"]}
        expected = sorted(
            (kind, direction, account, operation.asset, amount)
            for kind, amount in moved.items()
            if amount
            for direction, account in (("credit", credited), ("debit", debited))
        )
        if found_entries != expected:
            violations.add(
                LEDGER, f"entries {found_entries} instead of {expected}: {operation.key}"
            )

    for key in by_key:
        if key not in moving:
            where = sent[key].describe() if key in sent else "a key this run never sent"
            violations.add(LEDGER, f"applied, but no 2xx announced it: {key}: {where}")

    _check_holds(hold_rows, operations, placed, released, sent, violations)
    _check_refunds(by_id, moving, violations)

    stored_refusals = {row["key"]: row["refusal_code"] for row in refusal_rows}
    for key, operation in refused.items():
        first = operation.refusals[0].code
        if stored_refusals.get(key) != first:
            violations.add(
                REFUSALS,
                f"refused {first}, but the refusal stored under its key is "
                f"{stored_refusals.get(key)}: {operation.describe()}",
            )
    for key in stored_refusals.keys() - refused.keys():
        where = sent[key].describe() if key in sent else "a key this run never sent"
        violations.add(
            REFUSALS, f"a refusal is stored, but no refusal announced it: {key}: {where}"
        )

    for row in sums:
        if (row["total"], row["paid"]) != (0, 0):
            violations.add(
                BALANCES,
                f"{row['asset_symbol']} sums to {row['total']}, its paid parts to "
                f"{row['paid']}, not 0",
            )
    for row in negative:
        violations.add(BALANCES, f"negative user balance or paid part: {dict(row)}")
    # Per account: the balance and its paid part.
    expected_balances: Counter[tuple[str, str]] = Counter()
    expected_paid: Counter[tuple[str, str]] = Counter()
    for operation in moving.values():
        transaction = operation.transaction
        assert transaction is not None
        debited, credited = _moves(transaction, operation)
        for side, sign in ((debited, -1), (credited, 1)):
            expected_balances[(side, operation.asset)] += sign * transaction["amount"]
            expected_paid[(side, operation.asset)] += sign * transaction["paidAmount"]
    actual = {(r["account_id"], r["asset_symbol"]): r["balance"] for r in user_balances}
    actual_paid = {(r["account_id"], r["asset_symbol"]): r["paid"] for r in user_balances}
    for account in sorted(set(actual) | {k for k in expected_balances if k[0] in users}):
        parts = (actual.get(account, 0), actual_paid.get(account, 0))
        if parts != (expected_balances[account], expected_paid[account]):
            violations.add(
                BALANCES,
                f"{account}: balance and paid part {parts}, the transactions announced sum to "
                f"{(expected_balances[account], expected_paid[account])}",
            )
    held = {(r["account_id"], r["asset_symbol"]): r["held"] for r in user_balances}
    still_held: Counter[tuple[str, str]] = Counter()
    for row in hold_rows:
        if row["status"] == "held":
            still_held[(row["user_id"], row["asset_symbol"])] += row["amount"]
    for account in sorted(set(held) | set(still_held)):
        if held.get(account, 0) != still_held[account]:
            violations.add(
                HOLDS,
                f"{account}: held {held.get(account, 0)}, its holds still held sum to "
                f"{still_held[account]}",
            )
    _check_standings(recorder, actual, actual_paid, violations)


def _check_holds(
    hold_rows: Sequence[Any],
    operations: Sequence[Operation],
    placed: dict[str, Operation],
    released: dict[str, Operation],
    sent: dict[str, Operation],
    violations: Violations,
) -> None:
    """Each hold announced is stored once as placed; each release announced is stored on its
    hold; no other hold or release of the run is; a hold is ended by at most one capture or
    release, is in the state the ones announced left it (captured of the amount, released), and
    otherwise still held, or expired once past its expiry."""
    by_key = {row["idempotency_key"]: row for row in hold_rows}
    by_release = {row["release_key"]: row for row in hold_rows if row["release_key"]}
    by_id = {row["id"]: row for row in hold_rows}
    for key, operation in placed.items():
        row, hold = by_key.get(key), operation.hold
        assert hold is not None
        if row is None:
            violations.add(LEDGER, f"hold announced but not stored: {operation.describe()}")
            continue
        got = (row["id"], row["user_id"], row["asset_symbol"], row["amount"])
        if got != (hold["holdId"], operation.user_id, operation.asset, operation.amount):
            violations.add(LEDGER, f"hold row {dict(row)} differs: {operation.describe()}")
    for key in by_key.keys() - placed.keys():
        if key is None or not key.startswith(KEY_PREFIX):
            continue
        where = sent[key].describe() if key in sent else "a key this run never sent"
        violations.add(LEDGER, f"a hold is stored, but no 2xx announced it: {key}: {where}")
    for key, operation in released.items():
        row = by_release.get(key)
        if row is None or row["id"] != operation.reference_id or row["status"] != "released":
            found = None if row is None else dict(row)
            violations.add(LEDGER, f"release announced, stored as {found}: {operation.describe()}")
    for key in by_release.keys() - released.keys():
        where = sent[key].describe() if key in sent else "a key this run never sent"
        violations.add(LEDGER, f"a release is stored, but no 2xx announced it: {key}: {where}")

    ended: dict[str, list[Operation]] = defaultdict(list)
    for operation in operations:
        if operation.flow in ("capture", "release") and operation.successes:
            ended[operation.reference_id].append(operation)
    for hold_id, enders in ended.items():
        if len(enders) > 1:
            shown = "\n  ".join(op.describe() for op in enders)
            violations.add(HOLDS, f"hold {hold_id} ended {len(enders)} times:\n  {shown}")
    for operation in placed.values():
        hold = operation.hold
        assert hold is not None
        row = by_id.get(hold["holdId"])
        if row is None:
            continue
        enders = ended.get(hold["holdId"], [])
        if enders and enders[0].flow == "capture":
            transaction = enders[0].transaction or {}
            wanted = {("captured", transaction.get("amount"))}
        elif enders:
            wanted = {("released", 0)}
        else:
            wanted = {("held", 0), ("expired", 0)} if row["is_due"] else {("held", 0)}
        if (row["status"], row["captured_amount"]) not in wanted:
            violations.add(
                HOLDS,
                f"hold {dict(row)} is not as announced ({sorted(wanted)}): "
                f"{[op.describe() for op in enders] or operation.describe()}",
            )


def _check_refunds(
    by_id: dict[str, Any], moving: dict[str, Operation], violations: Violations
) -> None:
    """Each original's refunds and reversals announced add up to its refundedAmount, at most
    its amount."""
    refunded: Counter[str] = Counter()
    for operation in moving.values():
        if operation.flow == "refund" and operation.transaction is not None:
            refunded[operation.reference_id] += operation.transaction["amount"]
    for original_id, row in by_id.items():
        if row["refunded_amount"] != refunded[original_id] or refunded[original_id] > row["amount"]:
            violations.add(
                LEDGER,
                f"transaction {original_id} of {row['amount']}: refundedAmount "
                f"{row['refunded_amount']}, refunds announced {refunded[original_id]}",
            )


def _check_standings(
    recorder: Recorder,
    balances: dict[tuple[str, str], int],
    paid: dict[tuple[str, str], int],
    violations: Violations,
) -> None:
    """The balances read at the end: each balance and its paid part are the ledger's, its
    free part the rest, `held` the sum of the holds announced, not ended by a capture or
    release announced, and not expired when read (holds expiring about then are not judged),
    and available = balance - held (no credit given in the run expires before it ends)."""
    ended = {
        op.reference_id
        for op in recorder.operations
        if op.flow in ("capture", "release")
        if op.successes
    }
    holds = [
        op.hold
        for op in recorder.operations
        if op.flow == "hold" and op.hold is not None and op.hold["holdId"] not in ended
    ]
    for user_id, started, finished, body in recorder.standings:
        for row in body.get("balances", []):
            account = (user_id, row["assetSymbol"])
            mine = [h for h in holds if (h["userId"], h["assetSymbol"]) == account]
            expiries = [datetime.fromisoformat(h["expiresAt"]).timestamp() for h in mine]
            if any(started - EXPIRY_MARGIN_S <= e <= finished + EXPIRY_MARGIN_S for e in expiries):
                continue
            held = sum(h["amount"] for h, e in zip(mine, expiries, strict=True) if e > finished)
            balance, paid_part = balances.get(account, 0), paid.get(account, 0)
            wanted = (balance, paid_part, balance - paid_part, held, balance - held)
            got = tuple(row.get(name) for name in ("balance", "paid", "free", "held", "available"))
            if got != wanted:
                violations.add(
                    HOLDS,
                    f"{account}: balance, paid, free, held, available read {got}, the ledger and "
                    f"the holds announced say {wanted}",
                )


def check_verify(cluster: Cluster, violations: Violations) -> None:
    code, output = run_wallet_command("verify", database_url=cluster.url)
    if code != 0:
        violations.add(VERIFY, f"`wallet verify` exited {code}:\n{output[-3000:]}")


def _answers_within(recorder: Recorder, window: tuple[float, float]) -> list[Attempt]:
    start, end = window
    return [a for a in recorder.attempts() if a.started_at >= start and a.ended_at <= end]


def check_faults(faults: Sequence[Fault], recorder: Recorder, violations: Violations) -> None:
    """Each outage was answered with 503s (all of them if the database was wholly away), and
    the service recovered from each fault by itself."""
    for fault in faults:
        for category, problem in fault.problems:
            violations.add(category, f"{fault.name}: {problem}")
        if fault.lifted_at is None:
            violations.add(RECOVERY, f"{fault.name}: never lifted")
        if fault.outage is None:
            continue
        answers = _answers_within(recorder, fault.outage)
        unavailable = [a for a in answers if a.status == 503 and a.code == "database_unavailable"]
        if not unavailable:
            violations.add(
                OUTAGES,
                f"{fault.name}: no 503 database_unavailable among {len(answers)} requests sent "
                f"and answered while the database was away: "
                f"{Counter(a.status for a in answers)}",
            )
        others = [a for a in answers if a not in unavailable]
        if fault.is_outage_total and others:
            violations.add(
                OUTAGES,
                f"{fault.name}: {len(others)} of {len(answers)} requests answered otherwise than "
                f"503 while the database was away, e.g. {[a.describe() for a in others[:3]]}",
            )


def summary(
    recorder: Recorder, faults: Sequence[Fault], violations: Violations, *, seconds: float
) -> list[str]:
    load = recorder.attempts(phases=("load",))
    statuses = Counter(str(a.status or (a.error or "").split(":")[0]) for a in load)
    slowest = max((a.ended_at - a.started_at for a in load), default=0.0)
    settled = {op.key for op in recorder.operations if op.answers(phases=("settle",))}
    behind: Counter[str] = Counter()  # keys decided while their client heard no decision
    for operation in recorder.operations:
        before = _decided_unheard(operation)
        if before:
            behind["a lost answer" if any(a.status is None for a in before) else "a 503"] += 1
    lines = [
        f"faults: {len(recorder.operations)} operations, {len(faults)} faults injected, "
        f"{violations.total} violations",
        f"faults: {len(load)} attempts in {seconds:.0f} s, answers {dict(sorted(statuses.items()))}"
        f"; slowest {slowest:.2f} s; decided unheard, behind {dict(behind)}; "
        f"{len(settled)} settled after the load; "
        f"{len(recorder.attempts(phases=('replay',)))} replays checked, "
        f"{sum(1 for op in recorder.operations if op.refusals)} of refused keys",
    ]
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    for operation in recorder.operations:
        refusal = operation.refusals[0].code if operation.refusals else None
        kinds[operation.flow]["applied" if operation.successes else refusal or "undecided"] += 1
    lines.append(
        "faults: by kind "
        + "; ".join(f"{kind} {dict(sorted(counts.items()))}" for kind, counts in kinds.items())
    )
    unheard = [op for op in recorder.operations if _decided_unheard(op)]
    lines += [f"faults:   decided unheard: {op.describe()}" for op in unheard[:5]]
    for fault in faults:
        recovery = f"{fault.recovery_s:.2f} s" if fault.recovery_s is not None else "never"
        seen = ""
        if fault.outage is not None:
            answers = Counter(a.status for a in _answers_within(recorder, fault.outage))
            seen = f" (answered meanwhile: {dict(answers)})"
        lines.append(
            f"faults:   at {fault.injected_at - CLOCK_ORIGIN:.1f} s {fault.name}: "
            f"{fault.in_flight} in flight, {fault.effect or 'done'}"
            f"{seen}; recovered in {recovery}"
        )
    return lines
