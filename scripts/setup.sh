#!/usr/bin/env bash
# Create .venv and install clipaudit into it (editable, with the extras in
# $CLIPAUDIT_EXTRAS, default "test"; scripts/test.sh adds "ray": the tests run the ray
# engine on a local Ray, while clipaudit and its demo run without Ray).
# Idempotent: a second run only re-installs when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CLIPAUDIT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${CLIPAUDIT_EXTRAS:-test}
stamp="$VENV/.clipaudit-installed-${EXTRAS//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # torch and torchvision are resolved together by pip (never pin torch alone:
  # a lone CPU torch wheel breaks the registry's torchvision).
  "$VENV/bin/python" -m pip install --quiet -e ".[$EXTRAS]"
  touch "$stamp"
fi
if ! "$VENV/bin/python" -c "import torchvision.ops" 2>/dev/null; then
  echo "setup: 'import torchvision.ops' fails: torch and torchvision do not match." >&2
  echo "setup: reinstall them together: $VENV/bin/pip install --force-reinstall torch torchvision" >&2
  exit 1
fi
