"""`m1.load_pretrained`: a transformers MiniMaxForCausalLM whose experts stay bitsandbytes-quantized.

transformers 5.x keeps MiniMax's experts as two fused 3-D parameters per layer (`gate_up_proj`
[E, 2I, H] and `down_proj` [E, H, I]), which bitsandbytes' Linear4bit/Linear8bitLt cannot replace,
so `from_pretrained(..., quantization_config=...)` would quantize the small projections and leave the
experts (95% of the weights) in bf16. Here the model is built on the meta device, each layer's experts
module is swapped for `QuantizedExperts` (the stored bitsandbytes tensors, as buffers), and everything
else is loaded as stored (cast to `dtype`). A forward dequantizes only the experts the router picked,
with bitsandbytes' `dequantize_4bit` / `int8_vectorwise_dequant`, and runs the same arithmetic as
transformers' MiniMaxExperts: resident memory is the quantized size, not the bf16 size.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from m1.checkpoint import Checkpoint
from m1.errors import CheckpointError, UsageError
from m1.quantized import check_stored, is_quantized, read_pieces
from m1.schemes.bnb_codec import bnb_functional, check_data, dequantize_flat, quant_state
from m1.spec import Role, classify, spec_by_name

PROJECTIONS = ("w1", "w3", "w2")  # gate, up, down: transformers' gate_up_proj[e] = [w1; w3], down_proj[e] = w2


class QuantizedWeight(nn.Module):
    """One expert projection as the checkpoint stores it: bnb 4-bit, bnb int8 or plain (kept by --keep)."""

    def __init__(self, pieces: dict[str, torch.Tensor], name: str = "") -> None:
        super().__init__()
        self.name = name
        if "SCB" in pieces:
            self.kind = "int8"
            self.register_buffer("weight", pieces["weight"])
            self.register_buffer("SCB", pieces["SCB"])
            self.shape = tuple(pieces["weight"].shape)
        elif any(k.startswith("weight.") for k in pieces):
            self.kind = "4bit"
            state = quant_state(pieces, "cpu", name)  # QuantState.from_dict: bitsandbytes reads its own format
            self.register_buffer("weight", pieces["weight"])
            self.register_buffer("absmax", state.absmax)
            self.register_buffer("quant_map", state.code)
            self.shape = tuple(state.shape)
            self.blocksize, self.quant_type, self.dtype = state.blocksize, state.quant_type, state.dtype
            self.nested = state.nested
            if state.nested:
                self.register_buffer("nested_absmax", state.state2.absmax)
                self.register_buffer("nested_quant_map", state.state2.code)
                self.register_buffer("offset", state.offset.reshape(()).to(torch.float32))
                self.nested_blocksize, self.nested_dtype = state.state2.blocksize, state.state2.dtype
        else:
            self.kind = "plain"
            self.register_buffer("weight", pieces["weight"])
            self.shape = tuple(pieces["weight"].shape)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        F = bnb_functional()
        if self.kind == "plain":
            return self.weight.to(dtype)
        if self.kind == "int8":
            return F.int8_vectorwise_dequant(self.weight, self.SCB).to(dtype)
        state2 = None
        if self.nested:
            state2 = F.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                  blocksize=self.nested_blocksize, dtype=self.nested_dtype)
        state = F.QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.quant_map,
                             blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
                             offset=self.offset if self.nested else None, state2=state2)
        return dequantize_flat(self.weight, state).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={list(self.shape)}"


class QuantizedExperts(nn.Module):
    """Drop-in for transformers' MiniMaxExperts: forward(hidden, top_k_index, top_k_weights)."""

    def __init__(self, num_experts: int, act_fn: Any) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.experts = nn.ModuleList([nn.ModuleDict() for _ in range(num_experts)])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        # The routing bookkeeping is MiniMaxExperts.forward's, so the results match it exactly.
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        dtype = hidden_states.dtype
        for expert_idx in expert_hit:
            expert_idx = int(expert_idx[0])
            if expert_idx == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            expert = self.experts[expert_idx]
            # Dequantize only the experts in use, one at a time: transient bf16 memory is one expert.
            gate_up = torch.cat([expert["w1"].dequantize(dtype), expert["w3"].dequantize(dtype)])
            gate, up = nn.functional.linear(current_state, gate_up).chunk(2, dim=-1)
            del gate_up
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = nn.functional.linear(current_hidden_states, expert["w2"].dequantize(dtype))
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def expert_nbytes(model: nn.Module) -> int:
    """Bytes the model's expert modules hold (parameters and buffers)."""
    total = 0
    for module in model.modules():
        if isinstance(module, QuantizedExperts):
            total += sum(t.numel() * t.element_size() for t in module.buffers())
            total += sum(t.numel() * t.element_size() for t in module.parameters())
    return total


def load_pretrained(path: str, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa", revision: str | None = None) -> nn.Module:
    """A transformers MiniMaxForCausalLM (eval mode) from an m1 checkpoint, quantized or not.

    Quantized experts stay quantized on `device` and are dequantized per use; every other tensor is
    loaded in `dtype` (transformers' MiniMax needs one dtype: the router is cast too).
    """
    from transformers import MiniMaxConfig, MiniMaxForCausalLM
    from transformers.models.minimax import modeling_minimax as mm

    from m1.convert.job import RotaryWarning
    from m1.formats import get_format

    ckpt = Checkpoint.open(path, revision=revision)
    cfg = ckpt.config
    if cfg.quantization_config is not None:
        from m1.schemes import scheme_from_config

        scheme = scheme_from_config(cfg.quantization_config, f"{path}/config.json")
        if scheme.family != "bitsandbytes":
            raise UsageError(f"m1.load_pretrained runs bitsandbytes experts, not {scheme.describe()}",
                             file=f"{path}/config.json", hint="dequantize first: m1 convert SRC DST --dtype bf16")
    for message in get_format("hf").warnings(cfg):
        warnings.warn(message, RotaryWarning, stacklevel=2)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device cuda but torch sees no CUDA GPU", hint="load with device='cpu'")

    hf = cfg.to_dict("hf")
    hf.pop("quantization_config", None)  # transformers must not apply its own bnb path to this model
    hf_cfg = MiniMaxConfig(**hf)
    hf_cfg._attn_implementation = attn_implementation
    with torch.device("meta"):  # no memory for the bf16 experts, ever
        model = MiniMaxForCausalLM(hf_cfg)
    model.to(dtype)
    for layer in model.model.layers:
        layer.mlp.experts = QuantizedExperts(cfg.num_local_experts, layer.mlp.experts.act_fn)
    model.to_empty(device=device)
    # to_empty leaves buffers uninitialized: recompute the lightning decays and rotary frequencies.
    for module in model.modules():
        if isinstance(module, (mm.MiniMaxLightningAttention, mm.MiniMaxRotaryEmbedding)):
            model._init_weights(module)

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    weights = [n for n in ckpt.names() if classify(n).companion is None]
    specs = spec_by_name(cfg)
    for name in weights:
        c = classify(name, ckpt.weight_map[name])
        if c.rule.role == Role.EXPERT:
            experts = model.model.layers[c.layer].mlp.experts
            projection = name.rsplit(".", 2)[-2]
            if is_quantized(name, ckpt.weight_map):
                shape = specs[name].shape
                stored = check_stored(ckpt, name, shape)  # headers against the scheme, then the values
                pieces = read_pieces(ckpt, name)
                check_data(pieces, stored, shape, name)
            else:
                pieces = {"weight": ckpt.get(name)}
            module = QuantizedWeight(pieces, name).to(device)
            experts.experts[c.expert][projection] = module
            continue
        target = name.replace(".block_sparse_moe.", ".mlp.")
        param = params.get(target)
        if param is None:
            raise CheckpointError("transformers' MiniMax has no parameter for this tensor", file=ckpt.root, tensor=name)
        value = ckpt.get(name)
        if tuple(value.shape) != tuple(param.shape):
            raise CheckpointError(f"shape {list(value.shape)}, the model expects {list(param.shape)}", tensor=name)
        with torch.no_grad():
            param.copy_(value)
        loaded.add(target)
    if cfg.tie_word_embeddings:
        model.tie_weights()
        loaded.add("lm_head.weight")
    missing = [n for n in params if n not in loaded]
    for layer_idx, layer in enumerate(model.model.layers):
        for e, expert in enumerate(layer.mlp.experts.experts):
            missing += [f"model.layers.{layer_idx}.block_sparse_moe.experts.{e}.{p}.weight"
                        for p in PROJECTIONS if p not in expert]
    if missing:
        shown = ", ".join(missing[:3]) + (f" ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise CheckpointError(f"the checkpoint lacks {shown}", file=ckpt.root, hint="check it with m1 verify integrity")
    return model.eval()


def bf16_expert_nbytes(path: str) -> int:
    """What the experts would take in bf16 (for comparing against `expert_nbytes`)."""
    cfg = Checkpoint.open(path).config
    return cfg.num_hidden_layers * cfg.num_local_experts * 3 * cfg.hidden_size * cfg.intermediate_size * 2
