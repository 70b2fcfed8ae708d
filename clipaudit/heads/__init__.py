"""Stage 3: the classifier heads an audit judges, and their registry.

``base`` holds what every head is (``Head``, ``LinearForm``) and the registry
(``register_head_type``, ``load_head``, ``list_heads``); ``probe`` the linear probe
(fit, save, load); ``zero_shot`` prompt sets and the zero-shot head.
"""

from clipaudit.heads.base import (
    Head,
    HeadType,
    LinearForm,
    describe_heads,
    get_head_type,
    list_heads,
    load_head,
    register_head_type,
)
from clipaudit.heads.probe import (
    NORMALISATIONS,
    LinearProbe,
    ProbeConfig,
    ProbeFit,
    fit_probe,
    fit_probe_on_cache,
    load_probe,
    save_probe,
)
from clipaudit.heads.zero_shot import (
    PromptSet,
    ZeroShotHead,
    load_prompt_set,
    make_prompt_set,
    make_zero_shot_head,
)

__all__ = [
    "NORMALISATIONS",
    "Head",
    "HeadType",
    "LinearForm",
    "LinearProbe",
    "ProbeConfig",
    "ProbeFit",
    "PromptSet",
    "ZeroShotHead",
    "describe_heads",
    "fit_probe",
    "fit_probe_on_cache",
    "get_head_type",
    "list_heads",
    "load_head",
    "load_probe",
    "load_prompt_set",
    "make_prompt_set",
    "make_zero_shot_head",
    "register_head_type",
    "save_probe",
]
