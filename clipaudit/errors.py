"""One exception hierarchy. Every message is written for the user; the CLI maps
any ``ClipAuditError`` to exit code 2 in one place and prints only its message.

Exit codes of the ``clipaudit`` command, each meaning one thing:

- 0 ``EXIT_PASS``: done; for ``audit``, ``demo`` and ``rules apply``: every rule passed;
- 1 ``EXIT_RULE_FAILED``: a rule failed (only ``audit``, ``demo`` and ``rules apply``);
- 2 ``EXIT_USAGE``: a usage or input error (a ``ClipAuditError``, a bad option, a file
  that cannot be written: disk full, read-only folder);
- 3 ``EXIT_INTERNAL``: an internal error (a bug in clipaudit or a library it uses);
  never 1, so a crash cannot read as a failed rule.
"""

from __future__ import annotations

EXIT_PASS, EXIT_RULE_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class ClipAuditError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched artifact)."""


class InputError(ClipAuditError):
    """A file or argument given by the user is unusable."""


class ArtifactError(ClipAuditError):
    """A clipaudit file is missing, corrupt, of another kind or of an unsupported schema."""


class MismatchError(ArtifactError):
    """Two artifacts do not belong together (an SAE for another model, layer or width)."""


class ModelUnavailableError(ClipAuditError):
    """Model weights could not be found locally and cannot be downloaded."""


class RuleFileError(InputError):
    """A rule file is malformed; the message names file, path and problem."""


class OutputError(ClipAuditError):
    """An output could not be written: disk full, a read-only folder, a path that is a
    file, or another run writing the same folder. Nothing half-written is left behind."""
