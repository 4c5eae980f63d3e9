# syntax=docker/dockerfile:1
# moeplat images for the team setup (docker-compose.yml; docs/deploy.md). Targets:
#   cpu    the job server and CPU workers: torch 2.13.0, CPU build (the version requirements/cpu.txt pins)
#   cuda   GPU workers: torch 2.13.0 from PyPI, whose Linux wheels carry their CUDA libraries
#          (the host needs an NVIDIA driver and the NVIDIA container toolkit, nothing else)
#   tools  `mlflow server` and `optuna-dashboard`, at the versions moeplat is tested against
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
# torch first, from the CPU index: resolving moeplat's `torch>=2.4` on PyPI would pull the CUDA build
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY moeplat/ moeplat/
RUN pip install .
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
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX}
COPY pyproject.toml README.md ./
COPY moeplat/ moeplat/
RUN pip install '.[gpu]'
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
# Same versions as the clients (tests/deploy checks the pins against the installed packages).
FROM ${PYTHON_IMAGE} AS tools
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true
RUN pip install mlflow==3.17.2 optuna==5.0.0 optuna-dashboard==0.21.0 psycopg2-binary==2.9.13 boto3==1.44.5 \
    && useradd --create-home --uid 1000 tools
USER tools
WORKDIR /home/tools
