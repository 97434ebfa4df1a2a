"""The raw ceiling: aiohttp POSTing campaignd-shaped messages to the sink, no database.

Run as its own process (on uvloop, like ``campaignd run``) so that it gets a core to itself
the way the daemon does, instead of sharing the benchmark driver's. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import orjson
import uvloop

from _payload import message
from _poster import Poster
from _schedstat import cpu_wait_seconds


async def blast(poster: Poster, count: int, concurrency: int, campaign_id: str) -> dict[str, float | int]:
    """POST ``count`` messages, ``concurrency`` at a time; closes the poster."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await poster.post(orjson.dumps(message(index, campaign_id)), f"{campaign_id}:{index + 1}")

    try:
        cpu_before, wait_before = process_cpu_self(), cpu_wait_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu, cpu_wait = process_cpu_self() - cpu_before, cpu_wait_seconds() - wait_before
    finally:
        await poster.close()
    return {
        "elapsed": elapsed,
        "ok": poster.ok,
        "errors": poster.errors,
        "cpu_seconds": cpu,
        "cpu_wait_seconds": cpu_wait,
    }


def process_cpu_self() -> float:
    times = os.times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--campaign-id", required=True)
    args = parser.parse_args()

    async def run() -> dict[str, float | int]:
        # The session belongs to the running loop: made inside it.
        return await blast(Poster(args.url, args.concurrency), args.count, args.concurrency, args.campaign_id)

    result = uvloop.run(run())
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
