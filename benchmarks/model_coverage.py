"""Which open_clip models clipaudit audits, and at which hook points: every config in
``open_clip.list_models()``, with random weights (nothing is downloaded).

For each config:

1. the real config's image tower is built on the meta device (no memory, no weights):
   its tower family, pooling, what the rest of the tower is from the pooled vector,
   residual blocks and class token, parameter count;
2. a shrunken copy (2 blocks, or 1 per stage; small images; the real widths, heads,
   pooling, norms and projection) is built with random weights (layer scales drawn at a
   trained model's size, see ``layer_scales_at_trained_size``) and tested: the pooled
   vector through the rest of the tower reproduces ``encode_image``; at the first and
   last block, every residual hook token spliced back reproduces it, and changing the
   tokens at the first block changes the embedding; attributions from the pooled
   vector add up to the score (frozen gradients, affine projections);
3. with ``--full-max-params N``, configs whose image tower has at most N parameters are
   also built at full size (layer scales likewise) and checked on one image at their
   real resolution (pooled, and the residual hook points after the last block).

Writes a JSON file and a Markdown table (``--out``); prints the counts.
Run: python benchmarks/model_coverage.py [--full-max-params 100e6] [--only ViT-B-32 ...]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import re
import time
import traceback
from pathlib import Path
from typing import Any

import open_clip
import torch

from clipaudit.extraction.backbone import build_image_tower
from clipaudit.extraction.hooks import HookPoint, make_tower, tower_family

TOL = 1e-4


def timm_shrink(trunk: Any) -> list[dict[str, Any]]:
    """Keyword variants (tried in order) that shrink a timm trunk but keep its widths."""
    cls = type(trunk).__name__
    if hasattr(trunk, "blocks"):
        patch = getattr(getattr(trunk, "patch_embed", None), "patch_size", (16, 16))
        patch = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
        size = 4 * patch if patch >= 8 else 64  # hybrid (conv-stem) embeddings report patch 1
        variants = [{"depth": 2, "img_size": size}, {"depth": 2, "img_size": 64}, {"depth": 2}]
        if cls == "Eva":  # rope's reference grid follows the image size
            variants.insert(0, {"depth": 2, "img_size": size, "ref_feat_shape": (4, 4)})
        return variants
    if cls == "ConvNeXt":
        return [{"depths": [1] * len(trunk.stages)}]
    if cls == "FastVit":
        return [{"layers": [1] * len(trunk.stages)}]
    if cls == "SwinTransformer":
        return [{"depths": [1] * len(trunk.layers)}]
    return [{}]


def shrunken_configs(model_cfg: dict[str, Any], meta_visual: Any) -> list[tuple[dict[str, Any], int]]:
    """(model config, image size) variants of a shrunken copy, to try in order."""
    vision = model_cfg["vision_cfg"]
    out = []
    if vision.get("timm_model_name"):
        trunk = meta_visual.trunk
        for kwargs in timm_shrink(trunk):
            cfg = copy.deepcopy(model_cfg)
            cfg["vision_cfg"]["timm_model_kwargs"] = kwargs
            size = kwargs.get("img_size") or (64 if type(trunk).__name__ in ("ConvNeXt", "FastVit")
                                              else _timm_default_size(trunk))
            cfg["vision_cfg"]["image_size"] = size
            out.append((cfg, size))
    elif isinstance(vision.get("layers"), (list, tuple)):  # ModifiedResNet
        cfg = copy.deepcopy(model_cfg)
        cfg["vision_cfg"].update(layers=[1, 1, 1, 1], image_size=64)
        out.append((cfg, 64))
    else:  # open_clip ViT: 2 blocks on a 3 x 3 grid
        cfg = copy.deepcopy(model_cfg)
        patch = vision.get("patch_size", 16)
        size = 3 * patch
        cfg["vision_cfg"].update(layers=2, image_size=size)
        if vision.get("attentional_pool"):
            cfg["vision_cfg"]["attn_pooler_queries"] = min(vision.get("attn_pooler_queries", 256), 16)
        out.append((cfg, size))
    return out


def _timm_default_size(trunk: Any) -> int:
    size = (getattr(trunk, "default_cfg", None) or {}).get("input_size", (3, 224, 224))
    return int(size[-1])


LAYER_SCALE = re.compile(r"(^|\.)gamma(_\d)?$")  # open_clip/timm LayerScale(2d), ConvNeXt, EVA


@torch.no_grad()
def layer_scales_at_trained_size(visual: torch.nn.Module, seed: int = 0) -> int:
    """Redraws every layer-scale factor per channel from U(0.5, 1.5); returns how many
    tensors it redrew.

    Layer scale multiplies each block's attention and MLP output by a learned per-channel
    factor that training starts tiny (open_clip's ``ls_init_value`` 1e-4 in ViT-M-16-alt,
    timm's ``init_values`` 1e-6) and grows. At that init every block is nearly the identity:
    in a class-token tower the patch tokens reach the class token only through attention.
    In ViT-M-16-alt's 2-block copy, an edit of them at the first block moved the embedding
    by 1.2e-5 of its size (the edit check wants 1e-3), and dropping the last block moved it
    by 3e-5 (under ``TOL``: a rest of the tower that skipped a block would have passed).
    With these factors the same edit moves it by 0.11 and dropping the block by 0.25. The
    shrunken copies' real weights would be trained ones; the checks need every block seen."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in visual.named_parameters():
        if LAYER_SCALE.search(name):
            p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.5)
            n += 1
    return n


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


@torch.no_grad()
def check_tower(visual: Any, size: int, n_images: int = 2, seed: int = 0,
                layers: tuple[int, ...] = (0, -1)) -> dict[str, Any]:
    """Equivalence checks on a built tower; returns what was tested and the worst errors.
    Residual hook points are checked after each block in ``layers``; the edit check
    (changing the tokens changes the embedding) runs at block 0 when it is in ``layers``."""
    tower = make_tower(visual)
    images = torch.randn(n_images, 3, size, size, generator=torch.Generator().manual_seed(seed))
    expected = tower.encode(images)
    cap = tower.capture(images, HookPoint())
    readout = tower.pooled_readout
    result: dict[str, Any] = {
        "pooled_err": max(_rel_err(readout(cap.acts), expected), _rel_err(cap.embeds, expected)),
        "pooled_dim": tower.pooled_dim, "residual": {}}
    if readout.affine is not None:
        normed = readout.norm(cap.acts) if readout.norm is not None else cap.acts
        result["affine_err"] = _rel_err(normed @ readout.affine[0] + readout.affine[1], expected)
        result["complete_err"] = _completeness(cap.acts, readout, expected.shape[1])
    for token in tower.hook_tokens[1:]:
        errs, live, change = [], True, None
        for layer in layers:
            resolved = tower.resolve(HookPoint(layer, token))
            acts = tower.capture(images, HookPoint(layer, token)).acts
            rest = tower.forward_edited(images, resolved, lambda r, a=acts, t=token: tower.replace(r, t, a))
            errs.append(_rel_err(rest, expected))
            if layer == 0:
                moved = tower.forward_edited(images, resolved, lambda r, a=acts, t=token:
                                             tower.replace(r, t, a + torch.randn_like(a)))
                change = _rel_err(moved, expected)
                live = change > 1e-3
        result["residual"][token] = {"err": max(errs), "edit_changes_output": live,
                                     "edit_change": change}
    return result


def _completeness(pooled: torch.Tensor, readout: Any, embed_dim: int) -> float:
    """Frozen attributions of a random TopK SAE and L2 probe add up to the score."""
    from clipaudit.attribution.patching import attribute_cls
    from clipaudit.heads import LinearProbe
    from clipaudit.sae.model import TopKSAE

    d = pooled.shape[1]
    torch.manual_seed(1)
    sae = TopKSAE(d, 2 * d, min(8, d))
    g = torch.Generator().manual_seed(2)
    probe = LinearProbe(torch.randn(3, embed_dim, generator=g), torch.randn(3, generator=g),
                        ["a", "b", "c"], "l2")
    attr = attribute_cls(pooled, torch.arange(len(pooled)), sae, probe, readout)
    total = attr.dense().sum(1) + attr.error + attr.bias
    return _rel_err(total, attr.scores - attr.head_bias)


def audit_config(name: str, full_max_params: float) -> dict[str, Any]:
    row: dict[str, Any] = {"model": name}
    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    start = time.perf_counter()
    with torch.device("meta"):
        meta_visual = build_image_tower(model_cfg)
        family = tower_family(meta_visual)
        tower = make_tower(meta_visual)
        readout = tower.pooled_readout
    trunk = getattr(meta_visual, "trunk", None)
    row.update(family=family.name,
               tower=type(trunk).__name__ if trunk is not None else type(meta_visual).__name__,
               params=sum(p.numel() for p in meta_visual.parameters()),
               rest_of_tower=readout.description, affine=readout.is_affine,
               n_blocks=tower.n_blocks, hook_tokens=list(tower.hook_tokens),
               cls_is_pooled=tower.cls_is_pooled)
    errors = []
    for cfg, size in shrunken_configs(model_cfg, meta_visual):
        try:
            torch.manual_seed(0)
            visual = build_image_tower(cfg).eval()
            redrawn = layer_scales_at_trained_size(visual)
            row["shrunken"] = {"image_size": size,
                               "timm_model_kwargs": cfg["vision_cfg"].get("timm_model_kwargs"),
                               "params": sum(p.numel() for p in visual.parameters()),
                               "layer_scales_redrawn": redrawn, **check_tower(visual, size)}
            break
        except Exception as e:  # record and try the next variant
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    if "shrunken" not in row:
        row["shrunken_errors"] = errors
    if row["params"] <= full_max_params:
        try:
            torch.manual_seed(0)
            visual = build_image_tower(copy.deepcopy(model_cfg)).eval()
            size = open_clip.get_model_config(name)["vision_cfg"].get("image_size", 224)
            size = size if isinstance(size, int) else size[0]
            redrawn = layer_scales_at_trained_size(visual)
            row["full_size"] = {"image_size": size, "layer_scales_redrawn": redrawn,
                                **check_tower(visual, size, n_images=1, layers=(-1,))}
        except Exception as e:
            row["full_size_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    row["seconds"] = round(time.perf_counter() - start, 1)
    row.update(verdict(row))
    return row


def verdict(row: dict[str, Any]) -> dict[str, Any]:
    """Which hook points hold, on what evidence."""
    tests = [r for r in (row.get("shrunken"), row.get("full_size")) if r]
    if not tests:
        return {"pooled_ok": False, "residual_ok": None, "tested": "build failed"}
    pooled_ok = all(t["pooled_err"] < TOL and t.get("complete_err", 0.0) < TOL for t in tests)
    residual_ok = None
    if row["n_blocks"]:
        residual_ok = all(r["err"] < TOL and r["edit_changes_output"]
                          for t in tests for r in t["residual"].values()) and bool(tests[0]["residual"])
    how = "shrunken copy" + (" + full size" if row.get("full_size") else "")
    return {"pooled_ok": pooled_ok, "residual_ok": residual_ok, "tested": how}


def write_markdown(rows: list[dict[str, Any]], fpath: Path, header: str) -> None:
    lines = [header, "",
             "| model | family | tower | params | rest of tower from pooled | pooled "
             "| residual (tokens) | tested |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pooled = "yes" if r.get("pooled_ok") else "NO"
        if r.get("residual_ok") is None:
            residual = "-"
        else:
            residual = ("yes" if r["residual_ok"] else "NO") + f" ({', '.join(r['hook_tokens'][1:])})"
        lines.append(f"| {r['model']} | {r.get('family', '?')} | {r.get('tower', '?')} | "
                     f"{r.get('params', 0) / 1e6:.0f}M | {r.get('rest_of_tower', '?')} | {pooled} | "
                     f"{residual} | {r.get('tested', '')} |")
    fpath.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".bench/model_coverage"),
                        help="folder for model_coverage.json and model_coverage.md")
    parser.add_argument("--full-max-params", type=float, default=0.0,
                        help="also test configs with at most this many image-tower parameters at "
                             "full size (0: none)")
    parser.add_argument("--only", nargs="*", help="model names (default: all of list_models())")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.only or open_clip.list_models()
    rows, start = [], time.perf_counter()
    for i, name in enumerate(names, 1):
        try:
            row = audit_config(name, args.full_max_params)
        except Exception as e:
            row = {"model": name, "pooled_ok": False, "residual_ok": None,
                   "tested": f"error: {type(e).__name__}: {str(e)[:200]}",
                   "traceback": traceback.format_exc(limit=3)}
        rows.append(row)
        print(f"[{i}/{len(names)}] {name:34s} {row.get('family', '?'):17s} pooled "
              f"{'ok' if row.get('pooled_ok') else 'FAIL'}  residual "
              f"{ {True: 'ok', False: 'FAIL', None: '-'}[row.get('residual_ok')] }  "
              f"({row.get('tested')}, {row.get('seconds', 0)} s)", flush=True)
    seconds = time.perf_counter() - start
    n = len(rows)
    pooled = sum(bool(r.get("pooled_ok")) for r in rows)
    transformer = [r for r in rows if r.get("n_blocks")]
    residual = sum(bool(r.get("residual_ok")) for r in transformer)
    full = sum("full_size" in r for r in rows)
    families: dict[str, int] = {}
    for r in rows:
        families[r.get("family", "?")] = families.get(r.get("family", "?"), 0) + 1
    summary = (f"{pooled}/{n} configs at the pooled hook point; {residual}/{len(transformer)} "
               f"transformer towers at residual hook points; {full} also tested at full size")
    date = dt.date.today().isoformat()
    header = (f"# open_clip model coverage\n\n`python benchmarks/model_coverage.py "
              f"--full-max-params {args.full_max_params:g}`, {date}, open_clip "
              f"{open_clip.__version__}, random weights (layer scales redrawn at a trained "
              f"model's size), {seconds:.0f} s.\n\n{summary}. "
              f"Families: {', '.join(f'{k} {v}' for k, v in sorted(families.items()))}.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_coverage.json").write_text(json.dumps(
        {"date": date, "open_clip": open_clip.__version__, "summary": summary,
         "families": families, "seconds": round(seconds), "rows": rows}, indent=1, default=str))
    write_markdown(rows, args.out / "model_coverage.md", header)
    print(summary)
    print(f"families: {families}; {seconds:.0f} s; wrote {args.out}/model_coverage.{{json,md}}")


if __name__ == "__main__":
    main()
