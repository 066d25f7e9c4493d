"""The release config.json a GGUF's metadata implies: the model llama.cpp computes from `minimax-01.*`.

Layer kinds from `minimax-01.attention.recurrent_layers` (a softmax layer every 8th without it, as llama.cpp
assumes), rotary_dim from `rope.dimension_count`, the three alphas from `residual_scale`, betas 1.0, postnorm.
The sizes are bounded (m1.config_checks) on the GGUF keys before anything is built from them; the keys the
release format owns, and the order, come from its writer (m1.formats.release.new_config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from m1.config_checks import check_config_values
from m1.errors import CheckpointError
from m1.formats.release import DEFAULT_BLOCK_SIZE, NewModel, new_config
from m1.gguf.layout import RE_EXPORT, Fields, contents, field_value
from m1.gguf.names import ARCH

if TYPE_CHECKING:
    from gguf import GGUFReader

A = ARCH + "."
BLOCK_SIZE_KEY = A + "block_size"  # read if an exporter records it (m1's does not record make-tiny's 16 yet)
DEFAULT_SOFTMAX_EVERY = 8  # what llama.cpp assumes without recurrent_layers
# The config.json sizes m1.config_checks bounds, by the GGUF key each comes from: checked before anything is
# expanded from them (an expert_count of 2^30 is a list of 2^30 names otherwise).
GGUF_SIZE_KEYS = {
    "hidden_size": A + "embedding_length", "intermediate_size": A + "feed_forward_length",
    "num_hidden_layers": A + "block_count", "num_attention_heads": A + "attention.head_count",
    "num_key_value_heads": A + "attention.head_count_kv", "num_local_experts": A + "expert_count",
    "num_experts_per_tok": A + "expert_used_count", "vocab_size": A + "vocab_size",
    "head_dim": A + "attention.key_length", "rotary_dim": A + "rope.dimension_count", "block_size": BLOCK_SIZE_KEY,
}


def model_fields(reader: GGUFReader, root: str) -> dict[str, Any]:
    """The metadata of a GGUF of MiniMax-M1 (llama.cpp's minimax-01); any other architecture is refused."""
    arch = field_value(reader, "general.architecture")
    if arch != ARCH:
        what = f"architecture {arch!r}" if arch is not None else "no general.architecture"
        raise CheckpointError(f"a GGUF of {what}, not {ARCH} (MiniMax-M1)", file=root,
                              hint="m1 reads GGUFs of MiniMax-M1 only")
    return dict(reader.fields)


def value(fields: Fields, root: str, key: str, default: Any = None, required: bool = False,
          kind: type | tuple[type, ...] = int) -> Any:
    """The value of metadata `key`, of type `kind` (a bool is no int), or `default` where it is absent."""
    found = contents(fields.get(key))
    if found is None:
        if required:
            raise CheckpointError(f"the metadata lacks {key}", file=root, hint=RE_EXPORT)
        return default
    if not isinstance(found, kind) or isinstance(found, bool) and kind is not bool:
        raise CheckpointError(f"metadata {key} is {found!r}, not a {getattr(kind, '__name__', kind)}",
                              file=root, hint=RE_EXPORT)
    return found


def check_sizes(fields: Fields, root: str) -> None:
    """The bounds config.json gets (m1.config_checks), on the GGUF keys, before anything is built from them."""
    raw = {ours: contents(fields[key]) for ours, key in GGUF_SIZE_KEYS.items() if key in fields}
    check_config_values(raw, root, names=GGUF_SIZE_KEYS, hint=RE_EXPORT)


def layer_kinds(fields: Fields, root: str) -> tuple[str, ...]:
    n_layers = value(fields, root, A + "block_count", required=True)
    if not 0 < n_layers <= 10_000:
        raise CheckpointError(f"{A}block_count is {n_layers}", file=root, hint=RE_EXPORT)
    recurrent = value(fields, root, A + "attention.recurrent_layers", kind=list)
    if recurrent is None:  # llama.cpp's own assumption: a softmax layer every 8th
        return tuple("softmax" if (i + 1) % DEFAULT_SOFTMAX_EVERY == 0 else "lightning" for i in range(n_layers))
    if len(recurrent) != n_layers:
        raise CheckpointError(f"{A}attention.recurrent_layers lists {len(recurrent)} layers for block_count "
                              f"{n_layers}", file=root, hint=RE_EXPORT)
    return tuple("lightning" if bool(r) else "softmax" for r in recurrent)


def _nice_float(number: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974737875e-06)."""
    return float(str(np.float32(number)))


def implied_config(fields: Fields, root: str, kinds: tuple[str, ...],
                   gguf_tensors: Mapping[str, tuple[str, Any, tuple[int, ...]]]) -> dict[str, Any]:
    """A release-format config.json of the model llama.cpp computes from this GGUF (`gguf_tensors`: GGUF
    name -> (file, type, shape), for the vocabulary and the tied head); the tokenizer's ids follow it."""
    def k(key: str, default: Any = None, required: bool = False, kind: type | tuple[type, ...] = int) -> Any:
        return value(fields, root, key, default, required, kind)

    hidden = k(A + "embedding_length", required=True)
    heads = k(A + "attention.head_count", required=True)
    alpha = k(A + "residual_scale", required=True, kind=(int, float))
    head_dim = k(A + "attention.key_length", hidden // heads if heads else None)
    embd = gguf_tensors.get("token_embd.weight")
    vocab = k(A + "vocab_size", embd[2][0] if embd and len(embd[2]) == 2 else None)
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    alpha = _nice_float(alpha)
    common: dict[str, Any] = {
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": k(A + "feed_forward_length", required=True),
        "max_position_embeddings": k(A + "context_length", 4096),
        "num_attention_heads": heads,
        "num_experts_per_tok": k(A + "expert_used_count", required=True),
        "num_hidden_layers": len(kinds),
        "num_key_value_heads": k(A + "attention.head_count_kv", heads),
        "num_local_experts": k(A + "expert_count", required=True),
        "rms_norm_eps": _nice_float(k(A + "attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
        "rope_theta": _nice_float(k(A + "rope.freq_base", 10000.0, kind=(int, float))),
        "rotary_dim": k(A + "rope.dimension_count", head_dim),
        "shared_intermediate_size": 0,
        "tie_word_embeddings": "output.weight" not in gguf_tensors,
        "vocab_size": vocab,
    }
    block_size = k(BLOCK_SIZE_KEY)
    model = NewModel(kinds, head_dim, common["rotary_dim"], alpha, alpha, alpha,
                     block_size=DEFAULT_BLOCK_SIZE if block_size is None else block_size)
    raw = new_config(model, common)
    for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                      ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        token_id = k(key)
        if token_id is not None:
            raw[ours] = token_id
    return raw
