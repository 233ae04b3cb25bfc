#!/usr/bin/env bash
# One command: set up tether in .venv and run a real push/diff/pull round trip in ./demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh 2>&1 | grep -v "^WARNING: Location" || true
bash scripts/demo.sh "$@"
