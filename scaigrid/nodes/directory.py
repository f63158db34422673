"""A directory an http process keeps of gRPC peers it calls (ScaiInfer nodes, grpc replicas holding hybrid links).

It is reread every `refresh_s` while the catalogue routes to any of its entries (a catalogue that routes to none
costs no call at all), so requests never wait for a lookup. It holds one gRPC channel per peer address, opened on
first use; a channel to an address no entry uses any more is closed once the streams still on it end, so a peer
that moves leaves no connection behind and new calls go to its new address.
"""

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

from scaigrid.lifecycle import background

logger = logging.getLogger(__name__)

# A peer that restarts is reachable again within seconds, not after gRPC's default backoff of up to two minutes.
CHANNEL_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.max_reconnect_backoff_ms", 5000))


class ChannelDirectory:
    """Subclasses read their entries in `refresh` and then call `keep_channels` with the addresses in use."""

    def __init__(self, what: str, refresh_s: float, retire_grace_s: float,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self._what = what  # "node", "link": for log lines and task names
        self._credentials = credentials  # TLS for every channel; None: plaintext
        self._refresh_s = refresh_s
        self._retire_grace_s = retire_grace_s  # how long streams on a channel being closed may go on
        self._channels: dict[str, Any] = {}  # address -> grpc.aio.Channel
        self._retiring: dict[Any, asyncio.Task[None]] = {}
        self._tracked: frozenset[str] = frozenset()
        self._wanted = asyncio.Event()  # set while some entry is tracked
        self._refresh_now = asyncio.Event()
        self._failing = False

    async def refresh(self) -> None:
        raise NotImplementedError

    def track(self, keys: frozenset[str]) -> None:
        """The entries the catalogue routes to now (called on every catalogue load)."""
        newly = keys - self._tracked
        self._tracked = keys
        if keys:
            self._wanted.set()
        else:
            self._wanted.clear()
        if newly:
            self._refresh_now.set()  # an entry the catalogue just started routing to is read at once

    def channel(self, address: str) -> Any:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = (
                grpc.aio.insecure_channel(address, CHANNEL_OPTIONS) if self._credentials is None
                else grpc.aio.secure_channel(address, self._credentials, CHANNEL_OPTIONS))
        return channel

    def keep_channels(self, addresses: Iterable[str]) -> None:
        """Closes, without cutting the streams still running on them, the channels to any other address."""
        kept = set(addresses)
        for address in [address for address in self._channels if address not in kept]:
            channel = self._channels.pop(address)
            task = asyncio.create_task(channel.close(grace=self._retire_grace_s), name=f"{self._what}-channel-retire")
            self._retiring[channel] = task
            task.add_done_callback(functools.partial(self._retired, channel))

    def _retired(self, channel: Any, _: "asyncio.Task[None]") -> None:
        self._retiring.pop(channel, None)

    async def _follow(self) -> None:
        while True:
            await self._wanted.wait()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation that arrives as the event
            # is set, and this loop would then outlive its process's stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._refresh_s):
                    await self._refresh_now.wait()
            self._refresh_now.clear()
            try:
                await self.refresh()
            except Exception as exc:
                # Logged once per outage; the last view stays, and ages on until its entries count as gone.
                if not self._failing:
                    logger.warning("%s directory refresh failed (%s); retrying every %g s", self._what,
                                   type(exc).__name__, self._refresh_s,
                                   extra={"event": f"{self._what}_directory_failed"})
                self._failing = True
            else:
                self._failing = False

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Reads the tracked entries before serving (so the first requests find them), then follows."""
        if self._tracked:
            with contextlib.suppress(Exception):  # the source is not ready yet: _follow keeps trying and says so
                await self.refresh()
                self._refresh_now.clear()
        try:
            async with background(self._follow(), f"{self._what}-directory"):
                yield
        finally:
            # The process is leaving (its requests are drained): every channel closes now, retiring ones too.
            channels = [*self._channels.values(), *self._retiring]
            self._channels.clear()
            await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)
            await asyncio.gather(*self._retiring.values(), return_exceptions=True)
