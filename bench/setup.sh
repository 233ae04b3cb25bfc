#!/usr/bin/env bash
# Set up the benchmark's own environment: bench/.venv with DVC (the tool tether is compared
# against) and tether itself installed editable from this checkout, plus rsync from Debian.
# Idempotent: rerunning only installs what is missing. Usage: bash bench/setup.sh
set -euo pipefail

BENCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$BENCH_DIR")"
VENV="$BENCH_DIR/.venv"
PYTHON="${PYTHON:-python3}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# rsync and cp are the baselines for local remotes (cp is in coreutils, rsync may be missing);
# GNU time measures each tool's peak memory without counting the harness's own image.
missing=()
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
[ -x /usr/bin/time ] || missing+=(time)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} from Debian"
    as_root apt-get update -qq
    as_root apt-get install -y -qq "${missing[@]}"
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "setup: $PYTHON is older than 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# pip install, without the per-package "Location ... is ignored" noise some pip configs print.
pip_install() {
    "$VENV/bin/python" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}

echo "setup: installing benchmark tools (bench/requirements.txt) and tether (editable)"
pip_install --upgrade pip
pip_install -r "$BENCH_DIR/requirements.txt"
pip_install -e "$REPO_DIR"

echo "setup: done"
"$VENV/bin/python" -c 'import importlib.metadata as m; print("  tether", m.version("tether-data"))'
"$VENV/bin/dvc" --version | sed 's/^/  dvc /'
# sed reads all of rsync's output: `head -1` would close the pipe early, and under pipefail
# rsync's SIGPIPE made a successful setup exit 141.
rsync --version | sed -n '1s/^/  /p'
echo "run: $VENV/bin/python $BENCH_DIR/run.py --quick   (or without --quick for the full run)"
