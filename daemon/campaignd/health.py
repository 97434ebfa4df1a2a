"""Liveness, readiness and metrics over HTTP (aiohttp): GET /healthz, /readyz, /metrics.

No endpoint changes state. Liveness says whether this process still works (its loops
tick); readiness whether it can do its job now (database reachable, schema current).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from campaignd.metrics import REGISTRY

log = structlog.get_logger("campaignd.health")

Readiness = Callable[[], Awaitable[str | None]]


class Heartbeats:
    """Loops beat on each turn; one silent longer than its allowance makes the process unhealthy."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._allowance: dict[str, float] = {}
        self._last: dict[str, float] = {}

    def register(self, name: str, allowance_seconds: float) -> None:
        self._allowance[name] = allowance_seconds
        self._last[name] = self._clock()

    def beat(self, name: str) -> None:
        self._last[name] = self._clock()

    def problems(self) -> list[str]:
        now = self._clock()
        return [
            f"{name} loop has not ticked for {now - self._last[name]:.0f}s (allowed {allowance:.0f}s)"
            for name, allowance in self._allowance.items()
            if now - self._last[name] > allowance
        ]


def _json(status: int, body: dict[str, object]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class HealthServer:
    def __init__(self, host: str, port: int, heartbeats: Heartbeats, readiness: Readiness) -> None:
        self._host = host
        self._port = port
        self._heartbeats = heartbeats
        self._readiness = readiness
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = self._runner.addresses
        self.port = int(sockets[0][1]) if sockets else self._port
        log.info("health_server_listening", host=self._host, port=self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _healthz(self, _request: web.Request) -> web.Response:
        problems = self._heartbeats.problems()
        if problems:
            return _json(503, {"status": "unhealthy", "problems": problems})
        return _json(200, {"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        reason = await self._readiness()
        if reason is not None:
            return _json(503, {"status": "not ready", "reason": reason})
        return _json(200, {"status": "ready"})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})
