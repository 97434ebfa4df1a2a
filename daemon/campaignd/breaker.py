"""The circuit breaker: a campaign whose failures are dominated by one error code is paused.

A provider that answers every send with the same error (a template it rejects, an account
problem it reports under a generic code) would otherwise fail a whole campaign one recipient at
a time, thousands of requests after the first answer said it all. Whatever class the error
has, the same code over and over means the campaign, not its recipients, is at fault.

Pure bookkeeping, no I/O: the lane feeds it every send's result and pauses the campaign when
:meth:`FailureBreaker.record` returns a reason.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass, field

from campaignd.outcomes import ResultKind, SendResult

# Results that say nothing about whether the campaign's sends can succeed: throttling is the
# sender's pace (the limiter handles it), a skip never reached the provider.
_NEUTRAL = frozenset({ResultKind.THROTTLED, ResultKind.SKIPPED})
# Meta prefixes its messages with the code the reason already names: "(#135000) Generic...".
_CODE_PREFIX = re.compile(r"^\(#\d+\)\s*")
_DESCRIPTION_LIMIT = 200


@dataclass
class FailureBreaker:
    """Trips on ``consecutive`` failures in a row with one code, or when one code holds a
    ``ratio`` share of the last ``window`` sends. A limit of 0 disables its rule."""

    provider: str
    consecutive: int
    window: int
    ratio: float
    _streak_code: str | None = None
    _streak: int = 0
    _recent: deque[str | None] = field(default_factory=deque)
    _recent_codes: Counter[str] = field(default_factory=Counter)
    _descriptions: dict[str, str] = field(default_factory=dict)

    def record(self, result: SendResult) -> str | None:
        """Account for one send; returns why the campaign should pause, or None."""
        if result.kind in _NEUTRAL:
            return None
        # A send accepted with a note (answers.sent_without_id) counts by its code: a campaign
        # whose every answer is "accepted, no id" is one nothing may have reached.
        code = result.error_code
        if code is None and result.kind is not ResultKind.SENT:
            code = result.kind.value
        if code is not None and result.error_message:
            self._descriptions[code] = _describe(result.error_message)
        if code is not None and code == self._streak_code:
            self._streak += 1
        else:
            self._streak_code, self._streak = code, (0 if code is None else 1)
        self._remember(code)
        if code is None:
            return None
        if self.consecutive and self._streak >= self.consecutive:
            return f"{self._streak} consecutive failures with {self._error(code)}"
        if self.window and len(self._recent) == self.window:
            dominant, count = self._recent_codes.most_common(1)[0]
            if count >= self.ratio * self.window:
                return f"{count} of the last {self.window} sends failed with {self._error(dominant)}"
        return None

    def _remember(self, code: str | None) -> None:
        if not self.window:
            return
        self._recent.append(code)
        if code is not None:
            self._recent_codes[code] += 1
        if len(self._recent) > self.window:
            dropped = self._recent.popleft()
            if dropped is not None:
                self._recent_codes[dropped] -= 1
                if not self._recent_codes[dropped]:
                    del self._recent_codes[dropped]

    def _error(self, code: str) -> str:
        description = self._descriptions.get(code)
        text = f"{self.provider} error {code}"
        return f"{text} ({description})" if description else text


def _describe(message: str) -> str:
    text = _CODE_PREFIX.sub("", message).strip()
    if len(text) > _DESCRIPTION_LIMIT:
        text = text[: _DESCRIPTION_LIMIT - 1] + "…"
    return text
