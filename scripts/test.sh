#!/usr/bin/env bash
# Set up (once) and run the whole test suite, slow tests included.
# Browser and PDF tests need Debian's chromium and poppler-utils; installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v pdftoppm >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium poppler-utils libpango-1.0-0 libpangoft2-1.0-0 >/dev/null
fi
CLIPAUDIT_EXTRAS=test,ray bash scripts/setup.sh  # the ray engine's tests need Ray
set +e
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when no test ran: that is a failure, not a pass.
[ "$rc" = 5 ] && exit 1
exit "$rc"
