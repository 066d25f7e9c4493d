"""A weight and the input Hessian of correlated inputs, as real activations are: the layer the GPTQ tests round."""

from __future__ import annotations

import torch


def calibrated_layer(out: int, inn: int, seed: int = 0, samples: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(a bf16 weight [out, inn], the Hessian x^T x of `samples` correlated inputs [inn, inn])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, inn, generator=g) @ torch.randn(inn, inn, generator=g) * 0.3 + torch.randn(
        samples, inn, generator=g)
    w = (torch.randn(out, inn, generator=g) * 0.05).to(torch.bfloat16)
    return w, x.T @ x
