"""Waiting for an asyncio.Event with a time limit, without losing a cancellation."""

from __future__ import annotations

import asyncio


async def wait_set(event: asyncio.Event, timeout: float) -> bool:
    """Wait until `event` is set or `timeout` seconds have passed; True when it is set.

    Not asyncio.wait_for: on Python 3.11 it returns normally when the task is cancelled in the same turn as the
    event is set, so a shutdown or a lost lease went unnoticed and the loop went on. asyncio.timeout tells its
    own cancellation from the caller's. Always yields once, as wait_for did: a loop around an event left set
    must not starve every other task."""
    if event.is_set():
        await asyncio.sleep(0)
        return True
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()
