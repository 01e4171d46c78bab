"""The checks of a fault run: what its record and the ledger it left must show, each breach
filed as a violation under a category (the driver's ANSWERS, LEDGER, ...), and its summary."""

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fault_driver import (
    ANSWERS,
    BALANCES,
    CATEGORIES,
    CLIENT_TIMEOUT_S,
    CLOCK_ORIGIN,
    HANGS,
    IDEMPOTENCY,
    KEY_PREFIX,
    LEDGER,
    OUTAGES,
    RECOVERY,
    REFUSALS,
    REVENUE,
    SIGN,
    SOURCE,
    VERIFY,
    Attempt,
    Cluster,
    Fault,
    Operation,
    Recorder,
    run_wallet_command,
)


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


def _describes(operation: Operation, body: dict[str, Any]) -> bool:
    """The transaction in a 2xx body is the one the operation asked for."""
    field_name = {"topup": "metadata", "bonus": "reason", "spend": "description"}[operation.flow]
    return (
        (
            body.get("type"),
            body.get("userId"),
            body.get("assetSymbol"),
            body.get("amount"),
            body.get("idempotencyKey"),
            body.get(field_name),
        )
        == (
            operation.flow,
            operation.user_id,
            operation.asset,
            operation.amount,
            operation.key,
            operation.free_text,
        )
        and isinstance(body.get("balanceAfter"), int)
        and body["balanceAfter"] >= 0
    )


def check_answers(recorder: Recorder, violations: Violations) -> None:
    """Every answer keeps the contract; no request hangs; each key is applied at most once and
    every success and replay of a key carries the same transaction."""
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
            elif attempt.status == 422:
                if operation.flow != "spend" or attempt.code != "insufficient_funds":
                    violations.add(ANSWERS, f"refused: {operation.describe()}")
            elif attempt.is_success:
                assert attempt.body is not None
                if not _describes(operation, attempt.body):
                    violations.add(ANSWERS, f"2xx not of its request: {operation.describe()}")
                if attempt.is_replayed != (attempt.status == 200):
                    violations.add(ANSWERS, f"replay header wrong: {operation.describe()}")
            else:
                violations.add(ANSWERS, f"{attempt.status}: {operation.describe()}")
        _check_key(operation, violations)


def _check_key(operation: Operation, violations: Violations) -> None:
    """One key: applied at most once, one transaction in all its successes, and replayed as
    its first success when it is sent again after the run."""
    successes = operation.successes
    created = [a for a in successes if a.status == 201]
    if len(created) > 1:
        violations.add(IDEMPOTENCY, f"applied {len(created)} times: {operation.describe()}")
    if successes and not created and all(a.status == 200 for a in successes):
        # A replay without a 201 is fine when the 201 was lost (a worker died, a timeout).
        lost = [a for a in operation.answers() if a.status is None or a.status >= 500]
        if not lost:
            violations.add(IDEMPOTENCY, f"replayed but never applied: {operation.describe()}")
    ids = {a.body["transactionId"] for a in successes if a.body and "transactionId" in a.body}
    if len(ids) > 1:
        violations.add(IDEMPOTENCY, f"one key, {len(ids)} transactions: {operation.describe()}")
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
    """One key the ledger refused (422 insufficient_funds): a refusal is final
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
        or final.status != 422
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
    of it heard the decision made (a 201, or a 422 without Idempotent-Replayed): the answers
    before the first replay of it (one of them, or a lost request, is the one that made it)."""
    answers = operation.answers()
    decided = [a for a in answers if a.is_success or a.status == 422]
    if not decided or any(
        a.status == 201 or (a.status == 422 and not a.is_replayed) for a in answers
    ):
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


async def check_ledger(cluster: Cluster, recorder: Recorder, violations: Violations) -> None:
    """Every key answered 2xx is in the ledger once, with the amounts sent and its two entries;
    nothing else of the run is there; every key answered 422 keeps its refusal, and no other
    key of the run holds one; per asset the balances sum to zero; no user balance is negative;
    each user's balances are the sum of the flows announced to them."""
    announced = {op.key: op for op in recorder.operations if op.successes}
    refused = {op.key: op for op in recorder.operations if op.refusals}
    sent = {op.key: op for op in recorder.operations}
    users = {op.user_id for op in recorder.operations}
    connection = await cluster.connect()
    try:
        rows = await connection.fetch(
            "SELECT id, type, user_id, asset_symbol, amount, note, metadata, idempotency_key"
            " FROM transactions WHERE idempotency_key LIKE $1",
            KEY_PREFIX + "%",
        )
        entry_rows = await connection.fetch(
            "SELECT e.transaction_id, e.account_id, e.asset_symbol, e.direction, e.amount"
            " FROM entries e JOIN transactions t ON t.id = e.transaction_id"
            " WHERE t.idempotency_key LIKE $1",
            KEY_PREFIX + "%",
        )
        refusal_rows = await connection.fetch(
            "SELECT key, refusal_code FROM idempotency_keys"
            " WHERE key LIKE $1 AND refusal_code IS NOT NULL",
            KEY_PREFIX + "%",
        )
        sums = await connection.fetch(
            "SELECT asset_symbol, sum(balance) AS total FROM balances GROUP BY asset_symbol"
        )
        negative = await connection.fetch(
            "SELECT account_id, asset_symbol, balance FROM balances"
            " WHERE balance < 0 AND account_id NOT LIKE 'system:%'"
        )
        user_balances = await connection.fetch(
            "SELECT account_id, asset_symbol, balance FROM balances"
            " WHERE account_id = ANY($1::text[])",
            sorted(users),
        )
    finally:
        await connection.close()

    by_key: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_key[row["idempotency_key"]].append(row)
    entries: dict[str, list[Any]] = defaultdict(list)
    for row in entry_rows:
        entries[row["transaction_id"]].append(row)

    for key, operation in announced.items():
        found = by_key.get(key, [])
        transaction_id = operation.successes[0].body["transactionId"]  # type: ignore[index]
        if len(found) != 1:
            violations.add(LEDGER, f"in the ledger {len(found)} times: {operation.describe()}")
            continue
        row = found[0]
        note = None if operation.flow == "topup" else operation.free_text
        got = (row["id"], row["type"], row["user_id"], row["asset_symbol"], row["amount"])
        wanted = (transaction_id, operation.flow, operation.user_id, operation.asset)
        metadata = operation.free_text if operation.flow == "topup" else None
        stored_metadata = None if row["metadata"] is None else json.loads(row["metadata"])
        if got != (*wanted, operation.amount) or row["note"] != note or stored_metadata != metadata:
            violations.add(LEDGER, f"ledger row {dict(row)} differs: {operation.describe()}")
        source = SOURCE.get(operation.flow, operation.user_id)
        target = REVENUE if operation.flow == "spend" else operation.user_id
        pair = sorted(
            (e["direction"], e["account_id"], e["asset_symbol"], e["amount"])
            for e in entries.get(row["id"], [])
        )
        expected = [
            ("credit", target, operation.asset, operation.amount),
            ("debit", source, operation.asset, operation.amount),
        ]
        if pair != expected:
            violations.add(LEDGER, f"entries {pair} instead of {expected}: {operation.key}")

    for key in by_key:
        if key not in announced:
            where = sent[key].describe() if key in sent else "a key this run never sent"
            violations.add(LEDGER, f"applied, but no 2xx announced it: {key}: {where}")

    stored_refusals = {row["key"]: row["refusal_code"] for row in refusal_rows}
    for key, operation in refused.items():
        if stored_refusals.get(key) != "insufficient_funds":
            violations.add(
                REFUSALS,
                f"refused, but the refusal stored under its key is {stored_refusals.get(key)}: "
                f"{operation.describe()}",
            )
    for key in stored_refusals.keys() - refused.keys():
        where = sent[key].describe() if key in sent else "a key this run never sent"
        violations.add(REFUSALS, f"a refusal is stored, but no 422 announced it: {key}: {where}")

    for row in sums:
        if row["total"] != 0:
            violations.add(BALANCES, f"{row['asset_symbol']} sums to {row['total']}, not 0")
    for row in negative:
        violations.add(BALANCES, f"negative user balance: {dict(row)}")
    expected_balances: Counter[tuple[str, str]] = Counter()
    for operation in announced.values():
        expected_balances[(operation.user_id, operation.asset)] += (
            SIGN[operation.flow] * operation.amount
        )
    actual = {(r["account_id"], r["asset_symbol"]): r["balance"] for r in user_balances}
    for held in sorted(set(actual) | set(expected_balances)):
        if actual.get(held, 0) != expected_balances[held]:
            violations.add(
                BALANCES,
                f"{held}: balance {actual.get(held, 0)}, announced flows sum to "
                f"{expected_balances[held]}",
            )


def check_verify(cluster: Cluster, violations: Violations) -> None:
    code, output = run_wallet_command("verify", database_url=cluster.url)
    if code != 0:
        violations.add(VERIFY, f"`wallet verify` exited {code}:\n{output[-3000:]}")


def _flow_answers_within(recorder: Recorder, window: tuple[float, float]) -> list[Attempt]:
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
        answers = _flow_answers_within(recorder, fault.outage)
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
    unheard = [op for op in recorder.operations if _decided_unheard(op)]
    lines += [f"faults:   decided unheard: {op.describe()}" for op in unheard[:5]]
    for fault in faults:
        recovery = f"{fault.recovery_s:.2f} s" if fault.recovery_s is not None else "never"
        seen = ""
        if fault.outage is not None:
            answers = Counter(a.status for a in _flow_answers_within(recorder, fault.outage))
            seen = f" (answered meanwhile: {dict(answers)})"
        lines.append(
            f"faults:   at {fault.injected_at - CLOCK_ORIGIN:.1f} s {fault.name}: "
            f"{fault.in_flight} in flight, {fault.effect or 'done'}"
            f"{seen}; recovered in {recovery}"
        )
    return lines
