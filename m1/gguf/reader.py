"""Reading a GGUF of MiniMax-M1 (llama.cpp's `minimax-01`) back as an M1 checkpoint, through `gguf.GGUFReader`.

`GGUFStorage(path)` is a `m1.storage.Storage` over one GGUF file or a llama.cpp split set
(`NAME-00001-of-0000N.gguf`, opened by its first file): what the rest of m1 reads from a checkpoint
folder it synthesizes from the GGUF metadata, and it decodes its own tensors (`read_tensor`), so every
command that takes a checkpoint folder takes a GGUF too (`Checkpoint.open` routes `.gguf` paths here).

- `config.json`: a release-format MiniMax-M1 config (layer kinds from `minimax-01.attention.recurrent_layers`,
  rotary_dim from `rope.dimension_count`, the three alphas from `residual_scale`, betas 1.0, postnorm, as
  llama.cpp computes the model); `model.safetensors.index.json`: every spec tensor -> the GGUF file that
  holds it, the stacked `*_exps` tensors expanded to one spec name per expert;
- `tokenizer.json` / `tokenizer_config.json`, rebuilt from `tokenizer.ggml.*` (GPT-2 style byte-level BPE
  only), written to a cache folder when a local path is asked for;
- `header(file)`: the spec tensors of one file with the dtype they come back in: F32 for F32 and for
  every block type (dequantized), F16 and BF16 as stored;
- `read_tensor(name)`: one spec tensor in torch order ([rows, cols]: GGUF's ne reversed); an expert is
  read as its slice of the stacked tensor only. Block types go through `gguf.quants.dequantize`.

The file is memory-mapped; nothing is read until a tensor is asked for. Problems are one-line
`CheckpointError`s naming the file (and the tensor).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from glob import escape as glob_escape
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m1.config_checks import BOUND_FACTOR, MAX_SIZES, check_config_values
from m1.errors import CheckpointError, M1Error
from m1.gguf.names import ARCH, _compiled, from_gguf
from m1.safetensors_io import Header, TensorInfo
from m1.storage import Storage

if TYPE_CHECKING:
    import torch
    from gguf import GGMLQuantizationType, GGUFReader

    from m1.config import M1Config

A = ARCH + "."
CONFIG, INDEX = "config.json", "model.safetensors.index.json"
TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
DEFAULT_BLOCK_SIZE = 256  # the release code's default; export does not record make-tiny's 16 (yet)
BLOCK_SIZE_KEY = A + "block_size"  # read if an exporter records it
DEFAULT_SOFTMAX_EVERY = 8  # what llama.cpp assumes without recurrent_layers
RE_EXPORT = "re-download or re-export the GGUF"
# The config.json sizes m1.config_checks bounds, by the GGUF key each comes from: checked before anything is
# expanded from them (an expert_count of 2^30 is a list of 2^30 names otherwise).
GGUF_SIZE_KEYS = {
    "hidden_size": A + "embedding_length", "intermediate_size": A + "feed_forward_length",
    "num_hidden_layers": A + "block_count", "num_attention_heads": A + "attention.head_count",
    "num_key_value_heads": A + "attention.head_count_kv", "num_local_experts": A + "expert_count",
    "num_experts_per_tok": A + "expert_used_count", "vocab_size": A + "vocab_size",
    "head_dim": A + "attention.key_length", "rotary_dim": A + "rope.dimension_count", "block_size": BLOCK_SIZE_KEY,
}
# The longest metadata array an M1 GGUF holds is its vocabulary (tokens, types, merges): gguf-py parses each
# entry as a numpy view of its own, so a longer one is refused by its length before it is parsed.
MAX_ARRAY_ENTRIES = MAX_SIZES["vocab_size"]
GGML_MAX_DIMS = 4
# The release's own config keys that llama.cpp's graph fixes (m1.gguf.metadata.check_runnable).
RELEASE_AUTO_MAP = {"AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
                    "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM"}


def split_names(stem: str, count: int) -> list[str]:
    """llama.cpp's names of a split set: NAME-00001-of-0000N.gguf ..."""
    return [f"{stem}-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]


def first_split(path: Path) -> Path:
    """`path` itself, or, where it does not exist, the first split of the set written for it (NAME.gguf ->
    NAME-00001-of-0000N.gguf, as `m1 convert ... NAME.gguf --split-max-size` and gguf-split name them)."""
    if path.exists() or not path.name.endswith(".gguf"):
        return path
    found = sorted(path.parent.glob(f"{glob_escape(path.name[:-5])}-00001-of-[0-9][0-9][0-9][0-9][0-9].gguf"))
    return found[0] if len(found) == 1 else path


def _nice_float(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974737875e-06)."""
    return float(str(np.float32(value)))


@cache
def decodable(qtype: GGMLQuantizationType) -> bool:
    """Whether m1 reads tensors of this GGML type back: F32, F16, BF16, and what gguf.quants dequantizes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
        return True
    if qtype not in GGML_QUANT_SIZES or qtype in (GGMLQuantizationType.F64, GGMLQuantizationType.I8,
                                                  GGMLQuantizationType.I16, GGMLQuantizationType.I32,
                                                  GGMLQuantizationType.I64):
        return False
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:
        dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def is_stacked(gguf_name: str) -> bool:
    """Whether a GGUF tensor stacks the experts of a layer (`blk.N.ffn_*_exps.weight`)."""
    return any(rule.stacked and gguf_rx.match(gguf_name) for _, gguf_rx, rule in _compiled())


def out_dtype(qtype: GGMLQuantizationType) -> str:
    """The safetensors dtype a tensor of this GGML type comes back in."""
    return {"F16": "F16", "BF16": "BF16"}.get(qtype.name, "F32")


@dataclass(frozen=True)
class Slot:
    """Where one spec tensor lives: a GGUF tensor of a file (and its index along the stacked axis)."""

    file: str
    index: int  # in the file's reader.tensors
    gguf_name: str
    expert: int | None
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order, of the spec tensor (the stacked axis removed for an expert)
    offset: int  # absolute byte offset of its stored data in the file
    stored_bytes: int

    @property
    def dtype(self) -> str:
        return out_dtype(self.qtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as it comes back (dequantized)."""
        n = 1
        for d in self.shape:
            n *= d
        return n * (2 if self.dtype in ("F16", "BF16") else 4)


@dataclass(frozen=True)
class SplitInfo:
    no: int | None
    count: int | None
    tensors: int | None


class GGUFStorage(Storage):
    """A `Storage` over a GGUF file (or split set) of MiniMax-M1, decoding its own tensors."""

    decodes_tensors = True
    own_format = "gguf"
    mixed_float_dtypes = True  # F32 norms and router beside bf16 weights, by llama.cpp's type policy

    def __init__(self, path: str | Path) -> None:
        self.path = first_split(Path(path))
        self.root = str(self.path)
        self.folder = self.path.parent
        self._readers: dict[str, GGUFReader] = {}
        self._cache: Path | None = None
        self.files = self._split_files()
        self.fields = self._metadata(self._reader(self.files[0]))
        self._check_sizes()
        self.layer_kinds = self._layer_kinds()
        self.slots: dict[str, Slot] = {}
        self.gguf_tensors: dict[str, tuple[str, Any, tuple[int, ...]]] = {}  # GGUF name -> (file, type, shape)
        for file in self.files:
            self._map_tensors(file)
        self._check_split_total()
        self.raw_config = self._config()
        self._config_obj: M1Config | None = None
        self._tokenizer: tuple[dict[str, Any], dict[str, Any]] | None | bool = False  # False: not built yet

    # ---- opening -----------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = {}  # memory maps are reopened in a worker process, never pickled
        state["fields"] = {}  # reader fields point into the map: the values needed later are kept below
        return state

    def _reader(self, file: str) -> GGUFReader:
        reader = self._readers.get(file)
        if reader is None:
            path = self.folder / file
            try:
                if path.stat().st_size == 0:
                    raise ValueError("the file is empty")
                reader = _plain_reader()(path)
            except FileNotFoundError:
                raise CheckpointError("missing GGUF file", file=str(path), hint=RE_EXPORT) from None
            except LayoutError as exc:
                raise CheckpointError(f"not a readable GGUF: {exc}", file=str(path), tensor=exc.tensor,
                                      hint=f"the file is truncated or damaged; {RE_EXPORT}") from None
            except (ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, OSError) as exc:
                raise CheckpointError(f"not a readable GGUF: {_reader_error(exc)}", file=str(path),
                                      hint=f"the file is truncated or damaged; {RE_EXPORT}") from None
            if reader.byte_order != "I":
                raise CheckpointError("a big-endian GGUF: m1 reads little-endian GGUF only", file=str(path))
            self._readers[file] = reader
        return reader

    def _split_files(self) -> list[str]:
        name = self.path.name
        m = SPLIT_NAME.match(name)
        first = self._reader(name)
        split = _split_info(first, str(self.path))
        if split.count is None or split.count <= 1 and m is None:
            if split.no not in (None, 0):
                raise CheckpointError(f"split.no is {split.no} but split.count is {split.count}", file=self.root,
                                      hint=RE_EXPORT)
            return [name]
        if m is None:
            raise CheckpointError(f"split.count is {split.count} but the name does not follow llama.cpp's "
                                  "NAME-00001-of-0000N.gguf", file=self.root,
                                  hint="rename the files as gguf-split names them")
        if int(m["count"]) != split.count or split.no != int(m["no"]) - 1:
            raise CheckpointError(f"the name says split {int(m['no'])} of {int(m['count'])} but its split.no and "
                                  f"split.count say {split.no} (0-based) of {split.count}", file=self.root,
                                  hint=RE_EXPORT)
        names = split_names(m["stem"], split.count)
        if split.no != 0:
            raise CheckpointError(f"split {split.no + 1} of {split.count}: a split set is opened by its first file",
                                  file=self.root, hint=f"give {self.folder / names[0]}")
        for i, other in enumerate(names[1:], start=1):
            reader = self._reader(other)  # missing or unreadable: one line naming the split
            info = _split_info(reader, str(self.folder / other))
            if info.no != i or info.count != split.count:
                raise CheckpointError(f"split.no {info.no} of split.count {info.count} where the name says "
                                      f"{i} (0-based) of {split.count}", file=str(self.folder / other),
                                      hint="the splits come from different exports; " + RE_EXPORT)
        return names

    def _metadata(self, reader: GGUFReader) -> dict[str, Any]:
        arch = _field(reader, "general.architecture")
        if arch != ARCH:
            what = f"architecture {arch!r}" if arch is not None else "no general.architecture"
            raise CheckpointError(f"a GGUF of {what}, not {ARCH} (MiniMax-M1)", file=self.root,
                                  hint="m1 reads GGUFs of MiniMax-M1 only")
        return dict(reader.fields)

    def _key(self, key: str, default: Any = None, required: bool = False, kind: type | tuple[type, ...] = int) -> Any:
        value = _contents(self.fields.get(key))
        if value is None:
            if required:
                raise CheckpointError(f"the metadata lacks {key}", file=self.root, hint=RE_EXPORT)
            return default
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise CheckpointError(f"metadata {key} is {value!r}, not a {getattr(kind, '__name__', kind)}",
                                  file=self.root, hint=RE_EXPORT)
        return value

    def _check_sizes(self) -> None:
        """The bounds config.json gets (m1.config_checks), on the GGUF keys, before anything is built from them."""
        raw = {ours: _contents(self.fields[key]) for ours, key in GGUF_SIZE_KEYS.items() if key in self.fields}
        check_config_values(raw, self.root, names=GGUF_SIZE_KEYS, hint=RE_EXPORT)

    def _layer_kinds(self) -> tuple[str, ...]:
        n_layers = self._key(A + "block_count", required=True)
        if not 0 < n_layers <= 10_000:
            raise CheckpointError(f"{A}block_count is {n_layers}", file=self.root, hint=RE_EXPORT)
        recurrent = self._key(A + "attention.recurrent_layers", kind=list)
        if recurrent is None:  # llama.cpp's own assumption: a softmax layer every 8th
            return tuple("softmax" if (i + 1) % DEFAULT_SOFTMAX_EVERY == 0 else "lightning" for i in range(n_layers))
        if len(recurrent) != n_layers:
            raise CheckpointError(f"{A}attention.recurrent_layers lists {len(recurrent)} layers for block_count "
                                  f"{n_layers}", file=self.root, hint=RE_EXPORT)
        return tuple("lightning" if bool(r) else "softmax" for r in recurrent)

    def _map_tensors(self, file: str) -> None:
        from gguf import GGML_QUANT_SIZES

        display = str(self.folder / file)
        n_experts = self._key(A + "expert_count", required=True)
        for index, t in enumerate(self._reader(file).tensors):
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # torch order
            if t.name in self.gguf_tensors:
                raise CheckpointError(f"the GGUF tensor {t.name} is also in {self.gguf_tensors[t.name][0]}",
                                      file=display, tensor=t.name, hint=RE_EXPORT)
            self.gguf_tensors[t.name] = (file, t.tensor_type, shape)
            if not decodable(t.tensor_type):
                raise CheckpointError(f"GGML type {t.tensor_type.name}, which m1 cannot read back (it reads F32, "
                                      "F16, BF16 and the block types gguf.quants dequantizes)", file=display,
                                      tensor=t.name, hint="convert it with llama-quantize to a type m1 reads")
            try:
                names = from_gguf(t.name, self.layer_kinds, n_experts)
            except (KeyError, ValueError, IndexError):
                names = [t.name]  # not a minimax-01 tensor: integrity names it, the planner refuses it
            if not is_stacked(t.name):
                self._add(names[0], Slot(file, index, t.name, None, t.tensor_type, shape, int(t.data_offset),
                                         int(t.n_bytes)), display)
                continue
            if len(shape) != 3:
                raise CheckpointError(f"a stacked expert tensor of shape {list(shape)}: expected 3-D [experts, rows, "
                                      "cols]", file=display, tensor=t.name, hint=RE_EXPORT)
            # Experts as stored (integrity reports a count that differs from expert_count).
            names = from_gguf(t.name, self.layer_kinds, shape[0])
            block, type_size = GGML_QUANT_SIZES[t.tensor_type]
            per_expert = shape[1] * shape[2] // block * type_size
            for e, name in enumerate(names):
                self._add(name, Slot(file, index, t.name, e, t.tensor_type, shape[1:],
                                     int(t.data_offset) + e * per_expert, per_expert), display)

    def _add(self, name: str, slot: Slot, display: str) -> None:
        if name in self.slots:
            raise CheckpointError(f"two GGUF tensors hold it ({self.slots[name].gguf_name} and {slot.gguf_name})",
                                  file=display, tensor=name, hint=RE_EXPORT)
        self.slots[name] = slot

    def _check_split_total(self) -> None:
        if len(self.files) == 1:
            return
        total = _split_info(self._reader(self.files[0]), self.root).tensors
        if total is not None and total != len(self.gguf_tensors):
            raise CheckpointError(f"split.tensors.count is {total} but the {len(self.files)} splits hold "
                                  f"{len(self.gguf_tensors)} tensors", file=self.root, hint=RE_EXPORT)

    # ---- the synthesized files ----------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """A release-format config.json of the model llama.cpp computes from this GGUF."""
        k = self._key
        hidden = k(A + "embedding_length", required=True)
        heads = k(A + "attention.head_count", required=True)
        alpha = k(A + "residual_scale", required=True, kind=(int, float))
        head_dim = k(A + "attention.key_length", hidden // heads if heads else None)
        embd = self.gguf_tensors.get("token_embd.weight")
        vocab = k(A + "vocab_size", embd[2][0] if embd and len(embd[2]) == 2 else None)
        if vocab is None:
            tokens = self.fields.get("tokenizer.ggml.tokens")
            vocab = len(tokens.data) if tokens is not None else None
        alpha = _nice_float(alpha)
        raw: dict[str, Any] = {
            "architectures": ["MiniMaxM1ForCausalLM"],
            "attn_type_list": [0 if kind == "lightning" else 1 for kind in self.layer_kinds],
            "auto_map": dict(RELEASE_AUTO_MAP),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": k(A + "feed_forward_length", required=True),
            "layernorm_full_attention_alpha": alpha,
            "layernorm_full_attention_beta": 1.0,
            "layernorm_linear_attention_alpha": alpha,
            "layernorm_linear_attention_beta": 1.0,
            "layernorm_mlp_alpha": alpha,
            "layernorm_mlp_beta": 1.0,
            "max_position_embeddings": k(A + "context_length", 4096),
            "model_type": "minimax_m1",
            "num_attention_heads": heads,
            "num_experts_per_tok": k(A + "expert_used_count", required=True),
            "num_hidden_layers": len(self.layer_kinds),
            "num_key_value_heads": k(A + "attention.head_count_kv", heads),
            "num_local_experts": k(A + "expert_count", required=True),
            "postnorm": True,
            "rms_norm_eps": _nice_float(k(A + "attention.layer_norm_rms_epsilon", 1e-5, kind=(int, float))),
            "rope_theta": _nice_float(k(A + "rope.freq_base", 10000.0, kind=(int, float))),
            "rotary_dim": k(A + "rope.dimension_count", head_dim),
            "shared_intermediate_size": 0,
            "tie_word_embeddings": "output.weight" not in self.gguf_tensors,
            "vocab_size": vocab,
        }
        block_size = k(BLOCK_SIZE_KEY)
        if block_size is not None and block_size != DEFAULT_BLOCK_SIZE:
            raw["block_size"] = block_size
        for ours, key in (("bos_token_id", "tokenizer.ggml.bos_token_id"),
                          ("eos_token_id", "tokenizer.ggml.eos_token_id")):
            value = k(key)
            if value is not None:
                raw[ours] = value
        return raw

    @property
    def config(self) -> M1Config:
        if self._config_obj is None:
            from m1.config import M1Config

            self._config_obj = M1Config.from_dict(self.raw_config, source=self.display(CONFIG))
        return self._config_obj

    def _index(self) -> dict[str, Any]:
        total = sum(s.nbytes for s in self.slots.values())
        return {"metadata": {"total_size": total, "format": "gguf"},
                "weight_map": {name: slot.file for name, slot in self.slots.items()}}

    def _tokenizer_files(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        if self._tokenizer is False:
            self._tokenizer = self._build_tokenizer()
        return self._tokenizer  # type: ignore[return-value]

    def _build_tokenizer(self) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """tokenizer.json and tokenizer_config.json from tokenizer.ggml.* (GPT-2 style byte-level BPE only)."""
        from gguf import TokenType

        from m1.gguf.tokenizer import PRE_TOKENIZERS

        fields = self.fields or self._metadata(self._reader(self.files[0]))
        get = lambda key: _contents(fields.get(key))  # noqa: E731
        if get("tokenizer.ggml.model") != "gpt2" or get("tokenizer.ggml.pre") not in PRE_TOKENIZERS:
            return None
        tokens = get("tokenizer.ggml.tokens") or []
        types = get("tokenizer.ggml.token_type") or [int(TokenType.NORMAL)] * len(tokens)
        if len(types) != len(tokens):
            return None
        vocab: dict[str, int] = {}
        added = []
        for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
            if kind == TokenType.UNUSED:  # the export's [PAD{id}] rows past the tokenizer's ids
                continue
            vocab.setdefault(text, i)  # added tokens too: tokenizers keeps their ids only when the vocab has them
            if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
                added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": kind != TokenType.CONTROL, "special": kind == TokenType.CONTROL})
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        pre = get("tokenizer.ggml.pre")
        if pre == "gpt-2":
            pre_tokenizer: dict[str, Any] = byte_level
        else:
            pre_tokenizer = {"type": "Sequence", "pretokenizers": [
                *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
                  for r in PRE_TOKENIZERS[pre]),
                {**byte_level, "use_regex": False}]}
        merges = [m.split(" ", 1) for m in get("tokenizer.ggml.merges") or []]
        tokenizer = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges},
        }
        config: dict[str, Any] = {"tokenizer_class": "GPT2TokenizerFast",
                                  "model_max_length": self.raw_config["max_position_embeddings"]}
        for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                              ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
            token_id = get("tokenizer.ggml." + gguf_key)
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                config[key] = tokens[token_id]
        for key in ("add_bos_token", "add_eos_token"):
            value = get("tokenizer.ggml." + key)
            if value is not None:
                config[key] = bool(value)
        template = get("tokenizer.chat_template")
        if template:
            config["chat_template"] = template
        return tokenizer, config

    def _synthesized(self, name: str) -> bytes | None:
        if name == CONFIG:
            return (json.dumps(self.raw_config, indent=2) + "\n").encode()
        if name == INDEX:
            return (json.dumps(self._index(), indent=2) + "\n").encode()
        if name in (TOKENIZER, TOKENIZER_CONFIG):
            files = self._tokenizer_files()
            if files is None:
                return None
            obj = files[0] if name == TOKENIZER else files[1]
            return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        return None

    # ---- the Storage protocol -------------------------------------------------------------------------
    def display(self, name: str) -> str:
        if name in self.files:
            return str(self.folder / name)
        return f"{self.root} (its {name}, from the GGUF metadata)"

    def exists(self, name: str) -> bool:
        if name in self.files or name in (CONFIG, INDEX):
            return True
        return name in (TOKENIZER, TOKENIZER_CONFIG) and self._tokenizer_files() is not None

    def read_bytes(self, name: str) -> bytes:
        data = self._synthesized(name)
        if data is not None:
            return data
        if name in self.files:
            return (self.folder / name).read_bytes()
        raise CheckpointError("not in this GGUF", file=self.display(name))

    def header(self, file: str) -> Header:
        if file not in self.files:
            raise CheckpointError("missing GGUF file", file=str(self.folder / file), hint=RE_EXPORT)
        reader = self._reader(file)
        infos = {name: TensorInfo(name, s.dtype, s.shape, file, s.offset, s.offset + s.nbytes)
                 for name, s in self.slots.items() if s.file == file}
        return Header(file, infos, {}, int(reader.data_offset), (self.folder / file).stat().st_size)

    def local_path(self, file: str) -> Path:
        if file in self.files:
            return self.folder / file
        data = self._synthesized(file)
        if data is None:
            raise CheckpointError("not in this GGUF", file=self.display(file))
        path = self.cache_dir() / file
        if not path.is_file() or path.read_bytes() != data:
            tmp = path.with_name(f".{file}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return path

    def extra_files(self) -> list[str]:
        return [TOKENIZER, TOKENIZER_CONFIG] if self._tokenizer_files() is not None else []

    def identity(self, files: list[str]) -> dict[str, Any]:
        """Size and mtime of each GGUF file; the synthesized files have the first file's (they derive from it)."""
        out: dict[str, Any] = {}
        for name in files:
            try:
                own = name in self.files or name.endswith(".gguf")
                st = (self.folder / (name if own else self.files[0])).stat()
            except OSError:
                out[name] = None
                continue
            out[name] = [st.st_size, st.st_mtime_ns]
        return out

    def cache_dir(self) -> Path:
        """Where local_path writes the synthesized files: $XDG_CACHE_HOME/m1/gguf/<this file's identity>/."""
        if self._cache is None:
            st = self.path.stat()
            key = hashlib.sha256(f"{self.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            self._cache = base / "m1" / "gguf" / f"{self.path.stem}-{key}"
            self._cache.mkdir(parents=True, exist_ok=True)
        return self._cache

    def tokenizer_folder(self) -> Path | None:
        """A folder holding the synthesized tokenizer.json and tokenizer_config.json (None without a tokenizer)."""
        if self._tokenizer_files() is None:
            return None
        for name in (TOKENIZER, TOKENIZER_CONFIG):
            self.local_path(name)
        return self.cache_dir()

    def stored_types(self) -> dict[str, dict[str, int]]:
        """GGML type -> {"tensors", "bytes"} of the GGUF tensors as stored (the headers give decoded sizes)."""
        out: dict[str, dict[str, int]] = {}
        for _file, qtype, _shape in self.gguf_tensors.values():
            out.setdefault(qtype.name, {"tensors": 0, "bytes": 0})["tensors"] += 1
        for slot in self.slots.values():
            out[slot.qtype.name]["bytes"] += slot.stored_bytes
        return out

    def stored_as(self, name: str) -> tuple[str, int] | None:
        """The GGML type and the bytes as stored of tensor `name` (of header(file)): what inspect reports, where
        the header gives the dtype and size it is read back in."""
        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError("tensor not in the GGUF", file=self.root, tensor=name)
        return slot.qtype.name, slot.stored_bytes

    # ---- tensors ------------------------------------------------------------------------------------
    def stored_range(self, name: str) -> tuple[str, int, int]:
        """Where a tensor's stored bytes are: (file, offset, length), for the source check (m1.source_check)."""
        slot = self.slots[name]
        return slot.file, slot.offset, slot.stored_bytes

    def read_tensor(self, name: str) -> torch.Tensor:
        """One spec tensor, dequantized (block types, F32) or as stored (F16, BF16), in torch order."""
        import torch
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        slot = self.slots.get(name)
        if slot is None:
            raise CheckpointError("tensor not in the GGUF", file=self.root, tensor=name)
        display = str(self.folder / slot.file)
        where = f" (GGUF {slot.gguf_name}" + (f", expert {slot.expert})" if slot.expert is not None else ")")
        from m1.spec import spec_by_name

        spec = spec_by_name(self.config).get(name)
        if spec is not None and tuple(spec.shape) != slot.shape:
            raise CheckpointError(f"shape {list(slot.shape)}{where}, the metadata implies {list(spec.shape)}",
                                  file=display, tensor=name, hint=RE_EXPORT)
        t = self._reader(slot.file).tensors[slot.index]
        if t.name != slot.gguf_name:
            raise CheckpointError(f"the file changed since it was opened{where}", file=display, tensor=name,
                                  hint="open it again")
        data = t.data if slot.expert is None else t.data[slot.expert]
        try:
            if slot.qtype == Q.F32:
                array = np.array(data, dtype=np.float32)
            elif slot.qtype == Q.F16:
                array = np.array(data, dtype=np.float16)
            elif slot.qtype == Q.BF16:
                raw = np.ascontiguousarray(data).view(np.int16).reshape(slot.shape)
                return torch.from_numpy(raw.copy()).view(torch.bfloat16)
            else:
                array = dequantize(np.asarray(data), slot.qtype)
        except (ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"cannot decode {slot.qtype.name}{where}: {exc}", file=display, tensor=name,
                                  hint=RE_EXPORT) from None
        if tuple(array.shape) != slot.shape:
            raise CheckpointError(f"decoded to shape {list(array.shape)}{where}, expected {list(slot.shape)}",
                                  file=display, tensor=name, hint=RE_EXPORT)
        return torch.from_numpy(np.ascontiguousarray(array))

    # ---- what verify integrity checks on top of the spec (m1.integrity calls it for GGUF storages) -------------
    def findings(self, check_hashes: bool = True) -> list[tuple[str, str, str | None, str | None]]:
        """(code, message, file, tensor) for what a GGUF may get wrong beyond the spec checks: tensors that
        llama.cpp and the export keep in F32 (norms, router, 1-D) stored otherwise, and, when an m1 manifest
        sits beside the file, each split's size and sha256 against it."""
        from gguf import GGMLQuantizationType as Q

        from m1.spec import Role, classify

        out: list[tuple[str, str, str | None, str | None]] = []
        f32_roles = (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM, Role.ROUTER)
        for name, slot in self.slots.items():
            try:
                role = classify(name).rule.role
            except M1Error:
                continue  # the spec checks report it
            if slot.qtype != Q.F32 and (role in f32_roles or len(slot.shape) == 1):
                out.append(("gguf-type", f"stored as {slot.qtype.name} (GGUF {slot.gguf_name}); norms, the router and "
                            "1-D tensors are F32 in a minimax-01 GGUF", slot.file, name))
        if check_hashes:
            out += self._manifest_findings()
        return out

    def sources(self) -> list[Path]:
        """The GGUF files and the manifest beside them (which an output of the same stem would replace)."""
        return [*(self.folder / f for f in self.files), self.manifest_path()]

    def manifest_path(self) -> Path:
        from m1.manifest import MANIFEST

        m = SPLIT_NAME.match(self.files[0])
        stem = m["stem"] if m and len(self.files) > 1 else self.path.stem
        return self.folder / f"{stem}.{MANIFEST}"

    def _manifest_findings(self) -> list[tuple[str, str, str | None, str | None]]:
        from m1.atomic_io import file_sha256

        path = self.manifest_path()
        if not path.is_file():
            return []
        try:
            shards = json.loads(path.read_text()).get("shards", {})
            if not isinstance(shards, dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError, AttributeError):
            return [("manifest", "not a valid m1 manifest", path.name, None)]
        out = []
        for file in self.files:
            record = shards.get(file)
            if not isinstance(record, dict):
                continue
            size = (self.folder / file).stat().st_size
            if size != record.get("size"):
                out.append(("sha256", f"size {size}, the manifest recorded {record.get('size')}", file, None))
            elif file_sha256(self.folder / file).hexdigest() != record.get("sha256"):
                out.append(("sha256", "sha256 differs from the manifest: the file changed after it was written",
                            file, None))
        return out


@cache
def _plain_reader() -> type[GGUFReader]:
    """gguf.GGUFReader over a plain ndarray view of its memory map.

    The reader parses every metadata element (a 200064-token vocabulary, its types and merges: 600k elements
    for MiniMax-M1) as slices of `self.data`; slices of an `np.memmap` pay for memmap's `__array_finalize__`
    each time. The same map seen as a plain ndarray halves the open time and the memory it takes (full-size
    M1: 16.4 s -> 7.1 s, 700 -> 330 MB on this project's 2-core box); tensor data is still mapped, not read.
    """
    from gguf import GGUFReader, GGUFValueType

    class PlainGGUFReader(GGUFReader):
        """... which also refuses, as it parses, an array longer than the file or any M1 holds (before its
        entries are parsed one by one) and tensor infos that do not tile the data section (before any view of
        tensor data is made): `LayoutError`s."""

        _key = ""  # the metadata key being parsed
        _depth = 0  # 0: at a key or tensor info; >0: inside a value

        @property  # type: ignore[override]
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain = value.view(np.ndarray)  # keeps the map alive through .base

        def _get_str(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
            length, text = super()._get_str(offset)
            if self._depth == 0:
                self._key = bytes(text[:100]).decode("utf-8", "replace")
            return length, text

        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int],
                                                                           list[GGUFValueType]]:
            if raw_type == GGUFValueType.ARRAY:
                _check_array(self.data, int(orig_offs), self._key, "little" if self.byte_order == "I" else "big")
            self._depth += 1
            try:
                return super()._get_field_parts(orig_offs, raw_type)
            finally:
                self._depth -= 1

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            check_layout([_extent(f) for f in fields], int(start_offs), len(self.data), int(self.alignment))
            super()._build_tensors(start_offs, fields)

    return PlainGGUFReader


class LayoutError(ValueError):
    """A GGUF header that cannot describe a sound file, found while it is parsed (tensor: the tensor it names)."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor


# The fewest bytes one array entry takes, by GGUFValueType (UINT8 .. FLOAT64): scalars their size, a string
# (8) its uint64 length, an array (9) its element type and length.
_MIN_ENTRY = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 8: 8, 9: 12, 10: 8, 11: 8, 12: 8}


def _check_array(data: np.ndarray, offset: int, key: str, order: Literal["little", "big"] = "little") -> None:
    """An array value at `offset` (its uint32 element type, then its uint64 length) that fits the bytes left
    in the file and holds no more entries than any M1 GGUF needs; a short or unknown one gguf-py reports."""
    head = bytes(data[offset:offset + 12])
    if len(head) < 12:
        return
    entry = _MIN_ENTRY.get(int.from_bytes(head[:4], order))
    length = int.from_bytes(head[4:], order)
    if entry is None:
        return
    left = len(data) - offset - 12
    if length * entry > left:
        raise LayoutError(f"metadata {key} is an array of {length} entries, more than the {left} bytes left in the "
                          "file can hold (a damaged length)")
    if length > MAX_ARRAY_ENTRIES:
        raise LayoutError(f"metadata {key} is an array of {length} entries; m1 reads arrays of up to "
                          f"{MAX_ARRAY_ENTRIES} ({BOUND_FACTOR}x MiniMax-M1's vocabulary)")


@dataclass(frozen=True)
class Extent:
    """Where one tensor info puts its data: bytes [offset, offset + nbytes) of the data section."""

    name: str
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _extent(field: Any) -> Extent:
    """A tensor info's extent, sized as ggml sizes it (blocks of its type), in Python integers (no overflow)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    _, name_data, n_dims, dims, raw_type, offset = field.parts
    name = bytes(name_data).decode("utf-8", "replace")
    if int(n_dims[0]) > GGML_MAX_DIMS:
        raise LayoutError(f"a tensor info of {int(n_dims[0])} dimensions (ggml has at most {GGML_MAX_DIMS})", name)
    try:
        qtype = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise LayoutError(f"GGML type {int(raw_type[0])}, which gguf-py does not know", name) from None
    block, type_size = GGML_QUANT_SIZES[qtype]
    ne = [int(d) for d in dims]
    if ne and ne[0] % block:
        raise LayoutError(f"a row of {ne[0]} values is not a whole number of {qtype.name} blocks of {block}", name)
    n = 1
    for d in ne:
        n *= d
    return Extent(name, int(offset[0]), n // block * type_size)


def _align(n: int, alignment: int) -> int:
    return n + (-n % alignment)


def check_layout(extents: list[Extent], data_offset: int, file_size: int, alignment: int) -> None:
    """What llama.cpp's loader checks of the tensor infos, and more: each offset a multiple of the alignment,
    each extent inside the file, no two at the same bytes or overlapping, and, in offset order, nothing between
    them but alignment padding, from the start of the data section to the end of the file. A tensor count one
    short (the last info read as padding, the data section shifted) leaves the last tensor's bytes unclaimed."""
    for e in extents:
        if e.offset % alignment:
            raise LayoutError(f"its data offset {e.offset} is not a multiple of the alignment {alignment} (llama.cpp "
                              "refuses the file)", e.name)
        if data_offset + e.end > file_size:
            raise LayoutError(f"its data (bytes {e.offset}..{e.end} of the data section, which starts at byte "
                              f"{data_offset}) runs past the end of the file ({file_size} bytes: truncated, or a "
                              "damaged offset)", e.name)
    ordered = sorted(extents, key=lambda e: (e.offset, e.end, e.name))
    for prev, cur in zip(ordered, ordered[1:], strict=False):
        if cur.offset == prev.offset and (cur.nbytes or prev.nbytes):
            raise LayoutError(f"its tensor info points at the same bytes as {prev.name} (data offset {cur.offset})",
                              cur.name)
        if cur.offset < prev.end:
            raise LayoutError(f"its data (bytes {cur.offset}..{cur.end} of the data section) overlaps {prev.name}'s "
                              f"({prev.offset}..{prev.end})", cur.name)
    end, last = 0, None
    for cur in ordered:
        if cur.offset > _align(end, alignment):
            where = f"between {last.name}'s data and this tensor's" if last else "at the start of the data section"
            raise LayoutError(f"{cur.offset - end} bytes {where} that no tensor info claims (the tensor infos do not "
                              "tile the data section)", cur.name)
        end, last = max(end, cur.end), cur
    if ordered and file_size > data_offset + _align(end, alignment):
        raise LayoutError(f"{file_size - data_offset - end} bytes after the last tensor's data ({ordered[-1].name}) "
                          f"are unclaimed by any tensor info: the header's tensor count ({len(extents)}) is short, or "
                          "a tensor info was lost")


def _contents(field: Any) -> Any:
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


def _field(reader: GGUFReader, key: str) -> Any:
    return _contents(reader.fields.get(key))


def _split_info(reader: GGUFReader, display: str) -> SplitInfo:
    values = [_field(reader, k) for k in ("split.no", "split.count", "split.tensors.count")]
    for key, value in zip(("split.no", "split.count", "split.tensors.count"), values, strict=True):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise CheckpointError(f"{key} is {value!r}", file=display, hint=RE_EXPORT)
    return SplitInfo(*values)


GGUF_READER_MESSAGES = ("GGUF magic", "version", "Duplicate", "duplicated", "alignment", "Unknown/unhandled",
                        "is not a valid", "empty")


def _reader_error(exc: BaseException) -> str:
    """gguf-py's own complaints as they are; numpy's (a length or offset past the end of the map) in words."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, (ValueError, KeyError)) and any(m in text for m in GGUF_READER_MESSAGES):
        return text[:160]
    return "its header or data runs past the end of the file (truncated, or a damaged length)"
