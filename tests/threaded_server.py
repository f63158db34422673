"""An aiohttp server in a thread of its own: the base of the stand-in servers the tests talk to over real HTTP."""

import asyncio
import ssl
import threading
from typing import Self

from aiohttp import web

from appliance import devstack


class ThreadedServer:
    """Serves `routes()` on a free port of 127.0.0.1 between start() and stop(), on its own event loop."""

    name = "threaded-server"
    ssl_context: ssl.SSLContext | None = None  # set before start() to serve HTTPS

    def __init__(self) -> None:
        self.port = devstack.free_ports(1)[0]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=self.name, daemon=True)
        self._runner: web.AppRunner | None = None

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def releasing(self) -> None:
        """Called first by stop(): lets go of requests held on purpose, so that the server can stop."""

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        self.releasing()
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_routes(self.routes())
        # handler_cancellation: a client that goes away cancels its handler, which may record it.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context).start()
