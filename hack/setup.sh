#!/usr/bin/env bash
# Idempotent set-up shared by `make test` and `make demo`: the project virtualenv (.venv, never the
# system interpreter), installed within the locks, then the local cluster's binaries.
#
# Both locks are constraints: a fresh machine on any later day installs exactly the pinned versions,
# not the newest releases (which is how a new pydantic once broke `make test` on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/host-packages.sh  # Debian's docker.io, containerd, runc, CNI plugins, ... (installs as root, else fails with the list)

python=${CAPGATE_PYTHON:-python3}
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "capgate needs Python >= 3.11")'

venv=.venv
stamp="$venv/.capgate-setup-stamp"
want=$(cat pyproject.toml requirements.lock requirements-dev.lock | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating the project virtualenv ($venv, $("$python" --version))"
  "$python" -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$venv/bin/python" -c 'import capgate, biscuit_auth, kopf, mcp' 2>/dev/null; then
  echo "==> installing capgate and its dev dependencies into $venv (pip, within requirements.lock + requirements-dev.lock)"
  "$venv/bin/python" -m pip install --disable-pip-version-check -q \
    -c requirements.lock -c requirements-dev.lock -e '.[dev]'
  "$venv/bin/python" -m pip check
  echo "$want" >"$stamp"
else
  echo "==> python dependencies: up to date ($venv)"
fi

if ! command -v go >/dev/null 2>&1; then
  echo "capgate: the Go toolchain is needed to build the local cluster (kube-apiserver, etcd, kubectl, helm, kubelet, ...)" >&2
  exit 1
fi
echo "==> local cluster binaries"
bash hack/build-controlplane.sh
