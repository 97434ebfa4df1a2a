"""The generic ``http`` provider: one JSON POST per message to a configured URL."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson

from campaignd.config import HttpSenderConfig
from campaignd.outcomes import ResultKind, SendResult, parse_retry_after
from campaignd.providers.answers import GATEWAY_STATUSES, parse_json, text_id
from campaignd.providers.base import Delivery, InvalidAddress
from campaignd.providers.transport import HttpTransport

MAX_ADDRESS_LENGTH = 320


def classify_http_response(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    """Map one HTTP answer of the generic provider to a result (pure; see README "Providers")."""
    payload = parse_json(body)
    if 200 <= status < 300:
        message_id = text_id(payload.get("id")) if isinstance(payload, dict) else None
        if message_id is not None:
            return SendResult(ResultKind.SENT, provider_message_id=message_id)
        # A 2xx we cannot read, or without an id, proves nothing either way: the provider
        # may well have accepted it. Retried with the same Idempotency-Key by a sender whose
        # provider deduplicates; in doubt for one told it does not (resend_in_doubt = false).
        if payload is None:
            return SendResult(
                ResultKind.TRANSIENT,
                error_code="unparsable_body",
                error_message=f"HTTP {status} with a body that is not JSON",
                maybe_delivered=True,
            )
        return SendResult(
            ResultKind.TRANSIENT,
            error_code="missing_message_id",
            error_message=f"HTTP {status} without a message id",
            maybe_delivered=True,
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
    if status == 409 or status in GATEWAY_STATUSES:
        # 409: a request with this Idempotency-Key is still being processed (the key draft,
        # draft-ietf-httpapi-idempotency-key-header); a gateway's 502/504: the provider behind
        # it may have taken the request. Either way it may be delivered.
        return SendResult(ResultKind.TRANSIENT, error_code=code, error_message=message, maybe_delivered=True)
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
                code = str(error["code"])
            if isinstance(error.get("message"), str):
                message = f"HTTP {status}: {error['message']}"
    return code, message


# Whitespace as str.isspace() sees it (re's \s is the same test) and category Cc, which is
# exactly U+0000-U+001F and U+007F-U+009F; one regex scan instead of a Python loop per character.
_WHITESPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


def normalize_generic_address(address: str) -> str:
    # Spaces only: the duplicate check keys this provider's addresses as btrim(address), which
    # trims nothing else; any other blank left around it makes the address invalid below.
    cleaned = address.strip(" ")
    if not cleaned:
        raise InvalidAddress("address is empty")
    if len(cleaned) > MAX_ADDRESS_LENGTH:
        raise InvalidAddress(f"address is longer than {MAX_ADDRESS_LENGTH} characters")
    # Printable ASCII without a space, as nearly every address is, passes without the regex.
    plain = cleaned.isascii() and cleaned.isprintable() and " " not in cleaned
    if not plain and _WHITESPACE_OR_CONTROL.search(cleaned):
        raise InvalidAddress("address contains whitespace or control characters")
    return cleaned


class HttpProvider:
    name = "http"
    # Opaque to this provider: sent exactly as written.
    phone_addresses = False

    def __init__(self, sender_id: str, config: HttpSenderConfig, *, connection_limit: int) -> None:
        self.sender_id = sender_id
        self.resend_in_doubt = config.resend_in_doubt
        self._url = config.url
        self._headers = {name: value.get_secret_value() for name, value in config.headers.items()}
        self._transport = HttpTransport(
            timeout_seconds=config.timeout_seconds,
            connection_limit=connection_limit,
            secrets=[*_header_secrets(self._headers), *_url_credentials(config.url)],
        )
        self._headers.setdefault("Content-Type", "application/json")

    normalize_address = staticmethod(normalize_generic_address)

    def check_messages(self, messages: Sequence[Any]) -> str | None:
        # The generic provider forwards any JSON the host wrote.
        return None

    def send(self, delivery: Delivery) -> Awaitable[SendResult]:
        # The transport's coroutine itself, not one around it: each await of a request passes
        # through every coroutine that encloses it.
        body = orjson.dumps(
            {
                "to": delivery.address,
                "message": delivery.message,
                "campaign_id": delivery.campaign_id,
                "recipient_id": delivery.recipient_id,
            }
        )
        headers = {**self._headers, "Idempotency-Key": delivery.idempotency_key}
        return self._transport.post(self._url, data=body, headers=headers, classify=classify_http_response)

    def redact(self, text: str) -> str:
        return self._transport.redact(text)

    async def close(self) -> None:
        await self._transport.close()


def _url_credentials(url: str) -> list[str]:
    """The user name and password in ``url``, as written and decoded: an error text may quote
    either, and an API key often travels as the user name alone (https://KEY@host/)."""
    parts = urlsplit(url)
    return [text for part in (parts.username, parts.password) if part for text in (part, unquote(part))]


# Headers that describe the request and carry no credential: their values ("application/json")
# are words a provider's error text uses too.
_PLAIN_HEADERS = frozenset({"accept", "accept-encoding", "accept-language", "content-type", "user-agent"})


def _header_secrets(headers: Mapping[str, str]) -> list[str]:
    """Any other header may carry a credential, and a provider may echo back the bare token
    without its scheme ("Bearer "): the value and its words are secrets, but not a scheme
    word, which would vanish from every text that names it."""
    values = [value for name, value in headers.items() if name.lower() not in _PLAIN_HEADERS]
    words = [
        word
        for value in values
        for index, word in enumerate(value.split())
        if not (index == 0 and word.isalpha() and len(value.split()) > 1)
    ]
    return [*values, *words]
