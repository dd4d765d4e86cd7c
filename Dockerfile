# One image for the capgate operator (the default command), the injected sidecar (capgate-sidecar) and
# the init container that programs the pod's network namespace (capgate-init, needs iptables).
# Non-root, no shell needed at run time, dependencies pinned by requirements.lock. Needs BuildKit
# (the default of Docker >= 23; DOCKER_BUILDKIT=1 for Debian's docker.io 20.10) and no frontend image.
#
#   docker build -t ghcr.io/capgate/capgate:0.1.0 .
#   kind load docker-image ghcr.io/capgate/capgate:0.1.0
#
# Without a registry, `make image` (hack/image.sh) builds the same file FROM a Debian base it makes
# with debootstrap (--build-arg PYTHON_IMAGE=...). Behind a TLS-inspecting proxy, give pip the extra
# CA certificates as a build secret (it never reaches an image layer):
#   docker build --secret id=extra-ca,src=/usr/local/share/ca-certificates/proxy.crt .

# Any Debian bookworm image whose python3 has venv: python:3.12-slim, or Debian's python3 (3.11).
ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

# ---- deps: a virtualenv holding pip and exactly the lock. Its own stage, so that the runtime's copy of
# it is one layer that changes only with the lock (capgate itself is a small layer on top).
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/capgate-build-ca.pem
# Python 3.11's venv brings setuptools: removed, the image runs nothing that needs it.
RUN --mount=type=secret,id=extra-ca \
    cat /etc/ssl/certs/ca-certificates.crt > /etc/capgate-build-ca.pem \
 && if [ -f /run/secrets/extra-ca ]; then cat /run/secrets/extra-ca >> /etc/capgate-build-ca.pem; fi \
 && python3 -m venv /opt/capgate \
 && /opt/capgate/bin/pip uninstall -y setuptools
COPY requirements.lock /tmp/requirements.lock
RUN /opt/capgate/bin/pip install --no-deps -r /tmp/requirements.lock

# ---- build: the capgate wheel. setuptools only lives in this stage (cached, so a change to capgate/
# rebuilds in seconds and without PyPI); the runtime copies the virtualenv from deps, not from here.
FROM deps AS build
RUN /opt/capgate/bin/pip install "setuptools>=70.1"
COPY pyproject.toml README.md /src/
COPY capgate/ /src/capgate/
RUN /opt/capgate/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src

# ---- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="capgate" \
      org.opencontainers.image.description="Capability-based security for AI agents on Kubernetes: operator, sidecar and init container" \
      org.opencontainers.image.source="https://github.com/capgate/capgate" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG DEBIAN_FRONTEND=noninteractive
# iptables (nf_tables backend, Debian's default) for capgate-init; 65532 is the distroless "nonroot"
# user, which the Helm chart and the injected sidecar run as too (--no-log-init: no sparse lastlog
# of 65532 entries, which a layer would store in full).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iptables \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --no-log-init --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nonroot
COPY --from=deps /opt/capgate /opt/capgate
ENV PATH=/opt/capgate/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp
# capgate from its wheel, nothing from an index; then the lock must be a complete, consistent closure
# for this interpreter, or the build fails.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-deps --no-index /wheels/capgate-*.whl \
 && python -m pip check
USER 65532:65532
WORKDIR /tmp
# Operator: webhook 9443, metrics/health 8080. Sidecar: agent port 15080, admin 15090, outbound 15001.
EXPOSE 8080 9443 15001 15080 15090
CMD ["capgate-operator"]
