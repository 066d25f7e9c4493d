"""A GGUF run in a real llama.cpp (llama-cpp-python), against the engine on the source checkpoint.

`m1 verify llama SRC X.gguf` evaluates held-out windows in llama.cpp (each window from an empty state, logits
for every position) and in m1's engine on SRC, and reports KL(SRC || GGUF), top-1 agreement and both
perplexities: what llama.cpp users will actually get, measured by llama.cpp itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from m1.errors import UsageError

INSTALL = "pip install llama-cpp-python==0.3.36 (CMAKE_ARGS=-DGGML_NATIVE=OFF for a portable build)"


def llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("llama-cpp-python is not installed", hint=INSTALL) from None
    return llama_cpp


def llama_logits(path: Path, windows: torch.Tensor, threads: int = 2) -> torch.Tensor:
    """fp64 logits [n_windows, T, vocab] of llama.cpp, each window from an empty state."""
    ctx = int(windows.shape[1])
    model = llama_cpp().Llama(model_path=str(path), logits_all=True, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx,
                              n_threads=threads, verbose=False)
    out = []
    for window in windows.tolist():
        model.reset()
        model.eval(window)
        out.append(torch.from_numpy(np.array(model.scores[: len(window)], dtype=np.float64)))
    return torch.stack(out)


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


def compare_in_llama(source: str, gguf: Path, windows: torch.Tensor) -> dict[str, float]:
    if not gguf.is_file():
        raise UsageError("not a GGUF file", file=str(gguf))
    ref = engine_logits(source, windows)
    cand = llama_logits(gguf, windows)
    if cand.shape != ref.shape:
        raise UsageError(f"llama.cpp gives logits {list(cand.shape)}, the engine {list(ref.shape)}", file=str(gguf),
                         hint="is the GGUF made from this checkpoint?")
    if not torch.isfinite(cand).all():
        raise UsageError("llama.cpp's logits are not finite", file=str(gguf))
    return agreement(ref, cand, windows)
