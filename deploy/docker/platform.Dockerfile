# syntax=docker/dockerfile:1.7
# The platform image: web, Celery worker and beat, migrations; one image, the command picks the role
# (deploy/processes.py; compose and the Helm chart give each service its own). Build from the repository root:
#   docker build -f deploy/docker/platform.Dockerfile -t opentinker/platform:0.1.0 .
# Dependencies come from the lock (deploy/requirements/platform.txt, hashes checked).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG NODE_IMAGE=node:22.21.1-bookworm-slim

# --- the dependencies, into a virtual environment copied whole into the final stage
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/requirements/platform.txt /tmp/platform.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r /tmp/platform.txt

# --- the portal's front-end bundle (npm ci from the lock file)
FROM ${NODE_IMAGE} AS frontend
WORKDIR /src/frontend
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY frontend/ ./
RUN npm run typecheck && npm run build

# --- the image
FROM ${PYTHON_IMAGE} AS platform
RUN groupadd --system --gid 10001 opentinker \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/opentinker --create-home opentinker
COPY --from=deps /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DJANGO_SETTINGS_MODULE=portal.settings \
    OPENTINKER_MODE=production \
    OPENTINKER_VAR_DIR=/var/lib/opentinker \
    STATIC_ROOT=/app/staticfiles \
    PORT=8000
WORKDIR /app
COPY manage.py pyproject.toml ./
COPY opentinker/ opentinker/
COPY portal/ portal/
COPY api/ api/
COPY workers/ workers/
COPY env_registry/ env_registry/
COPY deploy/ deploy/
# Never imported here: the workers copy gpu_runtime/model_check.py into the sandbox to validate uploaded models.
COPY gpu_runtime/ gpu_runtime/
COPY --from=frontend /src/portal/static/portal/dist/ portal/static/portal/dist/
# Hashed, compressed static files (whitenoise). Production settings need their secrets to load: throwaway ones
# here, used by nothing but collectstatic (no database, no Valkey is contacted).
RUN SECRET_KEY="collectstatic-only-$(python -c 'import secrets; print(secrets.token_hex(32))')" \
    TOKEN_PEPPER="$(python -c 'import secrets; print(secrets.token_hex(32))')" \
    ALLOWED_HOSTS=build.invalid OBJECT_STORE_URL=file:///tmp/objects \
    DATABASE_URL=postgres://build@127.0.0.1:1/build REDIS_URL=redis://127.0.0.1:1/0 \
    python manage.py collectstatic --noinput -v 0 \
    && python -m compileall -q opentinker portal api workers env_registry deploy gpu_runtime
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["python", "deploy/healthcheck.py"]
CMD ["python", "deploy/web.py"]
