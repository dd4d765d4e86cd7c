#!/usr/bin/env bash
# The test command: set-up, static checks, then every test (unit and e2e against a real API server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
# Everything below runs from the project virtualenv.
export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv"

echo "==> ruff"
ruff check capgate tests e2e bench examples
echo "==> mypy --strict"
mypy capgate
echo "==> import contracts"
lint-imports
echo "==> capgate test examples/*.tests.yaml"
capgate test examples/*.tests.yaml
echo "==> pytest"
# pytest exits 5 when it collected nothing: that is a failure here too (set -e).
python -m pytest -q "$@"
