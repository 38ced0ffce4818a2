# syntax=docker/dockerfile:1.7
# Tether edge agent on any Linux box (x86_64 or arm64): ONNX Runtime on the CPU.
#
#   docker build -f deploy/docker/edge-cpu.Dockerfile -t tether-edge-cpu:0.1.0 .
#   docker run -p 8000:8000 -e TETHER_API_TOKENS=<token, 16+ chars> -v "$PWD/models/repository:/models:ro" tether-edge-cpu:0.1.0
#
# Base images are pinned by exact tag; pin them by digest too for production builds
# (deploy/docker/README.md shows how: FROM python:3.11.10-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

# ---------------------------------------------------------------- build: a venv with Tether
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/tether
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY serving ./serving
COPY edge ./edge
COPY cloud ./cloud
COPY models ./models
COPY tether ./tether
RUN /opt/tether/bin/pip install --no-compile . \
 && /opt/tether/bin/python -m compileall -q /opt/tether/lib

# ---------------------------------------------------------------- runtime: no compiler, no pip cache
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tether-edge-cpu" \
      org.opencontainers.image.description="Tether edge agent (ONNX Runtime, CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid tether --home-dir /var/lib/tether --shell /usr/sbin/nologin tether \
 && mkdir -p /models /var/lib/tether \
 && chown tether:tether /var/lib/tether
COPY --from=build /opt/tether /opt/tether
ENV PATH=/opt/tether/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TETHER_DATA_DIR=/var/lib/tether \
    TETHER_REPOSITORY=/models \
    TETHER_HTTP__HOST=0.0.0.0 \
    TETHER_HTTP__PORT=8000
# The API listens on all addresses inside the container, so the agent refuses to start
# without bearer tokens (TETHER_API_TOKENS or http.auth.tokens_file; docs/security.md).
# Models are read from a volume; state (engine cache, fleet state, outbox) lives in another.
VOLUME ["/models", "/var/lib/tether"]
USER 10001:10001
WORKDIR /var/lib/tether
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TETHER_HTTP__PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tether"]
CMD ["edge"]
