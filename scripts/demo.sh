#!/usr/bin/env bash
# Set up (once) and run the clipaudit demo on the bundled tiny CLIP.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/clipaudit demo "$@"
