# syntax=docker/dockerfile:1.7
# Two images of the same project:
#   docker build --target api    -t cxrsynth/api .      # FastAPI (python:3.11-slim)
#   docker build --target worker -t cxrsynth/worker .   # Celery GPU worker (nvidia/cuda runtime base)
# docker-compose.yml builds both. Dependencies are installed in a layer of their own (from
# pyproject.toml), so a code change rebuilds only the last layers.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# torch 2.14.1 wheels are built for CUDA 13.0 and carry their CUDA libraries; the base adds the
# NVIDIA container runtime wiring. The host driver must support CUDA 13.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8

# --------------------------------------------------------------------------------------------------
FROM ${UV_IMAGE} AS uv

# --------------------------------------------------------------------------------------------------
# The project's runtime dependencies, read from pyproject.toml (a separate stage so the list changes
# only when pyproject.toml does).
FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" \
    > /requirements.txt

# --------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CXRSYNTH_DATA_DIR=/var/lib/cxrsynth
RUN useradd --system --create-home --uid 10001 --user-group cxrsynth \
 && install -d -o cxrsynth -g cxrsynth /var/lib/cxrsynth
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt
WORKDIR /opt/cxrsynth
COPY --chown=cxrsynth:cxrsynth . .
# Editable install: migrations/ and the shipped weights are found next to the code (REPO_ROOT).
RUN pip install --no-deps -e .
USER cxrsynth
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=5 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

# --------------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker
# Python 3.11 from uv (the CUDA base ships another Python); a venv on PATH.
COPY --from=uv /uv /usr/local/bin/uv
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python UV_LINK_MODE=copy UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH \
    CXRSYNTH_DATA_DIR=/var/lib/cxrsynth CXRSYNTH_DEVICE=cuda
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv \
 && useradd --system --create-home --uid 10001 --user-group cxrsynth \
 && install -d -o cxrsynth -g cxrsynth /var/lib/cxrsynth
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN uv pip install -r /tmp/requirements.txt
WORKDIR /opt/cxrsynth
COPY --chown=cxrsynth:cxrsynth . .
RUN uv pip install --no-deps -e .
USER cxrsynth
CMD ["cxrsynth", "worker"]
