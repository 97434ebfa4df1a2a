"""The transport's own timeouts (Deadlines): each request gets its full timeout, an answer
that arrived stands, and a cancellation from outside (a shutdown) is never taken for one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import pytest
from aiohttp import web
from aiohttp.abc import ResolveResult
from aiohttp.resolver import DefaultResolver

from campaignd.outcomes import ResultKind, SendResult
from campaignd.providers.answers import MAX_PROVIDER_TEXT
from campaignd.providers.meta import classify_meta
from campaignd.providers.transport import REDACTION_MARGIN, Classifier, Deadlines, HttpTransport
from campaignd.providers.twilio import classify_twilio
from tests.provider_fakes import serve_app

TIMEOUT = 0.4


def _answer_as_sent(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    """Echoes what was read: the status as the provider message id, the body as the message."""
    return SendResult(ResultKind.SENT, provider_message_id=str(status), error_message=body.decode())


@pytest.fixture
async def server() -> AsyncIterator[str]:
    """/fast answers at once; /hang never answers; /stall sends the status and half a body."""

    async def fast(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"id":"m1"}')

    async def hang(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(30)
        return web.Response(body=b"late")

    async def stall(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=202)
        response.content_length = 100
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            await response.write(b'{"id":')
            await asyncio.sleep(30)
        return response

    app = web.Application()
    app.router.add_post("/fast", fast)
    app.router.add_post("/hang", hang)
    app.router.add_post("/stall", stall)
    async with serve_app(app) as url:
        yield url


@pytest.fixture
async def transport() -> AsyncIterator[HttpTransport]:
    transport = HttpTransport(timeout_seconds=TIMEOUT, connection_limit=32, secrets=[])
    try:
        yield transport
    finally:
        await transport.close()


async def _post(transport: HttpTransport, url: str) -> tuple[SendResult, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await transport.post(url, data=b"{}", headers={}, classify=_answer_as_sent)
    return result, loop.time() - started


def _is_timeout(result: SendResult) -> bool:
    return (result.kind, result.error_code, result.maybe_delivered) == (ResultKind.TRANSIENT, "timeout", True)


async def _wait_under(deadlines: Deadlines, seconds: float) -> str:
    """A request that waits ``seconds`` for its answer, under one of ``deadlines``."""
    deadline = deadlines.start()
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if deadline.timed_out():
            return "timed out"
        raise
    finally:
        deadlines.finish(deadline)
    return "answered"


async def test_a_request_without_an_answer_times_out_after_its_timeout(
    server: str, transport: HttpTransport
) -> None:
    result, took = await _post(transport, f"{server}/hang")

    assert _is_timeout(result)
    assert TIMEOUT * 0.9 <= took < TIMEOUT + 2.0


async def test_the_status_and_half_a_body_are_an_answer_when_the_timeout_cuts_the_body(
    server: str, transport: HttpTransport
) -> None:
    # A provider that accepted the message must not be resent to because its body stalled.
    result, took = await _post(transport, f"{server}/stall")

    assert result == SendResult(ResultKind.SENT, provider_message_id="202", error_message='{"id":')
    assert took < TIMEOUT + 2.0


async def test_a_classifier_that_fails_raises_instead_of_blaming_the_request(
    server: str, transport: HttpTransport
) -> None:
    # The request left and was answered: a bug reading the answer must reach the lane as one
    # (its recipient is then in doubt), not pass for a request that could not be built, which
    # would pause the sender for every campaign.
    def broken(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
        raise ValueError("a bug in the classifier")

    with pytest.raises(ValueError, match="a bug in the classifier"):
        await transport.post(f"{server}/fast", data=b"{}", headers={}, classify=broken)


async def test_each_request_gets_its_whole_timeout_whenever_it_starts(
    server: str, transport: HttpTransport
) -> None:
    first = asyncio.create_task(_post(transport, f"{server}/hang"))
    await asyncio.sleep(TIMEOUT / 2)
    second = asyncio.create_task(_post(transport, f"{server}/hang"))
    fast, _ = await _post(transport, f"{server}/fast")

    (first_result, _), (second_result, second_took) = await asyncio.gather(first, second)

    assert fast.kind is ResultKind.SENT
    assert _is_timeout(first_result) and _is_timeout(second_result)
    assert second_took >= TIMEOUT * 0.9


async def test_a_request_after_an_idle_spell_still_times_out_on_time(
    server: str, transport: HttpTransport
) -> None:
    assert (await _post(transport, f"{server}/fast"))[0].kind is ResultKind.SENT
    # Long enough for the sweeper to have gone to sleep with nothing pending.
    await asyncio.sleep(TIMEOUT * 1.5)

    result, took = await _post(transport, f"{server}/hang")

    assert _is_timeout(result)
    assert TIMEOUT * 0.9 <= took < TIMEOUT * 2


async def test_a_cancellation_from_outside_is_not_taken_for_a_timeout(
    server: str, transport: HttpTransport
) -> None:
    send = asyncio.create_task(_post(transport, f"{server}/hang"))
    await asyncio.sleep(TIMEOUT / 4)

    send.cancel()

    with pytest.raises(asyncio.CancelledError):
        await send
    # The transport goes on working, with its timeouts.
    assert _is_timeout((await _post(transport, f"{server}/hang"))[0])


async def test_a_cancellation_from_outside_wins_over_a_timeout_falling_due_with_it() -> None:
    deadlines = Deadlines(TIMEOUT)
    handled: list[str] = []

    async def request() -> None:
        deadline = deadlines.start()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            handled.append("timed out" if deadline.timed_out() else "cancelled")
            raise
        finally:
            deadlines.finish(deadline)

    send = asyncio.create_task(request())
    await asyncio.sleep(0)  # the request starts and waits
    loop = asyncio.get_running_loop()

    # The sweeper and a shutdown cancel it before it runs again.
    deadlines.expire_due(loop.time() + TIMEOUT)
    send.cancel()

    with pytest.raises(asyncio.CancelledError):
        await send
    assert handled == ["cancelled"]
    deadlines.close()


async def test_a_shutdown_landing_with_a_timeout_mid_body_still_cancels_the_request(
    server: str, transport: HttpTransport
) -> None:
    # Two handlers ask the same deadline on the way out (the body's read, then the request's).
    # The deadline is consumed by the first: were it consumed again, the second would swallow
    # the shutdown's cancellation, and a send worker would outlive the lane that stops it.
    send = asyncio.create_task(_post(transport, f"{server}/stall"))
    await asyncio.sleep(TIMEOUT / 4)  # the status and half the body arrived; the rest never does
    loop = asyncio.get_running_loop()

    transport._deadlines.expire_due(loop.time() + TIMEOUT)
    send.cancel()

    with pytest.raises(asyncio.CancelledError):
        await send


async def test_a_timeout_alone_is_taken_for_one() -> None:
    deadlines = Deadlines(30.0)
    loop = asyncio.get_running_loop()

    send = asyncio.create_task(_wait_under(deadlines, 60))
    await asyncio.sleep(0)
    assert deadlines.expire_due(loop.time()) > loop.time()  # not yet due: nothing happens
    assert not send.done()

    deadlines.expire_due(loop.time() + 30.0)

    assert await send == "timed out"
    assert not send.cancelled() and send.cancelling() == 0
    deadlines.close()


async def test_a_task_that_survived_a_cancellation_still_gets_its_timeouts(
    server: str, transport: HttpTransport
) -> None:
    async def survivor() -> SendResult:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(1)
        # Swallowed without uncancel(): the task still counts one cancellation.
        assert task.cancelling() == 1
        return (await _post(transport, f"{server}/hang"))[0]

    assert _is_timeout(await asyncio.create_task(survivor()))


def test_deadlines_moved_to_another_loop_drop_what_the_first_left_pending() -> None:
    deadlines = Deadlines(0.2)

    async def abandoned() -> None:
        deadlines.start()
        await asyncio.Event().wait()  # never finished: its loop is closed under it

    first = asyncio.new_event_loop()
    first.run_until_complete(asyncio.sleep(0, first.create_task(abandoned())))
    first.close()

    assert asyncio.run(asyncio.wait_for(_wait_under(deadlines, 30), timeout=5)) == "timed out"


@pytest.fixture
async def silent_tls_port() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word: a TLS handshake there stalls."""
    connections: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_connection_whose_handshake_never_completes_is_not_a_delivery_in_doubt(
    silent_tls_port: int, transport: HttpTransport
) -> None:
    # Only a ClientHello left: for a provider without an idempotency key, calling this "in
    # doubt" would end the recipient failed for good instead of retrying it.
    result, took = await _post(transport, f"https://127.0.0.1:{silent_tls_port}/send")

    assert (result.kind, result.error_code, result.maybe_delivered) == (
        ResultKind.TRANSIENT,
        "connect_timeout",
        False,
    )
    assert took < TIMEOUT


@pytest.mark.parametrize("port", ["99999", "0x50"])
async def test_a_url_aiohttp_cannot_use_is_the_senders_fault_and_sent_nothing(
    port: str, transport: HttpTransport
) -> None:
    result, _ = await _post(transport, f"http://127.0.0.1:{port}/send")

    assert (result.kind, result.error_code, result.maybe_delivered) == (
        ResultKind.SENDER_FATAL,
        "invalid_request",
        False,
    )


TOKEN = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"
META_TOKEN = "EAAGm0PX4ZCpsBAKZBx7Yq2Lm9Nw3Rt5Uv8"


@pytest.mark.parametrize(
    ("classify", "body"),
    [
        # Twilio's shape; the configured token echoed where the 300-character limit cuts it.
        (classify_twilio, {"code": 21211, "message": "x" * 280 + f" token {TOKEN} rejected"}),
        # Meta's shape; a token that is not the configured one (an older one), caught by its
        # form, which needs 23 characters of it to match.
        (
            classify_meta,
            {"error": {"code": 100, "message": "y" * 285 + f" {META_TOKEN} invalid"}},
        ),
    ],
)
async def test_a_credential_at_the_length_limit_is_redacted_before_the_text_is_shortened(
    classify: Classifier, body: dict[str, object]
) -> None:
    async def echo(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(body, status=400)

    app = web.Application()
    app.router.add_post("/send", echo)
    transport = HttpTransport(timeout_seconds=5, connection_limit=2, secrets=[TOKEN])
    try:
        async with serve_app(app) as url:
            result = await transport.post(f"{url}/send", data=b"{}", headers={}, classify=classify)
    finally:
        await transport.close()

    message = result.error_message or ""
    assert result.kind is not ResultKind.SENT and message.startswith("(#")
    assert len(message) <= MAX_PROVIDER_TEXT
    for secret in (TOKEN, META_TOKEN):
        # No run of 6 characters of the credential survives, wherever the cut fell.
        assert not any(secret[i : i + 6] in message for i in range(len(secret) - 5)), message


async def test_a_long_answer_is_redacted_only_as_far_as_it_can_be_stored() -> None:
    # Redaction patterns can take quadratic time on a long run without blanks: a 64 KiB answer
    # of 'http://a' took 2.7 s on the event loop, every lane of the process waiting.
    async def long_answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"code": 21211, "message": "http://a" * 8000}, status=400)

    app = web.Application()
    app.router.add_post("/send", long_answer)
    transport = HttpTransport(timeout_seconds=5, connection_limit=2, secrets=[TOKEN])
    redacted: list[int] = []
    redact = transport.redact

    def measured(text: str) -> str:
        redacted.append(len(text))
        return redact(text)

    transport.redact = measured  # type: ignore[method-assign]
    try:
        async with serve_app(app) as url:
            result = await transport.post(f"{url}/send", data=b"{}", headers={}, classify=classify_twilio)
    finally:
        await transport.close()

    assert result.kind is ResultKind.RECIPIENT_PERMANENT
    assert len(result.error_message or "") <= MAX_PROVIDER_TEXT
    assert redacted and max(redacted) <= MAX_PROVIDER_TEXT + REDACTION_MARGIN


async def test_a_name_lookup_that_never_answers_is_a_connection_never_made(
    monkeypatch: pytest.MonkeyPatch, transport: HttpTransport
) -> None:
    # aiohttp's connect timeouts do not cover the lookup: the request's own timeout ran out
    # and called it in doubt, and a sender that cannot resend failed a recipient nothing had
    # been sent to.
    async def hang(*args: object, **kwargs: object) -> list[ResolveResult]:
        await asyncio.sleep(30)
        return []

    monkeypatch.setattr(DefaultResolver, "resolve", hang)

    result, took = await _post(transport, "http://provider.invalid/send")

    assert (result.kind, result.error_code, result.maybe_delivered) == (
        ResultKind.TRANSIENT,
        "connection_error",
        False,
    )
    assert "not resolved within 0.1 s" in (result.error_message or "")
    assert took < TIMEOUT


async def test_a_connection_idle_past_its_time_is_not_reused() -> None:
    # A server that closes idle connections before the client does (Node.js: 5 s, aiohttp:
    # 15 s) cuts off the request written as its close arrives: unanswered, in doubt.
    peers: set[object] = set()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        peers.add(request.transport)
        return web.Response(body=b'{"id":"m1"}')

    app = web.Application()
    app.router.add_post("/send", answer)
    transport = HttpTransport(timeout_seconds=5, connection_limit=4, secrets=[], idle_connection_seconds=0.2)
    try:
        async with serve_app(app) as url:
            await _post(transport, f"{url}/send")
            await _post(transport, f"{url}/send")
            assert len(peers) == 1, "a connection in use is kept"
            await asyncio.sleep(0.6)
            result, _ = await _post(transport, f"{url}/send")
    finally:
        await transport.close()

    assert result.kind is ResultKind.SENT
    assert len(peers) == 2
