"""A checkpoint's JSON (API-ledger.md, docs/LEDGER.md): written as the API shows it, read back
equal, and anything else refused with a message saying what is wrong."""

import json
from datetime import UTC, datetime

import pytest

from wallet.service.audit import (
    ChainHead,
    Checkpoint,
    InvalidCheckpoint,
    checkpoint_json,
    parse_checkpoint,
)

HEAD = "6be6d319c8e1e58c14d0252ce74e676b0cd91db6a231d37cc3468c18b44f80f7"
CHECKPOINT = Checkpoint(
    at=datetime(2026, 12, 2, 10, 20, 0, 5, tzinfo=UTC),
    chains=[
        ChainHead("550e8400-e29b-41d4-a716-446655440000", "GOLD_COINS", HEAD, 2),
        ChainHead("system:treasury", "GOLD_COINS", "0" * 63 + "1", 9_007_199_254_740_993),
        ChainHead("system:treasury", "GOLD_COINS", HEAD, 3, shard=5),
    ],
)
CHAIN = {"account": "system:revenue", "assetSymbol": "GOLD_COINS", "chainHash": HEAD, "entries": 1}


def test_a_checkpoint_is_written_as_the_api_shows_it() -> None:
    assert checkpoint_json(CHECKPOINT) == {
        "at": "2026-12-02T10:20:00.000005Z",
        "chains": [
            {
                "account": "550e8400-e29b-41d4-a716-446655440000",
                "assetSymbol": "GOLD_COINS",
                "shard": 0,
                "chainHash": HEAD,
                "entries": 2,
            },
            {
                "account": "system:treasury",
                "assetSymbol": "GOLD_COINS",
                "shard": 0,
                "chainHash": "0" * 63 + "1",
                "entries": 9_007_199_254_740_993,
            },
            {
                "account": "system:treasury",
                "assetSymbol": "GOLD_COINS",
                "shard": 5,
                "chainHash": HEAD,
                "entries": 3,
            },
        ],
    }


def test_a_written_checkpoint_reads_back_equal() -> None:
    assert parse_checkpoint(json.dumps(checkpoint_json(CHECKPOINT))) == CHECKPOINT
    assert parse_checkpoint(json.dumps(checkpoint_json(CHECKPOINT)).encode()) == CHECKPOINT


def test_a_chain_of_a_checkpoint_taken_before_shards_is_of_shard_0() -> None:
    document = {"at": "2026-12-02T10:20:00Z", "chains": [CHAIN]}

    assert parse_checkpoint(json.dumps(document)).chains == [
        ChainHead("system:revenue", "GOLD_COINS", HEAD, 1, shard=0)
    ]


def test_a_checkpoint_may_name_one_account_and_asset_once_per_shard() -> None:
    document = {"at": "2026-12-02T10:20:00Z", "chains": [CHAIN, {**CHAIN, "shard": 1}]}

    assert [c.shard for c in parse_checkpoint(json.dumps(document)).chains] == [0, 1]


def test_a_checkpoint_of_an_empty_ledger_has_no_chains() -> None:
    assert parse_checkpoint('{"at": "2026-12-02T10:20:00+01:00", "chains": []}') == Checkpoint(
        at=datetime(2026, 12, 2, 9, 20, tzinfo=UTC), chains=[]
    )


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        pytest.param("", "not JSON", id="empty"),
        pytest.param(b"\xff\xfe", "not JSON", id="not-utf8"),
        pytest.param("[]", "not a checkpoint", id="a-list"),
        pytest.param('{"at": "2026-12-02T10:20:00Z"}', "not a checkpoint", id="no-chains"),
        pytest.param('{"at": "yesterday", "chains": []}', '"at" is not an RFC 3339', id="bad-time"),
        pytest.param('{"at": 0, "chains": []}', '"at" is not an RFC 3339', id="time-number"),
        pytest.param('{"at": "2026-12-02T10:20:00", "chains": []}', "no time zone", id="no-zone"),
        pytest.param('{"at": "2026-12-02T10:20:00Z", "chains": {}}', "not a list", id="chains"),
        pytest.param([{**CHAIN, "extra": 1}], "chain 0 is not an object", id="extra-member"),
        pytest.param([{**CHAIN, "account": ""}], "chain 0: account", id="empty-account"),
        pytest.param([{**CHAIN, "chainHash": HEAD.upper()}], "64 lowercase hex", id="upper"),
        pytest.param([{**CHAIN, "chainHash": HEAD[:-1]}], "64 lowercase hex", id="short"),
        pytest.param([{**CHAIN, "entries": 0}], "whole number from 1", id="no-entries"),
        pytest.param([{**CHAIN, "entries": 1.5}], "whole number from 1", id="fraction"),
        pytest.param([{**CHAIN, "entries": True}], "whole number from 1", id="boolean"),
        pytest.param([{**CHAIN, "entries": "3"}], "whole number from 1", id="string"),
        pytest.param([{**CHAIN, "shard": -1}], "shard must be a whole number from 0", id="below-0"),
        pytest.param([{**CHAIN, "shard": 1.0}], "shard must be a whole number", id="shard-float"),
        pytest.param([{**CHAIN, "shard": "1"}], "shard must be a whole number", id="shard-string"),
        pytest.param([{**CHAIN, "shard": False}], "shard must be a whole number", id="shard-bool"),
        pytest.param([CHAIN, {**CHAIN, "entries": 2}], "names a chain twice", id="twice"),
        pytest.param(
            [CHAIN, {**CHAIN, "shard": 0, "entries": 2}], "names a chain twice", id="shard-0-twice"
        ),
    ],
)
def test_anything_but_a_checkpoint_is_refused_saying_why(
    text: str | bytes | list[object], reason: str
) -> None:
    if isinstance(text, list):
        text = json.dumps({"at": "2026-12-02T10:20:00Z", "chains": text})

    with pytest.raises(InvalidCheckpoint, match=reason):
        parse_checkpoint(text)
