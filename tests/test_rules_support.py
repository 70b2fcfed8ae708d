"""Hand-built audit results for the rule tests (helpers only; no tests here)."""

from __future__ import annotations

from clipaudit.results import AuditResult, ClassAudit, ComponentInfo, Finding, HeadAudit


def finding(component: int = 7, *, share: float = 0.2, head: str = "probe",
            class_name: str = "malignant", concept: str = "ruler", alignment: float = -0.05,
            clarity: float = 0.6, metadata_auc: dict[str, float] | None = None,
            concept_share: float | None = None, calibrated_alignment: float | None = -0.2,
            reliance: float | None = None, kind: str = "shortcut") -> Finding:
    return Finding(id=f"{head}:{class_name}:{component}", head=head, class_name=class_name,
                   component=component, kind=kind, rank=1, share=share,  # type: ignore[arg-type]
                   concept_share=share if concept_share is None else concept_share,
                   alignment=alignment, clarity=clarity, concept=concept, concept_score=0.3,
                   metadata_auc=metadata_auc or {}, calibrated_alignment=calibrated_alignment,
                   reliance=reliance)


def audit(findings: list[Finding] = (), *, classes=("benign", "malignant"),
          heads=("probe",), unexplained: float = 0.1, sae_metrics=None, sae_sha: str = "sae-1",
          directions: dict[int, list[float]] | None = None, audit_id: str = "run-2",
          provenance: dict | None = None, n_instances: dict[str, int] | None = None
          ) -> AuditResult:
    """``n_instances``: audited instances per class name (default 100 each, enough for the
    default ``thresholds.min_instances``)."""
    head_audits = [HeadAudit(
        name=h, kind="linear-probe", class_names=list(classes), accuracy=0.9,
        classes=[ClassAudit(c, (n_instances or {}).get(c, 100), 0.9, 0.0, unexplained)
                 for c in classes],
        findings=[f for f in findings if f.head == h]) for h in heads]
    components = [ComponentInfo(j, "x", 0.3, 0.5, direction=d)
                  for j, d in (directions or {}).items()]
    prov = {"backbone": {"id": "tiny-vit-a"}, "sae": {"sha256": sae_sha,
                                                       "backbone_id": "tiny-vit-a"}}
    return AuditResult(audit_id=audit_id, provenance=provenance or prov,
                       sae_metrics=sae_metrics if sae_metrics is not None else
                       {"fvu": 0.2, "dead_fraction": 0.01},
                       heads=head_audits, components=components)
