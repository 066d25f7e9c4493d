"""bitsandbytes' serialization, as constants both the scheme (sizes) and the codec (bitsandbytes calls) use:
imported without torch, so commands that only read headers stay fast."""

from __future__ import annotations

NESTED_BLOCKSIZE = 256  # quantize_4bit(compress_statistics=True) quantizes the absmax in blocks of 256
# torch dtype names as QuantState.as_dict writes them (str(dtype) without "torch.").
STATE_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
