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


def classify_bare_status(status: int, headers: Mapping[str, str]) -> SendResult:
    """An answer without the provider's error envelope: a proxy's page, an empty body.

    Only then does the HTTP status decide, and only for what it says unambiguously: an
    overloaded or unreachable upstream is worth retrying, 429 asks for patience. Anything
    else is unknown: retried a few times, and the circuit breaker watches it.
    """
    code = f"http_{status}"
    message = f"HTTP {status} without the provider's error body"
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
