"""A GGUF run in a real llama.cpp (llama-cpp-python): the gguf format's runtime (`Format.runtime`).

`m1 verify llama SRC X.gguf` evaluates held-out windows here (each window from an empty state, logits for every
position) and in m1's engine on SRC (m1.verify.runtime), and reports KL(SRC || GGUF), top-1 agreement and both
perplexities: what llama.cpp users will actually get, measured by llama.cpp itself.
"""

from __future__ import annotations

from collections.abc import Callable
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


def run_checked(gguf: Path, windows: torch.Tensor, reference: Callable[[], torch.Tensor],
                threads: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(the engine's logits from `reference()`, llama.cpp's on the GGUF), refused when the file is missing, the
    shapes differ or llama.cpp's logits are not finite."""
    if not gguf.is_file():
        raise UsageError("not a GGUF file", file=str(gguf))
    ref = reference()
    cand = llama_logits(gguf, windows, threads)
    if cand.shape != ref.shape:
        raise UsageError(f"llama.cpp gives logits {list(cand.shape)}, the engine {list(ref.shape)}", file=str(gguf),
                         hint="is the GGUF made from this checkpoint?")
    if not torch.isfinite(cand).all():
        raise UsageError("llama.cpp's logits are not finite", file=str(gguf))
    return ref, cand
