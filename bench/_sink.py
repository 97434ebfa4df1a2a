"""Fallback zero-cost sink when nginx is not installed: one of several aiohttp processes
sharing a port (SO_REUSEPORT), each answering 200 {"id":"x"} without looking at the body,
after --latency seconds when given (a provider's round trip)."""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import web

ANSWER = b'{"id":"x"}'
LATENCY = web.AppKey("latency", float)


async def answer(request: web.Request) -> web.Response:
    # Drain the body so the connection can be reused, as nginx does.
    await request.read()
    latency: float = request.app[LATENCY]
    if latency > 0:
        await asyncio.sleep(latency)
    return web.Response(body=ANSWER, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    app = web.Application()
    app[LATENCY] = args.latency
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        reuse_port=True,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
