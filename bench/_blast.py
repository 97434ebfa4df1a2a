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

import aiohttp
import orjson
import uvloop

from _payload import address, rendered_message


async def blast(url: str, count: int, concurrency: int, campaign_id: str) -> dict[str, float | int]:
    # The same client setup as campaignd's http provider: one session, one pool sized to the
    # concurrency, a total timeout, the same headers.
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=10.0),
    )
    next_index = 0
    ok = 0
    errors = 0

    async def worker() -> None:
        nonlocal next_index, ok, errors
        while next_index < count:
            index = next_index
            next_index += 1
            body = orjson.dumps(
                {
                    "to": address(index),
                    "message": rendered_message(index),
                    "campaign_id": campaign_id,
                    "recipient_id": index + 1,
                }
            )
            headers = {"Content-Type": "application/json", "Idempotency-Key": f"{campaign_id}:{index + 1}"}
            try:
                async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                    answer = await response.content.read(64 * 1024)
                    # campaignd parses every answer for the provider's message id; so do we.
                    if response.status == 200 and orjson.loads(answer).get("id"):
                        ok += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

    try:
        cpu_before = process_cpu_self()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = process_cpu_self() - cpu_before
    finally:
        await session.close()
    return {"elapsed": elapsed, "ok": ok, "errors": errors, "cpu_seconds": cpu}


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
    result = uvloop.run(blast(args.url, args.count, args.concurrency, args.campaign_id))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
