"""Stage 6: which relied-on components are shortcuts (findings), with their evidence."""

from clipaudit.findings.select import (
    Candidate,
    largest_shares,
    make_finding,
    metadata_aucs,
    scatter_points,
    select_candidates,
)

__all__ = ["Candidate", "largest_shares", "make_finding", "metadata_aucs", "scatter_points",
           "select_candidates"]
