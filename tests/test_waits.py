"""spotd.common.waits.wait_set: an Event with a time limit that never loses a cancellation (issue 21)."""

from __future__ import annotations

import asyncio

from spotd.common.waits import wait_set


async def test_set_or_timed_out() -> None:
    event = asyncio.Event()
    assert await wait_set(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_set(event, 5) is True


async def test_a_cancellation_in_the_turn_the_event_is_set_is_not_lost() -> None:
    """asyncio.wait_for (Python 3.11) returned normally here: the loop around it went on for ever."""
    event = asyncio.Event()
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            event.clear()
            await wait_set(event, 10)
            turns += 1

    task = asyncio.get_running_loop().create_task(loop())
    await asyncio.sleep(0.01)  # parked in wait_set
    event.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled() and turns == 0


async def test_an_event_left_set_does_not_starve_the_other_tasks() -> None:
    """A loop that waits on an event nobody clears must still let the rest of the program run."""
    event = asyncio.Event()
    event.set()
    other_ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(other_ran.set)
    for _ in range(100):
        if other_ran.is_set():
            break
        assert await wait_set(event, 10)
    assert other_ran.is_set()
