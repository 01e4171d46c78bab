"""docs/LEDGER.md's worked examples of the hash chain are what the code computes: each example's
JSON is exactly `link_content` of the entry and transaction it describes, its printed digest is
`link`, and the auditor's shell command prints that digest; its example checkpoint is one
`wallet verify --checkpoint` reads, of that chain. The doc cannot drift from the code."""

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from wallet.domain.ledger import (
    GENESIS_LINK,
    AccountId,
    Direction,
    Entry,
    Flow,
    Kind,
    Transaction,
    TransactionId,
    UserId,
    link,
    link_content,
)
from wallet.service.audit import ChainHead, parse_checkpoint

LEDGER_DOC = Path(__file__).resolve().parents[2] / "docs" / "LEDGER.md"
EXAMPLE = re.compile(
    r"```sh\nprintf '%s' '(?P<content>[^'\n]+)' \| sha256sum\n```\n\n"
    r"```text\n(?P<digest>[0-9a-f]{64})  -\n```"
)
CHECKPOINT = re.compile(r"```json\n(?P<document>\{\"at\".*)\n```")
TIMESTAMP = "%Y-%m-%dT%H:%M:%S.%fZ"


def examples() -> list[tuple[str, str]]:
    found = [(m["content"], m["digest"]) for m in EXAMPLE.finditer(LEDGER_DOC.read_text("utf-8"))]
    assert len(found) == 2, "LEDGER.md has two worked examples, each a command and its output"
    return found


def moment(text: str) -> datetime:
    return datetime.strptime(text, TIMESTAMP).replace(tzinfo=UTC)


def described(record: dict[str, Any]) -> tuple[str, Entry, Transaction]:
    """The previous link, entry and transaction that an example's JSON describes."""
    entry, header = record["entry"], record["transaction"]
    transaction = Transaction(
        id=TransactionId(header["id"]),
        flow=Flow(header["type"]),
        user_id=UserId(header["userId"]),
        asset_symbol=header["assetSymbol"],
        amount=header["amount"],
        balance_after=0,  # not part of the link
        idempotency_key=header["idempotencyKey"],
        note=header["note"],
        metadata=header["metadata"],
        created_at=moment(header["createdAt"]),
        paid_amount=header["paidAmount"],  # freeAmount follows from it: the link checks both
        created_by=header["createdBy"],
        to_user_id=header["toUserId"],
        hold_id=header["holdId"],
        refund_of=header["refundOf"],
    )
    return (
        record["previous"],
        Entry(
            id=entry["id"],
            transaction_id=transaction.id,
            account_id=AccountId(entry["account"]),
            asset_symbol=entry["assetSymbol"],
            direction=Direction(entry["direction"]),
            amount=entry["amount"],
            balance_after=entry["balanceAfter"],
            created_at=moment(entry["createdAt"]),
            kind=Kind(entry["kind"]),
            paid_after=entry["paidAfter"],
        ),
        transaction,
    )


@pytest.mark.parametrize("index", [0, 1])
def test_each_worked_example_is_what_the_code_links(index: int) -> None:
    content, digest = examples()[index]
    previous, entry, transaction = described(json.loads(content))

    assert link_content(previous, entry, transaction) == content.encode("utf-8")
    assert link(previous, entry, transaction) == digest
    assert hashlib.sha256(content.encode("utf-8")).hexdigest() == digest


def test_the_worked_examples_form_a_chain_from_the_genesis_link() -> None:
    (first, first_digest), (second, _) = examples()

    assert json.loads(first)["previous"] == GENESIS_LINK
    assert json.loads(second)["previous"] == first_digest
    assert "\\u" not in second
    assert "É" in second


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum on this machine")
@pytest.mark.parametrize("index", [0, 1])
def test_the_auditors_shell_command_prints_the_documented_digest(index: int) -> None:
    content, digest = examples()[index]
    command = f"printf '%s' '{content}' | sha256sum"

    done = subprocess.run(
        ["sh", "-c", command],
        capture_output=True,
        check=True,
        env={"LC_ALL": "C.UTF-8", "PATH": "/usr/bin:/bin"},
    )

    assert done.stdout.decode() == f"{digest}  -\n"


def test_the_example_checkpoint_reads_and_names_the_examples_chain() -> None:
    (document,) = CHECKPOINT.findall(LEDGER_DOC.read_text("utf-8"))
    (first, _), (second, second_digest) = examples()
    account = json.loads(second)["entry"]["account"]

    assert parse_checkpoint(document).chains == [
        ChainHead(account, "GOLD_COINS", second_digest, 2)  # the second entry of that chain
    ]
    assert json.loads(first)["entry"]["account"] == account


def test_strings_are_written_as_the_doc_says() -> None:
    """Only `"`, `\\` and control characters are escaped (these with lowercase hex, or their
    short forms); `/` and every other character are themselves, non-ASCII as UTF-8."""
    content, _ = examples()[1]
    previous, entry, transaction = described(json.loads(content))
    note = 'say "hi"\\ / \x01\x1f\x7f\b\t\n\f\r é ☃ 𝄞 \u2028'
    written = link_content(previous, entry, replace(transaction, note=note))

    expected = '"note":"say \\"hi\\"\\\\ / \\u0001\\u001f\x7f\\b\\t\\n\\f\\r é ☃ 𝄞 \u2028"'
    assert expected.encode() in written
