"""Pure decisions about a send's result: what the recipient becomes, and when it is retried.

No I/O here; the dispatcher applies these decisions in batches.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any


class ResultKind(enum.StrEnum):
    """What one send's answer means, and so at which scope campaignd reacts (README "Providers")."""

    SENT = "sent"
    # Worth retrying this recipient later, with backoff; spends an attempt.
    TRANSIENT = "transient"
    # The provider asks the whole sender to slow down; the recipient is retried unspent.
    THROTTLED = "throttled"
    # Only this recipient must wait (per-user pair rate or marketing cap); others go on.
    RECIPIENT_DELAY = "recipient_delay"
    # This recipient can never succeed (bad number, blocked user...); the campaign goes on.
    RECIPIENT_PERMANENT = "recipient_permanent"
    # The sender itself is rejected (bad token, no permission, blocked account): pause the
    # sender and all its campaigns.
    SENDER_FATAL = "sender_fatal"
    # The campaign's message cannot be sent (missing or paused template...): pause that campaign.
    CAMPAIGN_FATAL = "campaign_fatal"
    # An error the tables do not know: retried a few times; the circuit breaker watches it.
    UNKNOWN = "unknown"
    # Nothing was sent: the recipient cannot be sent to (invalid address, bad variables).
    SKIPPED = "skipped"


# SendResult and RecipientUpdate are made for every message: not frozen, because a frozen
# dataclass's __init__ sets each field through object.__setattr__ and costs three times as
# much. Nothing changes one after construction (decide() and the transport use replace()).
@dataclass(slots=True)
class SendResult:
    kind: ResultKind
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after_seconds: float | None = None
    # The request left but no answer came back (timeout, connection lost mid-request): the
    # provider may have delivered it. Only a provider that deduplicates may be sent it again.
    maybe_delivered: bool = False


class RecipientState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"


@dataclass(slots=True)
class RecipientUpdate:
    """What an in-flight recipient becomes; the columns of ``record_outcomes``."""

    recipient_id: int
    state: RecipientState
    provider_message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    # For PENDING: seconds from now until the recipient may be claimed again.
    retry_in_seconds: float | None = None
    # -1 gives back the attempt its claim took (throttling, lost claims, sender pauses).
    attempt_adjust: int = 0
    # What kind of result led here, for metrics: a ResultKind value, "released" or "in_doubt".
    error_class: str = "none"
    # The lane's number of the claim this outcome was decided for, on an outcome that leaves
    # the recipient pending (see record_outcomes); the lane fills it in.
    claim: int | None = None
    # This send may have reached the provider (its request left, no answer came back): kept on
    # the row for good (recipients.maybe_delivered), whatever later attempts make of it.
    maybe_delivered: bool = False


OutcomeColumns = tuple[
    list[int],
    list[RecipientState] | None,
    list[str | None] | None,
    list[str | None] | None,
    list[str | None] | None,
    list[float | None] | None,
    list[int] | None,
    list[int | None] | None,
    list[bool] | None,
]


def outcome_columns(batch: Sequence[RecipientUpdate]) -> OutcomeColumns:
    """``record_outcomes``' parallel arrays, from recipient id to whether it may have been delivered.

    A column that holds only its default (no retry delays in a batch of sends that all
    succeeded, and every state ``sent``) goes as NULL, which the statement's ``unnest`` pads
    back out with NULLs, read as the default: asyncpg checks every element of an array it
    encodes with a Python-level ``isinstance``, which costs more per message than the row's
    other columns.
    """

    def unless_empty(column: list[Any], empty: Any = None) -> list[Any] | None:
        return None if column.count(empty) == len(column) else column

    return (
        [u.recipient_id for u in batch],
        unless_empty([u.state for u in batch], RecipientState.SENT),
        unless_empty([u.provider_message_id for u in batch]),
        unless_empty([u.error_code for u in batch]),
        unless_empty([u.error_message for u in batch]),
        unless_empty([u.retry_in_seconds for u in batch]),
        unless_empty([u.attempt_adjust for u in batch], 0),
        unless_empty([u.claim for u in batch]),
        unless_empty([u.maybe_delivered for u in batch], False),
    )


THROTTLE_DEFAULT_SECONDS = 1.0
RECIPIENT_DELAY_DEFAULT_SECONDS = 60.0
UNKNOWN_ATTEMPTS = 3
ERROR_MESSAGE_LIMIT = 500


def backoff_seconds(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    The fixed half keeps retries from coming back almost at once; the random half spreads
    a wave of failures (one provider blip hitting thousands of recipients) over time.
    """
    ceiling = min(cap, base * 2.0 ** max(attempt - 1, 0))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)


def _clip(message: str | None) -> str | None:
    if message is None or len(message) <= ERROR_MESSAGE_LIMIT:
        return message
    return message[: ERROR_MESSAGE_LIMIT - 1] + "…"


def decide(
    recipient_id: int,
    result: SendResult,
    *,
    attempts: int,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    rng: random.Random,
    resend_in_doubt: bool = True,
    last_error: str | None = None,
    last_message: str | None = None,
) -> RecipientUpdate:
    """The recipient's next state after one send; ``attempts`` includes this one.

    ``resend_in_doubt`` is the sender's: false for a provider that cannot deduplicate a resend.
    ``last_error`` and ``last_message``: the error the recipient carried when it was claimed.
    """
    if result.kind is ResultKind.SENT:
        if result.error_code is None:
            # Every accepted message: kept as short as it was (decide runs for each).
            return RecipientUpdate(
                recipient_id, RecipientState.SENT, provider_message_id=result.provider_message_id
            )
        # A sent answer's code is a note about it (answers.sent_without_id), kept on the row.
        return RecipientUpdate(
            recipient_id,
            RecipientState.SENT,
            provider_message_id=result.provider_message_id,
            error_code=result.error_code,
            error_message=_clip(result.error_message),
        )
    if result.maybe_delivered and not resend_in_doubt:
        # The request may have been delivered: retrying could deliver it twice.
        return in_doubt(recipient_id, resend=False)
    message = _clip(result.error_message)
    update = _decide(
        recipient_id,
        result,
        message,
        attempts,
        max_attempts,
        backoff_base,
        backoff_max,
        rng,
        (last_error, last_message),
    )
    return replace(update, error_class=result.kind.value, maybe_delivered=result.maybe_delivered)


def _decide(
    recipient_id: int,
    result: SendResult,
    message: str | None,
    attempts: int,
    max_attempts: int,
    backoff_base: float,
    backoff_max: float,
    rng: random.Random,
    last_error: tuple[str | None, str | None],
) -> RecipientUpdate:
    match result.kind:
        case ResultKind.SKIPPED:
            return RecipientUpdate(
                recipient_id, RecipientState.SKIPPED, error_code=result.error_code, error_message=message
            )
        case ResultKind.RECIPIENT_PERMANENT:
            return RecipientUpdate(
                recipient_id, RecipientState.FAILED, error_code=result.error_code, error_message=message
            )
        case ResultKind.TRANSIENT | ResultKind.UNKNOWN | ResultKind.RECIPIENT_DELAY:
            # An error nobody has classified is retried, but only a few times: a permanent
            # error in disguise must not cost every recipient max_attempts requests. A
            # recipient the provider keeps deferring spends attempts too, and ends failed.
            limit = min(max_attempts, UNKNOWN_ATTEMPTS) if result.kind is ResultKind.UNKNOWN else max_attempts
            if attempts >= limit:
                return _gave_up(recipient_id, result, message, attempts)
            if result.kind is ResultKind.RECIPIENT_DELAY:
                retry_in = result.retry_after_seconds or RECIPIENT_DELAY_DEFAULT_SECONDS
            else:
                retry_in = backoff_seconds(attempts, backoff_base, backoff_max, rng)
            return RecipientUpdate(
                recipient_id,
                RecipientState.PENDING,
                error_code=result.error_code,
                error_message=message,
                retry_in_seconds=retry_in,
            )
        case ResultKind.THROTTLED:
            return RecipientUpdate(
                recipient_id,
                RecipientState.PENDING,
                error_code=result.error_code,
                error_message=message,
                retry_in_seconds=result.retry_after_seconds or THROTTLE_DEFAULT_SECONDS,
                attempt_adjust=-1,
            )
        case ResultKind.SENDER_FATAL | ResultKind.CAMPAIGN_FATAL:
            # Not this recipient's fault, the first time: it waits, unspent, for the sender or
            # campaign to be resumed, and is sent first then. The same verdict on it again
            # after a resume may be its own (a per-recipient error the tables take for the
            # sender's), which would pause everything at every resume: then it spends its
            # attempts, and after a few ends failed, so that the campaign can go on.
            # Code and message alike: a provider that gives every error one code (the generic
            # http provider's) must not make a transient failure look like this verdict.
            repeated = last_error[0] is not None and last_error == (result.error_code, message)
            if repeated and attempts >= min(max_attempts, UNKNOWN_ATTEMPTS):
                return _gave_up(recipient_id, result, message, attempts)
            return RecipientUpdate(
                recipient_id,
                RecipientState.PENDING,
                error_code=result.error_code,
                error_message=message,
                retry_in_seconds=0.0,
                attempt_adjust=0 if repeated else -1,
            )
    raise AssertionError(f"unhandled result kind {result.kind}")


def _gave_up(recipient_id: int, result: SendResult, message: str | None, attempts: int) -> RecipientUpdate:
    return RecipientUpdate(
        recipient_id,
        RecipientState.FAILED,
        error_code=result.error_code,
        error_message=_clip(f"gave up after {attempts} attempts: {message or result.error_code}"),
    )


def internal_error(exc: BaseException, *, request_started: bool) -> SendResult:
    """A bug in the send path, not a provider answer: retried, spending an attempt so that it
    cannot loop forever. Once its request had left, the provider may have the message: in
    doubt, so a sender that cannot resend safely does not resend it."""
    return SendResult(
        ResultKind.TRANSIENT,
        error_code="internal_error",
        error_message=type(exc).__name__,
        maybe_delivered=request_started,
    )


def released(recipient_id: int) -> RecipientUpdate:
    """A claim given back unsent (shutdown, pause, lost lease): due again at once, attempt returned."""
    return RecipientUpdate(
        recipient_id, RecipientState.PENDING, retry_in_seconds=0.0, attempt_adjust=-1, error_class="released"
    )


def in_doubt(recipient_id: int, *, resend: bool) -> RecipientUpdate:
    """A send that was cut off after its request may have reached the provider."""
    reason = "the send was interrupted; whether the provider received it is unknown"
    if resend:
        return RecipientUpdate(
            recipient_id,
            RecipientState.PENDING,
            error_code="in_doubt",
            error_message=reason,
            retry_in_seconds=0.0,
            attempt_adjust=-1,
            error_class="in_doubt",
            maybe_delivered=True,
        )
    return RecipientUpdate(
        recipient_id,
        RecipientState.FAILED,
        error_code="in_doubt",
        error_message=reason,
        error_class="in_doubt",
        maybe_delivered=True,
    )


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as delay-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    # A provider asking for hours is almost certainly confused; cap so a sender never
    # sleeps for a day on one header, and never negative.
    return min(max(seconds, 0.0), 3600.0)
