"""One candidate scheme per tensor group, minimising the predicted total error under a size budget.

The problem is a multiple-choice knapsack: groups g (a layer's expert w1+w3, its w2, its attention, the embedding,
the head: m1.verify.mix_groups), each with the candidates c its runtime accepts, with a
size s(g, c) in bytes (from the schemes' `pieces()`: what the plan writes) and an additive predicted error
e(g, c) (m1.verify.sensitivity). `allocate` solves it exactly by dynamic programming over groups with the
sizes above each group's smallest counted in units of u bytes:

- u is the greatest common divisor of all those size differences when the budget then spans at most
  `MAX_UNITS` units: no rounding, the DP's mix is the exact optimum;
- otherwise u = ceil(spare / MAX_UNITS) and every difference is rounded *up* to whole units, so the mix
  always fits the true budget; it is optimal among mixes whose rounded sizes fit, which include every mix
  that fits a budget smaller by G x u bytes (G groups): the stated gap, `Allocation.slack_bound`.

Among mixes of equal predicted error the smaller one wins. Nothing here reads weights or imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from m1.errors import UsageError

MAX_UNITS = 200_000  # DP columns: G x MAX_UNITS cells of int8 back-pointers, 32 MB for M1's 160 groups


@dataclass
class Allocation:
    assignment: dict[str, str]  # group key -> candidate
    bytes: int  # the groups' bytes (the exact sum of their pieces)
    predicted: float  # the predicted total error of the assignment
    budget: int  # bytes available to the groups
    unit: int  # DP unit in bytes
    exact: bool  # no rounding: the optimum itself
    slack_bound: int = 0  # with rounding: the result is optimal for any budget this much smaller, or better
    notes: list[str] = field(default_factory=list)


def _gcd(values: Sequence[int]) -> int:
    g = 0
    for v in values:
        g = math.gcd(g, v)
    return g


def allocate(sizes: Mapping[str, Mapping[str, int]], errors: Mapping[str, Mapping[str, float]], budget: int,
             max_units: int = MAX_UNITS) -> Allocation:
    """sizes[g][c] bytes and errors[g][c] (same keys) -> the assignment of least total error within `budget`
    bytes (for the groups only). A UsageError when even the smallest mix does not fit."""
    import numpy as np

    groups = list(sizes)
    if not groups:
        raise UsageError("nothing to allocate: no tensor groups")
    cands = {g: sorted(sizes[g], key=lambda c: (sizes[g][c], errors[g][c])) for g in groups}
    base = sum(sizes[g][cands[g][0]] for g in groups)
    if base > budget:
        raise UsageError(f"the budget leaves {budget:,} bytes for the quantized groups, but the smallest mix "
                         f"(every group at its smallest candidate) needs {base:,}",
                         hint="raise --budget, or add a smaller candidate")
    spare = budget - base
    deltas = {g: [sizes[g][c] - sizes[g][cands[g][0]] for c in cands[g]] for g in groups}
    unit = _gcd([d for g in groups for d in deltas[g] if d > 0]) or 1
    exact = spare // unit <= max_units
    if not exact:
        unit = -(-spare // max_units)
    cap = spare // unit
    inf = float("inf")
    best = np.full(cap + 1, 0.0)  # best[k]: least error of the groups so far within k units
    back = np.zeros((len(groups), cap + 1), dtype=np.int16)
    for gi, g in enumerate(groups):
        new = np.full(cap + 1, inf)
        choice = np.zeros(cap + 1, dtype=np.int16)
        for ci, c in enumerate(cands[g]):
            w = -(-deltas[g][ci] // unit)  # rounded up: a rounded fit is a true fit
            if w > cap:
                continue
            shifted = np.full(cap + 1, inf)
            shifted[w:] = best[: cap + 1 - w] + float(errors[g][c])
            better = shifted < new  # strict: the smaller candidate keeps a tie
            new[better] = shifted[better]
            choice[better] = ci
        best, back[gi] = new, choice
    k = int(np.argmin(best))  # the least error; argmin takes the smallest capacity among ties
    assignment: dict[str, str] = {}
    for gi in range(len(groups) - 1, -1, -1):
        g = groups[gi]
        ci = int(back[gi, k])
        assignment[g] = cands[g][ci]
        k -= -(-deltas[g][ci] // unit)
    assignment = {g: assignment[g] for g in groups}
    total = sum(sizes[g][assignment[g]] for g in groups)
    assert total <= budget
    predicted = sum(float(errors[g][assignment[g]]) for g in groups)
    alloc = Allocation(assignment, total, predicted, budget, unit, exact, 0 if exact else len(groups) * unit)
    if not exact:
        alloc.notes.append(f"sizes above each group's smallest rounded up to units of {unit:,} bytes "
                           f"({cap:,} units): optimal for any budget {alloc.slack_bound:,} bytes smaller")
    return alloc


def uniform_assignment(sizes: Mapping[str, Mapping[str, int]], candidate: str) -> dict[str, str]:
    """Every group at `candidate`; a group that may not take it (its runtime's rules) at its smallest candidate."""
    return {g: candidate if candidate in s else min(s, key=lambda c: (s[c], c)) for g, s in sizes.items()}


def uniform(sizes: Mapping[str, Mapping[str, int]], errors: Mapping[str, Mapping[str, float]],
            candidate: str) -> tuple[int, float]:
    """(bytes, predicted error) of every group at `candidate` (`uniform_assignment`)."""
    assign = uniform_assignment(sizes, candidate)
    return (sum(sizes[g][c] for g, c in assign.items()), sum(float(errors[g][c]) for g, c in assign.items()))


def parse_budget(text: str, params: int, fixed: int = 0) -> tuple[int, str]:
    """--budget: '240GB' (m1.units sizes) or '4.6bpw' (bits per weight over all `params` of the model, the
    whole output's bytes as llama.cpp counts its BPW) -> (total bytes, how it was read)."""
    from m1.units import human_bytes, parse_size

    t = text.strip().lower()
    if t.endswith("bpw"):
        try:
            bpw = float(t[:-3])
        except ValueError:
            raise UsageError(f"cannot read the budget {text!r}", hint="write it like 240GB or 4.6bpw") from None
        if not bpw > 0 or not math.isfinite(bpw):
            raise UsageError(f"the budget must be a positive, finite number of bits per weight, got {text!r}",
                             hint="write it like 240GB or 4.6bpw")
        total = int(bpw * params / 8)
        return total, f"{bpw:g} bits per weight x {params:,} parameters = {human_bytes(total)}"
    try:
        total = parse_size(text)
    except UsageError:
        raise UsageError(f"cannot read the budget {text!r}", hint="write it like 240GB or 4.6bpw") from None
    return total, human_bytes(total)


def symbols(candidates: Sequence[str]) -> dict[str, str]:
    """One character per candidate for the layer map: the digit in its name (nf4 -> 4, q5_k -> 5, int8 -> 8),
    K for keep, else its first free letter."""
    out: dict[str, str] = {}
    for c in candidates:
        options = ["K"] if c == "keep" else [ch for ch in c if ch.isdigit()][:1] + [c[0].upper(), *c.upper()]
        out[c] = next((o for o in options if o not in out.values()), "?")
    return out


def layer_map(assignment: Mapping[str, str], parts: Sequence[str], layers: int,
              candidates: Sequence[str]) -> list[str]:
    """The compact map: a line per layer part (w13, w2, attn), a character per layer (spaces every 10 layers, '-'
    for a group not in the mix), a line for the global groups (embed, head), and a legend."""
    sym = symbols(candidates)
    lines = []
    for p in parts:
        if p in ("embed", "head"):
            continue
        chars = [sym.get(assignment.get(f"{layer}.{p}", ""), "-") for layer in range(layers)]
        lines.append(f"{p:>5s} " + " ".join("".join(chars[i : i + 10]) for i in range(0, layers, 10)))
    globals_ = [f"{p} {assignment[p]}" for p in ("embed", "head") if p in parts and p in assignment]
    if globals_:
        lines.append("      " + ", ".join(globals_))
    lines.append("      " + ", ".join(f"{s} = {c}" for c, s in sym.items()) + f"; layers 0..{layers - 1}, "
                 "a space every 10")
    return lines


def rule_of_thumb(groups: Sequence[str], layers: int, low: str, high: str) -> dict[str, str]:
    """llama.cpp's layer pattern (`use_more_bits` in llama-quant.cpp, as Q4_K_M applies it to ffn_down):
    the w2 of the first and last eighth of the layers and of every third layer in between gets `high`,
    every other group `low`."""
    def more_bits(i: int) -> bool:
        return i < layers // 8 or i >= 7 * layers // 8 or (i - layers // 8) % 3 == 2

    out = {}
    for g in groups:
        layer, part = g.split(".")
        out[g] = high if part == "w2" and more_bits(int(layer)) else low
    return out  # expert groups only: the caller gives the others theirs


def describe(alloc: Allocation) -> dict[str, Any]:
    return {"bytes": alloc.bytes, "budget": alloc.budget, "predicted": alloc.predicted, "unit": alloc.unit,
            "exact": alloc.exact, "slack_bound": alloc.slack_bound, "notes": alloc.notes}
