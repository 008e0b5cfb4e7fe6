"""The life of an integration's connection: read client messages until the client or the session ends."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable


async def receive_until_over(receive_loop: Callable[[], Awaitable[None]], over: asyncio.Event,
                             log: logging.Logger, name: str) -> BaseException | None:
    """Run ``receive_loop`` until it returns (the client left) or ``over`` is set (the session ended).

    Both are cancelled on the way out. Returns the receive loop's unexpected exception, if any (logged
    here), so that the caller can report an internal error before shutting the session down.
    """
    receiver = asyncio.create_task(receive_loop())
    waiter = asyncio.create_task(over.wait())
    try:
        await asyncio.wait({receiver, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (receiver, waiter):
            task.cancel()
        await asyncio.gather(receiver, waiter, return_exceptions=True)
    if receiver.done() and not receiver.cancelled() and receiver.exception() is not None:
        log.error("%s receive loop failed: %r", name, receiver.exception())
        return receiver.exception()
    return None
