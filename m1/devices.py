"""`--device auto|cpu|cuda`, the same for every command."""

from __future__ import annotations

import torch

from m1.errors import UsageError


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without one is a usage error."""
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device} but torch sees no CUDA GPU (torch.cuda.is_available() is False)",
                         hint="use --device cpu (or auto), or install a CUDA build of torch")
    return torch.device(device)
