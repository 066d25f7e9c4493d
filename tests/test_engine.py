"""The reference forward engine against two independent implementations.

- transformers' `MiniMaxForCausalLM` (same equations when rotary_dim == head_dim);
- tests/reference_m1.py, a float64 token-by-token transcription of the release equations.
Random tiny models, block_size 16 so the block-wise lightning code crosses block boundaries.
"""

from __future__ import annotations

import math

import pytest
import torch

from m1.config import M1Config
from m1.spec import inventory
from m1.verify.engine import (
    DictSource,
    EngineOutput,
    forward_layer,
    head,
    next_token_nll,
    run,
    run_layer,
)
from m1.verify.lightning import alibi_slopes, layer_slopes, lightning_attention

try:  # the repo root on sys.path (python -m pytest), or tests/ made a package
    from tests.reference_m1 import recurrent_lightning, reference_logits, release_slopes
except ModuleNotFoundError:  # plain `pytest`: its rootdir insertion puts tests/ itself on sys.path
    from reference_m1 import recurrent_lightning, reference_logits, release_slopes

KINDS = ("lightning", "lightning", "softmax", "lightning")


def tiny_config(
    *,
    rotary_dim: int = 16,
    heads: int = 4,
    kv_heads: int = 2,
    kinds: tuple[str, ...] = KINDS,
    postnorm: bool = True,
    tie: bool = False,
) -> M1Config:
    head_dim = 16
    return M1Config.from_dict(
        {
            "model_type": "minimax_m1",
            "hidden_size": 64,
            "intermediate_size": 48,
            "num_hidden_layers": len(kinds),
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "vocab_size": 256,
            "rotary_dim": rotary_dim,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "attn_type_list": [0 if k == "lightning" else 1 for k in kinds],
            "layernorm_full_attention_alpha": 1.7,
            "layernorm_full_attention_beta": 0.9,
            "layernorm_linear_attention_alpha": 1.3,
            "layernorm_linear_attention_beta": 1.1,
            "layernorm_mlp_alpha": 1.5,
            "layernorm_mlp_beta": 0.8,
            "postnorm": postnorm,
            "block_size": 16,
            "tie_word_embeddings": tie,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
        }
    )


def random_weights(cfg: M1Config, seed: int = 0) -> dict[str, torch.Tensor]:
    """fp32 weights for every tensor of the spec; norms near 1, linears scaled by fan-in."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in inventory(cfg):
        t = torch.randn(spec.shape, generator=gen)
        if len(spec.shape) == 1:
            t = 1.0 + 0.2 * t
        elif "embed_tokens" not in spec.name:
            t = t / math.sqrt(spec.shape[1])
        out[spec.name] = t
    return out


def random_tokens(n: int, seed: int, batch: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,) if batch is None else (batch, n), generator=gen)


# ---- transformers -------------------------------------------------------------------------------------


def hf_model(cfg: M1Config, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    hf_cfg = MiniMaxConfig(**cfg.to_dict("hf"))
    hf_cfg._attn_implementation = "eager"
    model = MiniMaxForCausalLM(hf_cfg).eval()
    state = {}
    for name, t in weights.items():
        if ".block_sparse_moe.experts." in name:
            continue
        state[name.replace(".block_sparse_moe.", ".mlp.")] = t
    # transformers fuses the experts: gate_up_proj[e] = [w1; w3], down_proj[e] = w2
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        experts = range(cfg.num_local_experts)
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([weights[f"{p}{e}.w1.weight"], weights[f"{p}{e}.w3.weight"]]) for e in experts]
        )
        down = [weights[f"{p}{e}.w2.weight"] for e in experts]
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(down)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    # only the lightning decay buffers, which transformers computes itself, may be missing
    buffers = {"slope_rate", "query_decay", "key_decay", "diagonal_decay"}
    assert all(k.rsplit(".", 1)[-1] in buffers for k in missing), missing
    return model


def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


def test_matches_transformers_when_rope_covers_the_head() -> None:
    cfg = tiny_config(rotary_dim=16)
    weights = random_weights(cfg, seed=1)
    tokens = random_tokens(40, seed=2, batch=2)  # 40 = 2 full blocks of 16 + a partial one
    ours = run(cfg, DictSource(weights), [tokens]).logits[0]
    theirs = hf_logits(hf_model(cfg, weights), tokens)
    assert ours.shape == theirs.shape == (2, 40, 256)
    assert theirs.std() > 0.5  # a non-degenerate comparison
    assert (ours - theirs).abs().max() < 1e-4


def test_partial_rope_transformers_departs_ours_follows_the_release() -> None:
    cfg = tiny_config(rotary_dim=8)  # half the head rotated, as in M1 (64 of 128)
    weights = random_weights(cfg, seed=3)
    tokens = random_tokens(36, seed=4)
    ours = run(cfg, DictSource(weights), [tokens]).logits[0]
    ref = reference_logits(cfg, weights, tokens.tolist())
    theirs = hf_logits(hf_model(cfg, weights), tokens[None])[0]
    assert (ours - ref).abs().max() < 1e-4
    # transformers rotates all 16 dims with head_dim frequencies: measurably different logits
    assert (theirs - ref).abs().max() > 1e-2
    # ... only from the softmax layer's positions on: the first token's logits agree (position 0 is unrotated)
    assert (theirs[0] - ref[0]).abs().max() < 1e-4


@pytest.mark.parametrize(
    ("heads", "kv_heads", "postnorm", "tie", "kinds"),
    [
        (4, 2, True, False, KINDS),
        (6, 3, False, True, ("lightning", "softmax", "lightning")),  # non-power-of-2 ALiBi heads, prenorm, tied
        (4, 4, True, False, ("lightning",)),  # a single layer: the slope factor guard
    ],
)
def test_matches_release_reference(
    heads: int, kv_heads: int, postnorm: bool, tie: bool, kinds: tuple[str, ...]
) -> None:
    cfg = tiny_config(rotary_dim=8, heads=heads, kv_heads=kv_heads, postnorm=postnorm, tie=tie, kinds=kinds)
    weights = random_weights(cfg, seed=heads)
    tokens = random_tokens(33, seed=5)
    ours = run(cfg, DictSource(weights), [tokens]).logits[0]
    ref = reference_logits(cfg, weights, tokens.tolist())
    assert ref.std() > 0.5
    assert (ours - ref).abs().max() < 1e-4


# ---- lightning attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [1, 5, 16, 37, 48])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_blockwise_lightning_equals_recurrent(seq_len: int, block_size: int) -> None:
    gen = torch.Generator().manual_seed(seq_len * 100 + block_size)
    heads, d = 8, 8
    q, k, v = (torch.randn(2, heads, seq_len, d, generator=gen) for _ in range(3))
    slopes = layer_slopes(heads, 1, 4)  # strong (0.35/step) to weak decays
    blockwise = lightning_attention(q, k, v, slopes, block_size)
    for b in range(2):
        expected = recurrent_lightning(q[b], k[b], v[b], slopes)
        assert (blockwise[b].double() - expected).abs().max() < 1e-4 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("n", range(1, 20))
def test_slopes_follow_the_release_recipe(n: int) -> None:
    assert alibi_slopes(n) == pytest.approx(release_slopes(n), rel=1e-12)


# ---- streaming, capture, hooks, gradients ---------------------------------------------------------------


class CountingSource(DictSource):
    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors)
        self.loaded: list[int] = []

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        self.loaded.append(layer)
        return super().layer_weights(layer)


def test_streams_each_layer_once_for_all_sequences() -> None:
    cfg = tiny_config()
    weights = random_weights(cfg, seed=7)
    batches = [random_tokens(20, seed=8), random_tokens(35, seed=9, batch=3), random_tokens(3, seed=10)]
    source = CountingSource(weights)
    together = run(cfg, source, batches, output="log_probs")
    assert source.loaded == list(range(cfg.num_hidden_layers))
    assert [t.shape for t in together.logits] == [(20, 256), (3, 35, 256), (3, 256)]
    for tokens, got in zip(batches, together.logits, strict=True):
        alone = run(cfg, DictSource(weights), [tokens], output="log_probs").logits[0]
        assert (alone - got).abs().max() < 1e-5
        assert torch.allclose(got.exp().sum(-1), torch.ones(()), atol=1e-4)


def test_captured_hidden_states_replay_layer_by_layer() -> None:
    cfg = tiny_config(rotary_dim=8)
    weights = random_weights(cfg, seed=11)
    source = DictSource(weights)
    tokens = random_tokens(30, seed=12)
    out: EngineOutput = run(cfg, source, [tokens], capture_hidden=True)
    assert out.hidden is not None and len(out.hidden) == cfg.num_hidden_layers + 1
    for layer in range(cfg.num_hidden_layers):
        # "isolated" mode: a layer fed the recorded input reproduces the recorded output
        again = forward_layer(cfg, layer, source.layer_weights(layer), out.hidden[layer][0][None])[0]
        assert (again - out.hidden[layer + 1][0]).abs().max() < 1e-5
        streamed = run_layer(cfg, source, layer, [out.hidden[layer][0]])[0]
        assert (streamed - out.hidden[layer + 1][0]).abs().max() < 1e-5
    assert (head(cfg, source.global_weights(), out.hidden[-1][0]) - out.logits[0]).abs().max() < 1e-5


def test_layer_hook_can_replace_outputs() -> None:
    cfg = tiny_config()
    a, b = random_weights(cfg, seed=13), random_weights(cfg, seed=14)
    tokens = random_tokens(25, seed=15)
    ref = run(cfg, DictSource(a), [tokens], capture_hidden=True)
    assert ref.hidden is not None
    last = cfg.num_hidden_layers - 1
    spliced = run(
        cfg, DictSource(b), [tokens],
        on_layer=lambda layer, inputs, outputs: [ref.hidden[layer + 1][0]] if layer == last else None,
    )
    plain_b = run(cfg, DictSource(b), [tokens]).logits[0]
    # model b, but with a's last-layer output spliced in: b's final norm and head applied to a's hidden state
    assert (spliced.logits[0] - plain_b).abs().max() > 1e-2
    expected = head(cfg, DictSource(b).global_weights(), ref.hidden[-1][0])
    assert (spliced.logits[0] - expected).abs().max() < 1e-5


def test_forward_is_differentiable_and_bf16_is_close() -> None:
    cfg = tiny_config(rotary_dim=8)
    weights = {k: v.clone().requires_grad_(True) for k, v in random_weights(cfg, seed=16).items()}
    source = DictSource(weights)
    tokens = random_tokens(24, seed=17, batch=2)
    from m1.verify.engine import embed

    hidden = embed(source.global_weights(), tokens)
    for layer in range(cfg.num_hidden_layers):
        hidden = forward_layer(cfg, layer, source.layer_weights(layer), hidden)
    loss = next_token_nll(head(cfg, source.global_weights(), hidden), tokens).mean()
    loss.backward()
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                 "model.layers.1.block_sparse_moe.gate.weight", "model.embed_tokens.weight", "lm_head.weight"):
        grad = weights[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    detached = {k: v.detach() for k, v in weights.items()}
    fp32 = run(cfg, DictSource(detached), [tokens]).logits[0]
    bf16 = run(cfg, DictSource(detached), [tokens], dtype=torch.bfloat16).logits[0]
    assert bf16.dtype == torch.float32  # the head is always fp32
    assert 0 < (bf16 - fp32).abs().max() < 0.25 * fp32.abs().max()


# ---- checkpoint sources -----------------------------------------------------------------------------------


def test_checkpoint_source_reads_the_release_layout(tmp_path) -> None:
    from safetensors.torch import load_file

    from m1.tiny import TinySpec, make_tiny
    from m1.verify.sources import CheckpointWeights

    cfg = make_tiny(tmp_path / "tiny", TinySpec(block_size=8))
    source = CheckpointWeights.open(str(tmp_path / "tiny"))
    # the same bf16 files read by the safetensors library itself, as an independent weight source
    direct = {}
    for shard in sorted((tmp_path / "tiny").glob("*.safetensors")):
        direct.update(load_file(str(shard)))
    tokens = random_tokens(19, seed=18)
    got = run(source.config, source, [tokens]).logits[0]
    want = run(cfg, DictSource(direct), [tokens]).logits[0]
    assert torch.equal(got, want)


def test_checkpoint_weights_dequantize_bitsandbytes_experts(tmp_path) -> None:
    from m1.cli import run_cli
    from m1.spec import inventory
    from m1.tiny import TinySpec, make_tiny
    from m1.verify.sources import CheckpointWeights

    cfg = make_tiny(tmp_path / "tiny", TinySpec(intermediate=128))
    assert run_cli(["quantize", str(tmp_path / "tiny"), str(tmp_path / "nf4"), "--scheme", "nf4", "-q"]) == 0
    source = CheckpointWeights.open(str(tmp_path / "nf4"))
    want = {t.name[len("model.layers.1."):]: t.shape for t in inventory(cfg) if t.layer == 1}
    got = source.layer_weights(1)
    assert {k: tuple(v.shape) for k, v in got.items()} == want  # companions folded in, spec shapes back
    assert all(v.is_floating_point() for v in got.values())
    plain = CheckpointWeights.open(str(tmp_path / "tiny")).layer_weights(1)
    w = "block_sparse_moe.experts.0.w1.weight"
    err = (got[w].float() - plain[w].float()).norm() / plain[w].float().norm()
    assert 0 < float(err) < 0.15  # nf4 error: present, and small


@pytest.mark.parametrize(("name", "bound"), [("tiny-trained", 3.0), ("tiny8-trained", 2.0)])
def test_shipped_tiny_trained_model_has_learned(name: str, bound: float) -> None:
    """tests/data/tiny-trained and tiny8-trained (scripts/train_tiny.py) predict their held-out bytes far better
    than chance."""
    import json
    from pathlib import Path

    from m1.verify.sources import CheckpointWeights

    root = Path(__file__).parent / "data" / name
    source = CheckpointWeights.open(str(root))
    assert json.loads((root / "tokenizer_config.json").read_text())["m1_byte_level"] is True
    text = "\n".join(
        m["content"]
        for line in (Path(__file__).parent / "data" / "corpus" / "mr-niah-en-2048.jsonl").read_text().splitlines()
        for m in json.loads(line)["messages"]
    ).encode()
    heldout = torch.tensor(list(text[int(len(text) * 0.9) :][: 8 * 256])).view(8, 256)
    logits = run(source.config, source, [heldout]).logits[0]
    ppl = next_token_nll(logits, heldout).mean().exp().item()
    assert ppl < bound, ppl  # READMEs: 1.64 and 1.22 over the whole held-out tail; uniform would be 256


def test_tiny8_trained_has_the_shapes_the_k_quant_and_mix_issues_need() -> None:
    """8 layers of both kinds (softmax not only every 8th), 8 experts, hidden 256, intermediate 512: every expert
    row a whole number of 256-wide K-quant super-blocks."""
    from pathlib import Path

    cfg = M1Config.from_file(Path(__file__).parent / "data" / "tiny8-trained" / "config.json")
    assert cfg.num_hidden_layers == 8 and cfg.num_local_experts == 8
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (256, 512, 256)
    assert cfg.layer_kinds.count("softmax") == 2 and cfg.layer_kinds.count("lightning") == 6
    assert all(t.shape[-1] % 256 == 0 for t in inventory(cfg) if ".experts." in t.name)
