"""What campaignd's http provider does per message, for the senders it is measured against
(the raw blast, the job queues): one shared session, its pool sized to the concurrency, the
same headers and body, the answer read and parsed for the provider's message id.

Each request's timeout is kept the way campaignd keeps it (its transport's Deadlines), not
with aiohttp's per-request timer, which costs 7-10 us more per request (bench/timeouts.py):
a cheaper timeout in campaignd alone would move the ceiling it is compared with, not
campaignd's distance to it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson

from campaignd.providers.transport import Deadlines

TIMEOUT_SECONDS = 10.0
NO_AIOHTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=None, sock_read=None)


class Poster:
    def __init__(
        self, url: str, concurrency: int, *, session_timeout: aiohttp.ClientTimeout = NO_AIOHTTP_TIMEOUT
    ) -> None:
        self.url = url
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=300),
            timeout=session_timeout,
        )
        self.deadlines = Deadlines(TIMEOUT_SECONDS)
        self.ok = 0
        self.errors = 0

    async def post(self, body: bytes, idempotency_key: str) -> None:
        deadline = self.deadlines.start()
        try:
            await self.exchange(body, idempotency_key)
        except asyncio.CancelledError:
            if not deadline.timed_out():
                raise
            self.errors += 1
        finally:
            self.deadlines.finish(deadline)

    async def exchange(self, body: bytes, idempotency_key: str) -> None:
        """One POST, its answer read and parsed, counted; no timeout of its own."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        try:
            async with self.session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                answer = await response.content.read(64 * 1024)
                if response.status == 200 and orjson.loads(answer).get("id"):
                    self.ok += 1
                else:
                    self.errors += 1
        except (aiohttp.ClientError, TimeoutError):
            self.errors += 1

    async def close(self) -> None:
        self.deadlines.close()
        await self.session.close()
