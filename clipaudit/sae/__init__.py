"""TopK sparse autoencoders: the model, training, metrics, files and foreign formats."""

from clipaudit.sae.config import SAETrainConfig
from clipaudit.sae.files import check_sae_matches, read_sae_file, save_sae
from clipaudit.sae.formats import (
    SAEFormat,
    detect_sae_format,
    import_sae,
    list_sae_formats,
    load_sae,
    register_sae_format,
)
from clipaudit.sae.info import SAEInfo, embed_readout_for, sae_info
from clipaudit.sae.metrics import FVU_WARN, SAEMetrics, evaluate_sae
from clipaudit.sae.model import SAE, SparseCodes, TopKSAE, canonical_topk
from clipaudit.sae.train import TrainResult, train_sae, train_sae_on_cache
from clipaudit.sae.trainer import SAETrainer, StepStats

__all__ = [
    "FVU_WARN",
    "SAE",
    "SAEFormat",
    "SAEInfo",
    "SAEMetrics",
    "SAETrainConfig",
    "SAETrainer",
    "SparseCodes",
    "StepStats",
    "TopKSAE",
    "TrainResult",
    "canonical_topk",
    "check_sae_matches",
    "detect_sae_format",
    "embed_readout_for",
    "evaluate_sae",
    "import_sae",
    "list_sae_formats",
    "load_sae",
    "read_sae_file",
    "register_sae_format",
    "sae_info",
    "save_sae",
    "train_sae",
    "train_sae_on_cache",
]
