# syntax=docker/dockerfile:1
#
# campaignd production image: the daemon and its runtime dependencies in a venv, nothing else.
#
#   docker build -t campaignd .
#   docker run --rm -v "$PWD/campaignd.toml:/etc/campaignd/campaignd.toml:ro" \
#       -e CAMPAIGND_DATABASE__URL=postgresql://user:password@db/campaignd campaignd migrate
#   docker run -d --name campaignd --stop-timeout 40 -v ... -e ... campaignd        # = campaignd run
#
# docker-compose.yml runs the whole demo stack (PostgreSQL, migrate, a fake provider, the daemon).

# The interpreter CI tests on (requires-python >= 3.11); Debian release pinned so a rebuild does
# not silently move to another libc.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a self-contained venv
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# Only what the package build reads (see .dockerignore): metadata, README (the package's long
# description) and the sources with their SQL files.
COPY pyproject.toml README.md ./
COPY daemon/ daemon/
# The base install only: no `embedded` extra (a bundled PostgreSQL for the demo and the tests)
# and no `dev` extra; production points at a real server. Every dependency ships manylinux
# wheels, so no compiler is needed. The pip cache survives between builds (BuildKit). Then a
# smoke test: the entry point works and everything `run` imports is installed.
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/venv/bin/pip install . \
    && /opt/venv/bin/campaignd --help >/dev/null \
    && /opt/venv/bin/python -c "import campaignd.cli, campaignd.daemon"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="campaignd" \
      org.opencontainers.image.description="Campaign-dispatch daemon: sends campaigns stored in PostgreSQL exactly once per recipient" \
      org.opencontainers.image.licenses="MIT"

# A fixed, numeric, unprivileged uid/gid: orchestrators can check runAsNonRoot against a number,
# and mounted files can be granted to it. No home, no shell.
RUN groupadd --system --gid 10001 campaignd \
    && useradd --system --uid 10001 --gid campaignd --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin campaignd

# Same base image in both stages, so the venv's python symlink (/usr/local/bin/python3.11) resolves.
COPY --from=builder /opt/venv /opt/venv

# PYTHONUNBUFFERED: logs reach `docker logs` as they are written. PYTHONDONTWRITEBYTECODE: the
# venv was byte-compiled at install; nothing to write at run time (read-only root file systems work).
# CAMPAIGND_CONFIG: mount the TOML here (or set CAMPAIGND_CONFIG= to configure from the
# environment alone); secrets go in environment variables, never in the image.
# CAMPAIGND_HEALTH__LISTEN: the health server listens on loopback by default, which in a container
# nothing outside can reach (not Docker's port mapping, not a Kubernetes probe): listen on all of
# the container's interfaces instead. `campaignd healthcheck` finds it there too.
ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CAMPAIGND_CONFIG=/etc/campaignd/campaignd.toml \
    CAMPAIGND_HEALTH__LISTEN=0.0.0.0:9187

USER 10001:10001

# /healthz (liveness), /readyz (readiness), /metrics.
EXPOSE 9187

# campaignd drains on SIGTERM: in-flight sends get [dispatch] drain_seconds (default 20) to finish,
# then it exits 0. Give it longer than that before the SIGKILL: `docker stop -t 40`,
# `stop_grace_period: 40s` in compose, terminationGracePeriodSeconds in Kubernetes.
STOPSIGNAL SIGTERM

# No curl in a slim image: the daemon's own client GETs /healthz and exits 0 only on 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["campaignd", "healthcheck"]

# campaignd runs as PID 1 without an init (tini, --init): it installs its own SIGTERM/SIGINT
# handlers (a PID 1 without handlers would ignore SIGTERM), and it starts no child processes, so
# there are no zombies to reap (health checks are started by the runtime, not by PID 1).
ENTRYPOINT ["campaignd"]
CMD ["run"]
