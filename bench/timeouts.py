"""What a request's timeout costs: aiohttp's per-request timer against campaignd's Deadlines.

    python bench/timeouts.py [--requests 30000] [--concurrency 64] [--rounds 8]

campaignd's transport keeps each request's timeout itself (one sweeper per sender, see
``campaignd.providers.transport.Deadlines``) instead of aiohttp's ``ClientTimeout(total=…)``,
which arms and cancels a loop timer and a timer context for every request. This measures the
difference where nothing else moves: the same client (``_poster.Poster``: one session, the
same body and headers, the answer read and parsed) against the nginx sink, in its own uvloop
process per measurement, the two ways taking turns in each round. Printed: CPU microseconds
per request of each way per round, and the paired differences.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import aiohttp
import uvloop

from _blast import blast
from _common import bench_workdir, zero_cost_sink
from _poster import TIMEOUT_SECONDS, Poster

WAYS = ("aiohttp", "deadlines")


class AiohttpTimeoutPoster(Poster):
    """The same client with aiohttp's own per-request timeout, as before campaignd's."""

    def __init__(self, url: str, concurrency: int) -> None:
        super().__init__(url, concurrency, session_timeout=aiohttp.ClientTimeout(total=TIMEOUT_SECONDS))

    async def post(self, body: bytes, idempotency_key: str) -> None:
        await self.exchange(body, idempotency_key)


async def measure(url: str, way: str, count: int, concurrency: int) -> dict[str, float]:
    poster = AiohttpTimeoutPoster(url, concurrency) if way == "aiohttp" else Poster(url, concurrency)
    result = await blast(poster, count, concurrency, "bench")
    return {"cpu_us": result["cpu_seconds"] / count * 1e6, "errors": result["errors"]}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=30_000, help="requests per measurement (30000)")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent requests (64)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds, each way once per round (8)")
    parser.add_argument("--child", nargs=2, metavar=("URL", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        url, way = args.child
        print(json.dumps(uvloop.run(measure(url, way, args.requests, args.concurrency))), flush=True)
        return 0

    results: dict[str, list[float]] = {way: [] for way in WAYS}
    with (
        bench_workdir("campaignd-timeouts-", keep=False) as workdir,
        zero_cost_sink(workdir / "sink") as sink,
    ):
        print(f"sink {sink.kind} at {sink.url}; {args.requests} requests, C={args.concurrency}")
        print(f"{'round':>5} {'aiohttp us/req':>15} {'deadlines us/req':>17} {'difference':>11}")
        for index in range(1, args.rounds + 1):
            for way in WAYS:
                command = [sys.executable, __file__, "--requests", str(args.requests)]
                command += ["--concurrency", str(args.concurrency), "--child", sink.url, way]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result = json.loads(output.strip().splitlines()[-1])
                if result["errors"]:
                    raise RuntimeError(f"{way}: {result['errors']} requests failed")
                results[way].append(result["cpu_us"])
            old, new = results["aiohttp"][-1], results["deadlines"][-1]
            print(f"{index:>5} {old:>15.1f} {new:>17.1f} {new - old:>+11.1f}", flush=True)
    differences = [new - old for old, new in zip(results["aiohttp"], results["deadlines"], strict=True)]
    print(
        f"median: aiohttp {statistics.median(results['aiohttp']):.1f} us/req,"
        f" deadlines {statistics.median(results['deadlines']):.1f} us/req,"
        f" paired difference {statistics.median(differences):+.1f} us"
        f" ({sum(d < 0 for d in differences)} of {len(differences)} rounds lower)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
