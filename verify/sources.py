"""Weight sources for the verify engine: any checkpoint the project reads, a layer at a time.

Plain tensors are read as stored; bitsandbytes-quantized experts are dequantized on the fly (one
expert at a time) with bitsandbytes' own functions, so the engine always sees ordinary weights. A new
format is one small source class with `layer_weights` and `global_weights`.
"""

from __future__ import annotations

import torch

from m1.checkpoint import Checkpoint
from m1.dtypes import FLOAT_DTYPES
from m1.spec import classify


class CheckpointWeights:
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
