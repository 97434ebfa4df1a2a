"""The circuit breaker's decisions, without I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from campaignd.breaker import FailureBreaker
from campaignd.outcomes import ResultKind, SendResult

SENT = SendResult(ResultKind.SENT, provider_message_id="m")
GENERIC = SendResult(ResultKind.UNKNOWN, error_code="135000", error_message="(#135000) Generic user error")
BAD_NUMBER = SendResult(ResultKind.RECIPIENT_PERMANENT, error_code="131026", error_message="Undeliverable")
THROTTLED = SendResult(ResultKind.THROTTLED, error_code="130429", error_message="Rate limit hit")
SKIPPED = SendResult(ResultKind.SKIPPED, error_code="invalid_address", error_message="bad")


def _breaker(consecutive: int = 20, window: int = 100, ratio: float = 0.9) -> FailureBreaker:
    return FailureBreaker("whatsapp", consecutive=consecutive, window=window, ratio=ratio)


def _feed(breaker: FailureBreaker, results: list[SendResult]) -> list[str | None]:
    return [breaker.record(result) for result in results]


def test_twenty_consecutive_failures_with_one_code_trip_with_a_readable_reason() -> None:
    reasons = _feed(_breaker(), [GENERIC] * 20)

    assert reasons[:19] == [None] * 19
    assert reasons[19] == "20 consecutive failures with whatsapp error 135000 (Generic user error)"


def test_sends_accepted_without_a_message_id_trip_it_by_their_note() -> None:
    # An api_base pointing at a web server answers 200 to everything: every recipient is
    # "sent" (no resend without an idempotency key), and the campaign must stop there.
    accepted_blindly = SendResult(
        ResultKind.SENT,
        error_code="sent_without_id",
        error_message="HTTP 200 accepted the request without naming a message id",
    )

    reasons = _feed(_breaker(), [accepted_blindly] * 20)

    assert reasons[:19] == [None] * 19
    assert reasons[19] == (
        "20 consecutive failures with whatsapp error sent_without_id"
        " (HTTP 200 accepted the request without naming a message id)"
    )
    # A send with its id is a success, and ends the streak.
    streak_broken = [accepted_blindly] * 19 + [SENT] + [accepted_blindly] * 19
    assert _feed(_breaker(window=0), streak_broken) == [None] * 39


def test_a_success_resets_the_streak() -> None:
    breaker = _breaker(window=0)

    assert _feed(breaker, [GENERIC] * 19 + [SENT] + [GENERIC] * 19) == [None] * 39
    assert breaker.record(GENERIC) is not None


def test_a_different_code_restarts_the_streak() -> None:
    breaker = _breaker(window=0)

    assert _feed(breaker, [GENERIC] * 19 + [BAD_NUMBER] + [GENERIC] * 19) == [None] * 39


def test_throttling_and_skips_neither_count_nor_break_the_streak() -> None:
    breaker = _breaker(window=0)

    reasons = _feed(breaker, [GENERIC] * 10 + [THROTTLED, SKIPPED] * 5 + [GENERIC] * 10)

    assert reasons[-1] is not None and reasons[-1].startswith("20 consecutive failures")


def test_ninety_percent_of_the_last_hundred_trips_even_with_successes_between() -> None:
    # Nine failures, one success: never 20 in a row, but 90 of the last 100 once 100 are in.
    # The 100th result is a success (a success never trips); the 101st failure does.
    breaker = _breaker()
    results = ([BAD_NUMBER] * 9 + [SENT]) * 10 + [BAD_NUMBER]

    reasons = _feed(breaker, results)

    assert reasons[:100] == [None] * 100
    assert reasons[100] == "90 of the last 100 sends failed with whatsapp error 131026 (Undeliverable)"


def test_mixed_codes_below_the_ratio_do_not_trip() -> None:
    breaker = _breaker(consecutive=0)
    other = SendResult(ResultKind.TRANSIENT, error_code="131000", error_message="Something went wrong")

    assert _feed(breaker, [GENERIC, other] * 200) == [None] * 400


def test_zero_disables_both_rules() -> None:
    breaker = _breaker(consecutive=0, window=0)

    assert _feed(breaker, [GENERIC] * 1000) == [None] * 1000


def test_a_failure_without_code_is_named_by_its_class() -> None:
    reasons = _feed(_breaker(consecutive=3), [SendResult(ResultKind.TRANSIENT)] * 3)

    assert reasons[-1] == "3 consecutive failures with whatsapp error transient"


@given(st.lists(st.sampled_from([SENT, GENERIC, BAD_NUMBER, THROTTLED, SKIPPED]), max_size=400))
def test_trips_exactly_when_one_rule_holds(results: list[SendResult]) -> None:
    breaker = _breaker(consecutive=5, window=20, ratio=0.8)
    counted: list[str | None] = []
    for result, reason in zip(results, _feed(breaker, results), strict=True):
        if result.kind in (ResultKind.THROTTLED, ResultKind.SKIPPED):
            assert reason is None
            continue
        counted.append(None if result.kind is ResultKind.SENT else result.error_code)
        last = counted[-1]
        streak = 0
        for code in reversed(counted):
            if code is None or code != last:
                break
            streak += 1
        window = counted[-20:]
        dominated = len(window) == 20 and any(
            code is not None and window.count(code) >= 16 for code in set(window)
        )
        assert (reason is not None) == (streak >= 5 or dominated)
