"""Zero-shot heads: y_c = cos(e, t_c), from a prompt set. A prompt set is a YAML
file of classes, each with names and/or prompts, plus shared templates.

```yaml
templates: ["a dermoscopy image of {}.", "a close-up photo of {}."]
classes:
  benign:
    names: [a benign nevus, a harmless mole]      # each is put into every template
  malignant:
    names: [a malignant melanoma]
    prompts: [a dermoscopy image of skin cancer]  # used verbatim
```

A class's text direction t_c is the normalised mean of its normalised prompt
embeddings (prompt ensembling, as in CLIP).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from clipaudit.artifacts import sha256_json
from clipaudit.errors import InputError
from clipaudit.heads.base import HeadType, LinearForm, register_head_type

if TYPE_CHECKING:
    from clipaudit.extraction.backbone import Backbone


@dataclass
class ZeroShotHead:
    """y_c = cos(e, t_c), t_c the normalised mean of class c's normalised prompt embeddings."""

    text_dirs: torch.Tensor
    """[C, D] unit vectors."""
    class_names: list[str]
    prompts: dict[str, list[str]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    name: str = "zero-shot"
    kind: str = "zero-shot"

    def linear_form(self, e_nD: torch.Tensor) -> LinearForm:
        t = self.text_dirs.to(e_nD)
        return LinearForm(t, torch.zeros(e_nD.shape[1]).to(e_nD),
                          e_nD.detach().norm(dim=1).clamp_min(1e-12), torch.zeros(len(t)).to(e_nD))

    def scores(self, e_nD: torch.Tensor) -> torch.Tensor:
        e = e_nD / e_nD.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return e @ self.text_dirs.to(e_nD).T

    def class_texts(self) -> dict[str, list[str]]:
        return {name: [name, *self.prompts.get(name, [])] for name in self.class_names}

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, **self.meta}


@dataclass(frozen=True)
class PromptSet:
    class_names: list[str]
    texts: dict[str, list[str]]
    """Class -> every text that is encoded for it (templates already applied)."""
    source: str = "<memory>"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return sha256_json({"classes": self.class_names, "texts": self.texts})


def make_prompt_set(classes: dict[str, dict[str, list[str]]], templates: list[str] | None = None,
                    source: str = "<memory>") -> PromptSet:
    """Apply templates to each class's names and add its verbatim prompts."""
    templates = templates or ["{}"]
    texts = {}
    for name, spec in classes.items():
        texts[name] = [t.format(n) for n in spec.get("names", []) for t in templates]
        texts[name] += list(spec.get("prompts", []))
    return PromptSet(list(classes), texts, source)


def load_prompt_set(fpath: Path | str) -> PromptSet:
    """Read and validate a prompt-set YAML file (errors name the file and the key)."""
    fpath = Path(fpath)
    if not fpath.is_file():
        raise InputError(f"{fpath}: prompt set not found")
    try:
        doc = yaml.safe_load(fpath.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{fpath}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{fpath}: expected a mapping with 'classes' (and optional 'templates')")
    unknown = set(doc) - {"classes", "templates"}
    if unknown:
        raise InputError(f"{fpath}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    templates = doc.get("templates", ["{}"])
    if not _is_str_list(templates) or not templates:
        raise InputError(f"{fpath}: templates: expected a non-empty list of strings")
    for i, t in enumerate(templates):
        if t.count("{}") != 1:
            raise InputError(f"{fpath}: templates[{i}]: must contain '{{}}' exactly once, got {t!r}")
    classes = doc.get("classes")
    if not isinstance(classes, dict) or len(classes) < 2:
        raise InputError(f"{fpath}: classes: expected a mapping of at least two classes")
    for name, spec in classes.items():
        if not isinstance(spec, dict):
            raise InputError(f"{fpath}: classes.{name}: expected a mapping with names and/or prompts")
        bad = set(spec) - {"names", "prompts"}
        if bad:
            raise InputError(f"{fpath}: classes.{name}: unknown key(s) {', '.join(sorted(map(str, bad)))}")
        for key in ("names", "prompts"):
            if key in spec and not _is_str_list(spec[key]):
                raise InputError(f"{fpath}: classes.{name}.{key}: expected a list of strings")
        if not spec.get("names") and not spec.get("prompts"):
            raise InputError(f"{fpath}: classes.{name}: needs at least one name or prompt")
    return make_prompt_set({str(k): v for k, v in classes.items()}, templates, str(fpath))


def _is_str_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(s, str) for s in x)


@torch.no_grad()
def make_zero_shot_head(prompt_set: PromptSet, encode_text) -> ZeroShotHead:
    """Encode every prompt with ``encode_text`` (texts -> [n, D]; one call for all classes,
    which the encoder batches) and ensemble per class."""
    names = list(prompt_set.class_names)
    texts = [t for name in names for t in prompt_set.texts[name]]
    every = encode_text(texts).float()
    dirs, start = [], 0
    for name in names:
        emb = every[start:start + len(prompt_set.texts[name])]
        start += len(prompt_set.texts[name])
        emb = emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
        mean = emb.mean(0)
        dirs.append(mean / mean.norm().clamp_min(1e-12))
    meta = {"prompt_set": prompt_set.source, "prompt_set_sha256": prompt_set.sha256}
    return ZeroShotHead(torch.stack(dirs), list(prompt_set.class_names),
                        dict(prompt_set.texts), meta=meta)


def _load_for(fpath: Path, backbone: Backbone) -> ZeroShotHead:
    return make_zero_shot_head(load_prompt_set(fpath), backbone.encode_text)


register_head_type(HeadType(
    "zero-shot", "a prompt-set YAML file (classes with names and/or prompts, templates)",
    _load_for))
