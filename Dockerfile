# syntax=docker/dockerfile:1
# driftloop: the CLI and every worker (`driftloop worker streams|serving|drift|retrain`); docker-compose.yml also
# runs the MLflow server and the Ray nodes from it, so clients, server and training jobs share one set of pins.
# Installed as the Makefile and the README do: `pip install -c constraints.txt .` (torch==2.13.0, the CPU wheel).
#   docker build -t driftloop .
#   docker build -t driftloop:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .   # CUDA torch
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

FROM ${PYTHON_IMAGE} AS build
# The PyTorch wheel index: .../whl/cpu keeps CUDA out of the image; a CUDA one (.../whl/cu128) for GPU nodes. Its
# last path part becomes the local version of constraints.txt's torch pin (2.13.0+cpu -> 2.13.0+cu128).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/driftloop && /opt/driftloop/bin/pip install -q -U "pip>=24" setuptools wheel
WORKDIR /src
COPY pyproject.toml constraints.txt ./
# the dependencies first (a layer that survives source changes), then driftloop itself; ray[default] adds the
# dashboard the Ray head serves the Jobs API with
RUN variant="${TORCH_INDEX##*/}" \
 && sed -i -E "s/^torch==([^+]+)\+cpu$/torch==\1+${variant}/" constraints.txt \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > requirements.txt \
 && /opt/driftloop/bin/pip install --extra-index-url "${TORCH_INDEX}" -c constraints.txt -r requirements.txt \
      "torch==2.13.0+${variant}" "ray[default]==2.60.0"
COPY . .
RUN /opt/driftloop/bin/pip install --no-deps . && /opt/driftloop/bin/pip check

FROM ${PYTHON_IMAGE}
# uid/gid 185 is the apache/spark image's spark user: Spark Connect (compose profile spark) writes the same Delta
# tables on the shared /data volume, and each side must be able to rewrite what the other wrote
ARG UID=185
RUN groupadd --system --gid "${UID}" driftloop \
 && useradd --system --uid "${UID}" --gid driftloop --create-home --home-dir /home/driftloop driftloop \
 && mkdir -p /data && chown driftloop:driftloop /data
COPY --from=build /opt/driftloop /opt/driftloop
ENV PATH=/opt/driftloop/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    DRIFTLOOP_DATA_DIR=/data \
    DRIFTLOOP_METRICS_HOST=0.0.0.0 \
    DRIFTLOOP_METRICS_PORT=9400
USER driftloop
WORKDIR /data
VOLUME /data
# 9400: a worker's /metrics; 8000: the drift worker's alert webhook (DRIFTLOOP_WEBHOOK_PORT)
EXPOSE 9400 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/metrics' % os.environ.get('DRIFTLOOP_METRICS_PORT', '9400'), timeout=4)"]
ENTRYPOINT ["driftloop"]
CMD ["--help"]
