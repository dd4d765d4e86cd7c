#!/usr/bin/env bash
# The demo command: set-up (pip, control-plane binaries), then the end-to-end story.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
echo "==> demo"
exec .venv/bin/python -m e2e.demo "$@"
