"""Every SQL statement campaignd runs lives in this package: ``*.sql`` files hold the named
statements, one file per owner (``queries.sql`` for dispatch, ``watchdog.sql``,
``operator.sql``), and ``migrations/NNN_name.sql`` the schema history. Names are unique
across files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from types import MappingProxyType
from typing import Final

_NAME_HEADER = re.compile(r"^--\s*name:(?P<name>.*)$", re.MULTILINE)
_VALID_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def parse_named_queries(text: str) -> dict[str, str]:
    """Split a file on ``-- name: x`` headers; comment lines stay with their statement."""
    headers = list(_NAME_HEADER.finditer(text))
    queries: dict[str, str] = {}
    for index, header in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(text)
        body = text[header.end() : end].strip()
        name = header.group("name").strip()
        if not _VALID_NAME.fullmatch(name):
            raise ValueError(f"query name {name!r} must be lowercase letters, digits and underscores")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        if not body:
            raise ValueError(f"query {name!r} is empty")
        queries[name] = body
    return queries


def load_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    for entry in sorted(resources.files(__package__).iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        for name, sql in parse_named_queries(entry.read_text("utf-8")).items():
            if name in queries:
                raise ValueError(f"query {name!r} is defined twice ({entry.name})")
            queries[name] = sql
    return queries


QUERIES: Final = MappingProxyType(load_queries())


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


_MIGRATION_FILE = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")


def load_migrations() -> tuple[Migration, ...]:
    folder = resources.files(__package__).joinpath("migrations")
    found = []
    for entry in folder.iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match["version"]), match["name"], entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    if versions != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations must be numbered 1..n without gaps, found {versions}")
    return tuple(found)


MIGRATIONS: Final = load_migrations()
SCHEMA_VERSION: Final = MIGRATIONS[-1].version
