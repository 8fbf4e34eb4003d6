#!/usr/bin/env bash
# Installs each example plugin package (examples/*/pyproject.toml) into the project's venv,
# editable, so its steps are found through the entry points `dhub.steps`. Run by
# `make setup` after the project itself is installed; cheap when nothing changed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
for project in "$ROOT"/examples/*/pyproject.toml; do
    dir="$(dirname "$project")"
    stamp="$VENV/.dhub-example-$(basename "$dir")"
    if [[ ! -f "$stamp" || "$project" -nt "$stamp" ]]; then
        echo "setup: installing the example $(basename "$dir") into the venv"
        # Entry points are read from installed metadata only, hence an install, not a path.
        "$VENV/bin/python" -m pip install -q -e "$dir"
        touch "$stamp"
    fi
done
