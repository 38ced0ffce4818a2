# syntax=docker/dockerfile:1.7
# Tether cloud inference worker: ONNX Runtime with the CUDA execution provider.
#
#   docker build -f deploy/docker/cloud.Dockerfile -t tether-cloud:0.1.0 .
#   docker run --gpus all -e TETHER_MQTT_URL=mqtts://broker:8883 \
#     -v "$PWD/models/repository:/models:ro" tether-cloud:0.1.0
#
# onnxruntime-gpu 1.22 is built for CUDA 12 and cuDNN 9, which this base carries. The
# same image also runs `tether fleet serve` (rollout controller + artifact server).
# Without a GPU, ONNX Runtime falls back to the CPU provider (runtime.providers order).
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
ARG ORT_GPU_VERSION=1.22.0

# ---------------------------------------------------------------- build: a venv with Tether
FROM ${CUDA_IMAGE} AS build
ARG ORT_GPU_VERSION
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/tether
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY serving ./serving
COPY edge ./edge
COPY cloud ./cloud
COPY models ./models
COPY tether ./tether
# Tether depends on the CPU `onnxruntime`; both wheels install the same `onnxruntime`
# package, so the CPU one is removed and the GPU one reinstalled over it.
RUN /opt/tether/bin/pip install --no-compile . \
 && /opt/tether/bin/pip uninstall -y onnxruntime \
 && /opt/tether/bin/pip install --no-compile --force-reinstall --no-deps "onnxruntime-gpu==${ORT_GPU_VERSION}" \
 && /opt/tether/bin/python -c "import onnxruntime as o; assert 'CUDAExecutionProvider' in o.get_available_providers()"

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE} AS runtime
LABEL org.opencontainers.image.title="tether-cloud" \
      org.opencontainers.image.description="Tether cloud inference worker (ONNX Runtime, CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tether \
 && useradd --system --uid 10001 --gid tether --home-dir /var/lib/tether --shell /usr/sbin/nologin tether \
 && mkdir -p /models /var/lib/tether \
 && chown tether:tether /var/lib/tether
COPY --from=build /opt/tether /opt/tether
ENV PATH=/opt/tether/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TETHER_CLOUD_REPOSITORY=/models \
    TETHER_CLOUD_DATA_DIR=/var/lib/tether \
    TETHER_CLOUD_METRICS_HOST=0.0.0.0 \
    TETHER_CLOUD_METRICS_PORT=9100
VOLUME ["/models", "/var/lib/tether"]
USER 10001:10001
WORKDIR /var/lib/tether
EXPOSE 9100
# The worker serves MQTT, not HTTP: its health is its Prometheus endpoint, which opens
# once every model is loaded and warmed up (cloud/worker.py start()).
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('TETHER_CLOUD_METRICS_PORT', '9100'), timeout=2)"]
ENTRYPOINT ["tether"]
CMD ["cloud"]
