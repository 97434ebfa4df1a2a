"""A local stand-in for the generic ``http`` provider, used by the tests, the demo and the benchmarks.

It speaks the same contract as the real provider API: ``POST`` a JSON body
``{"to", "message", "campaign_id", "recipient_id"}`` with an ``Idempotency-Key`` header, and get back
2xx ``{"id": ...}`` (sent), 429/503 (throttled), other 5xx/408 (transient), 401/403 (sender-level) or
another 4xx with ``{"error": {...}}`` (permanent). How it answers is driven by a mutable
:class:`Behaviour`; what it saw is recorded so that tests can check exactly-once delivery, rate limits
and headers.

Like a real idempotent API, a request whose key was already accepted is answered 200 with the id
given the first time and is not accepted again; such repeats are counted in
:meth:`FakeProvider.duplicate_keys`.

For chaos runs it can also misbehave the way real providers do: random latency, throttling
(429 with ``Retry-After``, 503) at random or only in periodic storms, answers stalled past any
sane client timeout, and addresses that always fail. It records each request's arrival time
and path (one path per sender lets one provider tell senders apart) and each status it
answered.

A request is accepted only at the very end of the handler, with no ``await`` between the
"already accepted?" check and the record, so concurrent requests with one key are accepted once. The
server runs with ``handler_cancellation=True``: when a client gives up (e.g. after its timeout) while
the handler is still sleeping, the handler is cancelled and the request is *not* accepted, which is
what a daemon that abandons a timed-out request must be able to assume about a well-behaved
provider. A request cancelled before acceptance is counted in :meth:`FakeProvider.cancelled_count`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "RECORDS_PATH",
    "Accepted",
    "Behaviour",
    "FakeProvider",
    "Rule",
    "behaviour_from_dict",
    "main",
    "max_in_window",
]

# GET this path for the records, when the provider runs in a process of its own.
RECORDS_PATH = "/_fake/records"

# Waiting the default 60 s for in-flight handlers would make a test that parks a request on a long
# ``delay_seconds`` hang at shutdown; nothing a fake provider is doing is worth waiting for.
_SHUTDOWN_TIMEOUT = 0.5
_THREAD_START_TIMEOUT = 10.0
_THREAD_STOP_TIMEOUT = 10.0
# Event-loop turns an accept under way needs to become a connection (see FakeProvider.stop).
_ACCEPT_DRAIN_TURNS = 5


@dataclass
class Rule:
    """How to answer requests for one address (exact match) or one address prefix."""

    status: int
    # A dict is sent as JSON, a str as text/html (to mimic proxies' error pages), None as an empty body.
    body: dict[str, Any] | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Applies only while the number of requests seen for the address (this one included) is <= times.
    times: int | None = None
    delay_seconds: float = 0.0


@dataclass
class Behaviour:
    latency_seconds: float = 0.0
    jitter_seconds: float = 0.0
    rules: dict[str, Rule] = field(default_factory=dict)
    # Checked after exact rules, in insertion order; the first matching prefix wins.
    fail_prefix_rules: dict[str, Rule] = field(default_factory=dict)
    transient_rate: float = 0.0
    throttle_rate: float = 0.0
    throttle_retry_after: str = "1"
    # When set, transient_rate and throttle_rate apply only during the first storm_seconds of
    # every storm_every_seconds (from the server's start). A provider that throttles a few
    # percent of requests all the time drives an AIMD client to its floor and keeps it there;
    # one that throttles in bursts lets it climb back between them, as real ones do.
    storm_every_seconds: float | None = None
    storm_seconds: float = 0.0
    # This fraction of requests is held timeout_seconds before being answered: set it past the
    # client's timeout, and the client gives up first (the request is then not accepted).
    timeout_rate: float = 0.0
    timeout_seconds: float = 30.0
    required_headers: dict[str, str] = field(default_factory=dict)
    all_status: int | None = None
    seed: int | None = None


def behaviour_from_dict(data: dict[str, Any]) -> Behaviour:
    """A Behaviour from JSON-like data (``--behaviour`` of ``python -m campaignd.fakeprovider``)."""
    fields = dict(data)
    for name in ("rules", "fail_prefix_rules"):
        if name in fields:
            fields[name] = {match: Rule(**rule) for match, rule in fields[name].items()}
    return Behaviour(**fields)


@dataclass(frozen=True, slots=True)
class Accepted:
    key: str
    address: str
    campaign_id: str
    recipient_id: int
    # When the accepting answer was decided (after any latency).
    at: float
    body: dict[str, Any]
    # When the request arrived: what a rate limit is about.
    arrived: float = 0.0
    path: str = ""
    message_id: str = ""


def max_in_window(times: Sequence[float], window_seconds: float = 1.0) -> int:
    """The largest number of ``times`` that fit in one half-open window ``[t, t + window_seconds)``.

    Half-open because a limit of N per second allows N at t=0 and N more at t=1.0: counting both ends
    would report 2N for a client that honours the limit exactly.
    """
    ordered = sorted(times)
    best = 0
    lo = 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window_seconds:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def _json_response(status: int, payload: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json_response(status, {"error": {"code": code, "message": message}}, headers)


def _rule_response(rule: Rule) -> web.Response:
    headers = dict(rule.headers) if rule.headers else None
    if isinstance(rule.body, dict):
        return _json_response(rule.status, rule.body, headers)
    if isinstance(rule.body, str):
        return web.Response(status=rule.status, text=rule.body, content_type="text/html", headers=headers)
    return web.Response(status=rule.status, headers=headers)


class ServedApp:
    """An aiohttp application listening on a socket of its own, so that it can stop accepting
    before it closes (see :meth:`stop`). Shared with the tests' fakes of the real APIs."""

    def __init__(self, runner: web.AppRunner, listening: socket.socket) -> None:
        self._runner = runner
        self._listening = listening

    @classmethod
    async def start(cls, app: web.Application, host: str, port: int) -> ServedApp:
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            listening = socket.socket(family, kind, proto)
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listening.bind(address)
            await web.SockSite(runner, listening).start()
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, listening)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._runner.addresses[0][:2]
        return str(host), int(port)

    async def stop(self) -> None:
        # Stop accepting before the server closes, and let the accepts already under way
        # finish: on Python 3.11 a connection accepted in the same loop turn as the close is
        # never wrapped (asyncio's Server._attach asserts it is open) and its socket leaks.
        # Once they have landed, aiohttp's shutdown closes them with the others.
        asyncio.get_running_loop().remove_reader(self._listening.fileno())
        for _ in range(_ACCEPT_DRAIN_TURNS):
            await asyncio.sleep(0)
        await self._runner.cleanup()


async def finish_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel and await what is still running on a server thread's loop before it closes (as
    asyncio.run does), so that nothing it holds is left to the garbage collector."""
    tasks = [task for task in asyncio.all_tasks(loop) if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class FakeProvider:
    """An aiohttp server answering ``POST`` on any path according to :attr:`behaviour`.

    Run it either in the caller's event loop (:meth:`start`/:meth:`stop`) or in a background thread
    with its own loop (:meth:`start_in_thread`/:meth:`stop_thread`). The record accessors are safe to
    call from any thread.
    """

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour: Behaviour = behaviour if behaviour is not None else Behaviour()
        self.url: str = ""
        self.last_headers: dict[str, str] = {}

        self._lock = threading.Lock()
        self._request_times: list[float] = []
        self._request_paths: list[str] = []
        self._answers: dict[int, int] = {}
        self._requests_by_address: dict[str, int] = {}
        self._accepted: dict[str, Accepted] = {}
        self._ids: dict[str, str] = {}
        self._duplicates: dict[str, int] = {}
        self._keys_by_address: dict[str, list[str]] = {}
        self._cancelled = 0
        # Never reset, so ids stay unique over the provider's life even across reset().
        self._next_id = 0

        self._rng = random.Random()
        self._rng_behaviour: Behaviour | None = None
        self._rng_seed: int | None = None
        self._started_at = time.monotonic()

        self._served: ServedApp | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle (caller's loop)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._served is not None:
            raise RuntimeError("FakeProvider is already started")
        app = web.Application()
        self._started_at = time.monotonic()
        app.router.add_get(RECORDS_PATH, self._records)
        app.router.add_post("/{tail:.*}", self._handle)
        served = await ServedApp.start(app, host, port)
        bound_host, bound_port = served.address
        shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown_host}:{bound_port}/send"
        self._served = served

    async def stop(self) -> None:
        served, self._served = self._served, None
        if served is not None:
            await served.stop()

    # ------------------------------------------------------------------ lifecycle (background thread)

    def start_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Serve from a new thread with its own event loop; returns once the server is listening."""
        if self._thread is not None or self._served is not None:
            raise RuntimeError("FakeProvider is already started")
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                with contextlib.suppress(Exception):
                    loop.run_until_complete(finish_tasks(loop))
                    loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="fake-provider", daemon=True)
        thread.start()
        if not ready.wait(_THREAD_START_TIMEOUT):
            raise RuntimeError("fake provider thread did not start listening in time")
        if failure:
            thread.join()
            raise failure[0]
        self._thread = thread
        self._thread_loop = loop

    def stop_thread(self) -> None:
        thread, loop = self._thread, self._thread_loop
        self._thread = self._thread_loop = None
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(_THREAD_STOP_TIMEOUT)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_THREAD_STOP_TIMEOUT)

    # ------------------------------------------------------------------ records

    def accepted(self) -> list[Accepted]:
        with self._lock:
            return list(self._accepted.values())

    def accepted_count(self) -> int:
        with self._lock:
            return len(self._accepted)

    def request_count(self) -> int:
        with self._lock:
            return len(self._request_times)

    def request_times(self, path: str | None = None) -> list[float]:
        """Arrival times (``time.monotonic()``) of every request, or of those to one path."""
        with self._lock:
            if path is None:
                return list(self._request_times)
            return [t for t, p in zip(self._request_times, self._request_paths, strict=True) if p == path]

    def answers(self) -> dict[int, int]:
        """How many requests were answered with each status (cancelled ones are not answered)."""
        with self._lock:
            return dict(self._answers)

    def duplicate_keys(self) -> dict[str, int]:
        with self._lock:
            return dict(self._duplicates)

    def addresses_delivered_under_several_keys(self) -> dict[str, list[str]]:
        with self._lock:
            return {a: list(keys) for a, keys in self._keys_by_address.items() if len(keys) > 1}

    def requests_by_address(self, address: str) -> int:
        with self._lock:
            return self._requests_by_address.get(address, 0)

    def cancelled_count(self) -> int:
        """Requests whose handler was cancelled (client gone) before an answer was decided."""
        with self._lock:
            return self._cancelled

    def max_requests_in_window(self, window_seconds: float = 1.0) -> int:
        return max_in_window(self.request_times(), window_seconds)

    def reset(self) -> None:
        """Forget every record; the behaviour is kept, and its random sequence restarts from its seed."""
        with self._lock:
            self._request_times.clear()
            self._request_paths.clear()
            self._answers.clear()
            self._requests_by_address.clear()
            self._accepted.clear()
            self._ids.clear()
            self._duplicates.clear()
            self._keys_by_address.clear()
            self._cancelled = 0
            self._rng_behaviour = None
            self.last_headers = {}

    def _record_request_time(self, at: float) -> None:
        """Tests use this to check windowing without having to time real requests."""
        with self._lock:
            self._request_times.append(at)
            self._request_paths.append("")

    # ------------------------------------------------------------------ handler

    def _random_draws(self, b: Behaviour) -> tuple[float, float, float, float]:
        # Re-seed when the behaviour is swapped or its seed edited, so each phase is reproducible.
        # All draws happen on arrival, before any await, so the sequence follows arrival order rather
        # than whichever sleeping handler happens to wake first.
        if self._rng_behaviour is not b or self._rng_seed != b.seed:
            self._rng = random.Random(b.seed)
            self._rng_behaviour = b
            self._rng_seed = b.seed
        r = self._rng.random
        return r(), r(), r(), r()

    def _in_storm(self, b: Behaviour, now: float) -> bool:
        if b.storm_every_seconds is None:
            return True
        return (now - self._started_at) % b.storm_every_seconds < b.storm_seconds

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            with self._lock:
                self._cancelled += 1
            raise

    async def _records(self, _request: web.Request) -> web.Response:
        """What this provider saw, for a test or benchmark running it in another process."""
        with self._lock:
            payload = {
                "request_times": list(self._request_times),
                "request_paths": list(self._request_paths),
                "accepted": [
                    {
                        "key": a.key,
                        "address": a.address,
                        "campaign_id": a.campaign_id,
                        "recipient_id": a.recipient_id,
                        "at": a.at,
                        "arrived": a.arrived,
                        "path": a.path,
                        "message_id": a.message_id,
                    }
                    for a in self._accepted.values()
                ],
                "duplicates": dict(self._duplicates),
                # JSON object keys are strings.
                "answers": {str(status): n for status, n in self._answers.items()},
                "cancelled": self._cancelled,
            }
        return _json_response(200, payload)

    async def _handle(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        with self._lock:
            self._answers[response.status] = self._answers.get(response.status, 0) + 1
        return response

    async def _answer(self, request: web.Request) -> web.Response:
        b = self.behaviour
        arrived = time.monotonic()
        with self._lock:
            # Arrival is recorded before anything that could fail or be cancelled: a rate limit
            # counts every request that reached the provider, whatever it was answered.
            self._request_times.append(arrived)
            self._request_paths.append(request.path)
            jitter_draw, transient_draw, throttle_draw, timeout_draw = self._random_draws(b)
        in_storm = self._in_storm(b, arrived)
        headers = dict(request.headers)
        self.last_headers = headers

        raw = await request.read()
        payload: Any
        try:
            payload = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            payload = None
        body: dict[str, Any] = payload if isinstance(payload, dict) else {}
        to = body.get("to")
        address: str | None = to if isinstance(to, str) else None
        seen = 0
        if address is not None:
            with self._lock:
                seen = self._requests_by_address.get(address, 0) + 1
                self._requests_by_address[address] = seen

        delay = b.latency_seconds + jitter_draw * b.jitter_seconds
        if timeout_draw < b.timeout_rate:
            delay += b.timeout_seconds
        if delay > 0:
            await self._sleep(delay)

        if b.all_status is not None:
            return _error(b.all_status, "forced", "forced status")

        for name, value in b.required_headers.items():
            if request.headers.get(name) != value:
                return _error(401, "unauthorized", f"missing or wrong {name} header")

        key = request.headers.get("Idempotency-Key")
        if address is None or not key:
            return _error(
                400, "bad_request", "expected a JSON object with a string 'to' and an Idempotency-Key header"
            )

        with self._lock:
            first_id = self._ids.get(key)
            if first_id is not None:
                self._duplicates[key] = self._duplicates.get(key, 0) + 1
        if first_id is not None:
            return _json_response(200, {"id": first_id})

        rule = b.rules.get(address)
        if rule is None:
            for prefix, candidate in b.fail_prefix_rules.items():
                if address.startswith(prefix):
                    rule = candidate
                    break
        if rule is not None and (rule.times is None or seen <= rule.times):
            if rule.delay_seconds > 0:
                await self._sleep(rule.delay_seconds)
            return _rule_response(rule)

        if in_storm and transient_draw < b.transient_rate:
            return _error(503, "unavailable", "random transient failure")
        if in_storm and throttle_draw < b.throttle_rate:
            return _error(429, "rate_limited", "random throttling", {"Retry-After": b.throttle_retry_after})

        # Lenient on the other fields, as the contract only makes 'to' and the key mandatory here;
        # the daemon's own tests check what it sends through `body`.
        campaign_id = body.get("campaign_id")
        recipient_id = body.get("recipient_id")
        with self._lock:
            # No await since the duplicate check above, so no other request with this key can have
            # been accepted in between: check-and-record is atomic within the event loop.
            self._next_id += 1
            new_id = f"fake-{self._next_id}"
            self._ids[key] = new_id
            self._accepted[key] = Accepted(
                key=key,
                address=address,
                campaign_id=campaign_id if isinstance(campaign_id, str) else "",
                recipient_id=(
                    recipient_id
                    if isinstance(recipient_id, int) and not isinstance(recipient_id, bool)
                    else -1
                ),
                at=time.monotonic(),
                body=body,
                arrived=arrived,
                path=request.path,
                message_id=new_id,
            )
            self._keys_by_address.setdefault(address, []).append(key)
        return _json_response(200, {"id": new_id})


# The provider keeps a record of every request for the whole run (~10 objects each). A full
# garbage collection walks all of them: ~90 ms at 100,000 records on a 2-core VM, during which
# no arrival is stamped, and the requests that arrived meanwhile are stamped in one clump,
# as if the daemon had sent them above its rate. Freezing what survived each second's
# collection keeps every collection down to the last second's objects.
RECORDS_FREEZE_SECONDS = 1.0


def _freeze_records() -> None:
    gc.collect()
    gc.freeze()


def main(argv: list[str] | None = None) -> None:
    """``python -m campaignd.fakeprovider``: serve until killed; prints the URL once listening.

    A process of its own keeps the provider's arrival times free of the jitter of whatever
    else runs in the caller's process (rate measurements), and serves docker-compose.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m campaignd.fakeprovider")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--jitter", type=float, default=0.0, help="+ uniform random seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--behaviour",
        type=orjson.loads,
        default=None,
        help="JSON of Behaviour fields (rules as {match: Rule fields}); the flags above override it",
    )
    args = parser.parse_args(argv)
    behaviour = behaviour_from_dict(args.behaviour or {})
    if args.latency:
        behaviour.latency_seconds = args.latency
    if args.jitter:
        behaviour.jitter_seconds = args.jitter
    if args.seed is not None:
        behaviour.seed = args.seed

    async def serve() -> None:
        provider = FakeProvider(behaviour)
        await provider.start(args.host, args.port)
        print(provider.url, flush=True)
        while True:
            await asyncio.sleep(RECORDS_FREEZE_SECONDS)
            _freeze_records()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
