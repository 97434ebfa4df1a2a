"""Fallback zero-cost sink when nginx is not installed: one of several aiohttp processes
sharing a port (SO_REUSEPORT), each answering 200 {"id":"x"} without looking at the body."""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web

ANSWER = b'{"id":"x"}'


async def answer(request: web.Request) -> web.Response:
    # Drain the body so the connection can be reused, as nginx does.
    await request.read()
    return web.Response(body=ANSWER, content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
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
