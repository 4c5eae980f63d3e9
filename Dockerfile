# syntax=docker/dockerfile:1
# moeplat images for the team setup (docker-compose.yml; docs/deploy.md). Targets:
#   cpu    the job server and CPU workers: torch 2.13.0, CPU build (the version requirements/cpu.txt pins);
#          every other package at the version and hash of requirements/lock.txt (scripts/install-locked.sh)
#   cuda   GPU workers: torch 2.13.0 from PyPI, whose Linux wheels carry their CUDA libraries
#          (the host needs an NVIDIA driver and the NVIDIA container toolkit, nothing else)
#   tools  `mlflow server` and `optuna-dashboard`, from the same lock as the clients
# Build one by hand with e.g. `docker build --target cpu -t moeplat:cpu .`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- the browser client: web/ bundled into web/dist (its build embeds example specs from specs/)
FROM node:22-bookworm-slim AS web
WORKDIR /src/web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY specs/ /src/specs/
COPY web/ ./
RUN npm run build

# --- what every Python image shares: an unprivileged user and the state directory it owns
FROM ${PYTHON_IMAGE} AS python
# no usage telemetry from MLflow / huggingface_hub (README, "Telemetry": set false to opt in)
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    HF_HUB_DISABLE_TELEMETRY=1
RUN useradd --create-home --uid 1000 moeplat \
    && mkdir -p /var/lib/moeplat \
    && chown moeplat:moeplat /var/lib/moeplat
WORKDIR /opt/moeplat

# --- the job server and CPU workers
FROM python AS cpu
# torch first, from the CPU index (resolving moeplat's `torch>=2.4` on PyPI would pull the CUDA build);
# its dependencies come from the lock with the rest
RUN pip install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY requirements/lock.txt requirements/
COPY scripts/install-locked.sh scripts/
COPY moeplat/ moeplat/
# every other package at the version and hash of requirements/lock.txt, as `make setup` installs them
RUN scripts/install-locked.sh
COPY --from=web /src/web/dist/ /opt/moeplat/web/dist/
ENV MOEPLAT_WEB_DIR=/opt/moeplat/web/dist \
    MOEPLAT_WORK_DIR=/var/lib/moeplat \
    MOEPLAT_SPEC_ROOTS=/specs
USER moeplat
WORKDIR /var/lib/moeplat
EXPOSE 8765
CMD ["moeplat", "serve", "--host", "0.0.0.0"]

# --- GPU workers (and a server, if you like: the same package)
FROM python AS cuda
# PyPI's torch 2.13.0 for Linux x86_64 is a CUDA build; it brings its CUDA runtime as nvidia-* wheels.
# For another CUDA version use PyTorch's cu index, e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
ARG TORCH_INDEX=https://pypi.org/simple
# Its nvidia-* dependencies are pinned exactly by torch itself; the rest come from the lock.
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY requirements/lock.txt requirements/
COPY scripts/install-locked.sh scripts/
COPY moeplat/ moeplat/
RUN scripts/install-locked.sh gpu
COPY --from=web /src/web/dist/ /opt/moeplat/web/dist/
ENV MOEPLAT_WEB_DIR=/opt/moeplat/web/dist \
    MOEPLAT_WORK_DIR=/var/lib/moeplat \
    MOEPLAT_SPEC_ROOTS=/specs \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER moeplat
WORKDIR /var/lib/moeplat
CMD ["moeplat", "worker"]

# --- mlflow server (PostgreSQL backend, artifacts proxied to S3/MinIO) and optuna-dashboard.
# The versions and files of requirements/lock.txt, the clients' own (pip checks a constraint's hashes).
FROM ${PYTHON_IMAGE} AS tools
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true
COPY requirements/lock.txt /tmp/lock.txt
RUN pip install pip==26.3 \
    && pip install -c /tmp/lock.txt mlflow optuna optuna-dashboard psycopg2-binary boto3 \
    && rm /tmp/lock.txt && useradd --create-home --uid 1000 tools
USER tools
WORKDIR /home/tools
