"""Weight sources for the verify engine: any checkpoint the project reads, a layer at a time.

Plain tensors are read as stored; bitsandbytes-quantized experts are dequantized on the fly (one
expert at a time) with bitsandbytes' own functions, so the engine always sees ordinary weights. A new
format is one small `WeightSource` subclass with `layer_weights` and `global_weights` (and optionally
`stacked_layer_weights`, below).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from m1.checkpoint import Checkpoint
from m1.dtypes import FLOAT_DTYPES, torch_dtype
from m1.errors import CheckpointError
from m1.spec import classify
from m1.verify.engine import DOWN, GATE_UP, WeightSource


def _reused(reuse: Mapping[str, torch.Tensor] | None, name: str, shape: tuple[int, ...],
            dtype: torch.dtype) -> torch.Tensor:
    """`reuse[name]` when it has this shape and dtype (its values are about to be overwritten), else a new one."""
    old = reuse.get(name) if reuse is not None else None
    if old is not None and tuple(old.shape) == shape and old.dtype == dtype and old.device.type == "cpu" \
            and old.is_contiguous():
        return old
    return torch.empty(shape, dtype=dtype)


class CheckpointWeights(WeightSource):
    """`WeightSource` over a `Checkpoint`, dequantizing bitsandbytes experts as they are read."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.config = ckpt.config
        self._by_layer = ckpt.by_layer()

    @classmethod
    def open(cls, source: str, revision: str | None = None) -> CheckpointWeights:
        return cls(Checkpoint.open(source, revision=revision))

    def get(self, name: str) -> torch.Tensor:
        info = self.ckpt.info(name)
        if info.dtype in FLOAT_DTYPES:
            return self.ckpt.get(name)
        from m1.quantized import dequantize_weight

        return dequantize_weight(self.ckpt, name)

    def global_weight(self, name: str) -> torch.Tensor:
        return self.get(name)  # the embedding alone, not the head too

    def _weights(self, names: list[str], strip: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            if classify(name).companion is None:
                out[name[len(strip):]] = self.get(name)
        return out

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        return self._weights(self._by_layer.get(layer, []), f"model.layers.{layer}.")

    def global_weights(self) -> dict[str, torch.Tensor]:
        return self._weights(self._by_layer.get(None, []))

    def stacked_layer_weights(self, layer: int, dtype: torch.dtype,
                              reuse: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`layer_weights` with the experts stacked as the engine's GATE_UP [E, 2I, H] and DOWN [E, H, I] in
        `dtype`, on the CPU. Experts stored in that dtype in local safetensors shards are read from the file
        straight into their slot (one copy, as `layer_weights`); others are read (or dequantized) and cast in."""
        prefix = f"model.layers.{layer}."
        names = self._by_layer.get(layer, [])
        experts = f"{prefix}block_sparse_moe.experts."
        out = self._weights([n for n in names if not n.startswith(experts)], prefix)
        n_exp, inter, hidden = self.config.num_local_experts, self.config.intermediate_size, self.config.hidden_size
        gate_up = _reused(reuse, GATE_UP, (n_exp, 2 * inter, hidden), dtype)
        down = _reused(reuse, DOWN, (n_exp, hidden, inter), dtype)
        for e in range(n_exp):
            self._read_into(f"{experts}{e}.w1.weight", gate_up[e, :inter])
            self._read_into(f"{experts}{e}.w3.weight", gate_up[e, inter:])
            self._read_into(f"{experts}{e}.w2.weight", down[e])
        out[GATE_UP], out[DOWN] = gate_up, down
        return out

    def _read_into(self, name: str, out: torch.Tensor) -> None:
        info = self.ckpt.info(name)
        direct = (info.dtype in FLOAT_DTYPES and torch_dtype(info.dtype) == out.dtype and info.nbytes > 0
                  and info.file.endswith(".safetensors") and out.is_contiguous()
                  and not self.ckpt.storage.decodes_tensors)
        t = None if direct else self.get(name)  # quantized experts come back dequantized, in the spec's shape
        shape = tuple(info.shape) if t is None else tuple(t.shape)
        if shape != tuple(out.shape):
            raise CheckpointError(f"shape {list(shape)}, expected {list(out.shape)}", file=info.file, tensor=name,
                                  hint="check it with m1 verify integrity")
        if t is not None:
            out.copy_(t)
            return
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        with open(self.ckpt.local_path(info.file), "rb", buffering=0) as f:
            f.seek(info.start)
            got = f.readinto(view)
        if got != info.nbytes:
            raise CheckpointError("truncated while reading", file=info.file, tensor=name, hint="re-download it")
