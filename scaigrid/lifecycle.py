"""Process lifecycle shared by the long-running modes: wait for SIGTERM/SIGINT, then leave cleanly."""

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Collection, Coroutine
from typing import Any

logger = logging.getLogger(__name__)


async def wait_for_stop_signal() -> str:
    """Returns the name of the first SIGTERM or SIGINT received; a second one is left to the default handler."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig.name)
        for other in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(other)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    name = await received
    logger.info("received %s, stopping", name, extra={"event": "stopping"})
    return name


@contextlib.asynccontextmanager
async def background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Runs `work` as a task while the block runs; cancels it, and waits for it to end, on the way out."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def finish_within(tasks: Collection["asyncio.Task[Any]"], grace_s: float) -> tuple[int, int]:
    """Gives the tasks grace_s to end, then cancels the rest; returns (finished, cut)."""
    if not tasks:
        return 0, 0
    done, pending = await asyncio.wait(tasks, timeout=grace_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    finished = sum(1 for task in done if not task.cancelled())
    return finished, len(tasks) - finished
