"""The demo stack's SMS provider: campaignd's own FakeProvider, listening on 0.0.0.0:8080.

It answers like a real provider would on a bad day, so that ``docker compose up`` shows every
outcome: 30-100 ms of latency, a few numbers that are not on the network (failed, 400), a few
that fail once and then succeed (retried), and occasional throttling (429 with Retry-After,
which makes the sender slow down). It also requires the Authorization header that campaignd
reads from ``env:DEMO_PROVIDER_AUTHORIZATION``, as a real provider requires its token.

docker-compose.yml runs it from the campaignd image (this file is mounted read-only):
``python /opt/campaignd-demo/fake_provider.py``. It logs what it accepted every few seconds
and stops at once on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from campaignd.fakeprovider import Behaviour, FakeProvider, Rule

# docker/seed.sql's campaign: addresses +1555<i, 7 digits> for i in 0..2999.
RECIPIENTS = 3000
# docker/campaignd.toml's sender url: http://fake-provider:8080/send
DEFAULT_PORT = 8080
REPORT_EVERY_SECONDS = 5.0


def address(index: int) -> str:
    return f"+1555{index:07d}"


def demo_behaviour(authorization: str | None) -> Behaviour:
    rules = {
        address(i): Rule(400, {"error": {"code": "unreachable", "message": "number not on network"}})
        for i in range(100, RECIPIENTS, 500)
    }
    for i in range(150, RECIPIENTS, 700):
        rules[address(i)] = Rule(500, {"error": {"code": "upstream_error"}}, times=1)
    return Behaviour(
        latency_seconds=0.03,
        jitter_seconds=0.07,
        rules=rules,
        throttle_rate=0.002,
        throttle_retry_after="1",
        required_headers={"Authorization": authorization} if authorization else {},
        seed=1,
    )


async def serve(host: str, port: int) -> None:
    provider = FakeProvider(demo_behaviour(os.environ.get("DEMO_PROVIDER_AUTHORIZATION")))
    await provider.start(host, port)
    print(f"fake provider listening on {provider.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # PID 1 in a container ignores SIGTERM unless it handles it: handle it, stop at once.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reported = -1
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_EVERY_SECONDS)
            requests = provider.request_count()
            if requests != reported:
                reported = requests
                print(
                    f"fake provider: {provider.accepted_count()} messages accepted, "
                    f"{requests} requests, {sum(provider.duplicate_keys().values())} duplicate keys",
                    flush=True,
                )
    finally:
        await provider.stop()


def main() -> None:
    # All interfaces: campaignd reaches it over the compose network as http://fake-provider:8080.
    host = os.environ.get("FAKE_PROVIDER_HOST", "0.0.0.0")
    port = int(os.environ.get("FAKE_PROVIDER_PORT", DEFAULT_PORT))
    asyncio.run(serve(host, port))


if __name__ == "__main__":
    main()
