"""The recipe of a measured mix (`m1-recipe.json`): where it goes, how it is read and checked, and its replay.

`m1 quantize --budget` (m1.quantize.budget) writes it beside the output: `m1-recipe.json` in an output folder,
`<stem>.m1-recipe.json` beside a file-set format's files. `--recipe` replays the same weights at the same
schemes without measuring. Its keys are the spec's weight names, or in a format that stacks experts its stacked
tensors (m1.formats' `expert_stacks`), so a recipe replays in a format that names its tensors the same way.
`summary_lines` prints a recipe for --dry-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from m1.errors import UsageError

RECIPE_VERSION = 1
RECIPE_NAME = "m1-recipe.json"
BNB_MIX_NOTE = ("a bitsandbytes mix of several schemes runs only through m1.load_pretrained: stock transformers "
                "4.x takes one bitsandbytes scheme per model (plus unquantized modules)")


@dataclass
class MixPlan:
    plan: Any
    recipe: dict[str, Any]  # the document written as m1-recipe.json
    lines: list[str] = field(default_factory=list)  # what --dry-run prints before the plan


def own_file(dest: Path, plan: Any, name: str) -> Path:
    """Where a small file of the job goes (the recipe, the GPTQ record): `<stem>.<name>` beside a file set,
    `<name>` in an output folder."""
    from m1.index import file_set_suffixes

    if plan.stem is not None and dest.suffix in file_set_suffixes():
        return dest.parent / f"{plan.stem}.{name}"
    return dest / name


def recipe_path(dest: Path, plan: Any) -> Path:
    """Where the recipe goes: `<stem>.m1-recipe.json` beside a file set, `m1-recipe.json` in an output folder."""
    return own_file(dest, plan, RECIPE_NAME)


def recipe_text(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=False) + "\n").encode()


def attach_recipe(dest: Path, plan: Any, doc: dict[str, Any]) -> Path:
    """Put the recipe into the plan's own small files: the executor writes it before the index and the
    manifest (which lists it), so an interrupted run never leaves a complete-looking mix without its recipe."""
    path = recipe_path(dest, plan)
    plan.written[path.name] = recipe_text(doc).decode()
    return path


def recipe_summary(doc: dict[str, Any]) -> dict[str, Any]:
    """The recipe without its per-weight table and raw sensitivities (for --json)."""
    return {k: v for k, v in doc.items() if k not in ("weights", "sensitivity")}


def loads_anywhere(fmt: str) -> bool:
    """Does format `fmt` store a type per tensor, so that its own runtime reads any mix (m1.formats'
    `mix_reader`)? If not, a mix of several schemes loads through m1.load_pretrained only."""
    from m1.formats import get_format

    return get_format(fmt).mix_reader is not None


def loader_line(fmt: str, n_used: int) -> str:
    """The recipe's `loader`: what reads a mix of `n_used` schemes written in format `fmt`."""
    from m1.formats import get_format

    reader = get_format(fmt).mix_reader
    if reader is not None:
        return reader
    return BNB_MIX_NOTE if n_used > 1 else "one scheme"


def stacks_experts(fmt: str | None) -> bool:
    """Does format `fmt` (a registered name, or not) stack experts, so that recipes name its stacked tensors?"""
    from m1.formats import all_formats

    return any(f.name == fmt and f.expert_stacks is not None for f in all_formats())


def read_recipe(path: Path, fmt: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the recipe ({type(exc).__name__})", file=str(path),
                         hint="give an m1-recipe.json written by m1 quantize --budget") from None
    if not isinstance(doc, dict) or doc.get("m1_recipe") != RECIPE_VERSION or not isinstance(doc.get("weights"), dict):
        raise UsageError("not an m1 recipe (m1_recipe 1 with weights)", file=str(path),
                         hint="give an m1-recipe.json written by m1 quantize --budget")
    if stacks_experts(doc.get("format")) != stacks_experts(fmt):
        want = (f"--format {doc.get('format')}" if stacks_experts(doc.get("format")) else
                f"a safetensors format (not --format {fmt})")
        raise UsageError(f"the recipe is for {doc.get('format')} output, the job writes {fmt}", file=str(path),
                         hint=f"use {want}")
    return doc


def check_coverage(doc: dict[str, Any], cfg: Any, fmt: str, path: Path) -> None:
    """A recipe covers this model's expert groups (and the other groups of its format's mix it planned), and its
    weights exactly theirs, each weight at its group's candidate: anything missing would be replayed at the main
    scheme without a word, anything extra was made for another model."""
    from m1.formats import get_format
    from m1.verify.sensitivity import groups_of

    hint = "a recipe replays on the model it was made for, as m1 quantize --budget wrote it"
    groups = doc.get("groups")
    if not isinstance(groups, dict) or not all(isinstance(v, str) for v in groups.values()):
        raise UsageError("the recipe has no groups (group -> candidate)", file=str(path), hint=hint)
    weights = doc["weights"]
    # every expert group; attention, embedding and head where the mix planned them (not pinned, a type it may take)
    every = {g.key: g for g in groups_of(cfg, get_format(fmt).mix_parts)}
    missing = [k for k, g in every.items() if g.experts and k not in groups]
    extra = [g for g in groups if g not in every]
    if missing or extra:
        what = f"lacks group {missing[0]}" if missing else f"has group {extra[0]}, which this model does not have"
        raise UsageError(f"the recipe {what} ({len(missing)} missing, {len(extra)} extra of {len(every)} groups)",
                         file=str(path), hint=hint)
    want = {k: every[k].recipe_names(cfg, fmt) for k in groups}
    named = {n for names in want.values() for n in names}
    missing_w = [n for names in want.values() for n in names if n not in weights]
    extra_w = [n for n in weights if n not in named]
    if missing_w or extra_w:
        what = f"lacks weight {missing_w[0]}" if missing_w else f"names {extra_w[0]}, which no group of this model has"
        raise UsageError(f"the recipe {what} ({len(missing_w)} missing, {len(extra_w)} extra)", file=str(path),
                         hint=hint)
    for g, names in want.items():
        off = [n for n in names if weights[n] != groups[g]]
        if off:
            raise UsageError(f"the recipe gives group {g} {groups[g]} but its weight {off[0]} {weights[off[0]]}",
                             file=str(path), hint=hint)


def plan_recipe(ckpt: Any, opts: Any, path: Path, fmt: str, imatrix: str | None = None) -> MixPlan:
    """The plan of a stored recipe: the same weights get the same schemes; nothing is measured."""
    from m1.quantize.options import plan_from_checkpoint
    from m1.schemes import make_scheme
    from m1.schemes.ggml import GGML_LIB_TYPES
    from m1.spec import spec_by_name

    doc = read_recipe(path, fmt)
    if any(opts.policy.describe().values()):
        raise UsageError("--keep/--only do not combine with --recipe: the recipe decides every expert group")
    weights = {str(k): str(v) for k, v in doc["weights"].items()}
    known = set(spec_by_name(ckpt.config)) if not stacks_experts(fmt) else None
    if known is not None:
        stray = [k for k in weights if k not in known]
        if stray:
            raise UsageError(f"the recipe names {stray[0]}, which this checkpoint does not have", file=str(path),
                             hint="a recipe replays on the model it was made for")
    check_coverage(doc, ckpt.config, fmt, path)
    main = doc.get("scheme") or opts.scheme.name
    scheme = opts.scheme if main == opts.scheme.name else (
        make_scheme(main, imatrix=imatrix) if imatrix and main in GGML_LIB_TYPES else make_scheme(main))
    plan = plan_from_checkpoint(ckpt, replace(opts, scheme=scheme, recipe=weights))
    if not loads_anywhere(fmt) and len({v for v in weights.values() if v != "keep"}) > 1:
        plan.warnings.append(BNB_MIX_NOTE)
    out = {**doc, "bytes": plan.total_bytes, "replayed_from": str(path)}
    lines = [f"recipe: {path} ({doc.get('metric', '?')}, {len(doc.get('groups', {}))} groups), not measured again",
             *("  " + x for x in doc.get("layer_map", []))]
    if BNB_MIX_NOTE in plan.warnings:
        lines.append("note: " + BNB_MIX_NOTE)
    return MixPlan(plan, out, lines)


def summary_lines(doc: dict[str, Any], sizes: dict[str, dict[str, int]], layers: int,
                  cands: dict[str, Any]) -> list[str]:
    """What --dry-run prints of a measured mix, from its recipe document."""
    from m1.units import human_bytes

    n_groups = len(doc["groups"])
    parts = doc.get("parts", ["w13", "w2"])
    layer_parts = [p for p in parts if p not in ("embed", "head")]
    global_parts = [p for p in parts if p in doc["groups"]]
    what = {"w13": "experts' w1+w3", "w2": "experts' w2", "attn": "attention"}
    lines = [f"budget: {doc['budget']['text']} = {doc['budget']['read_as']}",
             f"groups: {n_groups} ({layers} layers x {len(layer_parts)}: {', '.join(what[p] for p in layer_parts)}"
             + "".join(f"; {p}" for p in global_parts)
             + f"); not in a group (kept or typed by the format's policy): {human_bytes(doc['fixed_bytes'])}"]
    lines += ["  " + n for n in doc.get("notes", [])]
    first = [g for g in sizes if g.startswith("0.") or g in ("embed", "head")]
    lines.append("candidate sizes per group (layer 0" + "".join(f", {p}" for p in global_parts) + "): " + "; ".join(
        f"{g.split('.')[-1]} " + ", ".join(f"{c} {human_bytes(sizes[g][c])}" for c in sizes[g]) for g in first))
    if doc["metric"] == "prior":
        lines.append("errors: a stated prior, nothing measured (each group's share of the parameters a token goes "
                     "through x the scheme's relative weight MSE on Gaussian data, the same for every layer): it "
                     "sizes the mix, it cannot say which layers matter; measure with --corpus, or replay a measured "
                     "mix with --recipe")
    else:
        lines.append(f"errors: measured ({doc['metric']}, isolated per group) on {doc['calibration']} "
                     f"({doc['calibration_tokens']} tokens)")
    alloc = doc["allocation"]
    how = "exact" if alloc["exact"] else f"exact for sizes in units of {alloc['unit']:,} bytes"
    lines.append(f"allocation: DP over {n_groups} groups ({how}){'; ' + alloc['notes'][0] if alloc['notes'] else ''}")
    shown = layer_parts + global_parts
    lines.append(f"{'scheme':8s} " + " ".join(f"{p:>5s}" for p in shown) + f" {'bytes':>12s} {'predicted':>12s}")
    sens = doc["sensitivity"]
    for c in cands:
        gs = [g for g, x in doc["groups"].items() if x == c]
        if not gs:
            continue
        b = sum(doc["group_bytes"][g] for g in gs)
        err = sum(_err(sens, g, c, doc["metric"]) for g in gs)
        counts = [sum(g.split(".")[-1] == p for g in gs) for p in shown]
        lines.append(f"{c:8s} " + " ".join(f"{n:5d}" for n in counts) + f" {human_bytes(b):>12s} {err:12.6g}")
    lines += ["layer map:", *("  " + x for x in doc["layer_map"])]
    lines.append(f"mix: {human_bytes(doc['disk_bytes'])} on disk (tensors {human_bytes(doc['bytes'])}, "
                 f"{doc['bpw']:.3f} bits per weight; headers, index, manifest and recipe included) of budget "
                 f"{human_bytes(doc['budget']['bytes'])}, predicted error {doc['predicted']['mix']:.6g}")
    for c, u in doc["predicted"]["uniform"].items():
        lines.append(f"  uniform {c:8s} {human_bytes(u['bytes']):>12s} on disk, predicted {u['predicted']:.6g}"
                     f"{'' if u['fits'] else '  (over the budget)'}")
    if doc["loader"].startswith("a bitsandbytes mix"):
        lines.append("note: " + doc["loader"])
    return lines


def _err(sens: dict[str, Any], group: str, cand: str, metric: str) -> float:
    if cand == "keep":
        return 0.0
    e = sens["errors"][group][cand]
    if metric == "rel_l2":
        return e["rel_l2"] ** 2
    return e["kl"]
