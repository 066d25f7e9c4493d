"""Sensitivity of each tensor group to each candidate scheme, measured layer-streamed.

A *group* (m1.verify.mix_groups) is one layer's experts' gate and up projections (w1 + w3; one stacked tensor
each in a format that stacks experts), their down projections (w2) or its attention projections, or the
embedding, or the head. For a candidate scheme, a group's weights are quantized in
memory through the scheme's own `quantize` / `dequantize` (its library's: never m1's arithmetic), exactly as
the pipeline would write and the verify sources would read them back, and the group's *isolated* error is
measured on calibration text:

- `rel_l2`: the relative L2 error of that layer's output when only that group is quantized and the layer's
  input is the reference's (what `m1 verify compare` reports per layer as "isolated");
- `kl`: the mean KL(ref || perturbed) at the head when only that group is quantized, the layers after it
  exact. The perturbed hidden state of every group is carried forward through the exact later layers in the
  same pass.

One pass over the model per candidate: each layer is loaded once (plus one quantized copy of one group at a
time), so weight memory is one layer; the activations held are the reference's plus one perturbed copy per
group measured so far (groups x calibration tokens x hidden). `kl=False` drops the carried copies (only
`rel_l2`, memory of one layer's activations).

Predicted error of a mix (one candidate per group): the sum over groups of their errors, `kl` in nats or
`rel_l2` squared (independent perturbations add in energy). Which of the two predicts the end-to-end KL
better is measured in tests/test_budget.py (rank correlation over candidate mixes on a trained tiny M1):
the README's "Measured mixed precision" section states the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m1.config import M1Config
from m1.verify.engine import WeightSource
from m1.verify.mix_groups import (  # noqa: F401 (the groups' names, as the budget and the tests import them)
    ALL_PARTS,
    EXPERT_PARTS,
    GLOBAL_PARTS,
    LAYER_PARTS,
    Group,
    active_params,
    group_params,
    groups_of,
)

PARTS = EXPERT_PARTS  # the expert groups of a layer (what a mix planned before it planned every group)
KEEP = "keep"  # a candidate that leaves the group in its source precision (error 0)


# ---- quantizing in memory, through the scheme ----------------------------------------------------------


def roundtrip(scheme: Any, weight: torch.Tensor, name: str = "") -> torch.Tensor:
    """The weight as the pipeline stores it under `scheme` and the verify sources read it back: the scheme's
    own quantize then dequantize (through its library), on the CPU."""
    if scheme is None:
        return weight
    pieces = dict(scheme.quantize(weight, "cpu", name))
    return scheme.dequantize(pieces, "cpu", name, shape=tuple(weight.shape))


class RoundtripCache:
    """Dequantized weights by (spec name, scheme name), so that many mixes reuse one quantization each."""

    def __init__(self, schemes: Mapping[str, Any]) -> None:
        self.schemes = dict(schemes)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, full_name: str, scheme_name: str, weight: torch.Tensor) -> torch.Tensor:
        if scheme_name == KEEP:
            return weight
        key = (full_name, scheme_name)
        if key not in self._cache:
            self._cache[key] = roundtrip(self.schemes[scheme_name], weight, full_name)
        return self._cache[key]


class MixSource(WeightSource):
    """A `WeightSource` over `source` with each group's weights quantized in memory per `assignment`
    (group key -> candidate name; groups not named stay as stored). What a written mix reads back as,
    without writing it (tests/test_budget.py checks the two agree)."""

    def __init__(self, source: Any, assignment: Mapping[str, str], schemes: Mapping[str, Any],
                 cache: RoundtripCache | None = None) -> None:
        self.source = source
        self.config = source.config
        self.assignment = dict(assignment)
        self.cache = cache or RoundtripCache(schemes)

    def _global_groups(self) -> dict[str, str]:
        """Full name of each global weight the assignment quantizes -> its candidate."""
        out = {}
        for part in GLOBAL_PARTS:
            choice = self.assignment.get(part, KEEP)
            if choice != KEEP:
                out.update(dict.fromkeys(Group(None, part).weight_names(self.config), choice))
        return out

    def global_weights(self) -> dict[str, torch.Tensor]:
        weights = dict(self.source.global_weights())
        for name, choice in self._global_groups().items():
            weights[name] = self.cache.get(name, choice, weights[name])
        return weights

    def global_weight(self, name: str) -> torch.Tensor:
        weight = self.source.global_weight(name)
        choice = self._global_groups().get(name, KEEP)
        return weight if choice == KEEP else self.cache.get(name, choice, weight)

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        weights = dict(self.source.layer_weights(layer))
        for part in LAYER_PARTS:
            choice = self.assignment.get(f"{layer}.{part}", KEEP)
            if choice == KEEP:
                continue
            for local in Group(layer, part).local_names(self.config):
                full = f"model.layers.{layer}.{local}"
                weights[local] = self.cache.get(full, choice, weights[local])
        return weights


# ---- measuring ------------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """Per group key and candidate: {"rel_l2": ..., "kl": ...}; what it was measured on."""

    groups: list[str]
    candidates: list[str]
    errors: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    calibration: str = ""
    tokens: int = 0
    kl_uniform: dict[str, float] = field(default_factory=dict)  # measured end-to-end KL of each uniform scheme

    def error(self, group: str, candidate: str, metric: str = "kl") -> float:
        """The additive error of one group under one candidate: KL in nats, or rel_l2 squared."""
        if candidate == KEEP:
            return 0.0
        value = self.errors[group][candidate][metric]
        return value * value if metric == "rel_l2" else value

    def predict(self, assignment: Mapping[str, str], metric: str = "kl") -> float:
        return sum(self.error(g, c, metric) for g, c in assignment.items())

    def to_json(self) -> dict[str, Any]:
        return {"groups": self.groups, "candidates": self.candidates, "errors": self.errors,
                "calibration": self.calibration, "tokens": self.tokens, "kl_uniform": self.kl_uniform}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Sensitivity:
        return cls(list(obj["groups"]), list(obj["candidates"]), dict(obj["errors"]), obj.get("calibration", ""),
                   int(obj.get("tokens", 0)), dict(obj.get("kl_uniform", {})))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def _rows(cfg: M1Config, layer: int, weights: Mapping[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype,
          rows: int) -> torch.Tensor:
    """forward_layer over windows x [N, T, hidden], `rows` windows per call (windows are independent)."""
    from m1.verify.engine import forward_layer

    return torch.cat([forward_layer(cfg, layer, weights, part, dtype=dtype) for part in x.split(rows)])


@torch.no_grad()
def measure(
    source: Any,
    windows: Any,
    candidates: Mapping[str, Any],
    *,
    parts: Sequence[str] = PARTS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
    kl: bool = True,
    progress: Callable[[int], None] | None = None,
    accepts: Mapping[str, Sequence[str]] | None = None,
) -> Sensitivity:
    """Each group's isolated error under each candidate (name -> Scheme; KEEP is skipped), one layer-streamed
    pass over `source` per candidate. `windows`: m1.verify.text.Windows of the calibration text; `batch_size`
    windows go through a layer per call (the carried copies of all groups are batched together). `accepts`:
    group key -> the candidates it may take (its runtime's rules); a group is measured under those only.

    The embedding's group is quantized alone at the input (its perturbed state carried through the exact
    layers); the head's alone on the exact final state (its KL straight from the two heads' outputs)."""
    from m1.verify.engine import embed, head, stack_experts
    from m1.verify.metrics import layer_error

    cfg: M1Config = source.config
    device = torch.device(device)
    groups = groups_of(cfg, parts)
    names = [c for c in candidates if c != KEEP]
    out = Sensitivity([g.key for g in groups], list(candidates), {g.key: {} for g in groups},
                      tokens=int(windows.tokens.numel()))
    tokens = windows.tokens.to(device)
    n = tokens.shape[0]
    first = windows.first_scored
    ref_lp: torch.Tensor | None = None

    def logprobs(g: Mapping[str, torch.Tensor], states: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.log_softmax(head(cfg, g, s)[:, first:-1].float(), -1).reshape(-1, cfg.vocab_size)
                          for s in states.split(batch_size)])

    def takes(group: Group, cand: str) -> bool:
        return accepts is None or cand in accepts.get(group.key, ())

    def quantized_globals(g: Mapping[str, torch.Tensor], group: Group, scheme: Any) -> dict[str, torch.Tensor]:
        out = dict(g)
        for name in group.weight_names(cfg):
            out[name] = roundtrip(scheme, source.global_weight(name), name).to(device)
        return out

    for cand in names:
        scheme = candidates[cand]
        g = {k: v.to(device) for k, v in source.global_weights().items()}
        ref = embed(g, tokens, dtype)
        carried: dict[str, torch.Tensor] = {}
        for group in (gr for gr in groups if gr.part == "embed" and takes(gr, cand)):
            iso = embed(quantized_globals(g, group, scheme), tokens, dtype)
            _, rel = layer_error(ref, iso)
            out.errors[group.key][cand] = {"rel_l2": rel}
            if kl:
                carried[group.key] = iso
        for layer in range(cfg.num_hidden_layers):
            raw = source.layer_weights(layer)
            weights = stack_experts(cfg, {k: v.to(device) for k, v in raw.items()}, dtype)
            keys = list(carried)
            both = _rows(cfg, layer, weights, torch.cat([ref, *(carried[k] for k in keys)]), dtype, batch_size)
            ref_out = both[:n]
            for i, k in enumerate(keys, start=1):
                carried[k] = both[i * n : (i + 1) * n]
            del weights, both
            for group in (gr for gr in groups if gr.layer == layer and takes(gr, cand)):
                quantized = dict(raw)
                for local in group.local_names(cfg):
                    quantized[local] = roundtrip(scheme, raw[local], f"model.layers.{layer}.{local}")
                qweights = stack_experts(cfg, {k: v.to(device) for k, v in quantized.items()}, dtype)
                del quantized
                iso = _rows(cfg, layer, qweights, ref, dtype, batch_size)
                del qweights
                _, rel = layer_error(ref_out, iso)
                out.errors[group.key][cand] = {"rel_l2": rel}
                if kl:
                    carried[group.key] = iso
            ref = ref_out
            del raw
            if progress:
                progress(1)
        if kl and ref_lp is None:
            ref_lp = logprobs(g, ref)
        for group in (gr for gr in groups if gr.part == "head" and takes(gr, cand)):
            qg = quantized_globals(g, group, scheme)
            out.errors[group.key][cand] = {"rel_l2": _logit_error(cfg, g, qg, ref, batch_size)}
            if kl:
                assert ref_lp is not None
                cand_lp = logprobs(qg, ref)
                kl_sum = (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1).double().clamp_min(0.0)
                out.errors[group.key][cand]["kl"] = float(kl_sum.mean())
            del qg
        if kl:
            assert ref_lp is not None
            for key, states in carried.items():
                cand_lp = logprobs(g, states)
                kl_sum = (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1).double().clamp_min(0.0)
                out.errors[key][cand]["kl"] = float(kl_sum.mean())
        del g, ref, carried
    return out


def _logit_error(cfg: M1Config, exact: Mapping[str, torch.Tensor], quantized: Mapping[str, torch.Tensor],
                 states: torch.Tensor, batch_size: int) -> float:
    """The head's rel_l2: relative L2 error of the logits, the head quantized alone on the exact final state."""
    from m1.verify.engine import head

    num = den = 0.0
    for part in states.split(batch_size):
        ref, got = head(cfg, exact, part).double(), head(cfg, quantized, part).double()
        num += float((got - ref).pow(2).sum())
        den += float(ref.pow(2).sum())
    return math.sqrt(num / den) if den else 0.0


# ---- a stated prior, where nothing can be measured ------------------------------------------------------


def weight_noise(scheme: Any, rows: int = 256, cols: int = 4096, seed: int = 0) -> float:
    """The scheme's relative weight MSE on a seeded Gaussian [rows, cols] bf16 tensor, through its own
    quantize/dequantize: the prior's per-weight error of that scheme (0 for KEEP)."""
    if scheme is None:
        return 0.0
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    back = roundtrip(scheme, w, "").float()
    ref = w.float()
    return float((back - ref).pow(2).sum() / ref.pow(2).sum())


def prior(cfg: M1Config, candidates: Mapping[str, Any], parts: Sequence[str] = PARTS,
          accepts: Mapping[str, Sequence[str]] | None = None) -> Sensitivity:
    """Sensitivities where no data can be read (a sparse replica, headers only): group error = the group's
    share of the parameters a token goes through (`active_params`: top-k of the experts, all of attention and
    the head, one row of the embedding) x the scheme's relative weight MSE on Gaussian data (`weight_noise`),
    the same for every layer. It ranks schemes and sizes only; it says nothing about which layers matter
    (measure for that). `accepts`: as in `measure`."""
    groups = groups_of(cfg, parts)
    noise = {c: weight_noise(None if c == KEEP else s) for c, s in candidates.items()}
    active = {g.key: active_params(cfg, g) for g in groups}
    total = sum(active.values())
    out = Sensitivity([g.key for g in groups], list(candidates), {}, calibration="prior (no measurement)")
    for g in groups:
        share = active[g.key] / total
        out.errors[g.key] = {c: {"kl": share * noise[c], "rel_l2": math.sqrt(share * noise[c])}
                             for c in candidates if c != KEEP and (accepts is None or c in accepts.get(g.key, ()))}
    return out


def rank_correlation(a: Iterable[float], b: Iterable[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    xs, ys = list(a), list(b)

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((x - mx) * (y - my) for x, y in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((x - mx) ** 2 for x in rx))
    sy = math.sqrt(sum((y - my) ** 2 for y in ry))
    return cov / (sx * sy) if sx and sy else float("nan")
