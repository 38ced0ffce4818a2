# syntax=docker/dockerfile:1.7
# Tether edge agent for NVIDIA Jetson (Orin) on JetPack 6 (L4T r36, Ubuntu 22.04, CUDA 12.6,
# TensorRT 10.3): native TensorRT, engines cached on the state volume.
#
#   docker build -f deploy/docker/edge-jetson.Dockerfile -t tether-edge-jetson:0.1.0 .   # on an arm64 host
#   docker run --runtime nvidia -p 8000:8000 -e TETHER_API_TOKENS=<token, 16+ chars> \
#     -v /opt/tether/models:/models:ro -v tether-state:/var/lib/tether tether-edge-jetson:0.1.0
#
# TensorRT's Python bindings on Jetson come from NVIDIA's apt packages in the L4T image
# (the PyPI `tensorrt` wheels are not built for Tegra), so the venv sees the system
# site-packages and Tether is installed without the `tensorrt` extra. The L4T tag must
# match the JetPack release on the device (docs/deploy-jetson.md). Pin by digest for
# production (deploy/docker/README.md).
ARG L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0
ARG CUDA_PYTHON_VERSION=12.6.2.post1

# ---------------------------------------------------------------- build: a venv with Tether
FROM ${L4T_IMAGE} AS build
ARG CUDA_PYTHON_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-pip python3-libnvinfer \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv --system-site-packages /opt/tether \
 && /opt/tether/bin/pip install --upgrade "pip>=24,<26"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY serving ./serving
COPY edge ./edge
COPY cloud ./cloud
COPY models ./models
COPY tether ./tether
RUN /opt/tether/bin/pip install --no-compile . "cuda-python==${CUDA_PYTHON_VERSION}" \
 && /opt/tether/bin/python -c "import tensorrt; print('TensorRT', tensorrt.__version__)"

# ---------------------------------------------------------------- runtime
FROM ${L4T_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tether-edge-jetson" \
      org.opencontainers.image.description="Tether edge agent for Jetson (JetPack 6, TensorRT)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-libnvinfer \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid tether --groups video --home-dir /var/lib/tether \
      --shell /usr/sbin/nologin tether \
 && mkdir -p /models /var/lib/tether/engines \
 && chown -R tether:tether /var/lib/tether
COPY --from=build /opt/tether /opt/tether
ENV PATH=/opt/tether/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TETHER_DATA_DIR=/var/lib/tether \
    TETHER_REPOSITORY=/models \
    TETHER_RUNTIME__BACKEND=tensorrt \
    TETHER_RUNTIME__ENGINE_CACHE_DIR=/var/lib/tether/engines \
    TETHER_FLEET__HARDWARE=sm_87 \
    TETHER_HTTP__HOST=0.0.0.0 \
    TETHER_HTTP__PORT=8000
# The API listens on all addresses inside the container, so the agent refuses to start
# without bearer tokens (TETHER_API_TOKENS or http.auth.tokens_file; docs/security.md).
# The engine cache must outlive the container: building engines takes minutes on a Jetson.
VOLUME ["/models", "/var/lib/tether"]
USER 10001:10001
WORKDIR /var/lib/tether
EXPOSE 8000 8001
# Generous start period: the first start builds a TensorRT engine per model.
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('TETHER_HTTP__PORT', '8000'), timeout=2)"]
ENTRYPOINT ["tether"]
CMD ["edge"]
