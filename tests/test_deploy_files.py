"""The deployment files agree with the daemon they deploy.

systemd/campaignd.service, the Dockerfile and docker-compose.yml are parsed (no Docker engine,
no running systemd needed) and checked against what the daemon actually does: its drain time on
SIGTERM, its exit codes, its commands, where it reads its configuration. The unit goes through
``systemd-analyze verify``. The compose stack's own pieces -- docker/campaignd.toml, the seed SQL
and the fake provider's behaviour -- send their campaign against the test database, as
``docker compose up`` does.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from campaignd.cli import EXIT_CONFIG, build_parser
from campaignd.config import SECRET_REFERENCE_PREFIX, DispatchConfig, HealthConfig, load_settings
from campaignd.daemon import STOP_MARGIN_SECONDS
from campaignd.dispatch import FINAL_WRITE_SECONDS
from campaignd.fakeprovider import FakeProvider
from tests.conftest import DaemonProcess, wait_status

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "campaignd.service"
ENV_EXAMPLE = ROOT / "systemd" / "campaignd.env.example"
CONFIG_EXAMPLE = ROOT / "config.example.toml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = ROOT / "docker" / "campaignd.toml"
SEED_SQL = ROOT / "docker" / "seed.sql"
FAKE_PROVIDER_SCRIPT = ROOT / "docker" / "fake_provider.py"

# Where the unit expects the venv install (the unit's header says so).
UNIT_BINARY = "/opt/campaignd/.venv/bin/campaignd"
DEFAULT_DRAIN_SECONDS = DispatchConfig().drain_seconds
# After the drain: outcomes written, claims given back, lanes released, pool closed; by then
# the process ends a stop itself (daemon.end_an_overrunning_stop), before systemd's SIGKILL.
SHUTDOWN_MARGIN_SECONDS = FINAL_WRITE_SECONDS + STOP_MARGIN_SECONDS


# ---------------------------------------------------------------------------- parsing helpers

_TIMESPAN_UNITS = {
    "us": 1e-6,
    "usec": 1e-6,
    "ms": 1e-3,
    "msec": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
}


def timespan_seconds(value: str) -> float:
    """A systemd.time(7) span ("40", "40s", "1min 30s") or a compose duration ("1m30s")."""
    text = value.replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    assert parts, f"not a time span: {value!r}"
    assert "".join(number + unit for number, unit in parts) == text, f"not a time span: {value!r}"
    return sum(float(number) * _TIMESPAN_UNITS[unit or "s"] for number, unit in parts)


def parse_unit(text: str) -> dict[str, list[str]]:
    """Every assignment as "Section.Key" -> its values in order (systemd allows a key several times)."""
    values: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith(("#", ";")) or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, separator, value = line.partition("=")
        assert separator, f"{UNIT.name}: not an assignment: {line!r}"
        values.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return values


def effective(unit: dict[str, list[str]], key: str) -> str:
    assert key in unit, f"{UNIT.name} does not set {key}"
    return unit[key][-1]


def command_argv(value: str) -> list[str]:
    """An Exec*= command line without its prefixes ('-', '@', ':', '+', '!')."""
    return shlex.split(value.lstrip("-@:+!"))


def option(argv: list[str], name: str) -> str | None:
    for index, argument in enumerate(argv):
        if argument == name and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith(name + "="):
            return argument.split("=", 1)[1]
    return None


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line, pending = pending + line, ""
        if line:
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1] :]


def instruction(stage: list[tuple[str, str]], keyword: str) -> str:
    found = [arguments for name, arguments in stage if name == keyword]
    assert found, f"the image's final stage has no {keyword}"
    return found[-1]


def image_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in stage:
        if keyword == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT: the shell form would put /bin/sh in front as PID 1."""
    try:
        argv = json.loads(arguments)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list), f"not the exec (JSON) form: {arguments!r}"
    return [str(item) for item in argv]


def dockerignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, pattern) per line, with Docker's matching: '**' spans directories."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex = ""
        index = 0
        while index < len(pattern):
            if pattern.startswith("**/", index):
                regex, index = regex + "(?:.*/)?", index + 3
            elif pattern.startswith("**", index):
                regex, index = regex + ".*", index + 2
            elif pattern[index] == "*":
                regex, index = regex + "[^/]*", index + 1
            elif pattern[index] == "?":
                regex, index = regex + "[^/]", index + 1
            elif pattern[index] == "[":
                end = pattern.index("]", index)
                regex, index = regex + pattern[index : end + 1], end + 1
            else:
                regex, index = regex + re.escape(pattern[index]), index + 1
        rules.append((exception, re.compile(regex)))
    return rules


def in_build_context(rules: list[tuple[bool, re.Pattern[str]]], path: str) -> bool:
    """Whether ``path`` reaches the builder: the last rule matching it (or a parent) decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: depth + 1]) for depth in range(len(parts))]
    included = True
    for exception, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            included = exception
    return included


def yaml_children(lines: list[str], indent: int) -> dict[str, list[str]]:
    """The mapping keys at exactly ``indent`` spaces, each with its own line and the lines beneath.

    Enough YAML for docker-compose.yml's block style, so that the tests need no YAML library.
    """
    children: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        depth = len(line) - len(line.lstrip(" "))
        if depth == indent and not stripped.startswith("-"):
            key = stripped.split(":", 1)[0].strip().strip("\"'")
            current = children.setdefault(key, [])
            current.append(line)
        elif depth > indent and current is not None:
            current.append(line)
        elif depth < indent:
            current = None
    return children


def inline_value(block: list[str]) -> str:
    """The scalar after ``key:`` on a block's first line, without quotes or a trailing comment."""
    value = block[0].split(":", 1)[1].split(" #", 1)[0].strip()
    return value.strip("\"'")


class ComposeFile:
    """docker-compose.yml's services (keys at 2 spaces, their keys at 4) and ``&anchor`` blocks."""

    def __init__(self, text: str) -> None:
        top = yaml_children(text.splitlines(), 0)
        assert "services" in top, "docker-compose.yml has no services"
        self.anchors: dict[str, dict[str, list[str]]] = {}
        for lines in top.values():
            anchor = re.search(r"&([\w-]+)\s*$", lines[0])
            if anchor:
                self.anchors[anchor.group(1)] = yaml_children(lines[1:], 2)
        self.services = {
            name: yaml_children(lines[1:], 4) for name, lines in yaml_children(top["services"], 2).items()
        }

    def get(self, service: str, key: str) -> list[str] | None:
        """A service's key, its own or merged in from an anchor (``<<: *name``)."""
        own = self.services[service]
        if key in own:
            return own[key]
        if "<<" in own:
            merged = self.anchors[inline_value(own["<<"]).lstrip("*")]
            if key in merged:
                return merged[key]
        return None

    def require(self, service: str, key: str) -> list[str]:
        block = self.get(service, key)
        assert block is not None, f"docker-compose.yml: service {service} has no {key}"
        return block

    def environment(self, service: str) -> dict[str, str]:
        block = self.require(service, "environment")
        return {
            key: inline_value(lines) for key, lines in yaml_children(block[1:], _indent(block[1])).items()
        }

    def depends_on(self, service: str) -> dict[str, str]:
        block = self.require(service, "depends_on")
        conditions: dict[str, str] = {}
        for name, lines in yaml_children(block[1:], _indent(block[1])).items():
            condition = [
                line.split(":", 1)[1].strip() for line in lines if line.strip().startswith("condition:")
            ]
            conditions[name] = condition[0] if condition else "service_started"
        return conditions

    def list_items(self, service: str, key: str) -> list[str]:
        block = self.require(service, key)
        inline = block[0].split(":", 1)[1].strip()
        if inline.startswith("["):
            return [str(item) for item in json.loads(inline)]
        return [line.strip()[1:].strip().strip("\"'") for line in block[1:] if line.strip().startswith("-")]


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT.read_text())


@pytest.fixture(scope="module")
def image() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def compose() -> ComposeFile:
    return ComposeFile(COMPOSE.read_text())


def compose_drain_seconds() -> float:
    configured = tomllib.loads(COMPOSE_CONFIG.read_text()).get("dispatch", {}).get("drain_seconds")
    return float(configured) if configured is not None else DEFAULT_DRAIN_SECONDS


# ---------------------------------------------------------------------------- systemd unit


def test_unit_reports_readiness_and_liveness_to_systemd(unit: dict[str, list[str]]) -> None:
    assert effective(unit, "Service.Type") == "notify"
    assert effective(unit, "Service.NotifyAccess") == "main"
    assert timespan_seconds(effective(unit, "Service.WatchdogSec")) > 0


def test_unit_restarts_failures_but_not_a_bad_configuration(unit: dict[str, list[str]]) -> None:
    assert effective(unit, "Service.Restart") == "always"
    assert timespan_seconds(effective(unit, "Service.RestartSec")) >= 1
    prevented = " ".join(unit.get("Service.RestartPreventExitStatus", [])).split()
    assert str(EXIT_CONFIG) in prevented


def test_unit_migrates_before_each_start_without_a_crash_loop(unit: dict[str, list[str]]) -> None:
    migrations = [value for value in unit.get("Service.ExecStartPre", []) if "migrate" in command_argv(value)]
    assert len(migrations) == 1, "ExecStartPre must run `campaignd migrate`"
    # RestartPreventExitStatus= only looks at the main process's exit status: a bad configuration
    # failing in ExecStartPre (exit 2) would restart the unit forever. The '-' prefix ignores it,
    # and `run` then exits 2 on the same configuration, which does stop the unit.
    assert migrations[0].startswith("-"), "ExecStartPre's migrate must be prefixed with '-'"
    pre = command_argv(migrations[0])
    (start_line,) = unit["Service.ExecStart"]
    start = command_argv(start_line)
    assert pre[0] == start[0] == UNIT_BINARY
    assert "run" in start
    assert option(pre, "--config") == option(start, "--config") is not None
    build_parser().parse_args(pre[1:])
    build_parser().parse_args(start[1:])


def test_unit_stop_timeout_outlasts_the_drain(unit: dict[str, list[str]]) -> None:
    assert effective(unit, "Service.KillSignal") == "SIGTERM"
    assert effective(unit, "Service.KillMode") in ("mixed", "control-group")
    stop = timespan_seconds(effective(unit, "Service.TimeoutStopSec"))
    assert stop >= DEFAULT_DRAIN_SECONDS + SHUTDOWN_MARGIN_SECONDS, (
        f"TimeoutStopSec={stop:g}s leaves no time after drain_seconds={DEFAULT_DRAIN_SECONDS:g}s"
    )


def test_unit_takes_secrets_from_an_optional_environment_file(unit: dict[str, list[str]]) -> None:
    assert "-/etc/campaignd/campaignd.env" in unit.get("Service.EnvironmentFile", [])


def test_unit_runs_unprivileged_and_sandboxed(unit: dict[str, list[str]]) -> None:
    dynamic_user = unit.get("Service.DynamicUser", ["no"])[-1] == "yes"
    assert dynamic_user or unit.get("Service.User", ["root"])[-1] not in ("root", "0")
    for key, allowed in {
        "Service.NoNewPrivileges": ("yes",),
        "Service.ProtectSystem": ("strict",),
        "Service.ProtectHome": ("yes", "read-only", "tmpfs"),
        "Service.PrivateTmp": ("yes",),
        "Service.PrivateDevices": ("yes",),
    }.items():
        assert effective(unit, key) in allowed, f"{key}={effective(unit, key)}"
    # Only empty assignments: a later non-empty one would add capabilities back.
    for key in ("Service.CapabilityBoundingSet", "Service.AmbientCapabilities"):
        assert unit.get(key) and all(value == "" for value in unit[key]), f"{key} must be empty"
    # AF_UNIX: the sd_notify socket (READY=1, WATCHDOG=1) and a local PostgreSQL socket.
    families = " ".join(unit.get("Service.RestrictAddressFamilies", [])).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)


def _campaignd_executable(tmp_path: Path) -> str:
    """The campaignd console script next to this interpreter, or a stand-in (verify only stats it)."""
    beside = Path(sys.executable).parent / "campaignd"
    if beside.exists():
        return str(beside)
    found = shutil.which("campaignd")
    if found:
        return found
    stub = tmp_path / "campaignd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    return str(stub)


def systemd_analyze_verify(unit_text: str, tmp_path: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about the unit (installed at the real executable)."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    path = tmp_path / "campaignd.service"
    path.write_text(unit_text.replace(UNIT_BINARY, _campaignd_executable(tmp_path)))
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30, check=False)
    match = re.search(r"systemd (\d+)", version.stdout)
    # --man=no: no man pages needed. --recursive-errors=no (systemd >= 250): only this unit's own
    # problems count, not those of units it merely names (network-online.target, ...).
    command = [tool, "verify", "--man=no"]
    if match and int(match.group(1)) >= 250:
        command.append("--recursive-errors=no")
    result = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=60, check=False)
    # Unknown keys and unparsable values are only warnings (exit status 0): read what it says.
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "campaignd" in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert systemd_analyze_verify(UNIT.read_text(), tmp_path) == []


def test_systemd_analyze_verify_check_catches_a_broken_unit(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("Restart=always", "Restart=sometimes\nRestartPreventExitCode=2")
    problems = systemd_analyze_verify(broken, tmp_path)
    assert any("sometimes" in problem for problem in problems), problems
    assert any("RestartPreventExitCode" in problem for problem in problems), problems


def env_file_assignments(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, separator, value = line.partition("=")
        assert separator and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name), f"not NAME=value: {line!r}"
        if any(character.isspace() for character in value):
            # Quoted, so that systemd and a shell (`set -a; . file`) read the same value.
            assert len(value) > 1 and value[0] == value[-1] == '"', f"quote the value: {line!r}"
        values[name] = value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
    return values


def secret_references(config: dict[str, Any]) -> set[str]:
    # Header values of http senders, and the token fields of the other providers.
    candidates = [
        value
        for sender in config.get("senders", {}).values()
        for value in [
            *sender.get("headers", {}).values(),
            sender.get("access_token"),
            sender.get("auth_token"),
        ]
    ]
    return {
        value[len(SECRET_REFERENCE_PREFIX) :]
        for value in candidates
        if isinstance(value, str) and value.startswith(SECRET_REFERENCE_PREFIX)
    }


def test_env_example_sets_every_secret_config_example_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    values = env_file_assignments(ENV_EXAMPLE.read_text())
    assert "CAMPAIGND_DATABASE__URL" in values
    references = secret_references(tomllib.loads(CONFIG_EXAMPLE.read_text()))
    assert references, "config.example.toml references no env: secret any more: update this test"
    assert references <= values.keys(), f"campaignd.env.example misses {references - values.keys()}"
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = load_settings(CONFIG_EXAMPLE)
    assert settings.database.url.get_secret_value() == values["CAMPAIGND_DATABASE__URL"]


# ---------------------------------------------------------------------------- Dockerfile


def test_image_is_built_in_a_separate_stage_without_dev_or_embedded_extras(
    image: list[tuple[str, str]],
) -> None:
    assert sum(1 for keyword, _ in image if keyword == "FROM") >= 2
    final = final_stage(image)
    assert any(keyword == "COPY" and arguments.startswith("--from=") for keyword, arguments in final)
    installs = " ".join(arguments for keyword, arguments in image if keyword == "RUN" and "pip" in arguments)
    assert "pip install" in installs
    assert not re.search(r"\[[^\]]*\b(embedded|dev)\b", installs), installs
    assert "pixeltable" not in installs


def test_image_runs_as_a_non_root_user(image: list[tuple[str, str]]) -> None:
    user = instruction(final_stage(image), "USER").split(":")[0]
    assert user not in ("root", "0", "")


def test_image_stops_with_sigterm(image: list[tuple[str, str]]) -> None:
    assert instruction(final_stage(image), "STOPSIGNAL") == "SIGTERM"


def test_image_entrypoint_is_campaignd_run(image: list[tuple[str, str]]) -> None:
    final = final_stage(image)
    assert exec_form(instruction(final, "ENTRYPOINT")) == ["campaignd"]
    command = exec_form(instruction(final, "CMD"))
    assert command[0] == "run"
    build_parser().parse_args(command)


def _pid_namespaces_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


def test_as_pid_1_a_sigterm_before_the_daemon_starts_ends_it(tmp_path: Path) -> None:
    # The image runs campaignd as PID 1, without an init. The kernel drops a signal PID 1 has
    # no handler for, so a `docker stop` during start-up waited for the SIGKILL.
    if not _pid_namespaces_available():
        pytest.skip("needs unshare --pid (root) to run a process as PID 1")
    signalled = (
        "import os, signal, time\nimport campaignd\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(120)\n"
    )
    stopped = subprocess.run(
        ["unshare", "--pid", "--fork", sys.executable, "-c", signalled], capture_output=True, timeout=60
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    # Anywhere else the signal's own default stays: importing the package changes nothing.
    untouched = subprocess.run(
        [
            sys.executable,
            "-c",
            "import signal, campaignd; print(signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert untouched.stdout.strip() == "True", untouched.stderr


def test_image_healthcheck_uses_campaignd_healthcheck(image: list[tuple[str, str]]) -> None:
    healthcheck = instruction(final_stage(image), "HEALTHCHECK")
    options, separator, command = healthcheck.partition("CMD ")
    assert separator, f"HEALTHCHECK without CMD: {healthcheck!r}"
    for name in ("--interval", "--timeout", "--start-period", "--retries"):
        assert name + "=" in options
    argv = exec_form(command)
    assert argv[:2] == ["campaignd", "healthcheck"]
    build_parser().parse_args(argv[1:])


def test_image_health_server_listens_where_probes_reach_it(image: list[tuple[str, str]]) -> None:
    final = final_stage(image)
    listen = image_env(final).get("CAMPAIGND_HEALTH__LISTEN", "")
    host, port = HealthConfig(listen=listen).address or ("", 0)
    assert host in ("0.0.0.0", "::"), f"loopback is unreachable from outside a container: {listen!r}"
    exposed = {
        int(word.split("/")[0]) for keyword, words in final if keyword == "EXPOSE" for word in words.split()
    }
    assert port in exposed


def test_build_context_holds_the_package_and_nothing_else(image: list[tuple[str, str]]) -> None:
    rules = dockerignore_rules(DOCKERIGNORE.read_text())
    copied = [
        word.rstrip("/")
        for keyword, arguments in image
        if keyword == "COPY" and not arguments.startswith("--from=")
        for word in shlex.split(arguments)[:-1]
    ]
    package_files = [
        path.relative_to(ROOT).as_posix()
        for source in copied
        for path in ([ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts and ".egg-info" not in str(path)
    ]
    assert "daemon/campaignd/cli.py" in package_files
    assert any(path.endswith(".sql") for path in package_files)
    for path in package_files:
        assert in_build_context(rules, path), f"{path} is copied by the Dockerfile but .dockerignore drops it"
    for path in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        "daemon/campaignd/__pycache__/cli.cpython-311.pyc",
        "daemon/campaignd.egg-info/PKG-INFO",
        "campaignd.toml",
        ".env",
    ):
        assert not in_build_context(rules, path), f"{path} would be sent to the builder"


# ---------------------------------------------------------------------------- docker-compose.yml


def test_compose_has_the_demo_services(compose: ComposeFile) -> None:
    assert {"postgres", "migrate", "fake-provider", "campaignd", "seed"} <= compose.services.keys()


def test_compose_gives_the_daemon_time_to_drain(compose: ComposeFile) -> None:
    grace = timespan_seconds(inline_value(compose.require("campaignd", "stop_grace_period")))
    drain = max(DEFAULT_DRAIN_SECONDS, compose_drain_seconds())
    assert grace >= drain + SHUTDOWN_MARGIN_SECONDS, f"stop_grace_period {grace:g}s, drain_seconds {drain:g}s"


def test_compose_starts_in_dependency_order(compose: ComposeFile) -> None:
    assert compose.depends_on("migrate") == {"postgres": "service_healthy"}
    daemon = compose.depends_on("campaignd")
    assert daemon["migrate"] == "service_completed_successfully"
    assert daemon["fake-provider"] in ("service_started", "service_healthy")
    assert compose.depends_on("seed")["migrate"] == "service_completed_successfully"
    assert inline_value(compose.require("migrate", "restart")) == "no"
    assert inline_value(compose.require("seed", "restart")) == "no"


def test_compose_runs_the_daemon_commands(compose: ComposeFile) -> None:
    assert compose.list_items("migrate", "command") == ["migrate"]
    assert compose.list_items("campaignd", "command")[0] == "run"
    for service in ("migrate", "campaignd"):
        build_parser().parse_args(compose.list_items(service, "command"))


def test_compose_migrate_and_daemon_share_the_config_the_image_reads(
    compose: ComposeFile, image: list[tuple[str, str]]
) -> None:
    config_path = image_env(final_stage(image))["CAMPAIGND_CONFIG"]
    for service in ("migrate", "campaignd"):
        assert f"./docker/campaignd.toml:{config_path}:ro" in compose.list_items(service, "volumes")
        assert compose.environment(service).get("CAMPAIGND_CONFIG", config_path) == config_path
    for reference in re.findall(r"\./docker/[\w./-]+", COMPOSE.read_text()):
        assert (ROOT / reference).is_file(), f"docker-compose.yml mounts {reference}, which does not exist"


def test_compose_database_credentials_agree(compose: ComposeFile) -> None:
    server = compose.environment("postgres")
    url = urlsplit(compose.environment("campaignd")["CAMPAIGND_DATABASE__URL"])
    assert compose.environment("migrate")["CAMPAIGND_DATABASE__URL"] == url.geturl()
    assert (url.hostname, url.username, url.password, url.path.lstrip("/")) == (
        "postgres",
        server["POSTGRES_USER"],
        server["POSTGRES_PASSWORD"],
        server["POSTGRES_DB"],
    )
    seed = compose.environment("seed")
    assert (seed["PGHOST"], seed["PGUSER"], seed["PGPASSWORD"], seed["PGDATABASE"]) == (
        "postgres",
        server["POSTGRES_USER"],
        server["POSTGRES_PASSWORD"],
        server["POSTGRES_DB"],
    )


def test_compose_config_is_valid_and_points_at_the_fake_provider(
    compose: ComposeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in compose.environment("campaignd").items():
        monkeypatch.setenv(name, value)
    settings = load_settings(COMPOSE_CONFIG)
    assert "demo" in settings.senders, "docker/seed.sql's campaign uses sender 'demo'"
    assert "'demo'" in SEED_SQL.read_text()
    url = urlsplit(settings.senders["demo"].url)
    assert url.hostname == "fake-provider"
    assert url.port == int(load_fake_provider_script().DEFAULT_PORT)
    provider_token = compose.environment("fake-provider")["DEMO_PROVIDER_AUTHORIZATION"]
    assert settings.senders["demo"].headers["Authorization"].get_secret_value() == provider_token


def load_fake_provider_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_fake_provider", FAKE_PROVIDER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_compose_seed_campaign_is_sent_by_the_compose_config(
    conn: asyncpg.Connection,
    database_url: str,
    fake: FakeProvider,
    daemons: Callable[..., DaemonProcess],
) -> None:
    """`docker compose up` without Docker: migrate with docker/campaignd.toml, the daemon, the seed."""
    token = "Bearer deploy-files-test"
    behaviour = load_fake_provider_script().demo_behaviour(token)
    # Same answers per address; no waiting, so the test is quick.
    behaviour.latency_seconds = behaviour.jitter_seconds = behaviour.throttle_rate = 0.0
    fake.behaviour = behaviour
    env = {
        "CAMPAIGND_DATABASE__URL": database_url,
        "CAMPAIGND_SENDERS__DEMO__URL": fake.url,
        "CAMPAIGND_SENDERS__DEMO__RATE_PER_SECOND": "5000",
        "CAMPAIGND_HEALTH__LISTEN": "127.0.0.1:0",
        "CAMPAIGND_LOG__FORMAT": "json",
        "DEMO_PROVIDER_AUTHORIZATION": token,
    }
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "campaignd",
        "migrate",
        "--config",
        str(COMPOSE_CONFIG),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(migrate.communicate(), 60)
    assert migrate.returncode == 0, output.decode(errors="replace")
    daemon = daemons(COMPOSE_CONFIG, env)

    notices: list[str] = []
    conn.add_log_listener(lambda _connection, message: notices.append(str(message)))
    await conn.execute(SEED_SQL.read_text())
    campaign_id = str(await conn.fetchval("SELECT id FROM campaignd.campaigns WHERE sender_id = 'demo'"))
    assert any(campaign_id in notice for notice in notices), notices

    row = await wait_status(conn, campaign_id, "completed", timeout=90)
    assert (row["total_count"], row["sent_count"], row["failed_count"], row["skipped_count"]) == (
        3000,
        2989,
        6,
        5,
    ), daemon.log()[-3000:]
    reasons = await conn.fetch(
        "SELECT error_code, count(*) AS n FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state <> 'sent' GROUP BY error_code",
        campaign_id,
    )
    assert {reason["error_code"]: reason["n"] for reason in reasons} == {
        "unreachable": 6,
        "no_address": 2,
        "duplicate_address": 1,
        "missing_variable": 1,
        "invalid_address": 1,
    }
    assert fake.duplicate_keys() == {}
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait, 60) == 0
