"""A watch that survives the API server: reconnects on any error and says when the caller must re-list.

lightkube's own retry covers only errors inside a stream: a failed reconnect raises out of the iterator,
and after 410 Expired it retries the expired resourceVersion forever. Here any error ends that watch; the
caller gets a RESYNC (changes may have been missed: list again), and a new watch starts from now. On a client
made with a watch timeout (spotd.kube.client.make_client), each watch asks the server to end it after that
long and a silent connection fails on the client's read timeout: a half-open watch is an error too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from lightkube import AsyncClient
from lightkube.types import OnErrorAction, OnErrorResult

from spotd.kube.client import watch_timeout_of

RESYNC = "RESYNC"


def _raise(exc: Exception, count: int) -> OnErrorResult:
    return OnErrorResult(OnErrorAction.RAISE)


async def resilient_watch(
    client: AsyncClient,
    resource: Any,
    *,
    log: Any,
    what: str,
    resource_version: str | None = None,
    max_backoff: float = 5.0,
    **selectors: Any,
) -> AsyncIterator[tuple[str, Any]]:
    """Yields (event type, object) for ever; (RESYNC, None) after an error, before watching again."""
    failures = 0
    version = resource_version
    while True:
        started = time.monotonic()
        try:
            watch = client.watch(
                resource,
                resource_version=version,  # type: ignore[arg-type]  # None: from now (lightkube's default)
                server_timeout=watch_timeout_of(client),  # type: ignore[arg-type]  # None: the server's default
                on_error=_raise,
                **selectors,
            )
            async for event, obj in watch:
                failures = 0
                yield event, obj
            # A stream that ends at once, again and again (a proxy, a server in trouble), must not turn
            # into a request loop: back off as after an error, without a re-list (the resume is lossless).
            if time.monotonic() - started < 1.0:
                failures += 1
                await asyncio.sleep(min(max_backoff, 0.1 * 2**failures))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # connection refused, reset, 410 Expired, a line that does not parse
            failures += 1
            log.warning("watch_failed", watch=what, error=repr(exc), failures=failures)
            yield RESYNC, None
            await asyncio.sleep(min(max_backoff, 0.1 * 2**failures))
        version = None  # from now: what happened meanwhile comes from the caller's re-list
