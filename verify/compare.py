"""Perplexity and agreement between a reference and its conversions or quantizations.

The models run in lockstep, one layer at a time: for each layer the reference and every candidate
load that layer only, and each candidate's layer runs twice, on its own hidden states ("drift") and on
the reference's input ("isolated"), so per-layer error shows which layers a quantization hurts. Peak
memory is one layer per model plus the hidden states of the evaluation tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from m1.errors import M1Error, UsageError
from m1.verify.engine import embed, forward_layer, head, rope_tables
from m1.verify.metrics import (
    Agreement,
    RefPositions,
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

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "metrics": self.metrics.as_dict(), "passed": self.passed,
                "failures": self.failures, "layers": [r.__dict__ for r in self.layers]}


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


def _check_reference_finite(name: str, logprobs: list[torch.Tensor]) -> None:
    bad = sum(nonfinite_positions(lp) for lp in logprobs)
    if bad:
        total = sum(lp.shape[0] for lp in logprobs)
        raise M1Error(f"the reference gives NaN or infinite logits at {bad} of {total} scored positions, so "
                      "nothing can be compared with it", file=name,
                      hint="check its weights with m1 verify integrity --deep")


def _batches(windows: Windows, batch_size: int) -> list[torch.Tensor]:
    return list(windows.tokens.split(batch_size))


@torch.no_grad()
def lockstep(models: Sequence[Model], windows: Windows, device: torch.device, dtype: torch.dtype = torch.float32,
             batch_size: int = 4, per_layer: bool = True, progress: Callable[[int], None] | None = None
             ) -> tuple[list[torch.Tensor], list[list[LayerRow]]]:
    """Final hidden states per model (batches concatenated) and, per candidate, per-layer rows."""
    batches = [b.to(device) for b in _batches(windows, batch_size)]
    cfg = models[0].config
    states = []
    for m in models:
        g = {k: v.to(device) for k, v in m.source.global_weights().items()}
        states.append([embed(g, b, dtype) for b in batches])
        del g
    ropes = {b.shape[-1]: rope_tables(cfg, b.shape[-1], device) for b in batches}
    rows: list[list[LayerRow]] = [[] for _ in models[1:]]
    for layer in range(cfg.num_hidden_layers):
        ref_w = {k: v.to(device) for k, v in models[0].source.layer_weights(layer).items()}
        ref_in = states[0]
        ref_out = [forward_layer(cfg, layer, ref_w, s, dtype=dtype, rope=ropes[s.shape[-2]]) for s in ref_in]
        del ref_w
        for i, m in enumerate(models[1:], start=1):
            w = {k: v.to(device) for k, v in m.source.layer_weights(layer).items()}
            drift = [forward_layer(m.config, layer, w, s, dtype=dtype, rope=ropes[s.shape[-2]]) for s in states[i]]
            if per_layer:
                iso = [forward_layer(m.config, layer, w, s, dtype=dtype, rope=ropes[s.shape[-2]]) for s in ref_in]
                r, d, o = torch.cat(ref_out, 0), torch.cat(drift, 0), torch.cat(iso, 0)
                dc, dr = layer_error(r, d)
                ic, ir = layer_error(r, o)
                rows[i - 1].append(LayerRow(layer, cfg.layer_kind(layer), dc, dr, ic, ir))
            states[i] = drift
            del w
        states[0] = ref_out
        if progress:
            progress(1)
    return [torch.cat(s, 0) for s in states], rows


@torch.no_grad()
def scored_logprobs(model: Model, final_hidden: torch.Tensor, windows: Windows, device: torch.device,
                    rows_per_step: int = 1) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-probabilities at the scored positions, [n_scored, vocab] per window group (bounded memory), and
    the log-sum-exp of the raw logits there."""
    g = {k: v.to(device) for k, v in model.source.global_weights().items()}
    out, lses = [], []
    for chunk in final_hidden.split(rows_per_step):
        logits = head(model.config, g, chunk.to(device))[:, windows.first_scored : -1].float()
        logits = logits.reshape(-1, logits.shape[-1])
        lse = torch.logsumexp(logits, -1)
        out.append((logits - lse[:, None]).cpu())
        lses.append(lse.cpu())
    return out, lses


def targets_by_group(windows: Windows, rows_per_step: int = 1) -> list[torch.Tensor]:
    return [t[:, windows.first_scored + 1 :].reshape(-1) for t in windows.tokens.split(rows_per_step)]


def reference_positions(logprobs: list[torch.Tensor], lses: list[torch.Tensor], targets: list[torch.Tensor],
                        k: int) -> RefPositions:
    parts = [RefPositions.from_logprobs(lp, t, k, lse) for lp, lse, t in zip(logprobs, lses, targets, strict=True)]
    out = parts[0]
    for p in parts[1:]:
        out = out.cat(p)
    return out


def candidate_agreement(ref: RefPositions, logprobs: list[torch.Tensor], targets: list[torch.Tensor]) -> Agreement:
    """Agreement accumulated group by group, so the full [tokens, vocab] never has to exist at once."""
    kl, cand_t, top1 = [], [], []
    start = nonfinite = 0
    for lp, t in zip(logprobs, targets, strict=True):
        n = lp.shape[0]
        nonfinite += nonfinite_positions(lp)
        part = RefPositions(*(x[start : start + n] for x in ref.astuple()))
        kl.append(kl_from_top(part, lp))
        cand_t.append(lp.gather(-1, t[:, None])[:, 0].double())
        top1.append((lp.argmax(-1) == part.top_ids[:, 0]).double())
        start += n
    kl_all, cand_all, top1_all = torch.cat(kl), torch.cat(cand_t), torch.cat(top1)
    ppl_ref, err_ref = perplexity(-ref.target_logprob)
    ppl_cand, err_cand = perplexity(-cand_all)
    dp = cand_all.exp() - ref.target_logprob.double().exp()
    return Agreement(
        tokens=int(cand_all.numel()), ppl_ref=ppl_ref, ppl_ref_err=err_ref, ppl_cand=ppl_cand, ppl_cand_err=err_cand,
        ppl_ratio=ppl_cand / ppl_ref, kl_mean=float(kl_all.double().mean()), kl_median=quantile(kl_all, 0.5),
        kl_p99=quantile(kl_all, 0.99), kl_max=float(kl_all.max()), top1=float(top1_all.mean()),
        rms_dp=float(dp.pow(2).mean().sqrt()), nonfinite=nonfinite,
    )


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
            per_layer: bool = True, progress: Callable[[int], None] | None = None
            ) -> tuple[RefPositions, list[CandidateResult]]:
    if len(models) < 2:
        raise UsageError("compare needs a reference and at least one candidate")
    check_compatible(models)
    finals, rows = lockstep(models, windows, device, dtype, batch_size, per_layer, progress)
    targets = targets_by_group(windows)
    ref_logprobs, ref_lses = scored_logprobs(models[0], finals[0], windows, device)
    _check_reference_finite(models[0].name, ref_logprobs)
    ref = reference_positions(ref_logprobs, ref_lses, targets, top_k)
    results = []
    for i, m in enumerate(models[1:], start=1):
        metrics = candidate_agreement(ref, scored_logprobs(m, finals[i], windows, device)[0], targets)
        failures = thresholds.check(metrics)
        results.append(CandidateResult(m.name, metrics, rows[i - 1], not failures, failures))
    return ref, results


def reference_run(model: Model, windows: Windows, device: torch.device, dtype: torch.dtype = torch.float32,
                  batch_size: int = 4, top_k: int = DEFAULT_TOP_K, progress: Callable[[int], None] | None = None
                  ) -> RefPositions:
    """What compare needs from the reference, computed once (for `m1 verify logits --save`)."""
    finals, _ = lockstep([model], windows, device, dtype, batch_size, False, progress)
    logprobs, lses = scored_logprobs(model, finals[0], windows, device)
    _check_reference_finite(model.name, logprobs)
    return reference_positions(logprobs, lses, targets_by_group(windows), top_k)


def compare_to_saved(ref: RefPositions, candidates: Sequence[Model], windows: Windows, device: torch.device,
                     thresholds: Thresholds, dtype: torch.dtype = torch.float32, batch_size: int = 4,
                     progress: Callable[[int], None] | None = None, meta: Mapping[str, str] | None = None,
                     path: Path | str = "the stored reference") -> list[CandidateResult]:
    """Candidates against stored reference log-probs (no reference run, so no per-layer rows); `meta` (the
    file's metadata) refuses candidates that are not the model the reference was made from."""
    check_saved_compatible(path, meta or {}, windows, ref, candidates)
    targets = targets_by_group(windows)
    results = []
    for m in candidates:
        finals, _ = lockstep([m], windows, device, dtype, batch_size, False, progress)
        metrics = candidate_agreement(ref, scored_logprobs(m, finals[0], windows, device)[0], targets)
        failures = thresholds.check(metrics)
        results.append(CandidateResult(m.name, metrics, [], not failures, failures))
    return results


def model_perplexity(model: Model, windows: Windows, device: torch.device, dtype: torch.dtype = torch.float32,
                     batch_size: int = 4, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    finals, _ = lockstep([model], windows, device, dtype, batch_size, False, progress)
    targets = targets_by_group(windows)
    logprobs = scored_logprobs(model, finals[0], windows, device)[0]
    nll = torch.cat([-lp.gather(-1, t[:, None])[:, 0] for lp, t in zip(logprobs, targets, strict=True)])
    ppl, err = perplexity(nll)
    return {"model": model.name, "ppl": ppl, "ppl_err": err, "tokens_scored": int(nll.numel()),
            "nonfinite_positions": sum(nonfinite_positions(lp) for lp in logprobs),
            "windows": int(windows.tokens.shape[0]), "ctx": int(windows.tokens.shape[1]),
            "first_scored": windows.first_scored, "nll_mean": float(nll.double().mean()),
            "bits_per_token": float(nll.double().mean()) / math.log(2)}


# ---- stored reference (llama.cpp's KL-divergence-base workflow, top-k) ------------------------------------
def save_reference(path: Path, ref: RefPositions, windows: Windows, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    from m1.streaming import write_bytes_atomic

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
