"""What every HTTP provider adapter shares: the connection pool, one exchange, and redaction.

An adapter builds its request and owns a pure classifier ``(status, body, headers) -> SendResult``;
:class:`HttpTransport` posts, reads a bounded body, turns timeouts and connection errors into
results, and removes secrets from every text that leaves it.

Each request's timeout is kept by :class:`Deadlines`, not by aiohttp: aiohttp arms and cancels
a loop timer and a timer context for every request, which measured 7-10 µs of CPU per request
of ~80 (``bench/timeouts.py``). Every request of one transport has the same timeout, so
deadlines fall due in the order requests start, and one sweeper task per transport, sleeping
until the oldest, keeps them all.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers.answers import MAX_ERROR_CODE, MAX_PROVIDER_TEXT, clip
from campaignd.redact import REDACTED, Redactor

# An error body worth reading is a few hundred bytes; a provider (or a proxy in front of it)
# answering megabytes must not cost memory per message.
MAX_BODY_READ = 64 * 1024

Classifier = Callable[[int, bytes, Mapping[str, str]], SendResult]

# How long an idle connection is kept for the next request. A server closes idle
# connections on its own clock (Node.js after 5 s, many load balancers after 60); a request
# written as its close arrives is cut off unanswered, in doubt, and a sender that cannot
# resend fails that recipient. Closing first (aiohttp keeps them 15 s) leaves that race
# to servers quicker than this, at the cost of a new connection after a quiet spell.
IDLE_CONNECTION_SECONDS = 4.0

# How far past a text's limit it is redacted before being cut to it: longer than any
# credential (Meta's tokens run to ~250 characters).
REDACTION_MARGIN = 1024
# Meta's tokens travel as ``access_token=`` parameters and start with "EAA"; a provider may
# quote a token that is not exactly the configured one (truncated, or an older one), which
# value-based redaction would miss.
_ACCESS_TOKEN_PARAMETER = re.compile(r"(?i)(access_token[\"']?\s*[=:]\s*[\"']?)[^\s&\"',;]+")
_META_TOKEN = re.compile(r"\bEAA[A-Za-z0-9]{20,}")


class Deadline:
    """One request's: when it falls due, the task running it, whether it has."""

    __slots__ = ("cancelling", "due", "expired", "task")

    def __init__(self, due: float, task: asyncio.Task[object]) -> None:
        self.due = due
        self.task = task
        # Cancellations the task carried in (one it chose to survive): not this deadline's.
        self.cancelling = task.cancelling()
        self.expired = False

    def timed_out(self) -> bool:
        """Whether the CancelledError being handled is this deadline's and nobody else's.

        Consumes the deadline's cancellation, as :func:`asyncio.timeout` does, and only once:
        a cancellation from elsewhere (a shutdown) that lands with it still counts and must
        propagate through every handler that asks again on its way out.
        """
        if not self.expired:
            return False
        self.expired = False
        return self.task.uncancel() <= self.cancelling


class Deadlines:
    """Cancels the requests of one transport that outlive ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        # Insertion order is start order is due order: the first entry is the next due.
        self._pending: dict[Deadline, None] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> Deadline:
        # Asked without a loop, current_task() looks the running loop up, which on Python 3.11
        # costs a getpid() system call per request; the loop of the last request is asked first.
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            assert task is not None, "a request runs in a task"
            if loop is not self._loop:
                # Requests left pending on another loop can no longer finish or be cancelled.
                self._loop, self._sweeper = loop, None
                self._pending.clear()
        assert loop is not None
        deadline = Deadline(loop.time() + self.seconds, task)
        self._pending[deadline] = None
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = loop.create_task(self._sweep(loop), name="deadlines")
        return deadline

    def finish(self, deadline: Deadline) -> None:
        self._pending.pop(deadline, None)

    def expire_due(self, now: float) -> float:
        """Cancel the requests due by ``now``; returns when the next one falls due."""
        pending = self._pending
        while pending:
            oldest = next(iter(pending))
            if oldest.due > now:
                return oldest.due
            del pending[oldest]
            oldest.expired = True
            oldest.task.cancel()
        # With nothing pending, a request starting from now on falls due no earlier than one
        # timeout from now.
        return now + self.seconds

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            now = loop.time()
            await asyncio.sleep(self.expire_due(now) - now)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None


class BoundedResolver(AbstractResolver):
    """aiohttp's resolver, given ``seconds`` to answer.

    aiohttp's connect timeouts do not cover the name lookup: a resolver that hangs ran into
    the request's own timeout, which calls the request in doubt, and a sender that cannot
    resend safely failed recipients nothing had been sent to. A lookup that takes too long
    is raised as a lookup failure, which aiohttp reports as a connection never made. Every
    request to one host waits on the same lookup, and its answer is cached, so this costs a
    timer per lookup, not per request.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            async with asyncio.timeout(self._seconds):
                return await self._resolver.resolve(host, port, family)
        except TimeoutError:
            # Not a TimeoutError: aiohttp passes those on as they are, as if the request
            # had timed out.
            raise socket.gaierror(
                socket.EAI_AGAIN, f"the host name was not resolved within {self._seconds:g} s"
            ) from None

    async def close(self) -> None:
        await self._resolver.close()


class HttpTransport:
    """One aiohttp session and connection pool per sender, reused for every message."""

    def __init__(
        self,
        *,
        timeout_seconds: float,
        connection_limit: int,
        secrets: Iterable[str],
        idle_connection_seconds: float = IDLE_CONNECTION_SECONDS,
    ) -> None:
        self._idle_connection_seconds = idle_connection_seconds
        self._redactor = Redactor(secrets)
        self._deadlines = Deadlines(timeout_seconds)
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None

    def redact(self, text: str) -> str:
        """``text`` fit to leave the transport: no credential, and storable (see storable)."""
        text = _ACCESS_TOKEN_PARAMETER.sub(rf"\1{REDACTED}", self._redactor(text))
        return storable(_META_TOKEN.sub(REDACTED, text))

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Sized to the process's concurrency, so sends never queue for a connection
            # behind the sender's own limiter; DNS cached, as every request goes to one host.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._connection_limit,
                    ttl_dns_cache=300,
                    keepalive_timeout=self._idle_connection_seconds,
                    # A quarter for the lookup and half for the connection (below) leave
                    # a request that needed both a quarter of its timeout.
                    resolver=BoundedResolver(self._deadlines.seconds / 4),
                ),
                # The request's timeout is the transport's own (see Deadlines). aiohttp keeps
                # only the connection's set-up (TCP and TLS), within half of it, so that a
                # handshake that never completes ends as what it is, a request that never
                # left, before the request's own timeout makes it one in doubt. It costs a
                # timer per new connection, not per request.
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=self._deadlines.seconds / 2, sock_read=None
                ),
            )
        return self._session

    async def post(
        self, url: str, *, data: bytes, headers: Mapping[str, str], classify: Classifier
    ) -> SendResult:
        """POST once and classify the answer; never raises for network or provider faults."""
        client = self._session or self._client()
        deadline = self._deadlines.start()
        response: aiohttp.ClientResponse | None = None
        body: bytes | None = None
        try:
            # Redirects are not followed: a provider URL that moved is a fault to report, not
            # a place to send credentials to.
            async with client.post(url, data=data, headers=headers, allow_redirects=False) as response:
                body = await _read_bounded(response, MAX_BODY_READ, deadline)
        except asyncio.CancelledError:
            if not deadline.timed_out():
                raise
        except aiohttp.ConnectionTimeoutError:
            # Raised only while connecting, before anything of the request was written.
            return SendResult(
                ResultKind.TRANSIENT,
                error_code="connect_timeout",
                error_message="the connection to the provider was not set up in time",
                maybe_delivered=False,
            )
        except TimeoutError:
            pass
        except aiohttp.InvalidURL as exc:
            # A URL aiohttp cannot use (a port out of range, say): nothing left, and no send
            # on this sender can succeed. Before ClientError, which InvalidURL also is.
            return _unbuildable(self.redact(f"{type(exc).__name__}: {exc}"))
        except aiohttp.ClientError as exc:
            return SendResult(
                ResultKind.TRANSIENT,
                error_code="connection_error",
                error_message=self.redact(f"{type(exc).__name__}: {exc}"),
                # A connection that was never made (refused, DNS) carried nothing; one that
                # dropped mid-request may have delivered it.
                maybe_delivered=not isinstance(exc, aiohttp.ClientConnectorError),
            )
        except ValueError as exc:
            # The request could not even be built (a host name the resolver refuses, a header
            # value aiohttp rejects): nothing left, and no send on this sender can succeed.
            return _unbuildable(self.redact(f"{type(exc).__name__}: {exc}"))
        finally:
            self._deadlines.finish(deadline)
        # The deadline may fall due while the connection is given back, after the answer was
        # read: the answer stands.
        if response is None or body is None:
            return _timed_out()
        # Outside the handlers above: a classifier that fails is a bug to report (the request
        # left, so its recipient is in doubt), not a request that could not be built.
        answer = classify(response.status, body, response.headers)
        # An answer without error texts (every accepted message) has nothing to redact.
        if answer.error_code is None and answer.error_message is None:
            message_id = answer.provider_message_id
            if message_id is not None and "\x00" in message_id:
                return replace(answer, provider_message_id=storable(message_id))
            return answer
        return self._redacted(answer)

    def _redacted(self, result: SendResult) -> SendResult:
        """The provider's own words may echo a credential back; they reach the database.

        Redacted, then shortened: shortened first, a credential cut at the limit would no
        longer match, and its head would be stored.
        """
        code, message, message_id = result.error_code, result.error_message, result.provider_message_id
        return replace(
            result,
            error_code=None if code is None else self._redacted_text(code, MAX_ERROR_CODE),
            error_message=None if message is None else self._redacted_text(message, MAX_PROVIDER_TEXT),
            provider_message_id=None if message_id is None else storable(message_id),
        )

    def _redacted_text(self, text: str, limit: int) -> str:
        # Not the whole text either: some patterns take quadratic time on a long run without
        # blanks ('http://a' x 8,000 took 2.7 s), and a provider's answer may be 64 KiB of it.
        # The margin keeps a credential that straddles the limit whole for redaction.
        return clip(self.redact(text[: limit + REDACTION_MARGIN]), limit)

    async def close(self) -> None:
        self._deadlines.close()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            # Give the connector's transports a turn to close cleanly.
            await asyncio.sleep(0)


def storable(text: str) -> str:
    """``text`` with its NUL characters replaced: PostgreSQL's text refuses them, and one in a
    provider's answer failed the whole batch of outcomes it was written with."""
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _unbuildable(reason: str) -> SendResult:
    return SendResult(
        ResultKind.SENDER_FATAL,
        error_code="invalid_request",
        error_message=f"the request cannot be built: {reason}",
    )


def _timed_out() -> SendResult:
    # The request may have reached the provider: in doubt, like any request cut off midway.
    return SendResult(
        ResultKind.TRANSIENT,
        error_code="timeout",
        error_message="provider did not answer in time",
        maybe_delivered=True,
    )


async def _read_bounded(response: aiohttp.ClientResponse, limit: int, deadline: Deadline) -> bytes:
    """The body up to ``limit`` bytes, however many chunks it arrives in.

    Once the status line has arrived, a body cut short (the connection dropped, the timeout
    ran out) still yields what was read: the status alone may already tell that the provider
    accepted the message, and for providers without an idempotency key that must never turn
    into a resend.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        first = await response.content.read(limit)
        if response.content.at_eof() or not first:
            # The whole body in one read: a provider's answer almost always is.
            return first
        chunks.append(first)
        size = len(first)
        while size < limit:
            chunk = await response.content.read(limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except asyncio.CancelledError:
        if not deadline.timed_out():
            raise
    except (TimeoutError, aiohttp.ClientError):
        pass
    return b"".join(chunks)
