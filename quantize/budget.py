"""`m1 quantize --budget`: a measured mix of schemes under a size budget, and recipes that replay it.

1. Sizes: every expert tensor group (a layer's w1+w3, or its w2) under every candidate, from the schemes'
   `pieces()` (the bytes the plan writes); the rest of the output (attention, norms, router, embedding, head)
   from a plan of the job itself.
2. Errors: measured on calibration text (m1.verify.sensitivity, KL at the head by default) or, where nothing
   can be read (a sparse replica: headers only), a stated prior (`sensitivity.prior`: parameter share x the
   scheme's weight noise on Gaussian data, the same for every layer).
3. Allocation: m1.allocate's exact DP.
4. The plan: the pipeline's planner with `JobRequest.recipe` (weight, or a stacked tensor in a format that
   stacks experts -> scheme); the recipe document (m1.quantize.recipe) is written beside the output and
   replays the same mix with `--recipe`, without measuring.

A bitsandbytes mix of several schemes loads through `m1.load_pretrained` only: stock transformers 4.x takes
one bitsandbytes scheme (plus unquantized modules) per model. A format that stores a type per tensor
(m1.formats' `mix_reader`) has a runtime that reads any mix.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from m1.errors import UsageError
from m1.quantize.mix_sizes import group_candidates, group_sizes, mix_parts
from m1.quantize.recipe import (
    BNB_MIX_NOTE,
    RECIPE_NAME,
    RECIPE_VERSION,
    MixPlan,
    attach_recipe,
    loader_line,
    loads_anywhere,
    plan_recipe,
    recipe_summary,
    recipe_text,
    summary_lines,
)

# The recipe's side of a mix lives in m1.quantize.recipe; the job and the CLI take these from here too.
__all__ = ["MixPlan", "attach_recipe", "group_sizes", "make_candidates", "mix_plan", "output_bytes", "plan_budget",
           "recipe_summary", "summary_lines"]


def default_candidates(fmt: str) -> str:
    """--candidates when not given: the output format's (m1.formats' `mix_candidates`)."""
    from m1.formats import get_format

    return get_format(fmt).mix_candidates


def make_candidates(names: str, fmt: str, main: Any, imatrix: str | None = None, least: int = 2) -> dict[str, Any]:
    """'nf4,int8' -> name -> Scheme (None for keep), the main --scheme's options kept where the names agree;
    `least` candidates at least (--head-candidates may name one)."""
    from m1.schemes import make_scheme
    from m1.schemes.ggml import GGML_LIB_TYPES
    from m1.verify.sensitivity import KEEP

    out: dict[str, Any] = {}
    for name in (n.strip() for n in names.split(",")):
        if not name or name in out:
            continue
        if name == KEEP:
            out[name] = None
            continue
        if main is not None and name == main.name:
            scheme = main
        elif imatrix is not None and name in GGML_LIB_TYPES:
            scheme = make_scheme(name, imatrix=imatrix)
        else:
            scheme = make_scheme(name)
        if fmt not in scheme.formats:
            raise UsageError(f"--candidates: {scheme.describe()} cannot be stored in the {fmt} format",
                             hint=f"the {fmt} format stores schemes such as {default_candidates(fmt)}")
        out[name] = scheme
    if least == 1 and not out:
        raise UsageError("--head-candidates names no candidate", hint="e.g. --head-candidates q3_k,q4_k,q6_k")
    if least > 1 and (len([c for c in out if c != KEEP]) < 1 or len(out) < 2):
        raise UsageError("--candidates needs at least two candidates, one of them a scheme",
                         hint="e.g. --candidates nf4,int8 or --candidates q4_k,q5_k,q6_k,q8_0")
    return out


def output_bytes(plan: Any, ckpt: Any, recipe: dict[str, Any] | None = None) -> int:
    """At least every byte the job writes for `plan`: each file with its header (the sink's `file_bytes`), what
    the sink writes after them (the index), config.json and the copied files, the job's own small files and
    `recipe`, and the manifest (sized with placeholder hashes and each file's bound, as many digits or more)."""
    from m1.atomic_io import json_text
    from m1.manifest import SHA256_PLACEHOLDER, manifest_document
    from m1.sinks import get_sink
    from m1.version import __version__

    sink = get_sink(plan.sink)
    files = {f.name: sink.file_bytes(plan, f) for f in plan.files}
    small: dict[str, int] = {}
    if plan.writes_config:
        small["config.json"] = len(json_text(plan.config).encode())
        for name in plan.extra_files:
            small[name] = len(ckpt.storage.read_bytes(name))
    written = {n: len(t.encode()) for n, t in plan.written.items()}
    if recipe is not None:
        written[f"{plan.stem}.{RECIPE_NAME}" if plan.stem is not None else RECIPE_NAME] = len(recipe_text(recipe))
    small.update(written)
    small.update(sink.finish_bytes(plan))
    manifest = manifest_document(plan, f"m1 {__version__}", "0000-00-00T00:00:00Z", SHA256_PLACEHOLDER,
                                 {n: (SHA256_PLACEHOLDER, b) for n, b in files.items()},
                                 dict.fromkeys(small, SHA256_PLACEHOLDER))
    return sum(files.values()) + sum(small.values()) + len(json_text(manifest).encode())


MAX_FITS = 12  # allocations tried: each takes off what the last one's whole output went past the budget


def _fixed_bytes(plan: Any, grouped: set[str] | None = None) -> int:
    """The plan's tensor bytes outside the mix's groups (`grouped`: their recipe names; None: the experts)."""
    if grouped is None:
        return plan.total_bytes - sum(op.nbytes for op in plan.ops if op.role == "expert")
    return plan.total_bytes - sum(op.nbytes for op in plan.ops if any(o.name in grouped for o in op.outputs))


def _head_formats() -> list[str]:
    from m1.formats import format_names, get_format

    return [f for f in format_names() if "head" in get_format(f).mix_parts]

def plan_budget(ckpt: Any, opts: Any, *, budget: str, candidates: str | None, fmt: str, windows: Any = None,
                calibration: str = "", metric: str = "kl", device: str = "cpu", imatrix: str | None = None,
                sensitivity: Any = None, head_candidates: str | None = None) -> MixPlan:
    """Measure (or take `sensitivity`, or the prior), allocate, plan. `opts`: QuantizeOptions of the job."""
    from m1.allocate import Allocation, allocate, parse_budget, rule_of_thumb, uniform_assignment
    from m1.quantize.options import plan_from_checkpoint
    from m1.units import human_bytes
    from m1.verify import sensitivity as sens_mod

    if metric not in ("kl", "rel_l2"):
        raise UsageError(f"--metric must be kl or rel_l2, got {metric!r}")
    if any(opts.policy.describe().values()):
        raise UsageError("--keep/--only do not combine with --budget: the mix decides every expert group",
                         hint="add keep to --candidates to let the allocation leave groups unquantized")
    base_cands = make_candidates(candidates or default_candidates(fmt), fmt, opts.scheme, imatrix)
    cands = dict(base_cands)
    cfg = ckpt.config
    parts, notes = mix_parts(fmt, opts.format_options)
    head_cands = None
    if head_candidates is not None:
        if "head" not in parts:
            raise UsageError(f"--head-candidates: the {fmt} format's mix does not plan the head"
                             + (" (--head-type pins it)" if "head" in _all_parts(fmt) else ""),
                             hint=f"the formats whose mix plans the head: {', '.join(_head_formats())}")
        head_cands = make_candidates(head_candidates, fmt, opts.scheme, imatrix, least=1)
        for c, scheme in head_cands.items():
            cands.setdefault(c, scheme)
    groups = sens_mod.groups_of(cfg, parts)
    accepts, refused = group_candidates(ckpt, groups, base_cands, fmt, head_cands)
    notes += refused
    for g in [g for g in groups if not accepts[g.key]]:  # the job's fixed type, as without a mix
        notes.append(f"{g.key}: no candidate it may take, stays at the job's type")
        groups.remove(g)
    accepts = {g.key: accepts[g.key] for g in groups}
    smallest_scheme = next(s for s in cands.values() if s is not None)
    base_plan = plan_from_checkpoint(ckpt, replace(opts, scheme=smallest_scheme))
    total_budget, budget_text = parse_budget(budget, base_plan.params)
    sizes = group_sizes(ckpt, groups, cands, fmt, accepts)
    if sensitivity is None:
        if windows is not None:
            sensitivity = sens_mod.measure(_source(ckpt), windows, cands, device=device, kl=metric == "kl",
                                           parts=parts, accepts=accepts)
            sensitivity.calibration = calibration
        else:
            sensitivity = sens_mod.prior(cfg, cands, parts, accepts)
            metric = "kl"
    lacking = [g.key for g in groups if g.key not in sensitivity.errors]
    if lacking:
        raise UsageError(f"the sensitivities have no group {lacking[0]} (they were measured on another model, or "
                         "for another format's groups?)", hint="measure again with --corpus or --text")
    unmeasured = [(g, c) for g, row in accepts.items() for c in row if c != sens_mod.KEEP
                  and c not in sensitivity.errors[g]]
    if unmeasured:
        raise UsageError(f"the sensitivities have no {unmeasured[0][1]} for group {unmeasured[0][0]}",
                         hint="measure again with these --candidates")
    measured = windows is not None or not sensitivity.calibration.startswith("prior")
    errors = {g: {c: sensitivity.error(g, c, metric) for c in row} for g, row in accepts.items()}
    # Every byte on disk counts: besides the groups' tensors, the other tensors, every file's header, the index,
    # config and copied files, the manifest and the recipe. A uniform plan of each candidate sizes them; the
    # part that grows with the groups' tensors (headers, index and manifest entries) is shared out over the
    # groups, so the DP weighs a candidate by its bytes on disk, and each allocation whose whole output still
    # goes past the budget (a mix's config lists its weights) gives the excess back until it fits.
    names = {g.key: g.recipe_names(cfg, fmt) for g in groups}
    grouped = {n for ns in names.values() for n in ns}
    fixed = _fixed_bytes(base_plan, grouped)

    def weights_of(assignment: dict[str, str]) -> dict[str, str]:
        return {n: assignment[g] for g, ns in names.items() for n in ns}

    disk_sizes: dict[str, dict[str, int]] = {g: dict(row) for g, row in sizes.items()}
    for c, scheme in cands.items():
        if not any(c in row for row in sizes.values()):
            continue
        assign = uniform_assignment(sizes, c)
        uniform_plan = plan_from_checkpoint(ckpt, replace(opts, scheme=scheme or smallest_scheme,
                                                          recipe=weights_of(assign)))
        on_disk = output_bytes(uniform_plan, ckpt, {"weights": weights_of(assign)})
        share = -(-(on_disk - sum(sizes[g][x] for g, x in assign.items())) // len(groups))
        for g in disk_sizes:
            if c in disk_sizes[g]:
                disk_sizes[g][c] += share
    smallest = sum(min(row.values()) for row in disk_sizes.values())
    outside = smallest - sum(min(row.values()) for row in sizes.values())
    if smallest > total_budget:
        raise UsageError(f"--budget {budget} ({human_bytes(total_budget)}) is below the smallest mix of these "
                         f"candidates, {human_bytes(smallest)} on disk ({human_bytes(outside)} of it outside the "
                         f"mix's {len(groups)} groups: other tensors, headers, index, manifest, recipe)",
                         hint="raise --budget, or add a smaller candidate")

    def attempt(alloc: Any) -> tuple[Any, dict[str, Any], int]:
        """The plan and recipe of an allocation, and its whole output's bytes on disk."""
        recipe_weights = weights_of(alloc.assignment)
        used = Counter(c for c in alloc.assignment.values() if c != sens_mod.KEEP)
        if not used:
            raise UsageError("the budget leaves every group unquantized: nothing to quantize",
                             hint="use m1 convert for an unquantized copy, or lower --budget")
        on_experts = Counter(c for g, c in alloc.assignment.items() if c != sens_mod.KEEP and _is_expert(g))
        main_name = (on_experts or used).most_common(1)[0][0]  # what the file is "mostly" (a file type)
        plan = plan_from_checkpoint(ckpt, replace(opts, scheme=cands[main_name], recipe=recipe_weights))
        doc = _recipe_doc(plan, alloc, cands, sizes, errors, disk_sizes, total_budget, budget, budget_text,
                          main_name, "kl" if not measured else metric, measured, sensitivity, recipe_weights, cfg,
                          fmt, len(used), parts, grouped, notes)
        doc["disk_bytes"] = total_budget  # as many digits or more than the sum it becomes
        return plan, doc, output_bytes(plan, ckpt, doc)

    group_budget = total_budget
    for _ in range(MAX_FITS):
        alloc = allocate(disk_sizes, errors, group_budget)
        plan, doc, on_disk = attempt(alloc)
        if on_disk <= total_budget or group_budget == smallest:
            break
        # Headers and lists grew with the mix (a bitsandbytes mix's config lists its weights): take it off the
        # groups, down to the smallest mix at most.
        group_budget = max(smallest, group_budget - (on_disk - total_budget))
    if on_disk > total_budget:
        # Every mix the allocator found lists too much beside its tensors (on a small model a bitsandbytes mix's
        # weight list outweighs what it saves): the best uniform candidate that fits, if one does.
        def uniform_error(c: str) -> float:
            return sum(errors[g][x] for g, x in uniform_assignment(sizes, c).items())

        for c in sorted((c for c in cands if c != sens_mod.KEEP), key=uniform_error):
            assign = uniform_assignment(sizes, c)
            uniform = Allocation(assign, sum(sizes[g][x] for g, x in assign.items()), uniform_error(c),
                                 group_budget, 1, True)
            tried = attempt(uniform)
            if tried[2] <= total_budget:
                alloc, (plan, doc, on_disk) = uniform, tried
                break
    if on_disk > total_budget:
        raise UsageError(f"--budget {budget} ({human_bytes(total_budget)}) leaves no mix of these candidates that "
                         f"fits on disk with its headers, index, manifest and recipe", hint="raise --budget")
    doc["disk_bytes"] = on_disk
    schemes_used = sorted(set(alloc.assignment.values()), key=lambda c: list(cands).index(c))
    if not loads_anywhere(fmt) and len([c for c in schemes_used if c != sens_mod.KEEP]) > 1:
        plan.warnings.append(BNB_MIX_NOTE)
    lines = summary_lines(doc, sizes, cfg.num_hidden_layers, cands)
    if not loads_anywhere(fmt) and 2 <= len(cfg.layer_kinds):  # beside a mix m1 loads: llama.cpp's heuristic
        low, high = list(cands)[0], list(cands)[-1]
        expert_groups = [g for g in alloc.assignment if _is_expert(g)]
        if all(low in sizes[g] and high in sizes[g] for g in expert_groups):
            rot = rule_of_thumb(expert_groups, cfg.num_hidden_layers, low, high)
            for g, row in sizes.items():  # outside the experts: high where it may, else its largest
                rot.setdefault(g, high if high in row else max(row, key=lambda c: (row[c], c)))
            rot_bytes = sum(sizes[g][c] for g, c in rot.items()) + fixed
            rot_err = sum(errors[g][c] for g, c in rot.items())
            lines.append(f"llama.cpp's layer pattern ({high} for w2 of the first/last eighth and every third layer, "
                         f"else {low}; {high} outside the experts): {human_bytes(rot_bytes)}, predicted {rot_err:.6g}")
    return MixPlan(plan, doc, lines)


def round_mix_with(plan: Any, rounding: Any) -> None:
    """A mix's plan written with GPTQ's rounding (an m1.schemes.gptq.Rounding) for every scheme of it that takes
    one (m1.schemes.gptq_scheme_names); the others keep their own. Its sensitivities were measured with the
    schemes' own rounding, which GPTQ only improves on, so the allocation stays within the budget (the bytes do
    not change). The config (where the format has one) and the job record say so."""
    from m1.schemes import gptq_scheme_names

    takes = set(gptq_scheme_names())
    rounded = [name for name in plan.schemes if name in takes]
    if not rounded:
        raise UsageError(f"--rounding gptq: no scheme of this mix takes it ({', '.join(sorted(plan.schemes))})",
                         hint=f"GPTQ chooses the codes of {', '.join(sorted(takes))}: name some in --candidates")
    for name in rounded:
        plan.schemes[name] = replace(plan.schemes[name], rounding=rounding)
    if plan.scheme is not None and plan.scheme.name in plan.schemes:
        plan.scheme = plan.schemes[plan.scheme.name]
    qc = plan.config.get("quantization_config") if isinstance(plan.config, dict) else None
    if isinstance(qc, dict):
        qc["m1_rounding"] = {**rounding.record(), "schemes": sorted(rounded)}
    plan.job["rounding"] = {**rounding.record(), "schemes": sorted(rounded)}


def _is_expert(key: str) -> bool:
    return key.endswith((".w13", ".w2"))


def _all_parts(fmt: str) -> tuple[str, ...]:
    from m1.formats import get_format

    return get_format(fmt).mix_parts


def _recipe_doc(plan: Any, alloc: Any, cands: dict[str, Any], sizes: dict[str, dict[str, int]],
                errors: dict[str, dict[str, float]], disk_sizes: dict[str, dict[str, int]], total_budget: int,
                budget: str, budget_text: str,
                main_name: str, metric: str, measured: bool, sensitivity: Any, recipe_weights: dict[str, str],
                cfg: Any, fmt: str, n_used: int, parts: list[str], grouped: set[str],
                notes: list[str]) -> dict[str, Any]:
    """The recipe document (m1-recipe.json); the uniform schemes' bytes are their whole output on disk."""
    from m1.allocate import describe, layer_map, uniform

    uniforms = {}
    for c in cands:
        if not any(c in row for row in sizes.values()):
            continue
        b, p = uniform(disk_sizes, errors, c)
        uniforms[c] = {"bytes": b, "predicted": p, "fits": b <= total_budget}
    doc = {
        "m1_recipe": RECIPE_VERSION, "format": fmt, "scheme": main_name, "candidates": list(cands),
        "budget": {"text": budget, "bytes": total_budget, "read_as": budget_text},
        "bytes": plan.total_bytes, "fixed_bytes": _fixed_bytes(plan, grouped), "params": plan.params,
        "bpw": 8 * plan.total_bytes / plan.params if plan.params else None,
        "metric": metric if measured else "prior",
        "calibration": sensitivity.calibration, "calibration_tokens": sensitivity.tokens,
        "parts": parts, "group_candidates": {g: list(row) for g, row in sizes.items()}, "notes": notes,
        "groups": alloc.assignment, "group_bytes": {g: sizes[g][c] for g, c in alloc.assignment.items()},
        "predicted": {"mix": alloc.predicted, "uniform": uniforms},
        "allocation": describe(alloc),
        "layer_map": layer_map(alloc.assignment, parts, cfg.num_hidden_layers, list(cands)),
        "loader": loader_line(fmt, n_used),
        "weights": recipe_weights,
        "sensitivity": sensitivity.to_json(),
    }
    return doc


def _source(ckpt: Any) -> Any:
    from m1.verify.sources import CheckpointWeights

    return CheckpointWeights(ckpt)


def mix_plan(ckpt: Any, opts: Any, fmt: str, *, source: str, budget: str | None, candidates: str | None,
             calibration: str | None, calibration_tokens: int, calibration_ctx: int, metric: str,
             sensitivity: Path | None, recipe: Path | None, device: str, imatrix: str | None,
             head_candidates: str | None = None) -> MixPlan:
    """What the CLI's --budget / --recipe options make: a MixPlan."""
    from m1.formats import get_format
    from m1.verify.sensitivity import Sensitivity

    no_mix = get_format(fmt).no_mix
    if no_mix is not None:
        raise UsageError(f"--budget and --recipe write a mix of schemes, and a {fmt} checkpoint holds one: {no_mix[0]}",
                         hint=no_mix[1])
    if recipe is not None:
        if (budget is not None or candidates is not None or calibration is not None or sensitivity is not None
                or head_candidates is not None):
            raise UsageError("--recipe replays a stored mix: it does not combine with --budget, --candidates, "
                             "--head-candidates, --corpus, --text, --token-ids or --sensitivity")
        return plan_recipe(ckpt, opts, recipe, fmt, imatrix)
    assert budget is not None
    sens = None
    windows = None
    if sensitivity is not None:
        if calibration is not None:
            raise UsageError("--sensitivity reuses measured errors: drop --corpus (--text, --token-ids), "
                             "or drop --sensitivity")
        try:
            obj = json.loads(sensitivity.read_text())
            sens = Sensitivity.from_json(obj.get("sensitivity", obj))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"cannot read sensitivities ({type(exc).__name__})", file=str(sensitivity),
                             hint="give an m1-recipe.json written by m1 quantize --budget --corpus") from None
        want = [c for c in (candidates or default_candidates(fmt)).split(",") if c and c != "keep"]
        missing = [c for c in want if c not in sens.candidates]
        if missing:
            raise UsageError(f"the sensitivities in {sensitivity} do not cover candidate {missing[0]}",
                             hint=f"they cover {', '.join(sens.candidates)}")
    elif calibration is not None:
        from m1.devices import resolve_device
        from m1.verify.text import calibration_windows

        windows, what = calibration_windows(source, calibration, calibration_tokens, calibration_ctx,
                                            ckpt.config.vocab_size)
        device = str(resolve_device(device)) if "," not in device else "cpu"
        calibration = what
    return plan_budget(ckpt, opts, budget=budget, candidates=candidates, fmt=fmt, windows=windows,
                       calibration=calibration or "", metric=metric, device=device, imatrix=imatrix,
                       sensitivity=sens, head_candidates=head_candidates)
