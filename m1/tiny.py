"""`m1 make-tiny`: a small random M1 in the exact release layout, for tests and the demo.

Same tensor names, interleaved layer kinds (softmax every `softmax_every`-th layer, like layers
7, 15, ... 79 of the release), fp32 router, bf16 elsewhere, zero-based shard names and a layer's
tensors spread over several shards, as in the real index. Written with the safetensors library so
that our own reader is tested against files it did not write.

The vocabulary is bytes: `tokenizer_config.json` marks the model byte-level (the verify tools encode
text as UTF-8 bytes) and `tokenizer.json` is the same thing as a real byte-level BPE for the
`tokenizers` library and for the formats that embed the tokenizer (`byte_tokenizer_json`). A model with more
embedding rows than 256 gets the same tokenizer (an export that embeds it pads the token list to the rows).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from m1.config import M1Config
from m1.formats.release import NewModel, new_config
from m1.manifest import prepare_destination
from m1.spec import Role, inventory

BYTE_TOKENIZER_CONFIG = {"tokenizer_class": "m1-bytes", "m1_byte_level": True, "model_max_length": 1 << 20}
BYTE_VOCAB = 256


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode map as a list: entry b is the character that stands for byte b.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, 0x7F-0xA0, 0xAD) are
    shifted to U+0100 onwards, in byte order. This is the alphabet of `tokenizers`' ByteLevel and of
    llama.cpp's BPE vocabularies.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


# The one merge: two bytes that never occur in UTF-8 text (0xC0, 0xC1 could only start an overlong
# encoding), so it is never applied; its result takes id 255, the slot of byte 0xFF, which never occurs
# in UTF-8 text either.
UNREACHABLE_MERGE = (0xC0, 0xC1)
MERGE_ID = 0xFF


def byte_tokenizer_json() -> str:
    """tokenizer.json of a byte-level BPE whose ids are the byte values of any UTF-8 text.

    Id b is byte b (GPT-2's byte-to-unicode alphabet) for every byte a UTF-8 text can contain, so
    `encode(text).ids == list(text.encode())` for every str. GPT-2 pre-tokenizer (ByteLevel with its split
    regex, no prefix space) and ByteLevel decoder.

    Why one merge, and why it is unreachable: llama.cpp refuses a BPE vocabulary without merges ("cannot
    find tokenizer merges in model file": its file writer cannot write an empty array), and a merge's
    result must be a token of its own, while the tiny models have exactly 256 embedding rows. So the merge
    joins 0xC0 and 0xC1, bytes no UTF-8 text holds, into a token at id 255, the slot of 0xFF, which no UTF-8
    text holds either: the model never saw any of the three in training, and no text ever reaches the merge.
    """
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = gpt2_byte_alphabet()
    vocab = {alphabet[b]: b for b in range(256) if b != MERGE_ID}
    first, second = (alphabet[b] for b in UNREACHABLE_MERGE)
    vocab[first + second] = MERGE_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(first, second)]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"


@dataclass(frozen=True)
class TinySpec:
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    rotary_dim: int = 8
    intermediate: int = 96
    experts: int = 4
    top_k: int = 2
    vocab: int = 256
    softmax_every: int = 4
    block_size: int = 16
    shards: int = 3
    seed: int = 0


def tiny_config(spec: TinySpec) -> dict[str, Any]:
    """The release config.json of a tiny model (m1.formats.release writes the keys it owns, and the order)."""
    kinds = tuple("softmax" if (i + 1) % spec.softmax_every == 0 else "lightning" for i in range(spec.layers))
    alpha = (2 * spec.layers) ** 0.25
    model = NewModel(kinds, spec.head_dim, spec.rotary_dim, alpha, alpha, alpha, block_size=spec.block_size)
    return new_config(model, {
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "max_position_embeddings": 4096,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000000,
        "rotary_dim": spec.rotary_dim,
        "block_size": spec.block_size,  # recorded even at the release default, which write_config leaves out
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.45.2",
        "use_cache": True,
        "vocab_size": spec.vocab,
    })


def random_weights(cfg: M1Config, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in inventory(cfg):
        if t.role in (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM):
            value = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            value = torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1])
        out[t.name] = value.to(torch.float32 if t.dtype == "F32" else torch.bfloat16)
    return out


def save_release(dest: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], shards: int,
                 tokenizer_config: dict[str, Any] | None = None) -> None:
    """Save in the release layout: zero-based shard names, tensors dealt round-robin over shards.

    With the default (byte-level) tokenizer_config and at least 256 embedding rows, also the byte-level
    `tokenizer.json` (`byte_tokenizer_json`).
    """
    names = list(weights)
    n = max(1, min(shards, len(names)))
    files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {name: files[i % n] for i, name in enumerate(names)}
    for file in files:
        part = {k: weights[k].contiguous() for k in names if weight_map[k] == file}
        save_file(part, str(dest / file), metadata={"format": "pt"})
    total = sum(w.numel() * w.element_size() for w in weights.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or BYTE_TOKENIZER_CONFIG, indent=2) + "\n")
    if tokenizer_config is None and config["vocab_size"] >= BYTE_VOCAB:  # byte ids fit the embedding
        (dest / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    (dest / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 64}) + "\n")


def make_tiny(dest: Path, spec: TinySpec = TinySpec(), overwrite: bool = False) -> M1Config:
    raw = tiny_config(spec)
    cfg = M1Config.from_dict(raw, source="make-tiny")
    prepare_destination(dest, resume=False, overwrite=overwrite).release()
    save_release(dest, raw, random_weights(cfg, spec.seed), spec.shards)
    return cfg
