"""`--device auto|cpu|cuda|cuda:i|cuda:i,cuda:j,...`, the same for every command.

A command that runs in one place uses `resolve_device` (a set means its first device). A job that writes
with several processes (`--workers`, or ranks under torchrun) gives each its own device with
`writer_devices`: with `cuda`, round robin over the visible GPUs (cuda:0, cuda:1, ...); with a set, round
robin over the set; with one device (`cpu`, `cuda:2`), every process on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from m1.errors import UsageError

HINT = "use auto, cpu, cuda, cuda:N or a set such as cuda:0,cuda:3"


def _check(device: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise UsageError(f"--device must be auto, cpu, cuda, cuda:N or a set of cuda:N, got {device!r}", hint=HINT)


def device_set(device: str) -> list[str]:
    """The devices named by `--device` as written: one entry, or each of a comma-separated set."""
    parts = [p.strip() for p in device.split(",")] if "," in device else [device]
    for p in parts:
        _check(p)
    if len(parts) > 1:
        if any(not p.startswith("cuda:") for p in parts):
            raise UsageError(f"--device {device}: a set lists cuda:N devices only", hint=HINT)
        if len(set(parts)) != len(parts):
            raise UsageError(f"--device {device} names a device twice", hint=HINT)
    return parts


def _visible(device: str, parts: list[str]) -> int:
    import torch  # here, not at import: copy-only jobs on "cpu" never pay for torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device} but torch sees no CUDA GPU (torch.cuda.is_available() is False)",
                         hint="use --device cpu (or auto), or install a CUDA build of torch")
    count = torch.cuda.device_count()
    for p in parts:
        if p.startswith("cuda:") and int(p[5:]) >= count:
            raise UsageError(f"--device {device}: {p} is not visible (torch sees {count} GPU"
                             f"{'s' if count != 1 else ''}: cuda:0 to cuda:{count - 1})",
                             hint="check CUDA_VISIBLE_DEVICES, or name visible devices")
    return count


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; 'cuda' without one is a usage error; a set -> its first."""
    import torch

    parts = device_set(device)
    if parts == ["auto"]:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if parts == ["cpu"]:
        return torch.device("cpu")
    _visible(device, parts)
    return torch.device(parts[0])


def writer_devices(device: str, count: int, first: int = 0) -> list[str]:
    """The device of each of `count` writing processes, numbered from `first` (under torchrun: the rank's
    first writer on its node), as `cpu` or `cuda:N`."""
    parts = device_set(device)
    if parts == ["auto"]:
        import torch

        parts = ["cuda" if torch.cuda.is_available() else "cpu"]
    if parts == ["cpu"]:
        return ["cpu"] * count
    visible = _visible(device, parts)
    if parts == ["cuda"]:
        parts = [f"cuda:{i}" for i in range(visible)]
    return [parts[(first + i) % len(parts)] for i in range(count)]
