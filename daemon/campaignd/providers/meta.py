"""What Meta's Graph API answers mean: one pure, table-driven classifier for WhatsApp Cloud API,
Messenger and Instagram.

Meta's error envelope is ``{"error": {"message", "type", "code", "error_subcode",
"error_data": {"messaging_product", "details"}, "fbtrace_id"}}``. Meta asks integrators to
decide on ``code`` (and the details), never on the HTTP status, which is loose: throttling
comes back as 400, a transient fault as 500, a permission problem as 403 or 400. So the
status decides only when there is no envelope at all (a proxy's page, an empty body).

The tables come from Meta's published lists ("WhatsApp Cloud API error codes", "Messenger
Platform error codes", "Graph API rate limiting"); numbers of the three products do not
overlap, so one table serves all. Messenger's own errors arrive as a generic code with a
specific ``error_subcode`` (``(#10)`` + 2018278 "outside the allowed window", ``(#100)`` +
2018001 "no matching user"): a known subcode decides before its code, and is then the
``error_code`` recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import orjson

from campaignd.outcomes import ResultKind, SendResult, parse_retry_after
from campaignd.providers.answers import (
    classify_bare_status,
    describe,
    gateway_in_doubt,
    integer_code,
    parse_json,
    sent_without_id,
    short_text,
    text_id,
)

_K = ResultKind

META_CODES: Mapping[int, ResultKind] = MappingProxyType(
    {
        # Meta's side failed or is overloaded: worth retrying this recipient.
        1: _K.TRANSIENT,  # API Unknown: invalid request or possible server error
        102: _K.SENDER_FATAL,  # API Session: the session (token) expired or was revoked
        2: _K.TRANSIENT,  # API Service: temporary downtime or overload
        1200: _K.TRANSIENT,  # Messenger: temporary send message failure
        131000: _K.TRANSIENT,  # Something went wrong
        131016: _K.TRANSIENT,  # Service unavailable
        133004: _K.TRANSIENT,  # Server temporarily unavailable
        # Rate limits of the app, user, page, business or phone number: slow the sender.
        4: _K.THROTTLED,  # application request limit reached
        17: _K.THROTTLED,  # user request limit reached
        32: _K.THROTTLED,  # page request limit reached
        613: _K.THROTTLED,  # calls exceeded the rate limit
        341: _K.THROTTLED,  # application limit reached: temporary
        80001: _K.THROTTLED,  # Pages business use case rate limit (the Send API's page)
        80002: _K.THROTTLED,  # Instagram business use case rate limit
        80006: _K.THROTTLED,  # Messenger business use case rate limit
        80007: _K.THROTTLED,  # WhatsApp Business Account rate limit
        80008: _K.THROTTLED,  # WhatsApp Business Management API business use case rate limit
        130429: _K.THROTTLED,  # Cloud API throughput reached
        131057: _K.THROTTLED,  # account in maintenance mode (throughput upgrade), passes by itself
        # Only this recipient must wait; see RECIPIENT_DELAY_SECONDS.
        131049: _K.RECIPIENT_DELAY,  # per-user marketing message limit ("healthy ecosystem engagement")
        131056: _K.RECIPIENT_DELAY,  # (business, consumer) pair rate limit
        # This recipient can never receive this message; the campaign goes on.
        # Invalid parameter: values differ per recipient, and the breaker sees a pattern.
        100: _K.RECIPIENT_PERMANENT,
        131009: _K.RECIPIENT_PERMANENT,  # parameter value is not valid (same reasoning)
        131021: _K.RECIPIENT_PERMANENT,  # recipient cannot be the sender
        131026: _K.RECIPIENT_PERMANENT,  # undeliverable: not on WhatsApp, old client, terms not accepted
        131047: _K.RECIPIENT_PERMANENT,  # re-engagement: more than 24 hours since the user's last message
        131050: _K.RECIPIENT_PERMANENT,  # user stopped marketing messages from this business
        130472: _K.RECIPIENT_PERMANENT,  # user's number is part of a marketing experiment
        130497: _K.RECIPIENT_PERMANENT,  # messaging users in this country is restricted for the business
        132005: _K.RECIPIENT_PERMANENT,  # template text too long with this recipient's parameters
        551: _K.RECIPIENT_PERMANENT,  # Messenger: this person isn't available right now
        # The sender itself is rejected: token, permission, account, payment. Pause it.
        0: _K.SENDER_FATAL,  # AuthException
        3: _K.SENDER_FATAL,  # API method: the app lacks the capability
        10: _K.SENDER_FATAL,  # permission denied
        33: _K.SENDER_FATAL,  # the business phone number (or object) does not exist
        190: _K.SENDER_FATAL,  # access token expired or invalid
        368: _K.SENDER_FATAL,  # temporarily blocked for policy violations
        131005: _K.SENDER_FATAL,  # access denied
        131031: _K.SENDER_FATAL,  # business account locked
        131037: _K.SENDER_FATAL,  # phone number needs display name approval
        131042: _K.SENDER_FATAL,  # business eligibility payment issue
        131045: _K.SENDER_FATAL,  # incorrect certificate: number not registered
        131048: _K.SENDER_FATAL,  # spam rate limit: messaging restricted for this number
        133010: _K.SENDER_FATAL,  # phone number not registered on Cloud API
        # The campaign's message cannot be sent to anyone: pause this campaign.
        131008: _K.CAMPAIGN_FATAL,  # required parameter missing
        131051: _K.CAMPAIGN_FATAL,  # unsupported message type
        131053: _K.CAMPAIGN_FATAL,  # media upload error (the campaign's media)
        132000: _K.CAMPAIGN_FATAL,  # template parameter count mismatch
        132001: _K.CAMPAIGN_FATAL,  # template does not exist (name or language)
        132007: _K.CAMPAIGN_FATAL,  # template format character policy violated
        132012: _K.CAMPAIGN_FATAL,  # template parameter format mismatch
        132015: _K.CAMPAIGN_FATAL,  # template is paused for low quality
        132016: _K.CAMPAIGN_FATAL,  # template is disabled
        132068: _K.CAMPAIGN_FATAL,  # flow is blocked
    }
)
# Graph API "API permission" codes span a range.
META_PERMISSION_RANGE = range(200, 300)

META_SUBCODES: Mapping[int, ResultKind] = MappingProxyType(
    {
        33: _K.SENDER_FATAL,  # (#100) object with this id does not exist or lacks permission: page/phone id
        463: _K.SENDER_FATAL,  # (#190) token expired
        467: _K.SENDER_FATAL,  # (#190) token invalid
        1545041: _K.RECIPIENT_PERMANENT,  # (#551) this person isn't available right now
        2018001: _K.RECIPIENT_PERMANENT,  # (#100) no matching user found
        2018278: _K.RECIPIENT_PERMANENT,  # (#10) sent outside the allowed messaging window
        2018065: _K.RECIPIENT_PERMANENT,  # (#10) sent outside the allowed messaging window
        2534022: _K.RECIPIENT_PERMANENT,  # (#10) Instagram: sent outside the allowed window
        2018108: _K.RECIPIENT_PERMANENT,  # (#10) this person isn't receiving messages from you
        # (#1) "Received invalid JSON reply": Meta's own page says the message may have been
        # sent all the same.
        1357046: _K.TRANSIENT,
        2018109: _K.CAMPAIGN_FATAL,  # (#100) attachment size exceeds the allowable limit
    }
)

# Errors after which the message may have gone out: resent only by a sender told to.
META_MAYBE_DELIVERED = frozenset({1357046})

RECIPIENT_DELAY_SECONDS: Mapping[int, float] = MappingProxyType(
    {
        # One message every 6 s to the same user, with bursts of up to 45 paid back at that
        # rate: 45 x 6 s = 270 s repays the longest burst, so the retry should pass.
        131056: 300.0,
        # The per-user marketing cap counts every business's marketing messages over about a
        # day, and Meta advises retrying in growing steps rather than at once; 6 h spreads the
        # default five attempts over the day the cap lasts.
        131049: 6 * 3600.0,
    }
)

# Waits longer than this are capped, like Retry-After (see outcomes.parse_retry_after): the
# sender comes back and asks again rather than sleeping on one header for a day.
MAX_WAIT_SECONDS = 3600.0
USAGE_HEADERS = ("X-Business-Use-Case-Usage", "X-App-Usage", "X-Page-Usage")


def classify_meta(status: int, body: bytes, headers: Mapping[str, str]) -> SendResult:
    """One Graph API answer (Cloud API or Send API) as a result; pure, never raises."""
    payload = parse_json(body)
    if 200 <= status < 300:
        # Meta takes no idempotency key: a 2xx must never be sent again, even when its body
        # cannot be read; the message is sent, its id unknown.
        message_id = meta_message_id(payload)
        if message_id is None:
            return sent_without_id(status)
        return SendResult(ResultKind.SENT, provider_message_id=message_id)
    error = payload.get("error") if isinstance(payload, dict) else None
    code = integer_code(error.get("code")) if isinstance(error, dict) else None
    if not isinstance(error, dict) or code is None:
        bare = classify_bare_status(status, headers)
        if bare.kind is ResultKind.THROTTLED:
            return _throttled(bare.error_code or "", bare.error_message or "", headers)
        return bare
    subcode = integer_code(error.get("error_subcode"))
    kind, decided_by = meta_class(code, subcode)
    if kind is ResultKind.UNKNOWN:
        # A code the tables do not know: the status still says what it says unambiguously
        # (a proxy's {"error": {"code": 429}}, a new rate-limit code), as for Twilio.
        kind = _K.THROTTLED if status == 429 else _K.TRANSIENT if status >= 500 else kind
    message = describe(code, _error_text(error))
    if kind is ResultKind.THROTTLED:
        return _throttled(str(decided_by), message, headers)
    return SendResult(
        kind,
        error_code=str(decided_by),
        error_message=message,
        retry_after_seconds=RECIPIENT_DELAY_SECONDS.get(decided_by) if kind is _K.RECIPIENT_DELAY else None,
        maybe_delivered=decided_by in META_MAYBE_DELIVERED or gateway_in_doubt(status, kind),
    )


def meta_class(code: int, subcode: int | None) -> tuple[ResultKind, int]:
    """The class of ``(code, subcode)`` and the number that decided it."""
    if subcode is not None and subcode in META_SUBCODES:
        return META_SUBCODES[subcode], subcode
    if code in META_CODES:
        return META_CODES[code], code
    if code in META_PERMISSION_RANGE:
        return ResultKind.SENDER_FATAL, code
    # SDKs and proxies sometimes flatten Messenger's subcode into the code.
    if code in META_SUBCODES:
        return META_SUBCODES[code], code
    return ResultKind.UNKNOWN, code


def meta_message_id(payload: Any) -> str | None:
    """The WhatsApp ``messages[0].id`` (a wamid) or the Send API's ``message_id``."""
    if not isinstance(payload, dict):
        return None
    messages = payload.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[0], dict):
        return text_id(messages[0].get("id"))
    return text_id(payload.get("message_id"))


def _error_text(error: Mapping[str, Any]) -> str:
    text = short_text(error.get("message"))
    error_data = error.get("error_data")
    details = short_text(error_data.get("details")) if isinstance(error_data, dict) else ""
    if details and details not in text:
        return f"{text}: {details}" if text else details
    return text


def _throttled(code: str, message: str, headers: Mapping[str, str]) -> SendResult:
    return SendResult(
        ResultKind.THROTTLED, error_code=code, error_message=message, retry_after_seconds=meta_wait(headers)
    )


def meta_wait(headers: Mapping[str, str]) -> float | None:
    """The longest wait any of Retry-After and Meta's usage headers asks for, in seconds."""
    waits = [parse_retry_after(headers.get("Retry-After"))]
    for name in USAGE_HEADERS:
        waits.extend(_usage_waits(headers.get(name)))
    known = [wait for wait in waits if wait is not None and wait > 0]
    return min(max(known), MAX_WAIT_SECONDS) if known else None


def _usage_waits(value: str | None) -> list[float]:
    """``estimated_time_to_regain_access`` (minutes) wherever it appears in a usage header.

    X-Business-Use-Case-Usage maps business ids to lists of usage objects; X-App-Usage and
    X-Page-Usage are one flat object. Anything else is ignored: a header never breaks a send.
    """
    if not value:
        return []
    try:
        usage = orjson.loads(value)
    except orjson.JSONDecodeError:
        return []
    objects: list[Any] = [usage]
    if isinstance(usage, dict):
        for entry in usage.values():
            objects.extend(entry if isinstance(entry, list) else [entry])
    waits = []
    for item in objects:
        if isinstance(item, dict):
            minutes = item.get("estimated_time_to_regain_access")
            if isinstance(minutes, (int, float)) and not isinstance(minutes, bool) and minutes == minutes:
                waits.append(min(float(minutes) * 60.0, MAX_WAIT_SECONDS))
    return waits
