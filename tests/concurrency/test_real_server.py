"""The real `wallet serve` with two worker processes, loaded over real HTTP on 127.0.0.1: the
workers contend on the same rows and keys through separate pools."""

import asyncio
import random
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from concurrent_load import (
    API,
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


async def test_an_idle_connection_stays_open_longer_than_a_client_keeps_it(
    postgres_database_url: str, tmp_path: Path
) -> None:
    """A client idle for 6 s (past httpx's 5 s keep-alive, the server's old default) sends its
    next request on the same connection and gets its answer: the server does not close first."""
    async with running_server(
        postgres_database_url, workers=1, log_path=tmp_path / "server.log"
    ) as server:
        address = urlsplit(server.base_url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        request = f"GET {API}/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        try:
            for pause_s in (0, 6):
                await asyncio.sleep(pause_s)
                writer.write(request)
                await writer.drain()
                status_line = await asyncio.wait_for(reader.readline(), 10)
                assert status_line.startswith(b"HTTP/1.1 200"), (pause_s, status_line)
                headers = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()
