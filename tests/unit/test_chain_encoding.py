"""The chain's encoding as the code writes it (by hand, for speed) is the definition
docs/LEDGER.md gives: json.dumps of the record, keys sorted, no white space, non-ASCII kept, for
any entry of either kind and any transaction, with and without the optional fields, split any
way into paid and free credits."""

import json
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from wallet.domain.ledger import (
    CHAIN_VERSION,
    AccountId,
    Direction,
    Entry,
    Flow,
    Kind,
    Transaction,
    TransactionId,
    UserId,
    link_content,
)

# Any text the service stores: every code point but the surrogates, which no request can carry.
texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
optional_texts = st.none() | texts
moments = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=9)), timezone(-timedelta(hours=5))]),
)
amounts = st.integers(1, 10**15)
# An amount and its paid part: any split, all paid and all free included.
amounts_and_paid = amounts.flatmap(
    lambda amount: st.tuples(st.just(amount), st.integers(0, amount))
)
balances = st.integers(-(2**63), 2**63 - 1)


def definition(previous: str, entry: Entry, transaction: Transaction) -> bytes:
    """docs/LEDGER.md's definition, as it reads there."""

    def moment(value: datetime) -> str:
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    record = {
        "v": CHAIN_VERSION,
        "previous": previous,
        "entry": {
            "id": entry.id,
            "account": entry.account_id,
            "assetSymbol": entry.asset_symbol,
            "direction": entry.direction.value,
            "kind": entry.kind.value,
            "amount": entry.amount,
            "balanceAfter": entry.balance_after,
            "paidAfter": entry.paid_after,
            "createdAt": moment(entry.created_at),
        },
        "transaction": {
            "id": transaction.id,
            "type": transaction.flow.value,
            "userId": transaction.user_id,
            "toUserId": transaction.to_user_id,
            "assetSymbol": transaction.asset_symbol,
            "amount": transaction.amount,
            "paidAmount": transaction.paid_amount,
            "freeAmount": transaction.free_amount,
            "holdId": transaction.hold_id,
            "refundOf": transaction.refund_of,
            "idempotencyKey": transaction.idempotency_key,
            "note": transaction.note,
            "metadata": None if transaction.metadata is None else dict(transaction.metadata),
            "createdBy": transaction.created_by,
            "createdAt": moment(transaction.created_at),
        },
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@settings(max_examples=300, deadline=None)
@given(
    previous=texts,
    ids=st.tuples(texts, texts, texts, texts),
    users=st.tuples(texts, optional_texts),
    asset=texts,
    flow=st.sampled_from(Flow),
    direction=st.sampled_from(Direction),
    kind=st.sampled_from(Kind),
    amount_and_paid=amounts_and_paid,
    balance_after=balances,
    paid_after=balances,
    references=st.tuples(optional_texts, optional_texts, optional_texts),
    note=optional_texts,
    metadata=st.none() | st.dictionaries(texts, texts, max_size=4),
    created_at=moments,
    entry_created_at=st.none() | moments,
)
def test_the_written_encoding_is_the_documented_one(
    previous: str,
    ids: tuple[str, str, str, str],
    users: tuple[str, str | None],
    asset: str,
    flow: Flow,
    direction: Direction,
    kind: Kind,
    amount_and_paid: tuple[int, int],
    balance_after: int,
    paid_after: int,
    references: tuple[str | None, str | None, str | None],
    note: str | None,
    metadata: dict[str, str] | None,
    created_at: datetime,
    entry_created_at: datetime | None,
) -> None:
    entry_id, transaction_id, account, key = ids
    user, to_user = users
    hold_id, refund_of, created_by = references
    amount, paid_amount = amount_and_paid
    transaction = Transaction(
        id=TransactionId(transaction_id),
        flow=flow,
        user_id=UserId(user),
        asset_symbol=asset,
        amount=amount,
        balance_after=0,
        idempotency_key=key,
        note=note,
        metadata=metadata,
        created_at=created_at,
        paid_amount=paid_amount,
        created_by=created_by,
        to_user_id=None if to_user is None else UserId(to_user),
        hold_id=hold_id,
        refund_of=None if refund_of is None else TransactionId(refund_of),
    )
    entry = Entry(
        id=entry_id,
        transaction_id=transaction.id,
        account_id=AccountId(account),
        asset_symbol=asset,
        direction=direction,
        amount=amount,
        balance_after=balance_after,
        created_at=entry_created_at or created_at,
        kind=kind,
        paid_after=paid_after,
    )

    assert link_content(previous, entry, transaction) == definition(previous, entry, transaction)
