"""A file in the program that runs its format (`Format.runtime`, e.g. llama.cpp), against the engine on the source.

`m1 verify <runtime command> SRC FILE` evaluates held-out windows in the runtime (each window from an empty state,
logits for every position) and in m1's engine on SRC, and reports KL(SRC || FILE), top-1 agreement and both
perplexities: what the runtime's users will actually get, measured by the runtime itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def runtime_format() -> Any:
    """The first registered format that declares a runtime (m1.formats.base.Runtime), or None."""
    from m1.formats import all_formats

    return next((f for f in all_formats() if f.runtime is not None), None)


def engine_logits(source: str, windows: torch.Tensor) -> torch.Tensor:
    from m1.checkpoint import Checkpoint
    from m1.verify.engine import run
    from m1.verify.sources import CheckpointWeights

    ckpt = Checkpoint.open(source)
    return run(ckpt.config, CheckpointWeights(ckpt), [windows]).logits[0].double()


def agreement(ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, float]:
    """KL(ref || cand) mean (nats), top-1 agreement, and with `targets` both perplexities."""
    ref_lp, cand_lp = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    kl = (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1)
    out = {"kl_mean": float(kl.mean()), "kl_p99": float(torch.quantile(kl.flatten().float(), 0.99)),
           "top1": float((ref.argmax(-1) == cand.argmax(-1)).double().mean()), "positions": int(kl.numel())}
    if targets is not None:
        for label, lp in (("ref", ref_lp), ("cand", cand_lp)):
            nll = -lp[:, :-1].gather(-1, targets[:, 1:, None]).squeeze(-1)
            out[f"ppl_{label}"] = float(torch.exp(nll.mean()))
        out["ppl_ratio"] = out["ppl_cand"] / out["ppl_ref"]
    return out


def compare_in_runtime(source: str, path: Path, windows: torch.Tensor, threads: int = 2,
                       runtime: Any = None) -> dict[str, float]:
    """`agreement` of the runtime's logits on file `path` with the engine's on `source` (runtime: a
    m1.formats.base.Runtime; by default `runtime_format()`'s)."""
    if runtime is None:
        fmt = runtime_format()
        if fmt is None:
            from m1.errors import UsageError

            raise UsageError("no registered format declares a runtime to run its files in")
        runtime = fmt.runtime
    ref, cand = runtime.run(Path(path), windows, lambda: engine_logits(source, windows), threads)
    return agreement(ref, cand, windows)
