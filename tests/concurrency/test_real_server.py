"""The real `wallet serve` with two worker processes, loaded over real HTTP on 127.0.0.1: the
workers contend on the same rows and keys through separate pools."""

import random
from pathlib import Path

import pytest
from concurrent_load import (
    GOLD,
    assert_ledger_verifies,
    check_load,
    create_key_with_cli,
    mixed_requests,
    network_client,
    new_users,
    running_server,
    send_all,
    wait_for_group_to_end,
)

pytestmark = [pytest.mark.postgres_only, pytest.mark.timeout(120)]


@pytest.mark.parametrize("batch_max_size", ["1", "128"], ids=["own-transactions", "group-commit"])
async def test_two_workers_under_concurrent_load_keep_every_invariant(
    postgres_database_url: str, tmp_path: Path, batch_max_size: str
) -> None:
    rng = random.Random(1125)
    assets = (GOLD, "DIAMONDS")
    key = await create_key_with_cli(postgres_database_url, label="concurrency-load")
    async with running_server(
        postgres_database_url,
        workers=2,
        log_path=tmp_path / "server.log",
        settings={"batch_max_size": batch_max_size},
    ) as server:
        async with network_client(server.base_url, key=key, connections=64) as client:
            users = await new_users(client, label="served", count=10)
            requests = mixed_requests(rng, users, count=250, duplicate_share=0.15, assets=assets)
            assert len(requests) >= 280
            replies = await send_all(client, requests, concurrency=64)
            report = await check_load(client, replies, users=users, assets=assets)
        assert report.applied > 100, report
        assert report.codes["insufficient_funds"] > 0, report
        assert report.statuses[200] > 0, report
        assert report.refusals_replayed > 0, report

    assert not server.was_killed, f"the server ignored SIGTERM:\n{server.log_tail()}"
    assert server.process.returncode == 0, server.log_tail()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    outliving = await wait_for_group_to_end(server.process.pid, timeout_s=5)
    assert not outliving, f"processes of the server outlived it: {outliving}"
    await assert_ledger_verifies(postgres_database_url)
