"""``campaignd campaign create``: a campaign and its recipients from a JSON message and a CSV file.

The CSV has a header row; its ``address`` column is the recipient's address and every other
column a variable (``recipients.variables``, a JSON object of strings). Recipients stream
from the file into PostgreSQL through binary COPY, a buffer at a time, so a file of millions
of rows costs no more memory than a small one. The campaign row, its recipients and (with
``--start``) its start are one transaction: an error, a rejected file or a killed process
leaves nothing behind.

Decisions are pure functions (:func:`parse_header`, :func:`row_problem`, :func:`recipient`,
:func:`check_placeholders`); the file and the database are thin layers around them.

Exit codes: 0 created; 1 the database refused or is unreachable (unknown sender, schema not
migrated); 2 the input is wrong (message file, CSV header, bad rows with ``--on-bad-row
reject``, no recipient at all).
"""

from __future__ import annotations

import csv
import re
import sys
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

from campaignd.providers.http import MAX_ADDRESS_LENGTH
from campaignd.render import MAX_VARIABLE_LENGTH, Template, TemplateError
from campaignd.sql import QUERIES

if TYPE_CHECKING:
    from campaignd.config import Settings
    from campaignd.db import Connection

ADDRESS_COLUMN: Final = "address"
# Bad rows printed one by one; the rest are only counted, so a wholly broken file of a
# million rows does not bury the summary.
MAX_REPORTED_BAD_ROWS: Final = 20

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_INPUT: Final = 2

BadRowPolicy = Literal["skip", "reject"]

# PostgreSQL text and jsonb cannot hold NUL; lone surrogates are what undecodable bytes become
# under errors="surrogateescape" (strict UTF-8 never produces them otherwise).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class InputError(Exception):
    """The input files are wrong; the message names the file and the problem (exit 2)."""


class DatabaseRefusal(Exception):
    """The database cannot take the campaign as asked (unknown sender); exit 1."""


# ----------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class Header:
    names: tuple[str, ...]
    address_index: int

    @property
    def width(self) -> int:
        return len(self.names)

    @cached_property
    def variable_names(self) -> tuple[str, ...]:
        return self.names[: self.address_index] + self.names[self.address_index + 1 :]


def parse_header(fields: Sequence[str]) -> Header:
    """The header row's columns; raises ValueError saying what is wrong with it."""
    names = tuple(name.strip() for name in fields)
    for position, name in enumerate(names, start=1):
        if not name:
            raise ValueError(f"column {position} of the header has no name")
        if _UNSTORABLE.search(name):
            raise ValueError(f"column {position} of the header holds a NUL byte or bytes that are not UTF-8")
    # Spreadsheets capitalise headers; variables keep their case, templates are case-sensitive.
    address = [i for i, name in enumerate(names) if name.lower() == ADDRESS_COLUMN]
    if not address:
        raise ValueError(f"the header has no {ADDRESS_COLUMN!r} column (columns: {', '.join(names)})")
    if len(address) > 1:
        raise ValueError(f"the header has {len(address)} {ADDRESS_COLUMN!r} columns")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"the header names column {name!r} twice")
        seen.add(name)
    return Header(names, address[0])


def row_problem(fields: Sequence[str], header: Header) -> str | None:
    """Why a record cannot become a recipient; None when it can.

    An empty address is not a problem here: the daemon skips such a recipient as
    ``no_address``, which is where the campaign's report shows it.
    """
    if len(fields) != header.width:
        return f"{len(fields)} fields, the header has {header.width}"
    # One search over the whole row: the per-column search that names the column is for the
    # rare bad row only (this runs a million times for a million-row file).
    if _UNSTORABLE.search("".join(fields)) is not None:
        for name, value in zip(header.names, fields, strict=True):
            found = _UNSTORABLE.search(value)
            if found is not None:
                what = "a NUL byte" if found.group() == "\x00" else "bytes that are not UTF-8"
                return f"column {name!r} holds {what}"
    address = fields[header.address_index]
    if len(address) > MAX_ADDRESS_LENGTH and len(address.strip()) > MAX_ADDRESS_LENGTH:
        return f"the address is {len(address.strip())} characters long, more than {MAX_ADDRESS_LENGTH}"
    if max(map(len, fields)) > MAX_VARIABLE_LENGTH:
        for name, value in zip(header.names, fields, strict=True):
            if len(value) > MAX_VARIABLE_LENGTH:
                return f"column {name!r} is {len(value)} characters long, more than {MAX_VARIABLE_LENGTH}"
    return None


def recipient(fields: Sequence[str], header: Header) -> tuple[str | None, dict[str, str]]:
    """(address, variables) of a valid record. CSV cannot tell an empty cell from a missing
    one: an empty address is stored as NULL, an empty variable as the empty string."""
    values = list(fields)
    address = values.pop(header.address_index)
    # Lengths were checked by row_problem; strict=True would check them again per row.
    return address or None, dict(zip(header.variable_names, values))  # noqa: B905


def check_placeholders(template: Template, header: Header, recipients_file: Path) -> None:
    """Every placeholder needs a column, or every recipient would be skipped as missing_variable."""
    missing = sorted(template.variables - set(header.variable_names))
    if missing:
        raise InputError(
            f"{recipients_file}: the message uses {', '.join('{{' + m + '}}' for m in missing)} but the "
            f"CSV has no such column (variable columns: {', '.join(header.variable_names) or 'none'})"
        )


def parse_message(text: bytes, source: Path) -> dict[str, Any]:
    """The campaign's message: a JSON object that compiles as a template."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"{source}: not valid JSON: {exc}") from None
    if not isinstance(message, dict):
        raise InputError(f"{source}: the message must be a JSON object, not a {type(message).__name__}")
    try:
        Template(message)
    except TemplateError as exc:
        raise InputError(f"{source}: {exc}") from None
    return message


# ----------------------------------------------------------------------------- reading the CSV


@dataclass(frozen=True)
class BadRow:
    line: int
    reason: str


@dataclass
class Tally:
    """What a load did, filled in while the COPY consumes the rows."""

    loaded: int = 0
    no_address: int = 0
    blank_lines: int = 0
    bad_rows: int = 0
    examples: list[BadRow] = field(default_factory=list)

    def bad(self, row: BadRow) -> None:
        self.bad_rows += 1
        if len(self.examples) < MAX_REPORTED_BAD_ROWS:
            self.examples.append(row)


Record = tuple[int, list[str]]


def csv_records(lines: Iterable[str]) -> Iterator[Record | BadRow]:
    """Each CSV record with the line it starts on (1-based), or a BadRow where the csv module
    gives up on one (an unterminated quote, text after a closing quote, a field over its limit).
    The reader resumes at the next line after such an error."""
    reader = csv.reader(lines, strict=True)
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield BadRow(line, f"not valid CSV: {exc}")
            continue
        yield line, fields


def recipients(
    records: Iterable[Record | BadRow], header: Header, tally: Tally, *, stop_at_bad: bool
) -> Iterator[tuple[str | None, dict[str, str]]]:
    """The valid recipients of ``records``; bad rows and blank lines are counted in ``tally``.

    With ``stop_at_bad``, nothing more is yielded after the first bad row (the load will be
    rolled back, so writing more is wasted) but every bad row is still counted and reported.
    """
    rejecting = False
    for record in records:
        if isinstance(record, BadRow):
            tally.bad(record)
            rejecting = stop_at_bad
            continue
        line, fields = record
        if not fields:
            tally.blank_lines += 1
            continue
        problem = row_problem(fields, header)
        if problem is not None:
            tally.bad(BadRow(line, problem))
            rejecting = stop_at_bad
            continue
        if rejecting:
            continue
        address, variables = recipient(fields, header)
        tally.loaded += 1
        if address is None or not address.strip():
            tally.no_address += 1
        yield address, variables


@contextmanager
def open_recipients(path: Path) -> Iterator[tuple[Header, Iterator[Record | BadRow]]]:
    """The header of a recipients CSV and an iterator over the records after it."""
    try:
        # utf-8-sig: spreadsheets write a byte-order mark. surrogateescape: undecodable bytes
        # become a bad row with its line number instead of an error that ends the whole load.
        stream = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror or exc}") from None
    with stream:
        records = csv_records(stream)
        header: Header | None = None
        for record in records:
            if isinstance(record, BadRow):
                raise InputError(f"{path}: line {record.line}: the header is {record.reason}")
            line, fields = record
            if not fields:
                continue
            try:
                header = parse_header(fields)
            except ValueError as exc:
                raise InputError(f"{path}: line {line}: {exc}") from None
            break
        if header is None:
            raise InputError(f"{path}: the file is empty: it needs a header row with an 'address' column")
        yield header, records


# ----------------------------------------------------------------------------- the database


@dataclass(frozen=True)
class CampaignSpec:
    sender_id: str
    message: dict[str, Any]
    name: str
    rate_per_second: float | None
    start: bool
    on_bad_row: BadRowPolicy


@dataclass(frozen=True)
class Created:
    campaign_id: str
    status: str
    sender_paused_reason: str | None


class Rejected(Exception):
    """Rolls the load back: bad rows under ``--on-bad-row reject``, or no recipient at all."""


async def create_campaign(
    connection: Connection,
    spec: CampaignSpec,
    header: Header,
    records: Iterable[Record | BadRow],
    tally: Tally,
) -> Created:
    """Campaign, recipients and start in one transaction; raises Rejected or DatabaseRefusal
    after rolling back. ``tally`` says what was read, whatever the outcome."""
    reject = spec.on_bad_row == "reject"
    async with connection.transaction():
        await connection.execute(QUERIES["bulk_session"])
        sender = await connection.fetchrow(QUERIES["bulk_sender"], spec.sender_id)
        if sender is None:
            raise DatabaseRefusal(
                f"no sender {spec.sender_id!r}: senders are registered from the config by `campaignd "
                "migrate` (see `campaignd senders`)"
            )
        campaign_id: uuid.UUID = await connection.fetchval(
            QUERIES["bulk_insert_campaign"], spec.name, spec.sender_id, spec.message, spec.rate_per_second
        )
        rows = recipients(records, header, tally, stop_at_bad=reject)
        await connection.copy_records_to_table(
            "recipients",
            schema_name="campaignd",
            columns=["campaign_id", "address", "variables"],
            records=((campaign_id, address, variables) for address, variables in rows),
        )
        if reject and tally.bad_rows:
            raise Rejected(f"{tally.bad_rows} bad {'row' if tally.bad_rows == 1 else 'rows'}")
        if tally.loaded == 0:
            raise Rejected("no recipient to load")
        status = "draft"
        if spec.start:
            status = await connection.fetchval(QUERIES["bulk_start_campaign"], campaign_id)
    return Created(str(campaign_id), status, sender["paused_reason"])


# ----------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class CreateOptions:
    sender_id: str
    message_file: Path
    recipients_file: Path
    start: bool
    name: str | None
    rate_per_second: float | None
    on_bad_row: BadRowPolicy


def _err(message: str) -> None:
    print(f"campaignd: {message}", file=sys.stderr)


def _count(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def report_bad_rows(tally: Tally, source: Path, *, rejected: bool) -> None:
    if not tally.bad_rows:
        return
    verdict = "nothing was created" if rejected else "skipped, the other rows were loaded"
    _err(f"{source}: {_count(tally.bad_rows, 'bad row')} ({verdict}):")
    for row in tally.examples:
        print(f"  line {row.line}: {row.reason}", file=sys.stderr)
    if tally.bad_rows > len(tally.examples):
        print(f"  … and {tally.bad_rows - len(tally.examples):,} more", file=sys.stderr)


def print_summary(created: Created, spec: CampaignSpec, tally: Tally) -> None:
    print(f"campaign {created.campaign_id}")
    print(f"  name:              {spec.name}")
    print(f"  sender:            {spec.sender_id}")
    print(f"  status:            {created.status}")
    print(f"  recipients loaded: {tally.loaded:,}")
    print(f"  bad rows skipped:  {tally.bad_rows:,}")
    if tally.no_address:
        print(f"  without address:   {tally.no_address:,} (skipped as no_address when sending starts)")
    if created.status == "draft":
        print("  a draft: nothing is sent until its status is set to 'sending'")


async def cmd_campaign_create(settings: Settings, options: CreateOptions) -> int:
    from campaignd.operator import OperatorError, connected

    try:
        message = parse_message(_read_bytes(options.message_file), options.message_file)
        with open_recipients(options.recipients_file) as (header, records):
            check_placeholders(Template(message), header, options.recipients_file)
            spec = CampaignSpec(
                sender_id=options.sender_id,
                message=message,
                name=options.name if options.name is not None else options.recipients_file.stem,
                rate_per_second=options.rate_per_second,
                start=options.start,
                on_bad_row=options.on_bad_row,
            )
            tally = Tally()
            try:
                async with connected(settings) as connection:
                    created = await create_campaign(connection, spec, header, records, tally)
            except Rejected as exc:
                report_bad_rows(tally, options.recipients_file, rejected=True)
                _err(f"{options.recipients_file}: {exc}: no campaign was created")
                return EXIT_INPUT
    except InputError as exc:
        _err(str(exc))
        return EXIT_INPUT
    except (DatabaseRefusal, OperatorError) as exc:
        _err(str(exc))
        return EXIT_FAILURE
    report_bad_rows(tally, options.recipients_file, rejected=False)
    print_summary(created, spec, tally)
    if created.sender_paused_reason is not None:
        _err(
            f"warning: sender {spec.sender_id} is paused ({created.sender_paused_reason}): nothing is "
            f"sent until `campaignd resume-sender {spec.sender_id}`"
        )
    return EXIT_OK


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
