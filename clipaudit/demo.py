"""``clipaudit demo``: the whole pipeline on the bundled tiny CLIP and a planted
ruler -> malignant shortcut from the synthetic dermatology world.

make data set -> extract -> train SAE -> fit probe -> prompt set -> audit both
heads under rules/dermatology.yaml -> audit.json, report.html, report.pdf,
junit.xml, summary.md. The rules are meant to fail: the probe relies on rulers.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from clipaudit.audit import AuditConfig, AuditOutcome, OutputConfig, run_audit
from clipaudit.describe.config import DescribeConfig
from clipaudit.errors import OutputError
from clipaudit.extraction.backbone import BackboneSpec, load_backbone
from clipaudit.progress import NULL_REPORTER, Reporter
from clipaudit.resources import package_data_dpath
from clipaudit.sae.config import SAETrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    out_dpath: Path = Path("clipaudit-demo")
    """Folder for the data set, cache, SAE, probe and the audit."""
    n_images: int = 2000
    n_reference: int = 2000
    """Images of the clean reference set: the SAE is trained on it and it describes the
    components (an SAE decomposes the CLIP, so it learns from broad data, where each
    artifact occurs independently of the diagnosis)."""
    artifact: str = "ruler"
    target_class: str = "malignant"
    rate: float = 0.9
    """Share of ruler images that are malignant (0.5 = no shortcut)."""
    sae: SAETrainConfig = SAETrainConfig(expansion=2, k=16, steps=6000, batch_size=256)
    """The SAE trained on the reference set: 192 components for the tiny CLIP's 96
    dimensions. Wider SAEs split each artifact by context ("band-aid on dark skin beside
    a tan lesion"), and such a component's top images then lean towards one class.
    Trained to convergence: from 1,500 to 6,000 steps its unexplained variance still
    halves (0.0039 to 0.0018 on 4,000 dermatology images, 0.0053 to 0.0028 on 4,000 birds
    images), and an undertrained SAE spreads attributes over several components, which the
    ``sae-coverage`` check then rightly calls blind. Its seed is ``seed``."""
    seed: int = 0
    pdf: bool = True
    backbone: BackboneSpec = BackboneSpec.bundled()
    """The CLIP to audit: the bundled tiny CLIP (``tiny-derm-clip``), which knows the
    synthetic world; named explicitly, as every model is."""


def demo_prompts_fpath() -> Path:
    return package_data_dpath() / "prompts" / "dermatology.yaml"


def run_demo(config: DemoConfig = DemoConfig(), *, reporter: Reporter = NULL_REPORTER) -> AuditOutcome:
    from clipaudit.extraction.cache import ExtractConfig, extract
    from clipaudit.heads import ProbeConfig, fit_probe_on_cache, save_probe
    from clipaudit.sae import train_sae_on_cache
    from clipaudit.synthetic import make_planted_dataset

    out = Path(config.out_dpath)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; give the demo a folder to write into")
    backbone = load_backbone(config.backbone)
    data = make_planted_dataset(out / "data", artifact=config.artifact, target_class=config.target_class,
                                rate=config.rate, n=config.n_images, seed=config.seed,
                                overwrite=True, reporter=reporter)
    # A clean set of the same world (artifacts independent of the diagnosis) describes the
    # components, so a shortcut's top images are not mostly of the class it serves.
    reference = make_planted_dataset(out / "reference-data", artifact=None, n=config.n_reference,
                                     seed=config.seed + 1, overwrite=True, reporter=reporter)
    caches = {}
    for name, manifest in (("cache", data.manifest_fpath), ("reference-cache", reference.manifest_fpath)):
        if (out / name / "manifest.json").is_file():  # a previous demo's cache: start afresh
            shutil.rmtree(out / name)
        caches[name] = extract(manifest, out / name, ExtractConfig(num_workers=1), backbone=backbone,
                               reporter=reporter).dpath
    cache_dpath = caches["cache"]
    sae_fpath = out / "sae.safetensors"
    train_sae_on_cache(caches["reference-cache"], sae_fpath,
                       replace(config.sae, seed=config.seed),
                       reporter=reporter)
    probe_fpath = out / "probe.safetensors"
    save_probe(fit_probe_on_cache(cache_dpath, config=ProbeConfig(seed=config.seed)).probe, probe_fpath)
    audit_config = AuditConfig(
        rules="dermatology", seed=config.seed, outputs=OutputConfig(pdf=config.pdf),
        describe=DescribeConfig(vocabularies=("dermatology",), reference_cache=caches["reference-cache"]))
    return run_audit(cache_dpath, sae_fpath, out / "audit", probe=probe_fpath,
                     prompts=demo_prompts_fpath(), config=audit_config, backbone=backbone,
                     reporter=reporter)
