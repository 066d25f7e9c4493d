"""An importance matrix (llama.cpp's imatrix) from the layer-streamed engine, in llama.cpp's GGUF imatrix format.

For every linear layer's input the per-column sum of squared activations and the number of rows (tokens) it
saw: the attention projections (lightning qkv, gate, out; softmax q, k, v, o), the router, and each expert's
w1/w3 input and w2 input separately, counted per expert with the tokens routed to it. Like `llama-imatrix`,
which collects at every matrix multiplication of a `blk.*` weight (and of `output.weight` with
--process-output), but one layer at a time from the release safetensors: memory is one layer's weights plus
the activations of the calibration tokens, never the model.

The file (m1/gguf/imatrix.py) is what llama.cpp's `llama-imatrix` writes (tools/imatrix/imatrix.cpp, `save_imatrix`), so
`llama-quantize --imatrix` reads it: `general.type = imatrix`, `imatrix.datasets` (string array),
`imatrix.chunk_count` and `imatrix.chunk_size` (u32), and per weight, tensor names sorted,
`<gguf name>.in_sum2` F32 [n_cols, n_mat] and `<gguf name>.counts` F32 [1, n_mat] (GGUF ne order), n_mat =
n_expert for the stacked `*_exps` weights and 1 otherwise. Names are m1.gguf.names' (llama.cpp minimax-01).

What a quantizer uses (`importance`): in_sum2 / counts per matrix, 1 for a matrix that saw no token, as
llama-quantize does. Counts are stored as F32 by the format: exact up to 2^24 tokens per expert.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from m1.config import M1Config
from m1.dtypes import DTYPE_BYTES
from m1.errors import UsageError
from m1.gguf.imatrix import Entry, IMatrix
from m1.gguf.names import to_gguf
from m1.verify.engine import embed, forward_layer, rms_norm, rope_tables
from m1.verify.text import Windows

# ---- what is observed, per layer -----------------------------------------------------------------------------


def layer_inputs(cfg: M1Config, layer: int) -> dict[str, tuple[str, int | None]]:
    """Engine weight name (relative to the layer) -> (GGUF tensor name, expert slot) of every linear in `layer`."""
    if cfg.layer_kind(layer) == "lightning":
        attn = ["self_attn.qkv_proj.weight", "self_attn.output_gate.weight", "self_attn.out_proj.weight"]
    else:
        attn = [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names = [*attn, "block_sparse_moe.gate.weight"]
    names += [f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(cfg.num_local_experts)
              for w in ("w1", "w3", "w2")]
    out = {}
    for name in names:
        target = to_gguf(f"model.layers.{layer}.{name}")
        out[name] = (target.name, target.expert)
    return out


def _in_features(cfg: M1Config, name: str) -> int:
    if name.endswith(("out_proj.weight", "o_proj.weight")):
        return cfg.num_attention_heads * cfg.head_dim
    if name.endswith("w2.weight"):
        return cfg.intermediate_size
    return cfg.hidden_size


def head_input_name(cfg: M1Config) -> str:
    return "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"


class LayerCollector:
    """The engine's `observe` for one layer: accumulates sums of squares (float64) and row counts per weight."""

    def __init__(self, cfg: M1Config, layer: int, device: torch.device | str = "cpu") -> None:
        self.targets = layer_inputs(cfg, layer)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, np.ndarray] = {}
        for name, (gguf_name, expert) in self.targets.items():
            if gguf_name not in self.sums:
                n_mat = cfg.num_local_experts if expert is not None else 1
                self.sums[gguf_name] = torch.zeros(n_mat, _in_features(cfg, name), dtype=torch.float64, device=device)
                self.counts[gguf_name] = np.zeros(n_mat, dtype=np.int64)
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __call__(self, weight: str, x: torch.Tensor) -> None:
        try:
            gguf_name, expert = self.targets[weight]
        except KeyError:
            raise RuntimeError(f"the engine observed {weight!r}, which the imatrix does not know") from None
        if self._last[0] is x:  # q/k/v and w1/w3 share their input: square it once
            sq = self._last[1]
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            sq = torch.sum(flat.float().square(), dim=0, dtype=torch.float64)
            self._last = (x, sq)
        slot = expert if expert is not None else 0
        self.sums[gguf_name][slot] += sq
        self.counts[gguf_name][slot] += math.prod(x.shape[:-1])

    def entries(self) -> dict[str, Entry]:
        self._last = (None, None)
        return {n: Entry(n, s.cpu().numpy(), self.counts[n].copy()) for n, s in self.sums.items()}


# ---- the run ----------------------------------------------------------------------------------------------


def _embedding(source: Any) -> dict[str, torch.Tensor]:
    name = "model.embed_tokens.weight"
    return {name: source.global_weight(name)}


@torch.no_grad()
def compute_imatrix(
    cfg: M1Config,
    source: Any,
    windows: Windows | torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    datasets: Sequence[str] = (),
    process_output: bool = False,
    progress: Callable[[int], None] | None = None,
) -> IMatrix:
    """Stream the model one layer at a time over `windows` (token ids [n_windows, ctx], each window from an empty
    state, as llama-imatrix's chunks) and collect every linear input's statistics.

    source: an engine `WeightSource` (CheckpointWeights, DictSource). process_output: also the head's input
    (`output.weight`, llama-imatrix --process-output). progress(1) after each layer.
    """
    start = time.monotonic()
    device = torch.device(device)
    tokens = windows.tokens if isinstance(windows, Windows) else torch.as_tensor(windows, dtype=torch.long)
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise UsageError(f"windows must be token ids [n_windows, ctx], got shape {tuple(tokens.shape)}")
    batches = [b.to(device) for b in tokens.split(batch_size)]
    emb = {k: v.to(device) for k, v in _embedding(source).items()}
    states = [embed(emb, b, dtype) for b in batches]
    del emb
    ropes = {b.shape[-1]: rope_tables(cfg, b.shape[-1], device) for b in batches}
    entries: dict[str, Entry] = {}
    for layer in range(cfg.num_hidden_layers):
        weights = {k: v.to(device) for k, v in source.layer_weights(layer).items()}
        collect = LayerCollector(cfg, layer, device)
        states = [forward_layer(cfg, layer, weights, s, dtype=dtype, rope=ropes[s.shape[-2]], observe=collect)
                  for s in states]
        del weights
        entries.update(collect.entries())
        if progress is not None:
            progress(1)
    if process_output:
        norm = source.global_weight("model.norm.weight")
        name = head_input_name(cfg)
        sums = torch.zeros(1, cfg.hidden_size, dtype=torch.float64, device=device)
        rows = 0
        for s in states:
            h = rms_norm(s, norm.to(device), cfg.rms_norm_eps).float()
            sums[0] += torch.sum(h.reshape(-1, h.shape[-1]).square(), dim=0, dtype=torch.float64)
            rows += math.prod(h.shape[:-1])
        entries[name] = Entry(name, sums.cpu().numpy(), np.array([rows], dtype=np.int64))
    n_windows, ctx = (int(d) for d in tokens.shape)
    return IMatrix(dict(sorted(entries.items())), list(datasets), n_windows, ctx, time.monotonic() - start)


# ---- the plan (--dry-run) ---------------------------------------------------------------------------------



@dataclass
class LayerPlan:
    layer: int
    kind: str
    weight_bytes: int
    largest_tensor: int  # elements of the largest weight (cast to the compute dtype at use)
    entries: int


@dataclass
class Plan:
    layers: list[LayerPlan]
    tokens: int
    ctx: int
    batch_size: int
    dtype_bytes: int
    embedding_bytes: int
    hidden_bytes: int  # the activations of every calibration token, layer input and output
    batch_bytes: int  # one forward batch's working set through the largest layer (estimate)
    peak_bytes: int
    output_bytes: int
    sizes_from: str

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "layers"},
                "layers": [lp.__dict__ for lp in self.layers]}


def _stored_sizes(ckpt: Any, cfg: M1Config) -> tuple[dict[str, tuple[int, int]], str]:
    """name -> (bytes, elements) from the shard headers when they can be read, else from the config's spec."""
    from m1.spec import inventory

    specs = inventory(cfg)
    try:
        out = {}
        for s in specs:
            info = ckpt.info(s.name)
            out[s.name] = (int(info.nbytes), math.prod(info.shape))
        return out, "shard headers"
    except Exception:  # noqa: BLE001 - an index without its shards (tests/data/m1-release): the config says it
        return {s.name: (math.prod(s.shape) * DTYPE_BYTES.get(s.dtype, 2), math.prod(s.shape)) for s in specs}, "config"


def plan_imatrix(ckpt: Any, tokens: int, ctx: int, batch_size: int, dtype: torch.dtype = torch.float32,
                 process_output: bool = False) -> Plan:
    """Layer order, bytes read per layer and peak memory of `compute_imatrix`, from the config, index and headers
    only (no tensor data read)."""
    cfg = ckpt.config
    sizes, sizes_from = _stored_sizes(ckpt, cfg)
    dbytes = torch.empty(0, dtype=dtype).element_size()
    n_tokens = (tokens // ctx) * ctx
    layers = []
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        mine = [v for k, v in sizes.items() if k.startswith(prefix)]
        n_entries = len({g for g, _ in layer_inputs(cfg, layer).values()})
        layers.append(LayerPlan(layer, cfg.layer_kind(layer), sum(b for b, _ in mine), max(n for _, n in mine),
                                n_entries))
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    attn_width = cfg.num_attention_heads * cfg.head_dim
    rows = min(batch_size, max(1, n_tokens // ctx)) * ctx
    # One batch through a layer: the residual stream and norms (~10 x hidden), the attention projections and
    # their activations (~8 x heads*head_dim), an expert's SwiGLU on up to every row (~4 x intermediate), and the
    # softmax attention scores when SDPA materialises them (heads x ctx x ctx).
    batch_bytes = rows * dbytes * (10 * hidden + 8 * attn_width + 4 * inter) + \
        min(batch_size, max(1, n_tokens // ctx)) * cfg.num_attention_heads * ctx * ctx * 4
    hidden_bytes = 2 * n_tokens * hidden * dbytes
    largest = max(layers, key=lambda lp: lp.weight_bytes)
    cast = max(lp.largest_tensor for lp in layers) * dbytes
    emb_bytes = sizes.get("model.embed_tokens.weight", (0, 0))[0]
    n_out = sum(len({g for g, _ in layer_inputs(cfg, i).values()}) for i in range(cfg.num_hidden_layers))
    n_floats = 0
    for i in range(cfg.num_hidden_layers):
        for name, (_, expert) in layer_inputs(cfg, i).items():
            if expert in (None, 0):
                n_mat = cfg.num_local_experts if expert is not None else 1
                n_floats += n_mat * (_in_features(cfg, name) + 1)
    if process_output:
        n_out += 1
        n_floats += hidden + 1
    output_bytes = 4 * n_floats + 2 * n_out * 128 + 1024  # data + tensor infos + header (approx.)
    # the embedding is read once and dropped before the first layer, so the peak is the largest layer's
    peak = max(emb_bytes + hidden_bytes // 2, largest.weight_bytes + cast + hidden_bytes + batch_bytes)
    return Plan(layers, n_tokens, ctx, batch_size, dbytes, emb_bytes, hidden_bytes, batch_bytes, peak,
                output_bytes, sizes_from)


def routed_counts(cfg: M1Config, layer: int, weights: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> np.ndarray:
    """Tokens routed to each expert of `layer` for layer input `hidden`, from the engine's own trace (for checks)."""
    trace: dict[str, torch.Tensor] = {}
    forward_layer(cfg, layer, weights, hidden, trace=trace)
    ids = trace["expert_ids"].reshape(-1).cpu()
    return np.bincount(ids.numpy(), minlength=cfg.num_local_experts).astype(np.int64)
