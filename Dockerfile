# syntax=docker/dockerfile:1
# One image for the capgate operator (the default command) and the injected sidecar (command
# capgate-sidecar). Non-root, no shell entrypoint, dependencies pinned by requirements.lock.
#
#   docker build -t ghcr.io/capgate/capgate:0.1.0 .
#   kind load docker-image ghcr.io/capgate/capgate:0.1.0

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

# ---- build: the capgate wheel (setuptools only lives here)
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY capgate/ capgate/
RUN pip install --no-cache-dir --disable-pip-version-check "setuptools>=68" wheel \
 && pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir /wheels .

# ---- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="capgate" \
      org.opencontainers.image.description="Capability-based security for AI agents on Kubernetes: operator and sidecar" \
      org.opencontainers.image.source="https://github.com/capgate/capgate" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# Exactly the locked versions (--no-deps), then capgate itself; pip check fails the build if the
# lock is not a complete, consistent closure.
COPY requirements.lock /tmp/requirements.lock
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-deps -r /tmp/requirements.lock \
 && pip install --no-cache-dir --no-deps /wheels/capgate-*.whl \
 && pip check \
 && rm /tmp/requirements.lock \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nonroot
# 65532: the distroless "nonroot" user; the Helm chart and the injected sidecar run as it too.
USER 65532:65532
WORKDIR /tmp
# Operator: webhook 9443, metrics/health 8080. Sidecar: agent port 15080, admin 15090.
EXPOSE 8080 9443 15080 15090
CMD ["capgate-operator"]
