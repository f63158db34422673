"""The floor of this stack: the least an aiohttp proxy can do (one ClientSession, body forwarded, answer relayed)."""

import argparse
from collections.abc import AsyncIterator

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)
BACKLOG = 1024  # 500 streams connect at once; the default 128 would drop SYNs and add 1 s retries


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    # As many pooled keep-alive connections as there are clients, like a real gateway's dispatcher.
    async with ClientSession(connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None)) as session:
        app[SESSION] = session
        yield


async def forward(request: web.Request) -> web.StreamResponse:
    """Same path on the upstream; a streamed answer is relayed chunk by chunk, any other one whole."""
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with request.app[SESSION].post(request.app[UPSTREAM] + request.path, data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            return web.Response(body=await upstream.read(), status=upstream.status,
                                headers={"Content-Type": content_type})
        response = web.StreamResponse(status=upstream.status, headers={"Content-Type": content_type})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin of the mock, e.g. http://127.0.0.1:9000")
    args = parser.parse_args()
    # The gateway's http mode runs on uvloop: the floor must too, or the ratio would credit the loop to the gateway.
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, access_log=None, print=None,
                backlog=BACKLOG, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
