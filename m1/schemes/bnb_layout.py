"""bitsandbytes' serialization, as constants both the scheme (sizes) and the codec (bitsandbytes calls) use:
imported without torch, so commands that only read headers stay fast."""

from __future__ import annotations

from m1.dtypes import torch_name

NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes the absmax in blocks of 256
# The weight dtypes a 4-bit state records: safetensors name -> the torch name QuantState.as_dict writes
# (str(dtype) without "torch.").
STATE_DTYPES = {name: torch_name(name) for name in ("BF16", "F16", "F32")}
