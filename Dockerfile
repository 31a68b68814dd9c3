# syntax=docker/dockerfile:1
# finopsd's image: `finopsd run --config /etc/finopsd/config.toml` as uid 10001, for
# deploy/kubernetes (which mounts the config, the Secret and the store's volume).
#   docker build -t finopsd:0.1.0 .
#   docker run -v "$PWD/config.toml:/etc/finopsd/config.toml:ro" -p 8787:8787 finopsd:0.1.0
#
# Both stages use the same base, pinned by tag and by digest: the virtual environment built
# in the first is copied into the second, and its interpreter link
# (/usr/local/bin/python3.11) must point at the same Python there. 3.11 is the version the
# tests run on. Moving the pin: `docker buildx imagetools inspect python:3.11-slim-bookworm`
# gives the current digest; change the tag and the digest together.
ARG PYTHON_IMAGE=python:3.11.15-slim-bookworm@sha256:b18992999dbe963a45a8a4da40ac2b1975be1a776d939d098c647482bcad5cba

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/finopsd
# Only what the wheel is built from (.dockerignore lets nothing else in).
COPY pyproject.toml README.md ./
COPY finopsd ./finopsd
# A wheel, then the venv from it: the package and its dependencies, compiled to bytecode
# here, since the runtime's root filesystem is read-only.
RUN /opt/finopsd/bin/python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && /opt/finopsd/bin/python -m pip install --no-cache-dir --compile /wheels/finopsd-*.whl

FROM ${PYTHON_IMAGE}
# A fixed uid and gid (10001), the same as the StatefulSet's runAsUser/runAsGroup/fsGroup:
# the store's volume is owned by that group.
RUN groupadd --system --gid 10001 finopsd \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/finopsd \
       --no-create-home --shell /usr/sbin/nologin finopsd \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/finopsd
COPY --from=builder /opt/finopsd /opt/finopsd
ENV PATH=/opt/finopsd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FINOPSD_CONFIG=/etc/finopsd/config.toml
WORKDIR /var/lib/finopsd
USER 10001:10001
# The API (api.port, default 8787); bind it to 0.0.0.0 in config.toml to reach it.
EXPOSE 8787
# Kubernetes uses its own probes (deploy/kubernetes); this is for plain `docker run`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=4)"]
ENTRYPOINT ["finopsd"]
CMD ["run", "--config", "/etc/finopsd/config.toml"]
