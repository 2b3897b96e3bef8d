#!/usr/bin/env bash
# Source me: creates (once) and activates the project virtualenv, cached OUTSIDE the repo and keyed on
# requirements.txt + the Python version, so repeat runs and CI reuse it and a changed requirement rebuilds it.
# SGPSAM_VENV=system uses the current Python and its packages as they are (e.g. a GPU machine's own torch).
set -euo pipefail
_repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${SGPSAM_VENV:-}" = "system" ]; then
    export PYTHONPATH="$_repo_root/bundle${PYTHONPATH:+:$PYTHONPATH}"
    return 0
fi
_python="${SGPSAM_PYTHON:-python3}"
_key="$( (cat "$_repo_root/requirements.txt"; "$_python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
SGPSAM_VENV="${SGPSAM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sgpsam/venv-$_key}"
if [ ! -f "$SGPSAM_VENV/.complete" ]; then
    echo "[sgpsam] creating virtualenv $SGPSAM_VENV (first run: ~8 GB, ~10 minutes)" >&2
    rm -rf "$SGPSAM_VENV"
    mkdir -p "$(dirname "$SGPSAM_VENV")"
    "$_python" -m venv "$SGPSAM_VENV"
    "$SGPSAM_VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    "$SGPSAM_VENV/bin/python" -m pip install --quiet --progress-bar off -r "$_repo_root/requirements.txt" >&2
    touch "$SGPSAM_VENV/.complete"
fi
export SGPSAM_VENV
export PATH="$SGPSAM_VENV/bin:$PATH"
export PYTHONPATH="$_repo_root/bundle${PYTHONPATH:+:$PYTHONPATH}"
