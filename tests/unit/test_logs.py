"""Logs are JSON lines on stdout when it is not a terminal, uvicorn's own lines included, and
carry the request id bound for the request."""

import json
import logging

import pytest
import structlog

from wallet.logs import configure_logging


@pytest.fixture(autouse=True)
def restore_structlog() -> object:
    yield
    structlog.reset_defaults()


def test_lines_are_json_with_level_time_and_the_bound_request_id(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info")
    structlog.contextvars.bind_contextvars(request_id="req-1")
    try:
        structlog.get_logger().info("request", status=201)
        structlog.get_logger().debug("below the level")
        logging.getLogger("uvicorn.error").info("Started server process")
    finally:
        structlog.contextvars.clear_contextvars()

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["event"] for line in lines] == ["request", "Started server process"]
    assert lines[0]["request_id"] == "req-1"
    assert lines[0]["status"] == 201
    assert {line["level"] for line in lines} == {"info"}
    assert all(line["timestamp"].endswith("Z") for line in lines)
