"""Long contexts: chunked prefill in the engine, and agreement by position (`verify compare --by-position`).

- A layer run in chunks of positions (carrying the lightning state and the softmax keys/values) equals the
  one-call layer and the float64 token-by-token reference; both prefix-attention paths agree.
- At 65536 tokens the engine gives bitwise the same logits for the first 8192 positions as a run of 8192
  tokens: chunk c always covers positions [c * 4096, (c + 1) * 4096), so the shared prefix goes through the
  same operations on the same shapes in both runs (fp32, one process, fixed thread count; nothing in a
  chunk's arithmetic depends on the positions after it).
- --by-position: a lightning layer damaged in its slowest-decaying head (whose state accumulates over ~256
  positions, so its share of the layer's output, and the damage, grow along the window) shows KL growing
  from ~0.001 in the first buckets to ~0.5 in the last (tests/data/tiny-trained), and a sound copy (the hf
  conversion) shows KL 0 in every bucket.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import m1.verify.engine as engine
from m1.verify.engine import DictSource, forward_layer, forward_layer_chunked, run
from m1.verify.lightning import layer_slopes, lightning_attention
from m1.verify.metrics import position_buckets

try:  # the repo root on sys.path (python -m pytest), or tests/ made a package
    from tests.reference_m1 import reference_logits
    from tests.test_engine import random_tokens, random_weights, tiny_config
except ModuleNotFoundError:
    from reference_m1 import reference_logits
    from test_engine import random_tokens, random_weights, tiny_config

TRAINED = Path(__file__).parent / "data" / "tiny-trained"


def test_lightning_state_carries_across_calls() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 150, 8, generator=gen) for _ in range(3))
    slopes = layer_slopes(4, 1, 4)
    whole = lightning_attention(q, k, v, slopes, 16)
    state, parts = None, []
    for a, b in ((0, 32), (32, 37), (37, 150)):  # block-aligned, a partial block, the rest
        out, state = lightning_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], slopes, 16, state, True)
        parts.append(out)
    assert (torch.cat(parts, 2) - whole).abs().max() < 1e-6 * whole.abs().max()


@pytest.mark.parametrize("prefix", ["auto", "masked"])
def test_chunked_layers_equal_one_call_and_the_reference(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "PREFIX_ATTENTION", prefix)
    monkeypatch.setattr(engine, "MASKED_SCORES", 64 * 50)  # several query slices in the masked path
    cfg = tiny_config(rotary_dim=8)
    weights = random_weights(cfg, seed=21)
    tokens = random_tokens(150, seed=22, batch=2)
    one_call = run(cfg, DictSource(weights), [tokens], chunk_size=None).logits[0]
    chunked = run(cfg, DictSource(weights), [tokens], chunk_size=32).logits[0]  # 5 chunks, the last partial
    assert (chunked - one_call).abs().max() < 1e-5
    ref = reference_logits(cfg, weights, tokens[1].tolist())
    assert (chunked[1] - ref).abs().max() < 1e-4
    # a layer on its own, per-expert weights (no stacking) and [T, hidden] input
    hidden = torch.randn(150, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    layer_w = DictSource(weights).layer_weights(2)  # the softmax layer
    assert (forward_layer_chunked(cfg, 2, layer_w, hidden, chunk_size=48)
            - forward_layer(cfg, 2, layer_w, hidden)).abs().max() < 1e-5


@pytest.mark.slow
def test_65536_tokens_match_8192_on_the_shared_prefix() -> None:
    """Bitwise: the 64k run's first 8192 logits are the 8k run's, at the default chunk (4096 positions)."""
    cfg = tiny_config(rotary_dim=8, kinds=("lightning", "softmax", "lightning"))
    weights = random_weights(cfg, seed=31)
    tokens = random_tokens(65536, seed=32)
    long = run(cfg, DictSource(weights), [tokens]).logits[0]
    short = run(cfg, DictSource(weights), [tokens[:8192]]).logits[0]
    assert long.shape == (65536, 256) and torch.isfinite(long).all()
    assert torch.equal(long[:8192], short)
    assert long[8192:].std() > 0.1  # not degenerate far into the sequence


def test_position_buckets_are_powers_of_two_up_to_the_context() -> None:
    assert position_buckets(2048) == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64), (64, 128),
                                      (128, 256), (256, 512), (512, 1024), (1024, 2047)]
    assert position_buckets(2) == [(0, 1)]


def slowest_head_scaled(src: Path, dest: Path, layer: int, scale: float) -> Path:
    """A copy of `src` whose lightning layer `layer` has the v rows of its slowest-decaying head (the last:
    ALiBi slopes fall with the head index) scaled: a head whose state remembers ~1/slope positions."""
    shutil.copytree(src, dest)
    cfg = json.loads((src / "config.json").read_text())
    heads, hd = cfg["num_attention_heads"], cfg["head_dim"]
    name = f"model.layers.{layer}.self_attn.qkv_proj.weight"
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shard = dest / index["weight_map"][name]
    tensors = load_file(shard)
    w = tensors[name].float()
    h = heads - 1
    rows = slice(h * 3 * hd + 2 * hd, (h + 1) * 3 * hd)  # head h's rows are [q | k | v]
    w[rows] *= scale
    tensors[name] = w.to(tensors[name].dtype)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dest


BY_POSITION = ["--corpus", "mr-niah", "--ctx", "2048", "--tokens", "8192", "--device", "cpu", "-q", "--json",
               "--no-layers", "--by-position"]


@pytest.mark.slow
def test_by_position_shows_damage_that_grows_along_the_window(run, tmp_path: Path) -> None:
    sound = tmp_path / "sound"
    code, _, err = run("convert", TRAINED, sound, "--to", "hf", "-q")  # a sound copy in another layout
    assert code == 0, err
    # layer 0's last head: slope 2^-8, a state that remembers ~256 positions; its v rows 3x as large
    bad = slowest_head_scaled(TRAINED, tmp_path / "bad", layer=0, scale=3.0)
    code, out, err = run("verify", "compare", TRAINED, sound, bad, *BY_POSITION, "--report", tmp_path / "r")
    assert code == 0, err
    report = json.loads(out)
    sound_res, bad_res = report["candidates"]
    assert [(b["start"], b["end"]) for b in sound_res["by_position"]] == position_buckets(2048)
    assert all(b["kl_mean"] == 0 and b["kl_p99"] == 0 and b["top1"] == 1 and b["nll_diff"] == 0
               for b in sound_res["by_position"])
    kl = {b["start"]: b["kl_mean"] for b in bad_res["by_position"]}
    early = max(kl[s] for s in (0, 1, 2, 4))
    late = min(kl[s] for s in (256, 512, 1024))
    assert late > 5 * early, kl
    assert kl[1024] > kl[64] > kl[4], kl  # it grows along the window
    assert sum(b["tokens"] for b in bad_res["by_position"]) == bad_res["metrics"]["tokens"] == 4 * 2047
    for name in ("report.json", "report.md", "positions.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "by position" in md and "positions.png" in md and "| 1024-2046 |" in md
