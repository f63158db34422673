"""Waiting for an event: the one polling loop of the tests, with a deadline and a failure naming what was awaited.

`eventually` polls a plain condition; `eventually_async` is its twin for async tests, where a sleep must not block
the event loop (and may poll a coroutine). Both return the condition's first true value. An exception of a type in
`ignoring` means "not yet" (a process still starting, a program restarting); any other ends the wait at once. On
timeout the AssertionError names what was awaited and the last value or exception seen, with `context()` if given.
"""

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, cast

T = TypeVar("T")

NoErrors: tuple[type[BaseException], ...] = ()


class Deadline:
    """One wait: remembers the last outcome, and says when to try again or fails once the time is up."""

    def __init__(self, what: str, timeout_s: float, interval_s: float, context: Callable[[], str] | None) -> None:
        self.what, self.timeout_s, self.interval_s, self.context = what, timeout_s, interval_s, context
        self.ends_at = time.monotonic() + timeout_s
        self.last: object = None

    def pause_s(self) -> float:
        """How long to sleep before the next try; raises AssertionError once the deadline has passed."""
        left_s = self.ends_at - time.monotonic()
        if left_s <= 0:
            message = f"{self.what}: not reached in {self.timeout_s:g} s (last: {self.last!r})"
            raise AssertionError(message + (f"\n{self.context()}" if self.context else ""))
        return min(self.interval_s, left_s)


def eventually(condition: Callable[[], T], what: str, timeout_s: float = 30, *, interval_s: float = 0.05,
               ignoring: tuple[type[BaseException], ...] = NoErrors, context: Callable[[], str] | None = None) -> T:
    """Calls `condition` until it gives something true, and returns that."""
    deadline = Deadline(what, timeout_s, interval_s, context)
    while True:
        try:
            value = condition()
        except ignoring as exc:
            deadline.last = exc
        else:
            if value:
                return value
            deadline.last = value
        time.sleep(deadline.pause_s())


async def eventually_async(condition: Callable[[], Awaitable[T] | T], what: str, timeout_s: float = 30, *,
                           interval_s: float = 0.05, ignoring: tuple[type[BaseException], ...] = NoErrors,
                           context: Callable[[], str] | None = None) -> T:
    """`eventually` in an async test: the condition may return an awaitable, and the loop runs between tries."""
    deadline = Deadline(what, timeout_s, interval_s, context)
    while True:
        try:
            outcome = condition()
            value = cast(T, await outcome if inspect.isawaitable(outcome) else outcome)
        except ignoring as exc:
            deadline.last = exc
        else:
            if value:
                return value
            deadline.last = value
        await asyncio.sleep(deadline.pause_s())
