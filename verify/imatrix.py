"""An importance matrix (llama.cpp's imatrix) from the layer-streamed engine, collected by m1's own weight names.

For every linear layer's input the per-column sum of squared activations and the number of rows (tokens) it
saw: the attention projections (lightning qkv, gate, out; softmax q, k, v, o), the router, and each expert's
w1/w3 input and w2 input separately, counted per expert with the tokens routed to it (and, with process_output,
the head's). Like `llama-imatrix`, which collects at every matrix multiplication, but one layer at a time from
the checkpoint: memory is one layer's weights plus the activations of the calibration tokens, never the model.

The statistics are keyed by spec weight name (`ImportanceStats`); a format with an importance-matrix file
(`Format.imatrix`, m1.formats.base.ImatrixFile) names its entries and writes it. What a quantizer uses is the
format's: in_sum2 / counts per matrix, 1 for a matrix that saw no token, as llama-quantize does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from m1.config import M1Config
from m1.dtypes import DTYPE_BYTES
from m1.errors import UsageError
from m1.verify.engine import embed, forward_layer, rms_norm, rope_tables
from m1.verify.text import Windows

EXPERT_INPUT = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight"  # its rows: the tokens routed


@dataclass
class WeightStats:
    """One weight's statistics: the sum over its input rows of each column squared (float64 [n_cols]), and rows."""

    sums: np.ndarray
    rows: int


@dataclass
class ImportanceStats:
    weights: dict[str, WeightStats]  # spec weight name -> its input's statistics
    datasets: list[str]
    chunk_count: int
    chunk_size: int
    seconds: float = 0.0

    def routed_tokens(self, layer: int) -> np.ndarray:
        """Tokens routed to each expert of `layer` (int64 [n_expert])."""
        rows = []
        while (name := EXPERT_INPUT.format(layer=layer, expert=len(rows))) in self.weights:
            rows.append(self.weights[name].rows)
        return np.array(rows, dtype=np.int64)

    def layers(self) -> list[int]:
        return sorted({int(n.split(".")[2]) for n in self.weights if n.startswith("model.layers.")})

    def unseen_experts(self) -> dict[int, list[int]]:
        """layer -> the experts no calibration token was routed to."""
        out = {}
        for layer in self.layers():
            zero = [int(i) for i in np.flatnonzero(self.routed_tokens(layer) == 0)]
            if zero:
                out[layer] = zero
        return out


def imatrix_file(out: Path) -> Any:
    """The importance-matrix file (m1.formats.base.ImatrixFile) of the format whose example has OUT's suffix, or
    of the first format that has one."""
    from m1.formats import all_formats

    files = [f.imatrix for f in all_formats() if f.imatrix is not None]
    if not files:
        raise UsageError("no registered format has an importance-matrix file")
    return next((f for f in files if Path(f.example).suffix == out.suffix), files[0])


# ---- what is observed, per layer -----------------------------------------------------------------------------


def layer_inputs(cfg: M1Config, layer: int) -> list[str]:
    """The engine's names (relative to the layer) of every linear weight in `layer` whose input is observed."""
    if cfg.layer_kind(layer) == "lightning":
        attn = ["self_attn.qkv_proj.weight", "self_attn.output_gate.weight", "self_attn.out_proj.weight"]
    else:
        attn = [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    experts = [f"block_sparse_moe.experts.{e}.{w}.weight" for e in range(cfg.num_local_experts)
               for w in ("w1", "w3", "w2")]
    return [*attn, "block_sparse_moe.gate.weight", *experts]


def _in_features(cfg: M1Config, name: str) -> int:
    if name.endswith(("out_proj.weight", "o_proj.weight")):
        return cfg.num_attention_heads * cfg.head_dim
    if name.endswith("w2.weight"):
        return cfg.intermediate_size
    return cfg.hidden_size


def head_weight(cfg: M1Config) -> str:
    """The weight the head's input multiplies: the embedding when the two are tied."""
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


class LayerCollector:
    """The engine's `observe` for one layer: accumulates sums of squares (float64) and row counts per weight."""

    def __init__(self, cfg: M1Config, layer: int, device: torch.device | str = "cpu") -> None:
        self.prefix = f"model.layers.{layer}."
        self.sums = {name: torch.zeros(_in_features(cfg, name), dtype=torch.float64, device=device)
                     for name in layer_inputs(cfg, layer)}
        self.rows = dict.fromkeys(self.sums, 0)
        self._last: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __call__(self, weight: str, x: torch.Tensor) -> None:
        if weight not in self.sums:
            raise RuntimeError(f"the engine observed {weight!r}, which the imatrix does not know")
        if self._last[0] is x:  # q/k/v and w1/w3 share their input: square it once
            sq = self._last[1]
        else:
            flat = x.detach().reshape(-1, x.shape[-1])
            sq = torch.sum(flat.float().square(), dim=0, dtype=torch.float64)
            self._last = (x, sq)
        self.sums[weight] += sq
        self.rows[weight] += math.prod(x.shape[:-1])

    def stats(self) -> dict[str, WeightStats]:
        self._last = (None, None)
        return {self.prefix + n: WeightStats(s.cpu().numpy(), self.rows[n]) for n, s in self.sums.items()}


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
    collector: Callable[[M1Config, int, torch.device], LayerCollector] | None = None,
    on_layer: Callable[[int, LayerCollector], None] | None = None,
) -> ImportanceStats:
    """Stream the model one layer at a time over `windows` (token ids [n_windows, ctx], each window from an empty
    state, as llama-imatrix's chunks) and collect every linear input's statistics.

    source: an engine `WeightSource` (CheckpointWeights, DictSource). process_output: also the head's input
    (`head_weight`, llama-imatrix --process-output). progress(1) after each layer. collector: what observes a
    layer (a LayerCollector subclass that gathers more, e.g. m1.quantize.hessian's x x^T per expert), handed to
    on_layer(layer, collector) once the layer has run, before the next layer's is made.
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
    weights_seen: dict[str, WeightStats] = {}
    for layer in range(cfg.num_hidden_layers):
        weights = {k: v.to(device) for k, v in source.layer_weights(layer).items()}
        collect = (collector or LayerCollector)(cfg, layer, device)
        states = [forward_layer(cfg, layer, weights, s, dtype=dtype, rope=ropes[s.shape[-2]], observe=collect)
                  for s in states]
        del weights
        weights_seen.update(collect.stats())
        if on_layer is not None:
            on_layer(layer, collect)
        del collect
        if progress is not None:
            progress(1)
    if process_output:
        norm = source.global_weight("model.norm.weight")
        sums = torch.zeros(cfg.hidden_size, dtype=torch.float64, device=device)
        rows = 0
        for s in states:
            h = rms_norm(s, norm.to(device), cfg.rms_norm_eps).float()
            sums += torch.sum(h.reshape(-1, h.shape[-1]).square(), dim=0, dtype=torch.float64)
            rows += math.prod(h.shape[:-1])
        weights_seen[head_weight(cfg)] = WeightStats(sums.cpu().numpy(), rows)
    n_windows, ctx = (int(d) for d in tokens.shape)
    return ImportanceStats(weights_seen, list(datasets), n_windows, ctx, time.monotonic() - start)


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
                 process_output: bool = False, entry: Callable[[str], str] = str) -> Plan:
    """Layer order, bytes read per layer and peak memory of `compute_imatrix`, from the config, index and headers
    only (no tensor data read). entry: the file's entry for a spec weight name (ImatrixFile.entry; by default one
    per weight), which sizes the file's entries."""
    cfg = ckpt.config

    def entries(layer: int) -> int:
        return len({entry(f"model.layers.{layer}.{name}") for name in layer_inputs(cfg, layer)})

    sizes, sizes_from = _stored_sizes(ckpt, cfg)
    dbytes = torch.empty(0, dtype=dtype).element_size()
    n_tokens = (tokens // ctx) * ctx
    layers = []
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        mine = [v for k, v in sizes.items() if k.startswith(prefix)]
        layers.append(LayerPlan(layer, cfg.layer_kind(layer), sum(b for b, _ in mine), max(n for _, n in mine),
                                entries(layer)))
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
    n_out = sum(lp.entries for lp in layers)
    # every weight's column sums and its row count, however the file groups them
    n_floats = sum(_in_features(cfg, name) + 1 for i in range(cfg.num_hidden_layers) for name in layer_inputs(cfg, i))
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
