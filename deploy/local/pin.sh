#!/usr/bin/env bash
# Re-pins deploy/local/constraints-py<X.Y>.txt (`make constraints`): what a fresh install of the
# project resolves today, in a throwaway venv of the given Python (PYTHON, default python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
py="${PYTHON:-python3}"
pyver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$py" -m venv "$tmp/venv"
(cd "$ROOT" && "$tmp/venv/bin/python" -m pip install -q -e '.[dev]')
out="$ROOT/deploy/local/constraints-py$pyver.txt"
{
    echo "# Every package of \`pip install -e '.[dev]'\` at the version the suite last passed with, on Python $pyver"
    echo "# (deploy/local/setup.sh installs with it when the venv's Python is $pyver). Regenerate: make constraints"
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable
} > "$out"
echo "pinned $(grep -vc '^#' "$out") packages in $out; run make test before committing it"
