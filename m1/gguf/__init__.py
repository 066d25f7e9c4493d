"""GGUF export of MiniMax-M1 checkpoints for llama.cpp (architecture `minimax-01`).

- `names`: the tensor name table (spec <-> GGUF), as data;
- `metadata`: the model keys from an `M1Config`, refusing configs llama.cpp cannot run;
- `tokenizer`: the `tokenizer.ggml.*` keys from tokenizer.json / tokenizer_config.json;
- `types`: GGML type names and the type policy (experts, attention, head, embedding);
- `tensor_plan`: what to write (`plan_tensors`, `gguf_metadata`);
- `format`, `sink`: the pipeline's gguf format (its ops, options, reader hook) and sink;
- `reader`: a GGUF read back as a checkpoint (`GGUFStorage`), over `layout` (the file's layout checked as it
  is parsed), `split_set`, `implied_config` (metadata -> config.json), `tensor_map`, `rebuilt_tokenizer`
  and `checks` (what verify integrity adds);
- `job`: `export_gguf` runs them through the pipeline.
"""

from m1.gguf.job import ExportResult, export_gguf
from m1.gguf.names import ARCH, from_gguf, to_gguf
from m1.gguf.tensor_plan import TensorPlan, plan_tensors
from m1.gguf.types import TypePolicy

__all__ = ["ARCH", "ExportResult", "TensorPlan", "TypePolicy", "export_gguf", "from_gguf", "plan_tensors",
           "to_gguf"]
