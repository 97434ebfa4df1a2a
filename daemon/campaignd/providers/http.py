"""The generic ``http`` provider: one JSON POST per message to a configured URL."""

from __future__ import annotations

import asyncio
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
import orjson

from campaignd.config import HttpSenderConfig
from campaignd.outcomes import ResultKind, SendResult, parse_retry_after
from campaignd.providers.base import Delivery, InvalidAddress
from campaignd.redact import Redactor

MAX_ADDRESS_LENGTH = 320
MAX_BODY_READ = 64 * 1024


def classify_http_response(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    """Map one HTTP answer of the generic provider to a result (pure; see README "Providers")."""
    payload: Any = None
    if body:
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
    if 200 <= status < 300:
        message_id = payload.get("id") if isinstance(payload, dict) else None
        if isinstance(message_id, (str, int)) and not isinstance(message_id, bool) and str(message_id):
            return SendResult(ResultKind.SENT, provider_message_id=str(message_id)[:200])
        # A 2xx we cannot read, or without an id, proves nothing: retry it. The resend carries
        # the same Idempotency-Key, so a provider that did accept it will not deliver twice.
        if payload is None:
            return SendResult(
                ResultKind.TRANSIENT,
                error_code="unparsable_body",
                error_message=f"HTTP {status} with a body that is not JSON",
            )
        return SendResult(
            ResultKind.TRANSIENT,
            error_code="missing_message_id",
            error_message=f"HTTP {status} without a message id",
        )
    code, message = _error_fields(payload, status)
    if status in (429, 503):
        return SendResult(
            ResultKind.THROTTLED,
            error_code=code,
            error_message=message,
            retry_after_seconds=parse_retry_after(headers.get("Retry-After")),
        )
    if status in (401, 403):
        return SendResult(ResultKind.SENDER_FATAL, error_code=code, error_message=message)
    if status == 408 or status >= 500 or status < 200 or 300 <= status < 400:
        # Redirects are not followed: a provider URL that moved is a transient fault to
        # report, not a place to send secrets to.
        return SendResult(ResultKind.TRANSIENT, error_code=code, error_message=message)
    return SendResult(ResultKind.RECIPIENT_PERMANENT, error_code=code, error_message=message)


def _error_fields(payload: Any, status: int) -> tuple[str, str]:
    code: str = f"http_{status}"
    message = f"HTTP {status}"
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            if isinstance(error.get("code"), (str, int)) and not isinstance(error.get("code"), bool):
                code = str(error["code"])[:100]
            if isinstance(error.get("message"), str):
                message = f"HTTP {status}: {error['message']}"
    return code, message


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body up to ``limit`` bytes, however many chunks it arrives in."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await response.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def normalize_generic_address(address: str) -> str:
    cleaned = address.strip()
    if not cleaned:
        raise InvalidAddress("address is empty")
    if len(cleaned) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"address is longer than {MAX_ADDRESS_LENGTH} characters")
    if any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in cleaned):
        raise InvalidAddress("address contains whitespace or control characters")
    return cleaned


class HttpProvider:
    name = "http"

    def __init__(self, sender_id: str, config: HttpSenderConfig, *, connection_limit: int) -> None:
        self.sender_id = sender_id
        self.resend_in_doubt = config.resend_in_doubt
        self._url = config.url
        self._headers = {name: value.get_secret_value() for name, value in config.headers.items()}
        # Every configured header may carry a credential, and a provider may echo back the
        # bare token without its "Bearer " prefix: both the value and its words are secrets.
        self._redact = Redactor(
            [*self._headers.values(), *(word for value in self._headers.values() for word in value.split())]
        )
        self._headers.setdefault("Content-Type", "application/json")
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_seconds)
        self._connection_limit = connection_limit
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # One session and connection pool per sender, sized to the process's concurrency,
            # reused for every message.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._connection_limit, ttl_dns_cache=300),
                timeout=self._timeout,
                json_serialize=lambda obj: orjson.dumps(obj).decode(),
            )
        return self._session

    def normalize_address(self, address: str) -> str:
        return normalize_generic_address(address)

    def check_messages(self, messages: Sequence[Any]) -> str | None:
        # The generic provider forwards any JSON the host wrote.
        return None

    async def send(self, delivery: Delivery) -> SendResult:
        body = orjson.dumps(
            {
                "to": delivery.address,
                "message": delivery.message,
                "campaign_id": delivery.campaign_id,
                "recipient_id": delivery.recipient_id,
            }
        )
        headers = {**self._headers, "Idempotency-Key": delivery.idempotency_key}
        try:
            async with self._client().post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as response:
                answer = await _read_bounded(response, MAX_BODY_READ)
                return self._redacted(classify_http_response(response.status, answer, response.headers))
        except TimeoutError:
            return SendResult(
                ResultKind.TRANSIENT, error_code="timeout", error_message="provider did not answer in time"
            )
        except aiohttp.ClientError as exc:
            return SendResult(
                ResultKind.TRANSIENT,
                error_code="connection_error",
                error_message=self._redact(f"{type(exc).__name__}: {exc}"),
            )

    def _redacted(self, result: SendResult) -> SendResult:
        """The provider's own words may echo a credential back; they reach the database."""
        return replace(
            result,
            error_code=None if result.error_code is None else self._redact(result.error_code),
            error_message=None if result.error_message is None else self._redact(result.error_message),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            # Give the connector's transports a turn to close cleanly.
            await asyncio.sleep(0)
            self._session = None
