"""Pure decisions in campaignd.outcomes: next recipient state, backoff, Retry-After parsing."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from campaignd.outcomes import (
    ERROR_MESSAGE_LIMIT,
    RECIPIENT_DELAY_DEFAULT_SECONDS,
    THROTTLE_DEFAULT_SECONDS,
    UNKNOWN_ATTEMPTS,
    RecipientState,
    RecipientUpdate,
    ResultKind,
    SendResult,
    backoff_seconds,
    decide,
    in_doubt,
    internal_error,
    outcome_columns,
    parse_retry_after,
    released,
)

BASE = 2.0
CAP = 300.0
MAX_ATTEMPTS = 5


def _decide(
    result: SendResult,
    *,
    attempts: int = 1,
    seed: int = 0,
    resend_in_doubt: bool = True,
    last_error: str | None = None,
    last_message: str | None = None,
) -> RecipientUpdate:
    return decide(
        42,
        result,
        attempts=attempts,
        max_attempts=MAX_ATTEMPTS,
        backoff_base=BASE,
        backoff_max=CAP,
        rng=random.Random(seed),
        resend_in_doubt=resend_in_doubt,
        last_error=last_error,
        last_message=last_message,
    )


# ----------------------------------------------------------------- decide()


def test_sent_keeps_provider_message_id() -> None:
    update = _decide(SendResult(ResultKind.SENT, provider_message_id="m-1"))

    assert update == RecipientUpdate(42, RecipientState.SENT, provider_message_id="m-1")


def test_a_send_accepted_without_an_id_is_sent_and_keeps_its_note() -> None:
    note = SendResult(ResultKind.SENT, error_code="sent_without_id", error_message="HTTP 200 without an id")

    update = _decide(note, resend_in_doubt=False)

    assert update == RecipientUpdate(
        42, RecipientState.SENT, error_code="sent_without_id", error_message="HTTP 200 without an id"
    )


@pytest.mark.parametrize("kind", [ResultKind.SENDER_FATAL, ResultKind.CAMPAIGN_FATAL])
def test_the_same_verdict_on_a_recipient_after_a_resume_spends_its_attempts(kind: ResultKind) -> None:
    verdict = SendResult(kind, error_code="2018108", error_message="(#10) not receiving messages")

    said = "(#10) not receiving messages"
    first = _decide(verdict, attempts=1, last_error=None)
    other = _decide(verdict, attempts=1, last_error="131000", last_message=said)
    # A provider that gives every error one code: a transient failure before is not this verdict.
    transient = _decide(verdict, attempts=2, last_error="2018108", last_message="HTTP 503: busy")
    again = _decide(verdict, attempts=2, last_error="2018108", last_message=said)
    last = _decide(verdict, attempts=3, last_error="2018108", last_message=said)

    # The first time, and after another error, it was not the recipient's: unspent.
    assert (first.state, first.attempt_adjust, first.retry_in_seconds) == (RecipientState.PENDING, -1, 0.0)
    assert other.attempt_adjust == -1
    assert (transient.state, transient.attempt_adjust) == (RecipientState.PENDING, -1)
    # Again after a resume: spent, and after a few the recipient ends failed, not the campaign.
    assert (again.state, again.attempt_adjust) == (RecipientState.PENDING, 0)
    assert (last.state, last.error_code) == (RecipientState.FAILED, "2018108")
    assert last.error_message == "gave up after 3 attempts: (#10) not receiving messages"


def test_unknown_error_is_retried_but_only_up_to_three_attempts() -> None:
    unknown = SendResult(ResultKind.UNKNOWN, error_code="135000", error_message="Generic user error")

    retried = _decide(unknown, attempts=2)
    gave_up = _decide(unknown, attempts=UNKNOWN_ATTEMPTS)

    assert MAX_ATTEMPTS > UNKNOWN_ATTEMPTS, "the test needs the general limit to be higher"
    assert retried.state is RecipientState.PENDING and retried.retry_in_seconds is not None
    assert gave_up.state is RecipientState.FAILED
    assert gave_up.error_message == "gave up after 3 attempts: Generic user error"
    assert gave_up.error_class == "unknown"


def test_recipient_delay_waits_as_told_and_spends_the_attempt() -> None:
    delayed = _decide(
        SendResult(ResultKind.RECIPIENT_DELAY, error_code="131056", retry_after_seconds=300.0), attempts=1
    )
    default = _decide(SendResult(ResultKind.RECIPIENT_DELAY, error_code="131056"), attempts=1)
    last = _decide(SendResult(ResultKind.RECIPIENT_DELAY, error_code="131056"), attempts=MAX_ATTEMPTS)

    assert (delayed.state, delayed.retry_in_seconds, delayed.attempt_adjust) == (
        RecipientState.PENDING,
        300.0,
        0,
    )
    assert default.retry_in_seconds == RECIPIENT_DELAY_DEFAULT_SECONDS
    assert last.state is RecipientState.FAILED


def test_maybe_delivered_send_is_in_doubt_when_the_sender_cannot_deduplicate() -> None:
    timeout = SendResult(ResultKind.TRANSIENT, error_code="timeout", maybe_delivered=True)
    refused = SendResult(ResultKind.TRANSIENT, error_code="connection_error")
    no_key = _decide(timeout, resend_in_doubt=False)
    assert (no_key.state, no_key.error_code, no_key.error_class) == (
        RecipientState.FAILED,
        "in_doubt",
        "in_doubt",
    )
    # With an idempotency key the resend is safe; a connection never made carried nothing.
    assert _decide(timeout, resend_in_doubt=True).state is RecipientState.PENDING
    assert _decide(refused, resend_in_doubt=False).state is RecipientState.PENDING


def test_a_bug_after_the_request_left_is_in_doubt_not_a_plain_retry() -> None:
    """A sender that cannot resend safely must not resend a message the provider may have,
    whatever cut the send short, a bug in campaignd included."""

    def decided(request_started: bool, *, resend_in_doubt: bool) -> RecipientUpdate:
        bug = internal_error(KeyError("x"), request_started=request_started)
        return _decide(bug, resend_in_doubt=resend_in_doubt)

    left = decided(True, resend_in_doubt=False)
    assert (left.state, left.error_code) == (RecipientState.FAILED, "in_doubt")
    assert decided(True, resend_in_doubt=True).state is RecipientState.PENDING
    before = decided(False, resend_in_doubt=False)
    assert (before.state, before.error_code, before.error_message) == (
        RecipientState.PENDING,
        "internal_error",
        "KeyError",
    )


@pytest.mark.parametrize("kind", [ResultKind.SENDER_FATAL, ResultKind.CAMPAIGN_FATAL])
def test_sender_or_campaign_verdict_gives_the_recipient_back_unspent(kind: ResultKind) -> None:
    update = _decide(SendResult(kind, error_code="132001", error_message="no such template"), attempts=1)

    assert (update.state, update.retry_in_seconds, update.attempt_adjust) == (RecipientState.PENDING, 0.0, -1)
    assert update.error_class == kind.value


def test_permanent_fails_with_code_and_message() -> None:
    update = _decide(
        SendResult(ResultKind.RECIPIENT_PERMANENT, error_code="bad_number", error_message="no such number")
    )

    assert update.state is RecipientState.FAILED
    assert (update.error_code, update.error_message) == ("bad_number", "no such number")
    assert update.retry_in_seconds is None
    assert update.attempt_adjust == 0


@pytest.mark.parametrize("attempts", [1, 2, 3, 4])
def test_transient_below_max_attempts_retries_within_backoff_ceiling(attempts: int) -> None:
    update = _decide(
        SendResult(ResultKind.TRANSIENT, error_code="http_500", error_message="HTTP 500"), attempts=attempts
    )

    ceiling = min(CAP, BASE * 2 ** (attempts - 1))
    assert update.state is RecipientState.PENDING
    assert update.error_code == "http_500"
    assert update.error_message == "HTTP 500"
    assert update.attempt_adjust == 0
    assert update.retry_in_seconds is not None
    assert ceiling / 2 <= update.retry_in_seconds <= ceiling


def test_transient_retry_delay_matches_backoff_seconds_for_same_rng() -> None:
    update = _decide(SendResult(ResultKind.TRANSIENT, error_code="timeout"), attempts=3, seed=7)

    assert update.retry_in_seconds == backoff_seconds(3, BASE, CAP, random.Random(7))


@pytest.mark.parametrize("attempts", [MAX_ATTEMPTS, MAX_ATTEMPTS + 3])
def test_transient_at_max_attempts_gives_up(attempts: int) -> None:
    update = _decide(
        SendResult(ResultKind.TRANSIENT, error_code="timeout", error_message="provider did not answer"),
        attempts=attempts,
    )

    assert update.state is RecipientState.FAILED
    assert update.error_code == "timeout"
    assert update.error_message is not None
    assert update.error_message.startswith(f"gave up after {attempts} attempts")
    assert "provider did not answer" in update.error_message
    assert update.retry_in_seconds is None


def test_transient_give_up_without_message_names_the_code() -> None:
    update = _decide(SendResult(ResultKind.TRANSIENT, error_code="connection_error"), attempts=MAX_ATTEMPTS)

    assert update.error_message == f"gave up after {MAX_ATTEMPTS} attempts: connection_error"


def test_throttled_retry_spends_no_attempt_and_honours_retry_after() -> None:
    update = _decide(
        SendResult(ResultKind.THROTTLED, error_code="rate_limited", retry_after_seconds=7.5), attempts=3
    )

    assert update.state is RecipientState.PENDING
    assert update.attempt_adjust == -1
    assert update.retry_in_seconds == 7.5
    assert update.error_code == "rate_limited"


def test_throttled_at_max_attempts_is_still_retried() -> None:
    update = _decide(SendResult(ResultKind.THROTTLED, retry_after_seconds=1.0), attempts=MAX_ATTEMPTS)

    assert update.state is RecipientState.PENDING
    assert update.attempt_adjust == -1


def test_throttled_without_retry_after_uses_default_delay() -> None:
    update = _decide(SendResult(ResultKind.THROTTLED, error_code="rate_limited"))

    assert update.retry_in_seconds == THROTTLE_DEFAULT_SECONDS
    assert update.attempt_adjust == -1


def test_sender_fatal_keeps_recipient_pending_unspent_and_due_at_once() -> None:
    update = _decide(
        SendResult(ResultKind.SENDER_FATAL, error_code="http_401", error_message="bad token"),
        attempts=MAX_ATTEMPTS,
    )

    assert update.state is RecipientState.PENDING
    assert update.attempt_adjust == -1
    assert update.retry_in_seconds == 0.0
    assert update.error_code == "http_401"


def test_skipped_stays_skipped_with_reason() -> None:
    update = _decide(SendResult(ResultKind.SKIPPED, error_code="invalid_address", error_message="empty"))

    assert update == RecipientUpdate(
        42, RecipientState.SKIPPED, error_code="invalid_address", error_message="empty", error_class="skipped"
    )


@pytest.mark.parametrize(
    ("kind", "attempts"),
    [
        (ResultKind.RECIPIENT_PERMANENT, 1),
        (ResultKind.SKIPPED, 1),
        (ResultKind.TRANSIENT, 1),
        (ResultKind.TRANSIENT, MAX_ATTEMPTS),
        (ResultKind.THROTTLED, 1),
        (ResultKind.SENDER_FATAL, 1),
    ],
)
def test_long_error_message_is_clipped_to_limit(kind: ResultKind, attempts: int) -> None:
    long_message = "x" * (ERROR_MESSAGE_LIMIT * 3)

    update = _decide(SendResult(kind, error_code="e", error_message=long_message), attempts=attempts)

    assert update.error_message is not None
    assert len(update.error_message) == ERROR_MESSAGE_LIMIT
    assert update.error_message.endswith("…")


def test_message_at_exactly_the_limit_is_not_clipped() -> None:
    message = "y" * ERROR_MESSAGE_LIMIT

    update = _decide(SendResult(ResultKind.RECIPIENT_PERMANENT, error_code="e", error_message=message))

    assert update.error_message == message


# ----------------------------------------------------------------- backoff_seconds()


def test_backoff_ceiling_grows_exponentially_then_caps() -> None:
    # With a fixed rng, the fraction of the random half is the same for every call.
    delays = [backoff_seconds(attempt, 1.0, 16.0, random.Random(3)) for attempt in range(1, 9)]

    fraction = random.Random(3).uniform(0, 1)
    expected_ceilings = [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0, 16.0]
    for delay, ceiling in zip(delays, expected_ceilings, strict=True):
        assert delay == pytest.approx(ceiling / 2 + fraction * ceiling / 2)


def test_backoff_is_jittered_between_runs() -> None:
    rng = random.Random(11)

    delays = {backoff_seconds(4, 1.0, 100.0, rng) for _ in range(50)}

    assert len(delays) > 40
    assert min(delays) >= 4.0
    assert max(delays) <= 8.0


def test_backoff_attempt_zero_uses_base_as_ceiling() -> None:
    assert 0.5 <= backoff_seconds(0, 1.0, 10.0, random.Random(0)) <= 1.0


@given(
    attempt=st.integers(min_value=1, max_value=200),
    base=st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False),
    extra=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_backoff_is_between_half_and_full_capped_ceiling(
    attempt: int, base: float, extra: float, seed: int
) -> None:
    cap = base + extra
    ceiling = min(cap, base * 2 ** (attempt - 1))

    delay = backoff_seconds(attempt, base, cap, random.Random(seed))

    assert ceiling / 2 <= delay <= ceiling


# ----------------------------------------------------------------- released() / in_doubt()


def test_released_claim_is_due_at_once_with_attempt_returned() -> None:
    assert released(9) == RecipientUpdate(
        9, RecipientState.PENDING, retry_in_seconds=0.0, attempt_adjust=-1, error_class="released"
    )


def test_in_doubt_with_resend_goes_back_to_pending_unspent() -> None:
    update = in_doubt(9, resend=True)

    assert update.state is RecipientState.PENDING
    assert update.error_code == "in_doubt"
    assert update.retry_in_seconds == 0.0
    assert update.attempt_adjust == -1


def test_in_doubt_without_resend_fails_the_recipient() -> None:
    update = in_doubt(9, resend=False)

    assert update.state is RecipientState.FAILED
    assert update.error_code == "in_doubt"
    assert update.error_message
    assert update.retry_in_seconds is None
    assert update.attempt_adjust == 0


# ----------------------------------------------------------------- parse_retry_after()

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("0.25", 0.25),
        ("-3", 0.0),
        ("86400", 3600.0),
        ("1e12", 3600.0),
        ("inf", 3600.0),
    ],
)
def test_retry_after_seconds_are_parsed_and_bounded(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date_is_seconds_from_now() -> None:
    value = format_datetime(NOW + timedelta(seconds=30), usegmt=True)

    assert parse_retry_after(value, NOW) == pytest.approx(30.0)


def test_retry_after_literal_http_date() -> None:
    now = datetime(2015, 10, 21, 7, 27, 0, tzinfo=UTC)

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now) == pytest.approx(60.0)


def test_retry_after_past_http_date_is_zero() -> None:
    value = format_datetime(NOW - timedelta(minutes=5), usegmt=True)

    assert parse_retry_after(value, NOW) == 0.0


def test_retry_after_far_future_http_date_is_capped() -> None:
    value = format_datetime(NOW + timedelta(days=2), usegmt=True)

    assert parse_retry_after(value, NOW) == 3600.0


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "nan", "NaN", "12 seconds", "Wed, 99 Foo"])
def test_retry_after_absent_or_unreadable_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@pytest.mark.parametrize("kind", [k for k in ResultKind if k is not ResultKind.SENT])
def test_every_failure_carries_its_error_class_for_metrics(kind: ResultKind) -> None:
    update = _decide(SendResult(kind, error_code="x", retry_after_seconds=1.0))

    assert update.error_class == kind.value


def test_in_doubt_outcomes_are_classed_in_doubt() -> None:
    assert in_doubt(1, resend=True).error_class == "in_doubt"
    assert in_doubt(1, resend=False).error_class == "in_doubt"


def test_outcome_columns_send_empty_columns_as_null() -> None:
    sent = [
        RecipientUpdate(1, RecipientState.SENT, provider_message_id="m1"),
        RecipientUpdate(2, RecipientState.SENT),
    ]
    assert outcome_columns(sent) == (
        [1, 2],
        None,
        ["m1", None],
        None,
        None,
        None,
        None,
        None,
        None,
    )


def test_outcome_columns_keep_every_value_of_a_column_that_has_one() -> None:
    batch = [
        RecipientUpdate(1, RecipientState.SENT, provider_message_id="m1"),
        released(2),
        RecipientUpdate(3, RecipientState.FAILED, error_code="131026", error_message="undeliverable"),
        in_doubt(4, resend=True),
    ]
    batch[1].claim = 7
    batch[3].claim = 8
    ids, states, message_ids, codes, messages, retry_in, adjust, claims, maybe_delivered = outcome_columns(
        batch
    )
    assert ids == [1, 2, 3, 4]
    pending, sent, failed = RecipientState.PENDING, RecipientState.SENT, RecipientState.FAILED
    assert states == [sent, pending, failed, pending]
    assert message_ids == ["m1", None, None, None]
    assert codes == [None, None, "131026", "in_doubt"]
    assert messages[:3] == [None, None, "undeliverable"]
    assert retry_in == [None, 0.0, None, 0.0]
    assert adjust == [0, -1, 0, -1]
    assert claims == [None, 7, None, 8]
    assert maybe_delivered == [False, False, False, True]


def test_every_send_that_may_have_been_delivered_says_so_for_the_row_to_keep() -> None:
    timeout = SendResult(ResultKind.TRANSIENT, error_code="timeout", maybe_delivered=True)
    # Resent (pending) or given up (failed), the row must remember it: a later attempt's
    # answer overwrites the error code, and a cancel then took it for never sent.
    assert _decide(timeout, resend_in_doubt=True).maybe_delivered
    assert _decide(timeout, resend_in_doubt=False).maybe_delivered
    assert _decide(timeout, attempts=MAX_ATTEMPTS).state is RecipientState.FAILED
    assert _decide(timeout, attempts=MAX_ATTEMPTS).maybe_delivered
    assert in_doubt(1, resend=True).maybe_delivered
    assert in_doubt(1, resend=False).maybe_delivered
    bug = internal_error(RuntimeError("x"), request_started=True)
    assert _decide(bug, resend_in_doubt=True).maybe_delivered
    # Nothing left, or an answer came: not in doubt.
    assert not _decide(internal_error(RuntimeError("x"), request_started=False)).maybe_delivered
    assert not _decide(SendResult(ResultKind.TRANSIENT, error_code="http_503")).maybe_delivered
    assert not _decide(SendResult(ResultKind.SENT, provider_message_id="m")).maybe_delivered
    assert not released(1).maybe_delivered
