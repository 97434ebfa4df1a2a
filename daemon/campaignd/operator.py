"""Operator commands: pause, resume and cancel a campaign; list the senders and resume a paused
one; explain why a campaign does not progress (``doctor``); probe a daemon's ``/healthz``.

Each command is a thin piece of I/O around a pure decision (:func:`transition_refusal`,
:func:`diagnose`, :func:`health_url`), so the decisions are tested without a database.
Commands return an exit code: 0 done, 1 refused or a problem found.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
from rich.console import Console
from rich.table import Table
from rich.text import Text

from campaignd.sql import QUERIES

if TYPE_CHECKING:
    import asyncpg

    from campaignd.config import Settings
    from campaignd.db import Connection

PAUSED_BY_OPERATOR: Final = "paused by operator"
CANCELLED_BY_OPERATOR: Final = "campaign cancelled by operator"
# How dispatch words a provider's rejection of the sender (401/403); a campaign paused with
# such a reason was paused because of its sender, even after the sender's own reason is gone.
SENDER_REJECTED_PREFIX: Final = "provider rejected the sender"

HEALTH_TIMEOUT_SECONDS: Final = 3.0

# An error message quoted in a finding is cut here: providers return whole HTML pages.
_EXAMPLE_MAX_CHARS = 160


class OperatorError(Exception):
    """A command could not do what was asked; the message says why in plain words (exit 1)."""


# ----------------------------------------------------------------------------- output


def _console(*, stderr: bool = False) -> Console:
    # Piped output (scripts, CI logs) would otherwise be squeezed to 80 columns.
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 220)


def _say(message: str) -> None:
    _console().print(Text(message))


def _warn(message: str) -> None:
    _console(stderr=True).print(Text(f"warning: {message}", style="yellow"))


def _fail(message: str) -> int:
    print(f"campaignd: {message}", file=sys.stderr)
    return 1


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _recipients(n: int, plural_verb: str = "", singular_verb: str = "", adjective: str = "") -> str:
    """A count of recipients with a verb that agrees with it: findings read as sentences."""
    verb = plural_verb if n != 1 else singular_verb
    return f"{n} {adjective}{'recipient' if n == 1 else 'recipients'}" + (f" {verb}" if verb else "")


def _print_json(value: object) -> None:
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode())


# ----------------------------------------------------------------------------- connecting


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Connection]:
    """A connection for one command, with database trouble turned into plain words."""
    # Imported here: `healthcheck`, which Docker runs every few seconds, needs no driver.
    import asyncpg

    from campaignd import db

    redact = db.url_redactor(settings.database)
    try:
        connection = await db.connect(settings.database)
    except asyncpg.ClientConfigurationError:
        raise  # the settings' fault, not the database's: cli.main reports it, exit code 2
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OperatorError(
            f"cannot connect to the database: {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    try:
        yield connection
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.UndefinedColumnError) as exc:
        raise OperatorError(
            f"the campaignd schema is missing or out of date ({exc}): run `campaignd migrate`"
        ) from exc
    except (asyncpg.LockNotAvailableError, asyncpg.QueryCanceledError) as exc:
        # A cancel waits for a daemon preparing the campaign (seconds for millions of
        # recipients), and any command for a busy database; nothing was changed.
        raise OperatorError(
            f"the database did not answer in time ({type(exc).__name__}; [database]"
            f" lock_timeout_seconds {settings.database.lock_timeout_seconds:g},"
            f" statement_timeout_seconds {settings.database.statement_timeout_seconds:g}):"
            " a daemon may be preparing or writing this campaign; nothing was changed, try again"
        ) from exc
    finally:
        await connection.close()


# ----------------------------------------------------------------------------- campaigns

CampaignAction = Literal["pause", "resume", "cancel"]

_ALLOWED_FROM: Final[dict[CampaignAction, tuple[str, ...]]] = {
    # Not a draft: nothing is being sent, and a resume would start what the host never started.
    "pause": ("sending",),
    "resume": ("paused",),
    "cancel": ("draft", "sending", "paused"),
}
_TARGET: Final[dict[CampaignAction, str]] = {"pause": "paused", "resume": "sending", "cancel": "cancelled"}
_PAST: Final[dict[CampaignAction, str]] = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}


def transition_refusal(
    action: CampaignAction, campaign_id: str, status: str, *, held_by_sender: bool = False
) -> str | None:
    """Why ``action`` cannot apply to a campaign in ``status``; None when it can.

    ``held_by_sender``: paused with its sender, which ``resume-sender`` undoes; an operator's
    pause then takes it over, so that it stays paused when the sender is resumed.
    """
    if status in _ALLOWED_FROM[action] or (action == "pause" and held_by_sender):
        return None
    if status == _TARGET[action]:
        return f"campaign {campaign_id} is already {status}"
    if action in ("pause", "resume") and status == "draft":
        return (
            f"campaign {campaign_id} is a draft: nothing is sent until the host sets its status to"
            " 'sending'; `campaignd cancel` keeps it from ever being sent"
        )
    allowed = " or ".join(_ALLOWED_FROM[action])
    return f"campaign {campaign_id} is {status}: only a {allowed} campaign can be {_PAST[action]}"


@dataclass(frozen=True)
class CampaignRef:
    id: str
    name: str
    sender_id: str
    status: str
    status_reason: str | None
    sender_paused_reason: str | None

    @property
    def held_by_sender(self) -> bool:
        """Paused with its sender: ``resume-sender`` sends it again."""
        return (
            self.status == "paused"
            and self.status_reason is not None
            and self.status_reason == self.sender_paused_reason
        )


async def _campaign(connection: Connection, campaign_id: str) -> CampaignRef:
    row = await connection.fetchrow(QUERIES["op_campaign"], campaign_id)
    if row is None:
        raise OperatorError(f"no campaign {campaign_id}")
    return CampaignRef(
        id=str(row["id"]),
        name=row["name"],
        sender_id=row["sender_id"],
        status=row["status"],
        status_reason=row["status_reason"],
        sender_paused_reason=row["sender_paused_reason"],
    )


async def _checked(connection: Connection, action: CampaignAction, campaign_id: str) -> CampaignRef:
    campaign = await _campaign(connection, campaign_id)
    refusal = transition_refusal(action, campaign_id, campaign.status, held_by_sender=campaign.held_by_sender)
    if refusal is not None:
        raise OperatorError(refusal)
    return campaign


async def _raced(connection: Connection, action: CampaignAction, campaign_id: str) -> OperatorError:
    """The campaign changed between our read and our write (a daemon or host moved it)."""
    now = await _campaign(connection, campaign_id)
    refusal = transition_refusal(action, campaign_id, now.status, held_by_sender=now.held_by_sender)
    return OperatorError(refusal or f"campaign {campaign_id} changed while being {_PAST[action]}; try again")


async def pause_campaign(connection: Connection, campaign_id: str) -> CampaignRef:
    campaign = await _checked(connection, "pause", campaign_id)
    held_with = campaign.status_reason if campaign.held_by_sender else None
    if (
        await connection.fetchval(QUERIES["op_pause_campaign"], campaign_id, PAUSED_BY_OPERATOR, held_with)
        is None
    ):
        raise await _raced(connection, "pause", campaign_id)
    return campaign


async def resume_campaign(connection: Connection, campaign_id: str) -> CampaignRef:
    campaign = await _checked(connection, "resume", campaign_id)
    if await connection.fetchval(QUERIES["op_resume_campaign"], campaign_id) is None:
        raise await _raced(connection, "resume", campaign_id)
    return campaign


@dataclass(frozen=True)
class Cancellation:
    campaign: CampaignRef
    status: str
    cancelled: int
    in_flight: int
    # Pending resends of in-doubt sends, ended failed 'in_doubt' rather than skipped: the
    # provider may have delivered them.
    in_doubt: int


# Pending recipients a cancel ends per statement: tens of milliseconds, far below any sensible
# statement_timeout, whatever the campaign's size.
CANCEL_CHUNK = 10_000


async def cancel_campaign(connection: Connection, campaign_id: str) -> Cancellation:
    campaign = await _checked(connection, "cancel", campaign_id)
    row = await connection.fetchrow(QUERIES["op_cancel_campaign"], campaign_id, CANCELLED_BY_OPERATOR)
    if row is None:
        raise await _raced(connection, "cancel", campaign_id)
    # Its pending recipients a chunk a statement, each bounded whatever the campaign's size; a
    # cancel cut short here has cancelled the campaign all the same, and the watchdog ends the rest.
    cancelled = in_doubt = 0
    while True:
        chunk = await connection.fetchrow(
            QUERIES["op_cancel_pending"], campaign_id, CANCELLED_BY_OPERATOR, CANCEL_CHUNK
        )
        if chunk is None or not chunk["cancelled"] + chunk["in_doubt"]:
            break
        cancelled, in_doubt = cancelled + int(chunk["cancelled"]), in_doubt + int(chunk["in_doubt"])
    # Counted once the cancel has committed, in a snapshot of its own: the cancel's snapshot
    # predates the claims it waited for, and would report none of them in flight.
    in_flight = await connection.fetchval(QUERIES["op_campaign_in_flight"], campaign_id)
    return Cancellation(campaign, row["status"], cancelled, int(in_flight), in_doubt)


async def cmd_pause(settings: Settings, campaign_id: str) -> int:
    try:
        async with connected(settings) as connection:
            campaign = await pause_campaign(connection, campaign_id)
    except OperatorError as exc:
        return _fail(str(exc))
    if campaign.held_by_sender:
        _say(
            f"paused campaign {campaign_id} (was paused with its sender {campaign.sender_id}): "
            f"it stays paused when `campaignd resume-sender {campaign.sender_id}` resumes the sender"
        )
    else:
        _say(
            f"paused campaign {campaign_id} (was {campaign.status}): no more recipients are claimed; "
            "sends already at the provider finish and are recorded"
        )
    return 0


async def cmd_resume(settings: Settings, campaign_id: str) -> int:
    try:
        async with connected(settings) as connection:
            campaign = await resume_campaign(connection, campaign_id)
    except OperatorError as exc:
        return _fail(str(exc))
    _say(f"resumed campaign {campaign_id}: status sending")
    if campaign.sender_paused_reason is not None:
        _warn(
            f"sender {campaign.sender_id} is paused ({campaign.sender_paused_reason}): nothing is sent "
            f"until `campaignd resume-sender {campaign.sender_id}`"
        )
    return 0


async def cmd_cancel(settings: Settings, campaign_id: str) -> int:
    try:
        async with connected(settings) as connection:
            result = await cancel_campaign(connection, campaign_id)
    except OperatorError as exc:
        return _fail(str(exc))
    if result.status != "cancelled":
        # Another writer ended the campaign first; what we skipped is still counted.
        return _fail(
            f"campaign {campaign_id} became {result.status} while being cancelled; "
            f"{_recipients(result.cancelled, 'were', 'was', 'pending ')} skipped (cancelled)"
        )
    skipped = _recipients(result.cancelled, adjective="pending ")
    message = f"cancelled campaign {campaign_id}: {skipped} skipped (cancelled)"
    if result.in_doubt:
        message += (
            f"; {_recipients(result.in_doubt, 'were', 'was')} waiting to be resent after a send in doubt: "
            "failed (in_doubt), as the provider may have delivered them"
        )
    if result.in_flight:
        message += (
            f"; {_recipients(result.in_flight, 'are', 'is')} in flight: the daemon sending them records "
            "their outcome (any it gives back unsent end skipped too, or failed (in_doubt) when an "
            "earlier attempt may have been delivered)"
        )
    _say(message)
    return 0


# ----------------------------------------------------------------------------- senders


async def _print_listing(
    settings: Settings,
    sql: str,
    tabulate: Callable[[list[dict[str, Any]]], Table],
    *,
    as_json: bool,
) -> int:
    try:
        async with connected(settings) as connection:
            rows = [dict(row) for row in await connection.fetch(sql)]
    except OperatorError as exc:
        return _fail(str(exc))
    if as_json:
        _print_json(rows)
    else:
        _console().print(tabulate(rows))
    return 0


def senders_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="senders")
    for column in ("id", "provider", "rate/s", "burst", "resend in doubt", "lane", "sending", "paused"):
        table.add_column(column, overflow="fold")
    for row in rows:
        if row["lease_owner"] is None:
            lane = "free"
        else:
            state = "live" if row["lease_live"] else "expired"
            until = _stamp(row["lease_expires_at"])
            lane = f"{row['lease_owner']} (epoch {row['lease_epoch']}, {state} until {until})"
        table.add_row(
            Text(row["id"]),
            Text(row["provider"]),
            f"{row['rate_per_second']:g}",
            str(row["burst"]),
            "yes" if row["resend_in_doubt"] else "no",
            Text(lane),
            str(row["sending_campaigns"]),
            Text(row["paused_reason"] or "", style="red"),
        )
    return table


async def cmd_senders(settings: Settings, *, as_json: bool) -> int:
    return await _print_listing(settings, QUERIES["op_senders"], senders_table, as_json=as_json)


def daemons_table(rows: Sequence[dict[str, Any]]) -> Table:
    table = Table(
        title="daemons",
        caption=None if rows else "none announced (a daemon with [dispatch] rebalance_seconds = 0 does not)",
    )
    for column in ("owner", "state", "lanes", "senders served", "started", "last seen"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            Text(row["owner"]),
            "live" if row["live"] else Text("gone", style="red"),
            str(row["lanes"]),
            Text(", ".join(row["senders"])),
            _stamp(row["started_at"]),
            _stamp(row["seen_at"]),
        )
    return table


async def cmd_daemons(settings: Settings, *, as_json: bool) -> int:
    return await _print_listing(settings, QUERIES["op_daemons"], daemons_table, as_json=as_json)


@dataclass(frozen=True)
class SenderResumption:
    sender_id: str
    paused_reason: str | None
    campaigns: tuple[str, ...]


async def resume_sender(connection: Connection, sender_id: str) -> SenderResumption:
    """Clear the sender's pause and resume the campaigns paused because of it, together."""
    async with connection.transaction():
        row = await connection.fetchrow(QUERIES["op_lock_sender"], sender_id)
        if row is None:
            raise OperatorError(f"no sender {sender_id}")
        reason: str | None = row["paused_reason"]
        if reason is None:
            return SenderResumption(sender_id, None, ())
        resumed = await connection.fetch(QUERIES["op_resume_sender_campaigns"], sender_id, reason)
        await connection.execute(QUERIES["op_clear_sender_pause"], sender_id)
    return SenderResumption(sender_id, reason, tuple(str(r["id"]) for r in resumed))


async def cmd_resume_sender(settings: Settings, sender_id: str) -> int:
    try:
        async with connected(settings) as connection:
            result = await resume_sender(connection, sender_id)
    except OperatorError as exc:
        return _fail(str(exc))
    if result.paused_reason is None:
        _say(f"sender {sender_id} was not paused; nothing changed")
        return 0
    _say(f"resumed sender {sender_id} (it was paused: {result.paused_reason})")
    count = len(result.campaigns)
    _say(f"{_plural(count, 'campaign')} paused with it {'is' if count == 1 else 'are'} sending again")
    for campaign_id in result.campaigns:
        _say(f"  {campaign_id}")
    return 0


# ----------------------------------------------------------------------------- doctor

Severity = Literal["problem", "info"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    message: str


@dataclass(frozen=True, kw_only=True)
class LaneFacts:
    sender_id: str
    paused_reason: str | None = None
    lease_owner: str | None = None
    lease_epoch: int = 0
    lease_expires_at: datetime | None = None
    lease_live: bool = False


@dataclass(frozen=True, kw_only=True)
class Counters:
    total: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0


@dataclass(frozen=True, kw_only=True)
class StateCounts:
    pending: int = 0
    in_flight: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def total(self) -> int:
        return self.pending + self.in_flight + self.sent + self.failed + self.skipped

    @property
    def open(self) -> int:
        return self.pending + self.in_flight


@dataclass(frozen=True)
class ErrorCount:
    state: str
    code: str
    n: int
    example: str | None = None


@dataclass(frozen=True)
class ClaimGroup:
    owner: str | None
    epoch: int | None
    n: int
    first_expiry: datetime | None
    last_expiry: datetime | None


@dataclass(frozen=True, kw_only=True)
class CampaignFacts:
    """What the doctor knows about one campaign, read in one snapshot; ``now`` is the database's."""

    campaign_id: str
    sender: LaneFacts
    now: datetime
    name: str = ""
    status: str = "sending"
    status_reason: str | None = None
    prepared: bool = True
    counters: Counters = field(default_factory=Counters)
    states: StateCounts = field(default_factory=StateCounts)
    no_address: int = 0
    pending_due: int = 0
    pending_waiting: int = 0
    next_retry_at: datetime | None = None
    last_retry_at: datetime | None = None
    stuck_since: datetime | None = None
    stuck_reason: str | None = None
    errors: tuple[ErrorCount, ...] = ()
    claims: tuple[ClaimGroup, ...] = ()


@dataclass(frozen=True)
class PausedSenderFacts:
    sender_id: str
    paused_reason: str
    paused_campaigns: int
    sending_campaigns: int


def _problem(message: str) -> Finding:
    return Finding("problem", message)


def _info(message: str) -> Finding:
    return Finding("info", message)


def _stamp(at: datetime | None) -> str:
    return "never" if at is None else at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "less than a second"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}".replace(".0 ", " ")
    return f"{seconds:.0f} s"


def _when(at: datetime, now: datetime) -> str:
    """An absolute time, and how far it is from now, for a reader who compares it to a log."""
    delta = (at - now).total_seconds()
    relative = f"in {_duration(delta)}" if delta > 0 else f"{_duration(-delta)} ago"
    return f"{_stamp(at)} ({relative})"


def _quoted(example: str | None) -> str:
    if not example:
        return ""
    text = " ".join(example.split())
    if len(text) > _EXAMPLE_MAX_CHARS:
        text = text[: _EXAMPLE_MAX_CHARS - 1] + "…"
    return f" ({text})"


def _paused_by_sender(facts: CampaignFacts) -> bool:
    return facts.status == "paused" and (
        (facts.status_reason is not None and facts.status_reason == facts.sender.paused_reason)
        or (facts.status_reason or "").startswith(SENDER_REJECTED_PREFIX)
    )


def _status_findings(facts: CampaignFacts) -> list[Finding]:
    states, reason = facts.states, facts.status_reason
    if facts.status == "failed":
        return [_problem(f"campaign failed: {reason or 'no reason was recorded'}")]
    if facts.status == "completed":
        return [
            _info(f"campaign completed: {states.sent} sent, {states.failed} failed, {states.skipped} skipped")
        ]
    if facts.status == "cancelled":
        return [_info("campaign was cancelled" + (f" ({reason})" if reason else ""))]
    if facts.status == "draft":
        return [_info("campaign is a draft: nothing is sent until the host sets its status to 'sending'")]
    if facts.status == "paused":
        if _paused_by_sender(facts):
            if facts.sender.paused_reason is not None:
                return []  # the sender's finding says what to do
            return [
                _problem(
                    f"campaign was paused when its sender was rejected ({reason}), and sender "
                    f"{facts.sender.sender_id} has been resumed since: run `campaignd resume "
                    f"{facts.campaign_id}` to send its {_recipients(states.open, adjective='remaining ')}"
                )
            ]
        return [
            _info(
                f"campaign is paused ({reason or 'no reason given'}); its "
                f"{_recipients(states.open, 'wait', 'waits', 'remaining ')} for "
                f"`campaignd resume {facts.campaign_id}`"
            )
        ]
    return []


def _lane_detail(lane: LaneFacts, now: datetime) -> str:
    if lane.lease_expires_at is not None:
        return f"the lease of {lane.lease_owner} expired at {_when(lane.lease_expires_at, now)}"
    if lane.lease_epoch == 0:
        return "never taken"
    return "released by its last holder"


def _sender_findings(facts: CampaignFacts) -> list[Finding]:
    if facts.status not in ("sending", "paused"):
        return []
    lane = facts.sender
    sender = lane.sender_id
    if lane.paused_reason is not None:
        return [
            _problem(
                f"sender {sender} is paused: {lane.paused_reason}; run `campaignd resume-sender {sender}` "
                "once fixed"
            )
        ]
    if facts.status != "sending":
        return []
    if not lane.lease_live:
        return [
            _problem(
                f"no daemon holds sender {sender}'s lane ({_lane_detail(lane, facts.now)}): is a daemon "
                f"configured with sender {sender} running?"
            )
        ]
    until = "" if lane.lease_expires_at is None else f" until {_when(lane.lease_expires_at, facts.now)}"
    return [_info(f"sender {sender}'s lane is held by {lane.lease_owner} (epoch {lane.lease_epoch}){until}")]


def _stuck_findings(facts: CampaignFacts) -> list[Finding]:
    if facts.stuck_since is None:
        return []
    return [
        _problem(
            f"the watchdog has flagged this campaign stuck since {_when(facts.stuck_since, facts.now)}: "
            f"{facts.stuck_reason or 'no reason given'}"
        )
    ]


def _address_findings(facts: CampaignFacts) -> list[Finding]:
    missing = facts.no_address
    if missing == 0:
        return []
    skipped = sum(e.n for e in facts.errors if e.state == "skipped" and e.code == "no_address")
    if skipped >= missing:
        detail = "skipped: no_address"
    elif not facts.prepared and facts.status in ("draft", "sending", "paused"):
        detail = "they are skipped as no_address when the campaign starts"
    else:
        detail = f"{skipped} skipped: no_address"
    total = facts.states.total
    if missing * 2 > total:
        return [
            _problem(
                f"most recipients ({missing} of {total}) have no address ({detail}): check how the host "
                "fills recipients.address"
            )
        ]
    return [_info(f"{_recipients(missing, 'have', 'has')} no address ({detail})")]


def _error_findings(facts: CampaignFacts) -> list[Finding]:
    findings = []
    # The share that matters is of the recipients the provider has answered for good.
    answered = facts.states.sent + facts.states.failed
    for error in facts.errors:
        example = _quoted(error.example)
        if error.state == "failed":
            if error.n * 2 > answered:
                findings.append(
                    _problem(
                        f"most recipients fail with the same error: {error.n} of {answered} failed with "
                        f"code {error.code}{example}"
                    )
                )
            else:
                findings.append(_info(f"{_recipients(error.n)} failed with code {error.code}{example}"))
        elif error.state == "pending":
            findings.append(
                _info(f"{_recipients(error.n, 'wait', 'waits')} to be retried after {error.code}{example}")
            )
        elif error.state == "skipped" and error.code != "no_address":
            findings.append(_info(f"{_recipients(error.n, 'were', 'was')} skipped: {error.code}{example}"))
    return findings


def _waiting_findings(facts: CampaignFacts) -> list[Finding]:
    states = facts.states
    if facts.status in ("completed", "failed") and states.open:
        return [
            _problem(
                f"campaign is {facts.status} but {_recipients(states.pending, 'are', 'is')} still pending "
                f"and {states.in_flight} in flight"
            )
        ]
    if facts.status == "cancelled" and states.pending:
        return [
            _info(
                f"{_recipients(states.pending, 'are', 'is')} still pending, given back unsent after the "
                "cancel (or waiting to be resent after a send in doubt); the watchdog marks them skipped "
                "(cancelled), and those in doubt failed (in_doubt)"
            )
        ]
    if facts.status != "sending" or facts.sender.paused_reason is not None or facts.next_retry_at is None:
        return []
    if facts.pending_due == 0:
        waiting = facts.pending_waiting
        who = "the only pending recipient is" if waiting == 1 else f"all {waiting} pending recipients are"
        message = (
            f"{who} waiting on backoff; the next retry is due at {_when(facts.next_retry_at, facts.now)}"
        )
        if facts.last_retry_at is not None and facts.last_retry_at != facts.next_retry_at:
            message += f", the last at {_when(facts.last_retry_at, facts.now)}"
        return [_info(message)]
    return [
        _info(
            f"{_recipients(facts.pending_due, 'are', 'is')} due now and {facts.pending_waiting} waiting on "
            f"backoff (next retry at {_when(facts.next_retry_at, facts.now)})"
        )
    ]


def _claim_findings(facts: CampaignFacts) -> list[Finding]:
    findings = []
    lane = facts.sender
    for claim in facts.claims:
        owner = claim.owner or "an unknown owner"
        current = lane.lease_live and claim.owner == lane.lease_owner and claim.epoch == lane.lease_epoch
        if claim.last_expiry is None or claim.last_expiry < facts.now:
            expired = "never set" if claim.last_expiry is None else _when(claim.last_expiry, facts.now)
            if current:
                # The lane renews the claims it knows of; these it never heard back about.
                findings.append(
                    _info(
                        f"{_recipients(claim.n, 'are', 'is')} in flight under a claim of {owner} (epoch "
                        f"{claim.epoch}, expired {expired}) whose lane is still live: claims whose reply "
                        "the lane never got, given back unsent when it has nothing of this campaign "
                        "left to send or leaves the lane"
                    )
                )
                continue
            findings.append(
                _problem(
                    f"{_recipients(claim.n, 'are', 'is')} in flight under an expired claim of {owner} (epoch "
                    f"{claim.epoch}, expired {expired}): the daemon that claimed them stopped; the "
                    f"watchdog or the next holder of sender {lane.sender_id}'s lane recovers them"
                )
            )
            continue
        note = "" if current else f"; that claim no longer holds sender {lane.sender_id}'s lane"
        findings.append(
            _info(
                f"{_recipients(claim.n, 'are', 'is')} in flight, claimed by {owner} (epoch {claim.epoch}) "
                f"until {_when(claim.last_expiry, facts.now)}{note}"
            )
        )
    return findings


def _counter_findings(facts: CampaignFacts) -> list[Finding]:
    counters, states = facts.counters, facts.states
    checks = [
        ("sent_count", counters.sent, states.sent, f"{_recipients(states.sent, 'are', 'is')} sent"),
        ("failed_count", counters.failed, states.failed, f"{_recipients(states.failed)} failed"),
        (
            "skipped_count",
            counters.skipped,
            states.skipped,
            f"{_recipients(states.skipped, 'are', 'is')} skipped",
        ),
    ]
    # total_count is set when a daemon prepares the campaign; 0 before that is expected.
    if facts.prepared:
        checks.insert(
            0,
            ("total_count", counters.total, states.total, f"{_recipients(states.total, 'exist', 'exists')}"),
        )
    differences = [
        f"{name} is {counter} but {actual}" for name, counter, count, actual in checks if counter != count
    ]
    if not differences:
        return []
    return [_problem("counters differ from recipient states: " + "; ".join(differences))]


def diagnose(facts: CampaignFacts) -> list[Finding]:
    """Why a campaign is (not) progressing, in plain words: problems and context."""
    return [
        *_status_findings(facts),
        *_sender_findings(facts),
        *_stuck_findings(facts),
        *_address_findings(facts),
        *_error_findings(facts),
        *_waiting_findings(facts),
        *_claim_findings(facts),
        *_counter_findings(facts),
    ]


def diagnose_sender(facts: PausedSenderFacts) -> list[Finding]:
    held = facts.paused_campaigns + facts.sending_campaigns
    waiting = f"{_plural(held, 'campaign')} {'waits' if held == 1 else 'wait'} for it"
    return [
        _problem(
            f"sender {facts.sender_id} is paused: {facts.paused_reason}; {waiting}; "
            f"run `campaignd resume-sender {facts.sender_id}` once fixed"
        )
    ]


def _campaign_facts(
    row: asyncpg.Record, errors: Iterable[asyncpg.Record], claims: Iterable[asyncpg.Record]
) -> CampaignFacts:
    return CampaignFacts(
        campaign_id=str(row["id"]),
        name=row["name"],
        status=row["status"],
        status_reason=row["status_reason"],
        prepared=row["prepared"],
        now=row["now"],
        counters=Counters(
            total=row["total_count"],
            sent=row["sent_count"],
            failed=row["failed_count"],
            skipped=row["skipped_count"],
        ),
        states=StateCounts(
            pending=row["pending"],
            in_flight=row["in_flight"],
            sent=row["sent"],
            failed=row["failed"],
            skipped=row["skipped"],
        ),
        no_address=row["no_address"],
        pending_due=row["pending_due"],
        pending_waiting=row["pending_waiting"],
        next_retry_at=row["next_retry_at"],
        last_retry_at=row["last_retry_at"],
        stuck_since=row["stuck_since"],
        stuck_reason=row["stuck_reason"],
        sender=LaneFacts(
            sender_id=row["sender_id"],
            paused_reason=row["sender_paused_reason"],
            lease_owner=row["sender_lease_owner"],
            lease_epoch=row["sender_lease_epoch"],
            lease_expires_at=row["sender_lease_expires_at"],
            lease_live=row["sender_lease_live"],
        ),
        errors=tuple(ErrorCount(e["state"], e["error_code"], e["n"], e["example"]) for e in errors),
        claims=tuple(
            ClaimGroup(c["lease_owner"], c["lease_epoch"], c["n"], c["first_expiry"], c["last_expiry"])
            for c in claims
        ),
    )


async def fetch_campaign_facts(connection: Connection, campaign_id: str) -> CampaignFacts | None:
    # One snapshot: counters compared with states read at another moment would show drift
    # that is only a daemon writing in between.
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        row = await connection.fetchrow(QUERIES["op_doctor_campaign"], campaign_id)
        if row is None:
            return None
        errors = await connection.fetch(QUERIES["op_doctor_errors"], campaign_id)
        claims = await connection.fetch(QUERIES["op_doctor_claims"], campaign_id)
    return _campaign_facts(row, errors, claims)


@dataclass(frozen=True)
class Diagnosis:
    kind: Literal["campaign", "sender"]
    id: str
    title: str
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> int:
        return sum(1 for finding in self.findings if finding.severity == "problem")


def _campaign_diagnosis(facts: CampaignFacts) -> Diagnosis:
    states = facts.states
    done = states.sent + states.failed + states.skipped
    title = (
        f"campaign {facts.campaign_id} {facts.name!r}: sender {facts.sender.sender_id}, {facts.status}, "
        f"{done} of {states.total} recipients done"
    )
    return Diagnosis("campaign", facts.campaign_id, title, tuple(diagnose(facts)))


async def run_doctor(connection: Connection, campaign_id: str | None) -> list[Diagnosis]:
    if campaign_id is not None:
        facts = await fetch_campaign_facts(connection, campaign_id)
        if facts is None:
            raise OperatorError(f"no campaign {campaign_id}")
        return [_campaign_diagnosis(facts)]
    diagnoses = []
    for row in await connection.fetch(QUERIES["op_doctor_paused_senders"]):
        sender = PausedSenderFacts(
            row["id"], row["paused_reason"], row["paused_campaigns"], row["sending_campaigns"]
        )
        diagnoses.append(
            Diagnosis(
                "sender", sender.sender_id, f"sender {sender.sender_id}", tuple(diagnose_sender(sender))
            )
        )
    for row in await connection.fetch(QUERIES["op_doctor_open_campaigns"]):
        found = await fetch_campaign_facts(connection, str(row["id"]))
        if found is not None:  # deleted by the host since the listing
            diagnoses.append(_campaign_diagnosis(found))
    return diagnoses


def print_diagnoses(diagnoses: Sequence[Diagnosis], *, as_json: bool) -> None:
    problems = sum(d.problems for d in diagnoses)
    if as_json:
        _print_json(
            {
                "problems": problems,
                "diagnoses": [
                    {
                        "kind": d.kind,
                        "id": d.id,
                        "title": d.title,
                        "findings": [{"severity": f.severity, "message": f.message} for f in d.findings],
                    }
                    for d in diagnoses
                ],
            }
        )
        return
    console = _console()
    if not diagnoses:
        console.print("nothing to diagnose: no campaign is sending or paused, and no sender is paused")
    for diagnosis in diagnoses:
        console.print(Text(diagnosis.title, style="bold"))
        # Problems first: they are what the reader came for.
        for finding in sorted(diagnosis.findings, key=lambda f: f.severity != "problem"):
            label = (
                Text("  problem  ", style="bold red")
                if finding.severity == "problem"
                else Text("  info     ")
            )
            console.print(Text.assemble(label, finding.message))
    console.print(
        Text(f"{_plural(problems, 'problem')} found", style="bold red")
        if problems
        else Text("no problem found", style="green")
    )


async def cmd_doctor(settings: Settings, campaign_id: str | None, *, as_json: bool) -> int:
    try:
        async with connected(settings) as connection:
            diagnoses = await run_doctor(connection, campaign_id)
    except OperatorError as exc:
        return _fail(str(exc))
    print_diagnoses(diagnoses, as_json=as_json)
    return 1 if any(d.problems for d in diagnoses) else 0


# ----------------------------------------------------------------------------- healthcheck


def resolve_health_url(settings: Settings, url: str | None) -> str:
    """``--url`` as given, else the /healthz of the configured health server."""
    if url is not None:
        return url
    return health_url(settings.health.listen)


def health_url(listen: str) -> str:
    """The /healthz URL of a daemon whose health server listens on ``listen`` (host:port).

    A wildcard address is probed on loopback: that is where a HEALTHCHECK in the daemon's
    own container reaches it. Raises ValueError when the address says nothing to probe.
    """
    if not listen:
        raise ValueError("the health server is disabled ([health] listen is empty): pass --url")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        raise ValueError(f"[health] listen = {listen!r} has no fixed port to probe: pass --url")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


@dataclass(frozen=True)
class HealthAnswer:
    status: int | None  # None: no HTTP answer at all
    body: str


async def probe_health(url: str, seconds: float = HEALTH_TIMEOUT_SECONDS) -> HealthAnswer:
    # Imported here: only this command speaks HTTP, and aiohttp is a good part of start-up.
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            return HealthAnswer(response.status, await response.text(errors="replace"))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return HealthAnswer(None, f"{type(exc).__name__}: {exc}".rstrip(": "))


async def cmd_healthcheck(url: str) -> int:
    answer = await probe_health(url)
    if answer.status is None:
        return _fail(f"health check of {url} failed: {answer.body}")
    print(answer.body)
    if answer.status != 200:
        return _fail(f"health check of {url} answered HTTP {answer.status}")
    return 0
