"""Perplexity and agreement between a reference and its conversions or quantizations.

The models run in lockstep, one layer at a time: for each layer the reference and every candidate
load that layer only, and each candidate's layer runs twice, on its own hidden states ("drift") and on
the reference's input ("isolated"), so per-layer error shows which layers a quantization hurts. Peak
memory is one layer per model plus the hidden states of the evaluation tokens.

Long windows (--ctx 65536) run through each layer in chunks of positions (the engine's chunked prefill),
and the head and the metrics take the scored positions a chunk at a time, so neither a layer nor the
[positions, vocab] log-probabilities ever exist for a whole long window at once. With `by_position`, the
metrics are also reported per position bucket (powers of two up to the context), where damage that builds
up along the sequence (a lightning layer's state) shows in the later buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m1.api import callable_module
from m1.errors import M1Error, UsageError
from m1.verify.engine import DEFAULT_CHUNK, embed, forward_layer_chunked, head, load_layer
from m1.verify.metrics import (
    Agreement,
    PositionMetrics,
    RefPositions,
    by_position,
    kl_from_top,
    layer_error,
    nonfinite_positions,
    perplexity,
    quantile,
)
from m1.verify.text import Windows

DEFAULT_TOP_K = 256


@dataclass
class Model:
    name: str
    source: Any  # WeightSource with .config

    @property
    def config(self):  # noqa: ANN201
        return self.source.config


@dataclass
class LayerRow:
    layer: int
    kind: str
    drift_cos: float
    drift_rel_l2: float
    isolated_cos: float
    isolated_rel_l2: float


@dataclass
class CandidateResult:
    name: str
    metrics: Agreement
    layers: list[LayerRow] = field(default_factory=list)
    passed: bool = True
    failures: list[str] = field(default_factory=list)
    positions: list[dict[str, float]] | None = None  # by_position buckets, when asked for

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "metrics": self.metrics.as_dict(), "passed": self.passed,
               "failures": self.failures, "layers": [r.__dict__ for r in self.layers]}
        if self.positions is not None:
            out["by_position"] = self.positions
        return out


def model_signature(cfg: Any) -> dict[str, str]:
    """What two checkpoints must share to be compared: vocabulary, width, layers and their kinds."""
    return {"vocab_size": str(cfg.vocab_size), "hidden_size": str(cfg.hidden_size),
            "num_hidden_layers": str(cfg.num_hidden_layers), "layer_kinds": ",".join(cfg.layer_kinds)}


def _signature_mismatch(ref: Mapping[str, str], cand: Mapping[str, str]) -> str | None:
    differ = [f"{key} {cand[key]} vs {ref[key]}" for key in ("vocab_size", "hidden_size", "num_hidden_layers")
              if key in ref and ref[key] != cand[key]]
    if not differ and "layer_kinds" in ref and ref["layer_kinds"] != cand["layer_kinds"]:
        differ.append("the attention kinds of the layers differ")
    return "; ".join(differ) or None


def check_compatible(models: Sequence[Model]) -> None:
    ref = model_signature(models[0].config)
    for m in models[1:]:
        differ = _signature_mismatch(ref, model_signature(m.config))
        if differ:
            raise UsageError(f"{m.name} is not the same model as {models[0].name} ({differ})",
                             hint="compare a checkpoint with its own conversions or quantizations")


def check_saved_compatible(path: Path | str, meta: Mapping[str, str], windows: Windows, ref: RefPositions,
                           candidates: Sequence[Model]) -> None:
    """Candidates against the model a stored reference was made from, as check_compatible does for REF CAND.

    Files written before the signature was stored (m1_ref_logits_version 1) are checked by their ids only."""
    for m in candidates:
        differ = _signature_mismatch(meta, model_signature(m.config))
        vocab = m.config.vocab_size
        if differ is None:
            highest = max(int(windows.tokens.max()), int(ref.top_ids.max()) if ref.top_ids.numel() else 0)
            if highest >= vocab:
                differ = f"the reference holds token id {highest}, outside vocab_size {vocab}"
        if differ:
            raise UsageError(f"{m.name} is not the same model as the reference stored in {path} ({differ})",
                             hint="compare a checkpoint with its own conversions or quantizations, or make a "
                                  "reference from its source with m1 verify logits")


def _batches(windows: Windows, batch_size: int) -> list[torch.Tensor]:
    return list(windows.tokens.split(batch_size))


@torch.no_grad()
def lockstep(models: Sequence[Model], windows: Windows, device: torch.device, dtype: torch.dtype = torch.float32,
             batch_size: int = 4, per_layer: bool = True, progress: Callable[[int], None] | None = None,
             chunk_size: int | None = DEFAULT_CHUNK) -> tuple[list[torch.Tensor], list[list[LayerRow]]]:
    """Final hidden states per model (batches concatenated) and, per candidate, per-layer rows."""
    batches = [b.to(device) for b in _batches(windows, batch_size)]
    cfg = models[0].config
    states = []
    for m in models:
        g = {k: v.to(device) for k, v in m.source.global_weights().items()}
        states.append([embed(g, b, dtype) for b in batches])
        del g
    rows: list[list[LayerRow]] = [[] for _ in models[1:]]

    def forward(c: Any, layer: int, w: Mapping[str, torch.Tensor], s: torch.Tensor) -> torch.Tensor:
        return forward_layer_chunked(c, layer, w, s, dtype=dtype, chunk_size=chunk_size)

    for layer in range(cfg.num_hidden_layers):
        ref_w = load_layer(cfg, models[0].source, layer, device, dtype)
        ref_in = states[0]
        ref_out = [forward(cfg, layer, ref_w, s) for s in ref_in]
        del ref_w
        for i, m in enumerate(models[1:], start=1):
            w = load_layer(m.config, m.source, layer, device, dtype)
            drift = [forward(m.config, layer, w, s) for s in states[i]]
            if per_layer:
                iso = [forward(m.config, layer, w, s) for s in ref_in]
                r, d, o = torch.cat(ref_out, 0), torch.cat(drift, 0), torch.cat(iso, 0)
                dc, dr = layer_error(r, d)
                ic, ir = layer_error(r, o)
                rows[i - 1].append(LayerRow(layer, cfg.layer_kind(layer), dc, dr, ic, ir))
                del r, d, o, iso
            states[i] = drift
            del w
        states[0] = ref_out
        if progress:
            progress(1)
    return [torch.cat(s, 0) for s in states], rows


def _spans(windows: Windows, chunk_size: int | None) -> list[tuple[int, int, int]]:
    """(window, first, end) of the scored positions, window by window, at most chunk_size positions each: the
    logits at positions first..end-1 predict tokens first+1..end."""
    n, ctx = windows.tokens.shape
    step = ctx if chunk_size is None else max(1, chunk_size)
    return [(w, a, min(ctx - 1, a + step)) for w in range(n) for a in range(windows.first_scored, ctx - 1, step)]


@torch.no_grad()
def scored_chunks(model: Model, final_hidden: torch.Tensor, windows: Windows, device: torch.device,
                  chunk_size: int | None = DEFAULT_CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(log-probabilities [n, vocab], log-sum-exp of the raw logits [n], next-token ids [n]) of the scored
    positions, in order, at most one chunk of one window at a time (bounded memory at any context)."""
    g = {k: v.to(device) for k, v in model.source.global_weights().items()}
    ctx = windows.tokens.shape[1]
    whole = chunk_size is None or ctx <= chunk_size
    for w, a, b in _spans(windows, None if whole else chunk_size):
        if whole:  # the head on the whole window, as it always ran (same numbers for short windows)
            logits = head(model.config, g, final_hidden[w : w + 1].to(device))[0, a:b].float()
        else:
            logits = head(model.config, g, final_hidden[w, a:b].to(device)).float()
        lse = torch.logsumexp(logits, -1)
        yield (logits - lse[:, None]).cpu(), lse.cpu(), windows.tokens[w, a + 1 : b + 1]


def scored_positions(windows: Windows) -> torch.Tensor:
    """The position in its window of every scored logit, in scoring order (what by_position buckets)."""
    n, ctx = windows.tokens.shape
    return torch.arange(windows.first_scored, ctx - 1).repeat(n)


def reference_from(chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], k: int, name: str
                   ) -> RefPositions:
    """What compare keeps of the reference (top-k per position), chunk by chunk; refuses non-finite logits."""
    parts, bad, total = [], 0, 0
    for lp, lse, t in chunks:
        bad += nonfinite_positions(lp)
        total += lp.shape[0]
        parts.append(RefPositions.from_logprobs(lp, t, k, lse))
    if bad:
        raise M1Error(f"the reference gives NaN or infinite logits at {bad} of {total} scored positions, so "
                      "nothing can be compared with it", file=name,
                      hint="check its weights with m1 verify integrity --deep")
    return RefPositions(*(torch.cat(x) for x in zip(*(p.astuple() for p in parts), strict=True)))


def candidate_positions(ref: RefPositions, chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                        ) -> tuple[PositionMetrics, int]:
    """Per scored position: KL(ref || cand), the candidate's log-prob of the next token, top-1 agreement,
    accumulated chunk by chunk (the full [tokens, vocab] never exists at once); and the non-finite count."""
    kl, cand_t, top1 = [], [], []
    start = nonfinite = 0
    for lp, _, t in chunks:
        n = lp.shape[0]
        nonfinite += nonfinite_positions(lp)
        part = RefPositions(*(x[start : start + n] for x in ref.astuple()))
        kl.append(kl_from_top(part, lp))
        cand_t.append(lp.gather(-1, t[:, None])[:, 0].double())
        top1.append(lp.argmax(-1) == part.top_ids[:, 0])
        start += n
    return PositionMetrics(torch.cat(kl), ref.target_logprob.double(), torch.cat(cand_t), torch.cat(top1)), nonfinite


def candidate_agreement(ref: RefPositions, chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                        ) -> tuple[Agreement, PositionMetrics]:
    pm, nonfinite = candidate_positions(ref, chunks)
    ppl_ref, err_ref = perplexity(-pm.ref_logprob)
    ppl_cand, err_cand = perplexity(-pm.cand_logprob)
    dp = pm.cand_logprob.exp() - pm.ref_logprob.exp()
    metrics = Agreement(
        tokens=int(pm.kl.numel()), ppl_ref=ppl_ref, ppl_ref_err=err_ref, ppl_cand=ppl_cand, ppl_cand_err=err_cand,
        ppl_ratio=ppl_cand / ppl_ref, kl_mean=float(pm.kl.double().mean()), kl_median=quantile(pm.kl, 0.5),
        kl_p99=quantile(pm.kl, 0.99), kl_max=float(pm.kl.max()), top1=float(pm.top1.double().mean()),
        rms_dp=float(dp.pow(2).mean().sqrt()), nonfinite=nonfinite,
    )
    return metrics, pm


def _result(name: str, metrics: Agreement, pm: PositionMetrics, windows: Windows, thresholds: Thresholds,
            layers: list[LayerRow], positions: bool) -> CandidateResult:
    failures = thresholds.check(metrics)
    buckets = by_position(pm, scored_positions(windows), windows.tokens.shape[1]) if positions else None
    return CandidateResult(name, metrics, layers, not failures, failures, buckets)


@dataclass(frozen=True)
class Thresholds:
    max_kl: float | None = None
    min_top1: float | None = None
    max_ppl_ratio: float | None = None

    def check(self, m: Agreement) -> list[str]:
        """Failures of a candidate: non-finite logits or metrics always, then the thresholds that are set."""
        failures = []
        if m.nonfinite:
            failures.append(f"NaN or infinite logits at {m.nonfinite} of {m.tokens} scored positions "
                            "(check the weights with m1 verify integrity --deep)")
        elif not all(math.isfinite(v) for v in (m.ppl_cand, m.ppl_ratio, m.kl_mean, m.top1)):
            failures.append(f"the metrics are not finite (PPL {m.ppl_cand}, KL mean {m.kl_mean})")
        if self.max_kl is not None and not m.kl_mean <= self.max_kl:
            failures.append(f"KL mean {m.kl_mean:.5f} > {self.max_kl}")
        if self.min_top1 is not None and not m.top1 >= self.min_top1:
            failures.append(f"top-1 {m.top1:.4f} < {self.min_top1}")
        if self.max_ppl_ratio is not None and not m.ppl_ratio <= self.max_ppl_ratio:
            failures.append(f"PPL ratio {m.ppl_ratio:.4f} > {self.max_ppl_ratio}")
        return failures


def compare(models: Sequence[Model], windows: Windows, device: torch.device, thresholds: Thresholds,
            dtype: torch.dtype = torch.float32, batch_size: int = 4, top_k: int = DEFAULT_TOP_K,
            per_layer: bool = True, progress: Callable[[int], None] | None = None, by_position: bool = False,
            chunk_size: int | None = DEFAULT_CHUNK) -> tuple[RefPositions, list[CandidateResult]]:
    if len(models) < 2:
        raise UsageError("compare needs a reference and at least one candidate")
    check_compatible(models)
    finals, rows = lockstep(models, windows, device, dtype, batch_size, per_layer, progress, chunk_size)
    ref = reference_from(scored_chunks(models[0], finals[0], windows, device, chunk_size), top_k, models[0].name)
    results = []
    for i, m in enumerate(models[1:], start=1):
        metrics, pm = candidate_agreement(ref, scored_chunks(m, finals[i], windows, device, chunk_size))
        results.append(_result(m.name, metrics, pm, windows, thresholds, rows[i - 1], by_position))
    return ref, results


def reference_run(model: Model, windows: Windows, device: torch.device, dtype: torch.dtype = torch.float32,
                  batch_size: int = 4, top_k: int = DEFAULT_TOP_K, progress: Callable[[int], None] | None = None,
                  chunk_size: int | None = DEFAULT_CHUNK) -> RefPositions:
    """What compare needs from the reference, computed once (for `m1 verify logits --save`)."""
    finals, _ = lockstep([model], windows, device, dtype, batch_size, False, progress, chunk_size)
    return reference_from(scored_chunks(model, finals[0], windows, device, chunk_size), top_k, model.name)


def compare_to_saved(ref: RefPositions, candidates: Sequence[Model], windows: Windows, device: torch.device,
                     thresholds: Thresholds, dtype: torch.dtype = torch.float32, batch_size: int = 4,
                     progress: Callable[[int], None] | None = None, meta: Mapping[str, str] | None = None,
                     path: Path | str = "the stored reference", by_position: bool = False,
                     chunk_size: int | None = DEFAULT_CHUNK) -> list[CandidateResult]:
    """Candidates against stored reference log-probs (no reference run, so no per-layer rows); `meta` (the
    file's metadata) refuses candidates that are not the model the reference was made from."""
    check_saved_compatible(path, meta or {}, windows, ref, candidates)
    results = []
    for m in candidates:
        finals, _ = lockstep([m], windows, device, dtype, batch_size, False, progress, chunk_size)
        metrics, pm = candidate_agreement(ref, scored_chunks(m, finals[0], windows, device, chunk_size))
        results.append(_result(m.name, metrics, pm, windows, thresholds, [], by_position))
    return results


def model_perplexity(model: Model, windows: Windows, device: torch.device, dtype: torch.dtype = torch.float32,
                     batch_size: int = 4, progress: Callable[[int], None] | None = None,
                     chunk_size: int | None = DEFAULT_CHUNK) -> dict[str, Any]:
    finals, _ = lockstep([model], windows, device, dtype, batch_size, False, progress, chunk_size)
    nll_parts, nonfinite = [], 0
    for lp, _, t in scored_chunks(model, finals[0], windows, device, chunk_size):
        nll_parts.append(-lp.gather(-1, t[:, None])[:, 0])
        nonfinite += nonfinite_positions(lp)
    nll = torch.cat(nll_parts)
    ppl, err = perplexity(nll)
    return {"model": model.name, "ppl": ppl, "ppl_err": err, "tokens_scored": int(nll.numel()),
            "nonfinite_positions": nonfinite,
            "windows": int(windows.tokens.shape[0]), "ctx": int(windows.tokens.shape[1]),
            "first_scored": windows.first_scored, "nll_mean": float(nll.double().mean()),
            "bits_per_token": float(nll.double().mean()) / math.log(2)}


# ---- stored reference (llama.cpp's KL-divergence-base workflow, top-k) ------------------------------------
def save_reference(path: Path, ref: RefPositions, windows: Windows, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from m1.atomic_io import write_bytes_atomic

    tensors = {"tokens": windows.tokens.contiguous(), "top_logprobs": ref.top_logprobs.contiguous(),
               "top_ids": ref.top_ids.to(torch.int64).contiguous(), "logsumexp": ref.logsumexp.contiguous(),
               "target_logprob": ref.target_logprob.contiguous()}
    tmp = path.with_name(f".{path.name}.build")
    try:
        save_file(tensors, str(tmp), metadata={**meta, "first_scored": str(windows.first_scored),
                                               "m1_ref_logits_version": "2"})
        write_bytes_atomic(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


def load_reference(path: Path) -> tuple[RefPositions, Windows, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        ref = RefPositions(t["top_logprobs"], t["top_ids"], t["logsumexp"], t["target_logprob"])
        windows = Windows(t["tokens"], int(meta["first_scored"]))
    except (OSError, KeyError, ValueError, Exception) as exc:  # safetensors raises its own error type
        raise UsageError(f"not a reference-logits file written by m1 verify logits ({type(exc).__name__})",
                         file=str(path), hint="make one with: m1 verify logits REF --save FILE") from None
    _check_stored(path, ref, windows)
    return ref, windows, meta


def _check_stored(path: Path, ref: RefPositions, windows: Windows) -> None:
    """The stored tensors fit together and are finite; otherwise compare would fail deep inside, or pass on NaN."""
    hint = "make a new one with: m1 verify logits REF --save FILE"
    tokens = windows.tokens
    ok = tokens.dim() == 2 and tokens.dtype == torch.int64 and 0 <= windows.first_scored < tokens.shape[1] - 1
    n = tokens.shape[0] * windows.scored_per_window if ok else -1
    ok = ok and ref.top_ids.dim() == 2 and tuple(ref.top_logprobs.shape) == tuple(ref.top_ids.shape)
    ok = ok and ref.top_ids.shape[0] == n and ref.top_ids.shape[1] >= 1 and ref.top_ids.dtype == torch.int64
    ok = ok and tuple(ref.logsumexp.shape) == tuple(ref.target_logprob.shape) == (n,)
    if not ok:
        raise UsageError("not a reference-logits file written by m1 verify logits (its tensors do not fit together)",
                         file=str(path), hint=hint)
    if int(tokens.min()) < 0 or int(ref.top_ids.min()) < 0:
        raise UsageError("the reference holds negative token ids", file=str(path), hint=hint)
    for name in ("top_logprobs", "logsumexp", "target_logprob"):
        bad = int((~torch.isfinite(getattr(ref, name))).sum())
        if bad:
            raise M1Error(f"the reference holds {bad} NaN or infinite values in {name}, so nothing can be compared "
                          "with it", file=str(path), tensor=name, hint=hint)


# `m1.verify.compare(REF, CAND, ...)`: this module, called, is the job (m1.verify.jobs.compare).
callable_module(__name__, "m1.verify.jobs:compare")
