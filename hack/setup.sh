#!/usr/bin/env bash
# Idempotent set-up shared by `make test` and `make demo`: Python deps, then the local control plane.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "capgate needs Python >= 3.11")'

stamp=".setup-stamp"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! python3 -c 'import capgate, biscuit_auth, kopf, jsonschema' 2>/dev/null; then
  echo "==> installing capgate and its dev dependencies (pip)"
  python3 -m pip install --disable-pip-version-check -q -e '.[dev]'
  touch "$stamp"
else
  echo "==> python dependencies: up to date"
fi

if ! command -v go >/dev/null 2>&1; then
  echo "capgate: the Go toolchain is needed to build the local control plane (kube-apiserver, etcd, kubectl, helm)" >&2
  exit 1
fi
echo "==> local control plane binaries"
bash hack/build-controlplane.sh
