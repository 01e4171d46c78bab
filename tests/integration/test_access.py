"""API keys in the service layer: a key is found through a short cache, and requests that find
its entry expired share one look-up."""

import asyncio

import pytest

from wallet.domain.access import Scope
from wallet.domain.errors import Unauthenticated
from wallet.service.access import Access
from wallet.store import queries
from wallet.store.database import Database


async def test_concurrent_requests_share_one_look_up_of_a_key(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    access = Access(database, default_reads_per_second=0, default_writes_per_second=0)
    key, secret = await access.create_key(label="x", scopes=frozenset({Scope.ADMIN}))
    look_ups = 0
    find = queries.find_api_key

    async def counted(*args: object, **kwargs: object) -> object:
        nonlocal look_ups
        look_ups += 1
        return await find(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(queries, "find_api_key", counted)
    found = await asyncio.gather(*(access.authenticate(secret) for _ in range(50)))

    assert look_ups == 1
    assert {k.id for k in found} == {key.id}
    with pytest.raises(Unauthenticated):
        await access.authenticate("wk_" + "B" * 43)
    assert look_ups == 2
