"""Pure pieces the classifiers share: reading a body, an id, an error text, a bare status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from campaignd.outcomes import ResultKind, SendResult, parse_retry_after

MAX_MESSAGE_ID_LENGTH = 200
# Provider texts are stored per recipient, and the transport shortens them to these lengths
# only after redacting them (see clip): a credential cut at the limit would no longer match
# and its head would be stored. The body they come from is already bounded.
MAX_PROVIDER_TEXT = 300
MAX_ERROR_CODE = 100


def parse_json(body: bytes) -> Any:
    """The JSON value of ``body``, or None when it is empty or not JSON."""
    if not body:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        # JSON that is not UTF-8 (a Latin-1 answer): its envelope still says what happened,
        # where refusing it turned Twilio's "invalid number" into an unknown HTTP 400.
        return orjson.loads(body.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        return None


def text_id(value: Any) -> str | None:
    """A provider's id as text, or None when it is absent, empty or not a scalar."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    text = str(value)
    return text[:MAX_MESSAGE_ID_LENGTH] if text else None


def integer_code(value: Any) -> int | None:
    """An error code as an int: providers send ints, proxies and SDKs sometimes digit strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None


def short_text(value: Any) -> str:
    """``value`` on one line, or "" when it is not text. Not shortened: see clip."""
    if not isinstance(value, str):
        return ""
    return " ".join(value.split())


def clip(text: str, limit: int) -> str:
    """``text`` shortened to ``limit`` characters, an ellipsis marking the cut. Only for texts
    already redacted."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(code: int | str, message: str) -> str:
    """``(#code) message``, the shape of Meta's own texts, for every provider alike."""
    prefix = f"(#{code})"
    if message.startswith(prefix):
        return message
    return f"{prefix} {message}" if message else prefix


# A gateway's own answer about the provider behind it (RFC 9110 15.6.3, 15.6.5): no answer in
# time, or an answer the gateway could not read. The provider may have taken the request,
# exactly as when campaignd's own timeout runs out.
GATEWAY_STATUSES = frozenset({502, 504})


def gateway_in_doubt(status: int, kind: ResultKind) -> bool:
    """Whether an answer carrying the provider's error envelope may still hide a delivery.

    A gateway status says the provider behind it did not answer in time, whatever envelope
    the gateway (or the provider's own edge) wrapped it in. Only a retryable verdict is in
    doubt: a definite one (no such number, a bad token) is the provider's own answer.
    """
    return status in GATEWAY_STATUSES and kind in (ResultKind.TRANSIENT, ResultKind.UNKNOWN)


def classify_bare_status(status: int, headers: Mapping[str, str]) -> SendResult:
    """An answer without the provider's error envelope: a proxy's page, an empty body.

    Only then does the HTTP status decide, and only for what it says unambiguously: an
    overloaded or unreachable upstream is worth retrying, 429 asks for patience. Anything
    else is unknown: retried a few times, and the circuit breaker watches it.
    """
    code = f"http_{status}"
    message = f"HTTP {status} without the provider's error body"
    if status in GATEWAY_STATUSES:
        return SendResult(ResultKind.TRANSIENT, error_code=code, error_message=message, maybe_delivered=True)
    if status == 429:
        return SendResult(
            ResultKind.THROTTLED,
            error_code=code,
            error_message=message,
            retry_after_seconds=parse_retry_after(headers.get("Retry-After")),
        )
    if status >= 500 or status == 408 or 300 <= status < 400:
        return SendResult(ResultKind.TRANSIENT, error_code=code, error_message=message)
    return SendResult(ResultKind.UNKNOWN, error_code=code, error_message=message)


SENT_WITHOUT_ID = "sent_without_id"


def sent_without_id(status: int) -> SendResult:
    """A 2xx of a provider that always names the message it accepted, naming none.

    Sent, and never sent again: these providers take no idempotency key. But such answers
    come from something that is not the provider (an ``api_base`` pointing at a web server,
    a captive proxy) as often as from the provider, so the recipient carries the code, and
    the circuit breaker pauses a campaign whose sends all end this way, instead of letting
    it "send" everyone while nothing is delivered.
    """
    return SendResult(
        ResultKind.SENT,
        error_code=SENT_WITHOUT_ID,
        error_message=f"HTTP {status} accepted the request without naming a message id",
    )
