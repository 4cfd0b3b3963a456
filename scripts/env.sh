#!/usr/bin/env bash
# Sourced by the other scripts: makes sure .venv exists and holds requirements.txt, sets $PYTHON.
# The install is skipped when requirements.txt has not changed since the last successful one.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PAD_VENV:-$REPO_ROOT/.venv}"
PYTHON="$VENV/bin/python"
stamp="$VENV/.requirements.sha256"
wanted="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$PYTHON" ]; then
  echo "setting up $VENV (first run; torch is large, this takes a few minutes)" >&2
  python3 -m venv "$VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  if ! "$PYTHON" -m pip install --disable-pip-version-check -q -r "$REPO_ROOT/requirements.txt" \
      > "$VENV/pip-install.log" 2>&1; then
    # This machine's pip configuration names local package folders that may be absent: hide
    # those warnings, show the rest.
    grep -v "^WARNING: Location .* is ignored" "$VENV/pip-install.log" >&2
    echo "error: installing requirements.txt into $VENV failed (log: $VENV/pip-install.log)" >&2
    exit 2
  fi
  echo "$wanted" > "$stamp"
fi
export PYTHON
export PYTHONDONTWRITEBYTECODE=1
export WANDB_MODE="${WANDB_MODE:-disabled}"
