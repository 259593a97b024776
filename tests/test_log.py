"""Other libraries' log records (botocore, asyncio, aiohttp: the stdlib `logging`) come out as spotd's own
events do: one JSON object per line, with the library's logger name, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

from spotd.common import log


@pytest.fixture(autouse=True)
def root_logger_restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)
    log.configure("info")  # structlog back to stderr
    root.handlers[:] = handlers


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_library_record_is_one_json_line_with_its_logger_name() -> None:
    out = io.StringIO()
    log.configure("info", stream=out)
    logging.getLogger("botocore.credentials").warning("Found credentials in %s", "environment variables")
    (line,) = lines(out)
    assert line["event"] == "Found credentials in environment variables"
    assert line["logger"] == "botocore.credentials"
    assert line["level"] == "warning"
    assert str(line["timestamp"]).endswith("Z")


def test_a_library_exception_is_in_the_same_line_and_secrets_are_redacted() -> None:
    out = io.StringIO()
    log.configure("info", stream=out)
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        logging.getLogger("aiohttp.client").exception("POST https://am:hunter2@alertmanager:9093/api/v2 failed")
    (line,) = lines(out)
    assert line["logger"] == "aiohttp.client" and line["level"] == "error"
    assert line["event"] == "POST https://***@alertmanager:9093/api/v2 failed"
    assert "ConnectionError: refused" in str(line["exception"])
    assert "hunter2" not in out.getvalue()


def test_library_debug_and_info_stay_quiet_and_a_second_configure_replaces_the_first() -> None:
    first, second = io.StringIO(), io.StringIO()
    log.configure("debug", stream=first)
    logging.getLogger("httpx").info("HTTP Request: GET https://10.0.0.1/api/v1/nodes")
    log.configure("info", stream=second)  # as simulate-reclaim does: a log file, then back
    logging.getLogger("asyncio").warning("Executing <Task> took 0.3 seconds")
    assert first.getvalue() == ""
    (line,) = lines(second)
    assert line["logger"] == "asyncio"


def test_asyncio_and_warnings_of_a_real_process_are_json_lines() -> None:
    """A real process: asyncio's own report of a task whose exception nobody read, and a library's
    DeprecationWarning, on stderr beside spotd's event."""
    code = """
import asyncio, gc, warnings
from spotd.common import log
log.configure("info")
log.get("spotd.test").info("started")

async def fails():
    raise RuntimeError("boom")

async def main():
    asyncio.get_running_loop().create_task(fails())
    await asyncio.sleep(0.05)

asyncio.run(main())
gc.collect()
warnings.warn("this call is deprecated", DeprecationWarning, stacklevel=1)
"""
    run = subprocess.run(
        [sys.executable, "-W", "always::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    records = [json.loads(line) for line in run.stderr.splitlines()]
    assert [r.get("logger") for r in records] == [None, "asyncio", "py.warnings"], run.stderr
    assert records[0]["event"] == "started"
    assert records[1]["level"] == "error" and "RuntimeError: boom" in str(records[1]["exception"])
    assert "this call is deprecated" in str(records[2]["event"])
