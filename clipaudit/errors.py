"""One exception hierarchy. Every message is written for the user; the CLI maps
any ``ClipAuditError`` to exit code 2 in one place and prints only its message."""

from __future__ import annotations


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
