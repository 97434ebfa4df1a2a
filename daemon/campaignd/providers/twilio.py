"""The ``twilio`` provider: Twilio Programmable Messaging.

Request: ``POST {api_base}/2010-04-01/Accounts/{account_sid}/Messages.json`` with HTTP Basic
(account SID, auth token) and a form-encoded body: ``To`` (``+`` and digits), ``From`` or
``MessagingServiceSid`` (from config), ``Body`` and/or ``MediaUrl`` (repeated), and
``StatusCallback`` when configured.

The campaign's ``message`` is ``{"body": "Hi {{first_name}}", "media_url": ["https://..."]}``:
``body`` (at most 1,600 characters) or ``media_url`` (a URL or a list of at most 10), at least
one of them. A 2xx is ``sent`` with the message's ``sid``; errors are classified by
:func:`classify_twilio`, from Twilio's error ``code``.

Twilio has no idempotency key for creating a message: a send cut off after its request left
may or may not have been accepted, and a resend may deliver twice. So ``resend_in_doubt``
defaults to false for this provider, and a 2xx is never sent again, even when its body
cannot be read.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlencode

from campaignd.config import TwilioSenderConfig
from campaignd.outcomes import ResultKind, SendResult, parse_retry_after
from campaignd.providers import answers
from campaignd.providers.adapter import Adapter, Problem, Request, text_problem
from campaignd.providers.addresses import normalize_e164
from campaignd.providers.base import Delivery

_K = ResultKind

# From Twilio's error and warning dictionary (twilio.com/docs/api/errors).
TWILIO_CODES: Mapping[int, ResultKind] = MappingProxyType(
    {
        # Twilio's side failed, or the carrier did not say why: retry.
        20500: _K.TRANSIENT,  # internal server error
        20503: _K.TRANSIENT,  # service unavailable
        30008: _K.TRANSIENT,  # unknown error
        # Too much, too fast: slow the sender.
        20429: _K.THROTTLED,  # too many requests
        21611: _K.THROTTLED,  # this From number has too many messages queued
        30001: _K.THROTTLED,  # queue overflow
        30022: _K.THROTTLED,  # US A2P 10DLC: rate limit exceeded
        # Too many messages between these two numbers in 30 s; the pair is held for 30 s.
        14107: _K.RECIPIENT_DELAY,
        # This recipient cannot receive it; the campaign goes on.
        21211: _K.RECIPIENT_PERMANENT,  # invalid To phone number
        21265: _K.RECIPIENT_PERMANENT,  # To number cannot be a short code
        21266: _K.RECIPIENT_PERMANENT,  # To and From cannot be the same
        21408: _K.RECIPIENT_PERMANENT,  # sending to this region is not enabled
        21608: _K.RECIPIENT_PERMANENT,  # trial account: To number is not verified
        21610: _K.RECIPIENT_PERMANENT,  # recipient replied STOP (unsubscribed)
        21612: _K.RECIPIENT_PERMANENT,  # To number not reachable through this From / channel
        21614: _K.RECIPIENT_PERMANENT,  # To number is not a mobile number
        # The From number cannot message this destination (a short code abroad, say): a From
        # that can message nobody fails every recipient this way, and the breaker pauses it.
        21606: _K.RECIPIENT_PERMANENT,
        21617: _K.RECIPIENT_PERMANENT,  # body over 1,600 characters once this recipient's variables are in
        21620: _K.RECIPIENT_PERMANENT,  # invalid media URL (may come from this recipient's variables)
        30003: _K.RECIPIENT_PERMANENT,  # unreachable destination handset
        30004: _K.RECIPIENT_PERMANENT,  # message blocked
        30005: _K.RECIPIENT_PERMANENT,  # unknown destination handset
        30006: _K.RECIPIENT_PERMANENT,  # landline or unreachable carrier
        30007: _K.RECIPIENT_PERMANENT,  # filtered by the carrier
        # The account or its sending number is rejected: pause the sender.
        20003: _K.SENDER_FATAL,  # authentication failed
        20005: _K.SENDER_FATAL,  # account not active
        20404: _K.SENDER_FATAL,  # account (or service) not found
        21212: _K.SENDER_FATAL,  # invalid From number
        21609: _K.SENDER_FATAL,  # invalid StatusCallback URL
        21701: _K.SENDER_FATAL,  # Messaging Service does not exist
        21703: _K.SENDER_FATAL,  # Messaging Service has no phone number available
        21704: _K.SENDER_FATAL,  # Messaging Service contains no phone numbers
        30002: _K.SENDER_FATAL,  # account suspended
        30032: _K.SENDER_FATAL,  # toll-free number not verified
        30034: _K.SENDER_FATAL,  # US A2P 10DLC: unregistered number
        # The campaign's message cannot be sent to anyone.
        21602: _K.CAMPAIGN_FATAL,  # body required
        21623: _K.CAMPAIGN_FATAL,  # too many media URLs
    }
)

BODY_LIMIT = 1600
MAX_MEDIA = 10
MESSAGE_FIELDS = frozenset({"body", "media_url"})


def classify_twilio(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    """One Twilio answer as a result; pure, never raises."""
    payload = answers.parse_json(body)
    if 200 <= status < 300:
        # No idempotency key: a 2xx is never resent, even without a readable sid.
        sid = answers.text_id(payload.get("sid")) if isinstance(payload, dict) else None
        if sid is None:
            return answers.sent_without_id(status)
        return SendResult(ResultKind.SENT, provider_message_id=sid)
    code = answers.integer_code(payload.get("code")) if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or code is None:
        return answers.classify_bare_status(status, headers)
    kind = TWILIO_CODES.get(code)
    if kind is None:
        # A code the table does not know: Twilio's 5xx are its own faults, 429 its limit;
        # anything else is left to the few retries and the circuit breaker.
        kind = _K.TRANSIENT if status >= 500 else _K.THROTTLED if status == 429 else ResultKind.UNKNOWN
    return SendResult(
        kind,
        error_code=str(code),
        error_message=answers.describe(code, answers.short_text(payload.get("message"))),
        retry_after_seconds=parse_retry_after(headers.get("Retry-After")) if kind is _K.THROTTLED else None,
        maybe_delivered=answers.gateway_in_doubt(status, kind),
    )


class TwilioProvider(Adapter):
    name = "twilio"
    phone_addresses = True

    def __init__(self, sender_id: str, config: TwilioSenderConfig, *, connection_limit: int) -> None:
        token = config.auth_token.get_secret_value()
        credentials = base64.b64encode(f"{config.account_sid}:{token}".encode()).decode("ascii")
        super().__init__(
            sender_id,
            config,
            connection_limit=connection_limit,
            secrets=[token, credentials],
            classify=classify_twilio,
        )
        self._url = f"{config.api_base}/2010-04-01/Accounts/{config.account_sid}/Messages.json"
        self._headers = {
            "Authorization": f"Basic {credentials}",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        origin = (
            ("MessagingServiceSid", config.messaging_service_sid)
            if config.messaging_service_sid is not None
            else ("From", config.from_number or "")
        )
        self._fixed: list[tuple[str, str]] = [origin]
        if config.status_callback is not None:
            self._fixed.append(("StatusCallback", config.status_callback))

    def normalize_address(self, address: str) -> str:
        return normalize_e164(address)

    def problem(self, message: Any) -> Problem | None:
        return twilio_message_problem(message)

    def request(self, delivery: Delivery) -> Request:
        message: Mapping[str, Any] = delivery.message
        fields = [("To", delivery.address), *self._fixed]
        body = message.get("body")
        if isinstance(body, str) and body.strip():
            fields.append(("Body", body))
        fields.extend(("MediaUrl", url) for url in _media_urls(message.get("media_url")))
        return Request(self._url, urlencode(fields).encode("ascii"), self._headers)


def twilio_message_problem(message: Any) -> Problem | None:
    """Why a rendered message cannot become a Twilio message, or None (pure)."""
    if not isinstance(message, dict):
        return Problem('the message must be a JSON object such as {"body": "..."}')
    unknown = sorted(set(message) - MESSAGE_FIELDS)
    if unknown:
        return Problem(f"unknown field {unknown[0]!r} in the message; expected body and/or media_url")
    if "body" not in message and "media_url" not in message:
        return Problem('the message needs a "body" or a "media_url"')
    media = message.get("media_url")
    if media is not None:
        items = [media] if isinstance(media, str) else media if isinstance(media, list) else None
        if items is None or not all(isinstance(item, str) for item in items):
            return Problem("media_url must be an http(s) URL or a list of them")
        urls = _media_urls(media)
        if len(urls) != len(items):
            # Text that is not a URL came from one recipient's variables (an empty or
            # mistyped column): that recipient is skipped, not the campaign failed.
            return Problem("media_url must be an http(s) URL or a list of them", recipient_level=True)
        if len(urls) > MAX_MEDIA:
            return Problem(f"media_url has {len(urls)} URLs; Twilio takes at most {MAX_MEDIA}")
    if "body" in message:
        body = message["body"]
        # A body left blank by its variables is fine beside media: only the media go.
        blank_beside_media = isinstance(body, str) and not body.strip() and bool(media)
        problem = None if blank_beside_media else text_problem(body, "body", BODY_LIMIT)
        if problem is not None:
            return problem
    return None


def _media_urls(media: Any) -> list[str]:
    items = [media] if isinstance(media, str) else media if isinstance(media, list) else []
    return [item for item in items if isinstance(item, str) and item.startswith(("https://", "http://"))]
