#!/usr/bin/env bash
# Set up (once), lint (ruff, and mypy on clipaudit/) and run the whole test suite, slow
# tests included. Browser and PDF tests need Debian's chromium and poppler-utils;
# installed here when missing. Fails when a linter or a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v pdftoppm >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium poppler-utils libpango-1.0-0 libpangoft2-1.0-0 >/dev/null
fi
CLIPAUDIT_EXTRAS=test,ray bash scripts/setup.sh  # the ray engine's tests need Ray
set +e
lint=0
echo "ruff check clipaudit tests benchmarks"
.venv/bin/ruff check clipaudit tests benchmarks || lint=1
echo "mypy (clipaudit/, configured in pyproject.toml)"
.venv/bin/mypy || lint=1
[ "$lint" = 0 ] || echo "linters failed (see above); running the tests anyway, exit code 1 at the end"
.venv/bin/python -m pytest "$@"
rc=$?
# pytest exits 5 when no test ran: that is a failure, not a pass.
[ "$rc" = 5 ] && rc=1
[ "$rc" = 0 ] && [ "$lint" != 0 ] && rc=1
exit "$rc"
