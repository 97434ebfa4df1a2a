"""The SQL package: named queries and numbered migrations (no database needed)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from campaignd.sql import MIGRATIONS, QUERIES, SCHEMA_VERSION, load_migrations, parse_named_queries

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "daemon" / "campaignd"
_USE = re.compile(r"""QUERIES\[\s*(['"])(?P<name>[^'"]+)\1\s*\]""")


def _used_names(folder: Path, *, exclude: Path | None = None) -> set[str]:
    names: set[str] = set()
    for path in folder.rglob("*.py"):
        if exclude is not None and path.resolve() == exclude:
            continue
        names.update(match["name"] for match in _USE.finditer(path.read_text("utf-8")))
    return names


# ----------------------------------------------------------------- parse_named_queries()


def test_sections_are_split_by_name_header() -> None:
    text = "-- preamble is ignored\n\n-- name: first\nSELECT 1;\n\n-- name: second_one\nSELECT 2\nFROM t;\n"

    assert parse_named_queries(text) == {"first": "SELECT 1;", "second_one": "SELECT 2\nFROM t;"}


def test_comment_lines_stay_with_their_statement() -> None:
    text = "-- name: q\n-- explains q\nSELECT 1; -- trailing\n"

    assert parse_named_queries(text) == {"q": "-- explains q\nSELECT 1; -- trailing"}


def test_header_allows_trailing_spaces() -> None:
    assert parse_named_queries("-- name: q   \nSELECT 1;\n") == {"q": "SELECT 1;"}


def test_text_without_headers_has_no_queries() -> None:
    assert parse_named_queries("SELECT 1;\n-- just a comment\n") == {}


def test_duplicate_name_is_refused() -> None:
    with pytest.raises(ValueError, match="twice"):
        parse_named_queries("-- name: q\nSELECT 1;\n-- name: q\nSELECT 2;\n")


@pytest.mark.parametrize("text", ["-- name: q\n", "-- name: q\n   \n\n-- name: r\nSELECT 1;\n"])
def test_empty_body_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="'q' is empty"):
        parse_named_queries(text)


# ----------------------------------------------------------------- QUERIES


def test_queries_are_loaded_and_read_only() -> None:
    assert len(QUERIES) >= 10
    assert all(body.strip() for body in QUERIES.values())
    with pytest.raises(TypeError):
        QUERIES["new"] = "SELECT 1"  # type: ignore[index]


def test_no_query_swallowed_a_malformed_header() -> None:
    # A header the parser does not recognise (capital letter, digit, typo) would silently become
    # part of the previous query; asyncpg would then refuse a prepared statement with two commands.
    offenders = {
        name: body for name, body in QUERIES.items() if re.search(r"^--\s*name\b", body, re.MULTILINE)
    }

    assert offenders == {}


def test_every_query_the_package_uses_is_defined() -> None:
    used = _used_names(PACKAGE)

    assert used, "found no QUERIES[...] uses: the usage pattern no longer matches the code"
    assert used - set(QUERIES) == set()


def test_every_query_the_tests_use_is_defined() -> None:
    used = _used_names(ROOT / "tests", exclude=Path(__file__).resolve())

    assert used - set(QUERIES) == set()


def test_every_defined_query_is_used_somewhere() -> None:
    by_package = _used_names(PACKAGE)
    by_tests = _used_names(ROOT / "tests", exclude=Path(__file__).resolve())

    only_in_tests = sorted((set(QUERIES) - by_package) & by_tests)
    if only_in_tests:
        # Reported, not failed: a statement kept for the tests is odd but harmless.
        print(f"queries used only by the tests: {only_in_tests}")
    assert sorted(set(QUERIES) - by_package - by_tests) == []


# ----------------------------------------------------------------- migrations


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_schema_version_is_the_last_migration() -> None:
    assert SCHEMA_VERSION == MIGRATIONS[-1].version == len(MIGRATIONS)


def test_migrations_match_their_files() -> None:
    files = sorted(p.name for p in (PACKAGE / "sql" / "migrations").glob("*.sql"))

    assert [f"{m.version:03d}_{m.name}.sql" for m in MIGRATIONS] == files
    for migration in MIGRATIONS:
        path = PACKAGE / "sql" / "migrations" / f"{migration.version:03d}_{migration.name}.sql"
        assert migration.sql == path.read_text("utf-8")
        assert migration.sql.strip()


def _fake_package(tmp_path: Path, names: list[str]) -> Path:
    folder = tmp_path / "migrations"
    folder.mkdir()
    for name in names:
        (folder / name).write_text("SELECT 1;\n")
    return tmp_path


def test_load_migrations_sorts_and_ignores_other_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _fake_package(tmp_path, ["002_second.sql", "001_first.sql", "README.md", "3_bad_name.sql"])
    monkeypatch.setattr(resources, "files", lambda _package: root)

    loaded = load_migrations()

    assert [(m.version, m.name) for m in loaded] == [(1, "first"), (2, "second")]


@pytest.mark.parametrize("names", [["001_a.sql", "003_c.sql"], ["002_b.sql"], ["001_a.sql", "001_again.sql"]])
def test_load_migrations_refuses_gaps_and_repeats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str]
) -> None:
    root = _fake_package(tmp_path, names)
    monkeypatch.setattr(resources, "files", lambda _package: root)

    with pytest.raises(ValueError, match="numbered"):
        load_migrations()
