"""Local fakes of the real providers' APIs: WhatsApp Cloud API, Messenger/Instagram Send API, Twilio.

Each fake is an aiohttp server that checks what the real API checks first (the credential,
the path, the body's shape) and answers like it: the real success body, or the real error
envelope (Meta: ``{"error": {"message", "type", "code", "error_subcode", "error_data":
{"messaging_product", "details"}, "fbtrace_id"}}``; Twilio: ``{"code", "message", "more_info",
"status"}``).

API, the same for the three::

    fake = FakeWhatsApp(token="...", phone_number_id="1234")   # or FakeMessenger / FakeTwilio
    await fake.start()            # in the test's loop ...      fake.start_in_thread() # ... or its own
    fake.url                      # the api_base to configure
    fake.fail("15550001111", meta_error(131026, "Message undeliverable."), times=2)
    fake.fail_next(3, meta_error(130429, "Rate limit hit", headers={"Retry-After": "2"}))
    fake.default = Reply(503, "<html>busy</html>")   # every other request (None: success)
    fake.latency_seconds = 0.5
    fake.requests                 # every request: parsed JSON / form, headers, path, address
    fake.sent                     # the requests answered with success, with their message ids
    await fake.stop()                                           fake.stop_thread()

Scripted answers are chosen in this order: the next-N queue, the address's rule, the default,
success. A request the real API would refuse (bad token, wrong path, malformed body) is refused
before any script, with the provider's real code, so a test cannot pass on a wrong request.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import itertools
import secrets
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from campaignd.fakeprovider import ServedApp, finish_tasks

P = TypeVar("P")
F = TypeVar("F", bound="FakeApi")
WHATSAPP_TYPES = frozenset(
    {
        "text",
        "template",
        "image",
        "audio",
        "video",
        "document",
        "sticker",
        "interactive",
        "location",
        "contacts",
    }
)


@dataclass(frozen=True)
class Reply:
    status: int
    # dict or list: JSON; str: text/html (a proxy's page); bytes: as they are; None: empty.
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_seconds: float = 0.0
    # Announce a longer body than is sent, then drop the connection.
    truncate: bool = False


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    raw: bytes
    # The parsed body: JSON (Meta) or form fields (Twilio; lists for repeated fields).
    json: Any
    form: dict[str, list[str]]
    address: str | None


@dataclass(frozen=True)
class Sent:
    request: Recorded
    message_id: str


def meta_error(
    code: int,
    message: str,
    *,
    subcode: int | None = None,
    details: str | None = None,
    status: int = 400,
    error_type: str = "OAuthException",
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """Meta's Graph API error envelope, as the Cloud API and the Send API return it."""
    error: dict[str, Any] = {
        "message": message if message.startswith("(#") else f"(#{code}) {message}",
        "type": error_type,
        "code": code,
        "fbtrace_id": "A" + secrets.token_hex(10),
    }
    if subcode is not None:
        error["error_subcode"] = subcode
    if details is not None:
        error["error_data"] = {"messaging_product": "whatsapp", "details": details}
    return Reply(status, {"error": error}, dict(headers or {}))


def twilio_error(
    code: int, message: str, *, status: int = 400, headers: Mapping[str, str] | None = None
) -> Reply:
    """Twilio's REST error envelope."""
    body = {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    return Reply(status, body, dict(headers or {}))


class Providers:
    """Providers a test made, closed together when it ends (see :func:`closing_providers`)."""

    def __init__(self) -> None:
        self._made: list[Any] = []

    def __call__(self, provider: P) -> P:
        self._made.append(provider)
        return provider


@contextlib.asynccontextmanager
async def closing_providers() -> AsyncIterator[Providers]:
    providers = Providers()
    try:
        yield providers
    finally:
        for provider in providers._made:
            await provider.close()


@contextlib.asynccontextmanager
async def serve_app(app: web.Application) -> AsyncIterator[str]:
    """An aiohttp app on an ephemeral loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def served(fake: F) -> AsyncIterator[F]:
    """The fake, listening in the test's loop for the duration of the block."""
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@dataclass
class _Rule:
    reply: Reply
    times: int | None
    used: int = 0


class FakeApi:
    """What the three fakes share: scripting, records, and serving in or out of the test's loop."""

    def __init__(self) -> None:
        self.url = ""
        self.default: Reply | None = None
        self.latency_seconds = 0.0
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._sent: list[Sent] = []
        self._rules: dict[str, _Rule] = {}
        self._next: deque[Reply] = deque()
        self._ids = itertools.count(1)
        self._served: ServedApp | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---------------------------------------------------------------- scripting and records

    def fail(self, address: str, reply: Reply, *, times: int | None = None) -> None:
        """Answer ``reply`` to requests for ``address`` (as sent: digits, +digits or a PSID)."""
        with self._lock:
            self._rules[address] = _Rule(reply, times)

    def fail_next(self, count: int, reply: Reply) -> None:
        with self._lock:
            self._next.extend([reply] * count)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    @property
    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._sent.clear()
            self._rules.clear()
            self._next.clear()
        self.default = None
        self.latency_seconds = 0.0

    # ---------------------------------------------------------------- serving

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._served = await ServedApp.start(app, host, port)
        bound_host, bound_port = self._served.address
        self.url = f"http://{bound_host}:{bound_port}{self.base_path}"

    async def stop(self) -> None:
        if self._served is not None:
            served, self._served = self._served, None
            await served.stop()

    def start_in_thread(self) -> None:
        """Serve from a thread with its own loop (for a daemon in a subprocess); returns once listening."""
        listening: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def serve() -> None:
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                listening.set_exception(exc)
                loop.close()
                return
            listening.set_result(None)
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.run_until_complete(finish_tasks(loop))
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=serve, name=type(self).__name__, daemon=True)
        self._thread.start()
        listening.result(timeout=10)

    def stop_thread(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = self._loop = None

    # ---------------------------------------------------------------- the provider's part

    base_path = ""

    def refusal(self, request: web.Request, recorded: Recorded) -> Reply | None:
        """The real API's answer to a request it refuses before looking at anything else."""
        raise NotImplementedError

    def success(self, recorded: Recorded, message_id: str) -> Reply:
        raise NotImplementedError

    def new_id(self) -> str:
        raise NotImplementedError

    def parse(self, raw: bytes) -> tuple[Any, dict[str, list[str]], str | None]:
        """The JSON, the form and the recipient's address of a request body."""
        raise NotImplementedError

    # ---------------------------------------------------------------- handling

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body, form, address = self.parse(raw)
        recorded = Recorded(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            raw,
            body,
            form,
            address,
        )
        with self._lock:
            self._requests.append(recorded)
        if self.latency_seconds:
            await asyncio.sleep(self.latency_seconds)
        reply = self.refusal(request, recorded) or self._scripted(address)
        if reply is None:
            message_id = self.new_id()
            with self._lock:
                self._sent.append(Sent(recorded, message_id))
            reply = self.success(recorded, message_id)
        if reply.delay_seconds:
            await asyncio.sleep(reply.delay_seconds)
        return await _respond(request, reply)

    def _scripted(self, address: str | None) -> Reply | None:
        with self._lock:
            if self._next:
                return self._next.popleft()
            rule = self._rules.get(address) if address is not None else None
            if rule is not None and (rule.times is None or rule.used < rule.times):
                rule.used += 1
                return rule.reply
        return self.default


async def _respond(request: web.Request, reply: Reply) -> web.StreamResponse:
    headers = dict(reply.headers)
    if isinstance(reply.body, (dict, list)):
        raw, content_type = orjson.dumps(reply.body), "application/json"
    elif isinstance(reply.body, str):
        raw, content_type = reply.body.encode(), "text/html"
    else:
        raw, content_type = reply.body or b"", "application/octet-stream"
    if not reply.truncate:
        return web.Response(status=reply.status, body=raw, content_type=content_type, headers=headers)
    response = web.StreamResponse(status=reply.status, headers={**headers, "Content-Type": content_type})
    response.content_length = len(raw) + 100
    await response.prepare(request)
    await response.write(raw)
    if request.transport is not None:
        request.transport.close()
    return response


def _json_body(raw: bytes) -> Any:
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.loads(raw)
    return None


def _bearer_refusal(request: web.Request, token: str) -> Reply | None:
    authorization = request.headers.get("Authorization", "")
    if not authorization:
        return meta_error(
            2500,
            "An active access token must be used to query information about the current user.",
            error_type="OAuthException",
        )
    if authorization != f"Bearer {token}":
        return meta_error(190, "Invalid OAuth access token - Cannot parse access token", status=401)
    return None


def _meta_path_refusal(request: web.Request, version: str, object_ids: set[str]) -> Reply | None:
    parts = request.path.strip("/").split("/")
    if request.method != "POST" or len(parts) != 3 or parts[0] != version or parts[2] != "messages":
        return meta_error(2500, f"Unknown path components: {request.path}", error_type="OAuthException")
    if parts[1] not in object_ids:
        return meta_error(
            100,
            f"Unsupported post request. Object with ID '{parts[1]}' does not exist, cannot be loaded due "
            "to missing permissions, or does not support this operation.",
            subcode=33,
            error_type="GraphMethodException",
        )
    return None


def _invalid(details: str) -> Reply:
    return meta_error(100, "Invalid parameter", details=details)


class _MetaFake(FakeApi):
    """What the Cloud API and the Send API check alike: the bearer token, then the path."""

    def __init__(self, token: str, object_ids: set[str], version: str) -> None:
        super().__init__()
        self.token, self.version, self._object_ids = token, version, object_ids
        self.base_path = f"/{version}"

    def refusal(self, request: web.Request, recorded: Recorded) -> Reply | None:
        return (
            _bearer_refusal(request, self.token)
            or _meta_path_refusal(request, self.version, self._object_ids)
            or self.body_refusal(recorded)
        )

    def body_refusal(self, recorded: Recorded) -> Reply | None:
        raise NotImplementedError


class FakeWhatsApp(_MetaFake):
    """WhatsApp Cloud API: ``POST /{version}/{phone_number_id}/messages``."""

    def __init__(
        self, *, token: str, phone_number_id: str = "106540352242922", version: str = "v21.0"
    ) -> None:
        super().__init__(token, {phone_number_id}, version)
        self.phone_number_id = phone_number_id

    def parse(self, raw: bytes) -> tuple[Any, dict[str, list[str]], str | None]:
        body = _json_body(raw)
        to = body.get("to") if isinstance(body, dict) else None
        return body, {}, to if isinstance(to, str) else None

    def body_refusal(self, recorded: Recorded) -> Reply | None:
        body = recorded.json
        if not isinstance(body, dict):
            return _invalid("the request body must be a JSON object")
        if body.get("messaging_product") != "whatsapp":
            return meta_error(100, "The parameter messaging_product is required.")
        if not isinstance(body.get("to"), str) or not body["to"].lstrip("+").isdigit():
            return _invalid("'to' must be a phone number")
        kind = body.get("type", "text")
        if kind not in WHATSAPP_TYPES or kind not in body:
            return _invalid(f"message of type {kind!r} needs a {kind!r} object")
        if kind == "text" and not (
            isinstance(body["text"], dict) and isinstance(body["text"].get("body"), str)
        ):
            return meta_error(100, "The parameter text['body'] is required.")
        if kind == "template":
            template = body["template"]
            if not isinstance(template, dict) or not template.get("name"):
                return meta_error(100, "The parameter template['name'] is required.")
            language = template.get("language")
            if not isinstance(language, dict) or not language.get("code"):
                return meta_error(100, "The parameter template['language'] is required.")
        return None

    def new_id(self) -> str:
        return "wamid.HBgL" + base64.b64encode(f"{next(self._ids):012d}".encode()).decode().rstrip("=")

    def success(self, recorded: Recorded, message_id: str) -> Reply:
        to = recorded.address or ""
        return Reply(
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to.lstrip("+")}],
                "messages": [{"id": message_id, "message_status": "accepted"}],
            },
        )


class FakeMessenger(_MetaFake):
    """Messenger / Instagram Send API: ``POST /{version}/{page_id or me}/messages``."""

    def __init__(self, *, token: str, page_id: str = "104758932459301", version: str = "v21.0") -> None:
        super().__init__(token, {page_id, "me"}, version)
        self.page_id = page_id

    def parse(self, raw: bytes) -> tuple[Any, dict[str, list[str]], str | None]:
        body = _json_body(raw)
        recipient = body.get("recipient") if isinstance(body, dict) else None
        psid = recipient.get("id") if isinstance(recipient, dict) else None
        return body, {}, psid if isinstance(psid, str) else None

    def body_refusal(self, recorded: Recorded) -> Reply | None:
        body = recorded.json
        if not isinstance(body, dict) or recorded.address is None:
            return meta_error(100, "The parameter recipient is required")
        message = body.get("message")
        if not isinstance(message, dict) or ("text" in message) == ("attachment" in message):
            return meta_error(100, "param message must be non-empty.")
        messaging_type = body.get("messaging_type")
        if messaging_type not in ("RESPONSE", "UPDATE", "MESSAGE_TAG"):
            return meta_error(
                100, "(#100) Param messaging_type must be one of {RESPONSE, UPDATE, MESSAGE_TAG}"
            )
        if (messaging_type == "MESSAGE_TAG") != ("tag" in body):
            return meta_error(100, "(#100) Tag is required for MESSAGE_TAG messaging type, and only for it")
        return None

    def new_id(self) -> str:
        return f"m_{next(self._ids):08d}" + secrets.token_urlsafe(24)

    def success(self, recorded: Recorded, message_id: str) -> Reply:
        return Reply(200, {"recipient_id": recorded.address, "message_id": message_id})


class FakeTwilio(FakeApi):
    """Twilio Messaging: ``POST /2010-04-01/Accounts/{AccountSid}/Messages.json``, form-encoded."""

    def __init__(self, *, account_sid: str, auth_token: str) -> None:
        super().__init__()
        self.account_sid, self.auth_token = account_sid, auth_token

    def parse(self, raw: bytes) -> tuple[Any, dict[str, list[str]], str | None]:
        try:
            form = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            form = {}
        to = form.get("To", [None])[0]
        return None, form, to

    def refusal(self, request: web.Request, recorded: Recorded) -> Reply | None:
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        if request.headers.get("Authorization") != f"Basic {expected}":
            return twilio_error(20003, "Authenticate", status=401)
        if (
            request.method != "POST"
            or request.path != f"/2010-04-01/Accounts/{self.account_sid}/Messages.json"
        ):
            return twilio_error(20404, f"The requested resource {request.path} was not found", status=404)
        if not request.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            return twilio_error(21602, "Message body is required.")
        form = recorded.form
        if "To" not in form:
            return twilio_error(21604, "A 'To' phone number is required.")
        to = form["To"][0]
        if not (to.startswith("+") and to[1:].isdigit() and 7 <= len(to) - 1 <= 15):
            return twilio_error(21211, f"The 'To' number {to} is not a valid phone number.")
        if ("From" in form) == ("MessagingServiceSid" in form):
            return twilio_error(
                21603, "A 'From' or 'MessagingServiceSid' parameter is required to send a message."
            )
        if not form.get("Body", [""])[0] and "MediaUrl" not in form:
            return twilio_error(21602, "Message body is required.")
        return None

    def new_id(self) -> str:
        return f"SM{next(self._ids):032x}"

    def success(self, recorded: Recorded, message_id: str) -> Reply:
        form = recorded.form
        return Reply(
            201,
            {
                "account_sid": self.account_sid,
                "api_version": "2010-04-01",
                "body": form.get("Body", [""])[0],
                "date_created": "Thu, 24 Aug 2023 05:01:45 +0000",
                "direction": "outbound-api",
                "error_code": None,
                "error_message": None,
                "from": form.get("From", [None])[0],
                "messaging_service_sid": form.get("MessagingServiceSid", [None])[0],
                "num_media": str(len(form.get("MediaUrl", []))),
                "num_segments": "1",
                "price": None,
                "sid": message_id,
                "status": "queued" if "MessagingServiceSid" not in form else "accepted",
                "to": recorded.address,
                "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{message_id}.json",
            },
        )
