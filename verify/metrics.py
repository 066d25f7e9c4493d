"""Agreement and perplexity metrics, as pure functions on log-probabilities.

The reference side may be stored compactly (llama.cpp's KL-divergence-base idea, but top-k): per
position the top-k log-probabilities and ids, the log-sum-exp of the logits and the log-probability
of the actual next token. KL(ref || cand) is then computed over the top-k ids plus one bucket for the
rest of the vocabulary; with k equal to the vocabulary (the tiny models) it is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RefPositions:
    """What compare needs from the reference, for N scored positions."""

    top_logprobs: torch.Tensor  # [N, k] float32, descending
    top_ids: torch.Tensor  # [N, k] int64
    logsumexp: torch.Tensor  # [N] float32: log-sum-exp of the raw logits
    target_logprob: torch.Tensor  # [N] float32: log p(next token)

    @classmethod
    def from_logprobs(cls, logprobs: torch.Tensor, targets: torch.Tensor, k: int,
                      logsumexp: torch.Tensor | None = None) -> RefPositions:
        k = min(k, logprobs.shape[-1])
        top = logprobs.topk(k, dim=-1)
        lse = logsumexp if logsumexp is not None else torch.zeros(logprobs.shape[0])
        return cls(top.values.float(), top.indices, lse.float(), logprobs.gather(-1, targets[:, None])[:, 0].float())

    def cat(self, other: RefPositions) -> RefPositions:
        return RefPositions(*(torch.cat([a, b]) for a, b in zip(self.astuple(), other.astuple(), strict=True)))

    def astuple(self) -> tuple[torch.Tensor, ...]:
        return self.top_logprobs, self.top_ids, self.logsumexp, self.target_logprob


def kl_from_top(ref: RefPositions, cand_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref || cand) per position over the ref's top-k ids plus a bucket for all other ids."""
    p_top = ref.top_logprobs.double().exp()
    cand_top = cand_logprobs.double().gather(-1, ref.top_ids)
    kl = (p_top * (ref.top_logprobs.double() - cand_top)).sum(-1)
    # The rest of the vocabulary as one bucket; below float32 resolution (the top-k is all of it) it is 0.
    rest_ref = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    rest_cand = (1.0 - cand_top.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(rest_ref > 1e-6, rest_ref * (rest_ref.clamp_min(1e-12).log() - rest_cand.log()),
                       torch.zeros_like(rest_ref))
    return (kl + tail).clamp_min(0.0).float()


def perplexity(nll: torch.Tensor) -> tuple[float, float]:
    """exp(mean NLL) and its standard error (delta method, as llama.cpp's perplexity reports)."""
    nll = nll.double()
    n = nll.numel()
    mean = float(nll.mean())
    ppl = math.inf if mean > 709.0 else math.exp(mean)  # exp overflows a float beyond ~709.78; NaN stays NaN
    if n < 2:
        return ppl, float("nan")
    sem = float(nll.std(unbiased=True)) / math.sqrt(n)
    return ppl, ppl * sem


def quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q)) if x.numel() else float("nan")


@dataclass
class Agreement:
    tokens: int
    ppl_ref: float
    ppl_ref_err: float
    ppl_cand: float
    ppl_cand_err: float
    ppl_ratio: float
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float
    rms_dp: float  # RMS of the change in the probability of the actual next token
    nonfinite: int = 0  # scored positions where the candidate's logits hold NaN or inf

    def as_dict(self) -> dict[str, float]:
        out = dict(self.__dict__)
        if not self.nonfinite:  # only when there is something to say: sound reports stay as they were
            del out["nonfinite"]
        return out


def agreement(ref: RefPositions, cand_logprobs: torch.Tensor, targets: torch.Tensor) -> Agreement:
    kl = kl_from_top(ref, cand_logprobs)
    cand_target = cand_logprobs.gather(-1, targets[:, None])[:, 0].double()
    ppl_ref, err_ref = perplexity(-ref.target_logprob)
    ppl_cand, err_cand = perplexity(-cand_target)
    top1 = float((cand_logprobs.argmax(-1) == ref.top_ids[:, 0]).double().mean())
    dp = cand_target.exp() - ref.target_logprob.double().exp()
    return Agreement(
        tokens=int(targets.numel()), ppl_ref=ppl_ref, ppl_ref_err=err_ref, ppl_cand=ppl_cand, ppl_cand_err=err_cand,
        ppl_ratio=ppl_cand / ppl_ref, kl_mean=float(kl.double().mean()), kl_median=quantile(kl, 0.5),
        kl_p99=quantile(kl, 0.99), kl_max=float(kl.max()), top1=top1, rms_dp=float(dp.pow(2).mean().sqrt()),
        nonfinite=nonfinite_positions(cand_logprobs),
    )


def nonfinite_positions(logprobs: torch.Tensor) -> int:
    """Positions (rows of [N, vocab] log-probabilities) where any value is NaN or inf: a logit that is NaN or
    +-inf makes its row non-finite after log-softmax, while finite logits always give finite log-probs."""
    return int((~torch.isfinite(logprobs)).any(-1).sum())


def layer_error(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L2 error) of two hidden-state tensors [..., hidden], over all positions."""
    r = ref.double().reshape(-1, ref.shape[-1])
    c = cand.double().reshape(-1, cand.shape[-1])
    cos = float(torch.nn.functional.cosine_similarity(r, c, dim=-1).mean())
    rel = float((c - r).norm() / r.norm().clamp_min(1e-30))
    return cos, rel


# ---- by position -------------------------------------------------------------------------------------------


@dataclass
class PositionMetrics:
    """Per scored position, in scoring order: KL(ref || cand), the log-prob of the actual next token under
    the reference and the candidate (float64) and whether the two top-1 tokens agree."""

    kl: torch.Tensor  # [N] float32
    ref_logprob: torch.Tensor  # [N] float64
    cand_logprob: torch.Tensor  # [N] float64
    top1: torch.Tensor  # [N] bool


def position_buckets(ctx: int) -> list[tuple[int, int]]:
    """[start, end) position ranges by powers of two up to the context: [0, 1), [1, 2), [2, 4), [4, 8), ...,
    the last one cut at ctx - 1 (the last position of a window predicts nothing)."""
    edges, end = [(0, 1)], 1
    while end < ctx - 1:
        edges.append((end, min(2 * end, ctx - 1)))
        end *= 2
    return edges


def by_position(pm: PositionMetrics, positions: torch.Tensor, ctx: int) -> list[dict[str, float]]:
    """The agreement metrics of each position bucket (`position_buckets`) that holds scored positions: KL mean
    and p99, top-1 agreement, the mean NLL of reference and candidate and their difference (cand - ref)."""
    out = []
    for start, end in position_buckets(ctx):
        sel = (positions >= start) & (positions < end)
        n = int(sel.sum())
        if not n:
            continue
        kl = pm.kl[sel]
        nll_ref, nll_cand = -pm.ref_logprob[sel], -pm.cand_logprob[sel]
        out.append({"start": start, "end": end, "tokens": n, "kl_mean": float(kl.double().mean()),
                    "kl_p99": quantile(kl, 0.99), "top1": float(pm.top1[sel].double().mean()),
                    "nll_ref": float(nll_ref.mean()), "nll_cand": float(nll_cand.mean()),
                    "nll_diff": float((nll_cand - nll_ref).mean())})
    return out
