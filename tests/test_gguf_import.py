"""Reading GGUF back (m1.gguf.reader): every command that takes a checkpoint folder takes a GGUF file too.

On a tiny M1 exported with `export_gguf` (f32, bf16, q8_0, q4_0): the tensors read back are the originals
exactly (float types) or bit-exactly what `gguf.quants.dequantize` gives for the stored data (block types);
`m1 inspect`, `m1 verify integrity`, `m1 convert x.gguf back/ --to release`, `m1 verify compare` and
`m1 verify perplexity` work on the file and agree with the imported folder; split sets, other
architectures, missing, mis-shaped and mis-typed tensors, and truncated or damaged files.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType
from gguf.quants import dequantize
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from m1.checkpoint import Checkpoint
from m1.errors import CheckpointError
from m1.gguf import export_gguf, to_gguf
from m1.gguf.metadata import KV, apply
from m1.gguf.names import ARCH
from m1.gguf.reader import GGUFStorage
from m1.gguf.tokenizer import PRE_TOKENIZERS, TokenizerFiles, tokenizer_metadata
from m1.tiny import TinySpec, make_tiny
from m1.verify.text import corpus_text

TYPES = ("f32", "bf16", "q8_0", "q4_0")
MORE_TYPES = ("f16", "q4_1", "q5_0", "q5_1", "mxfp4")  # read back only
FLOAT = ("f32", "bf16")


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The synthesized tokenizer files go to $XDG_CACHE_HOME/m1/gguf: a fresh one per test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("src") / "tiny"
    make_tiny(dest, TinySpec())
    return dest


@pytest.fixture(scope="module")
def exports(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    out = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def get(expert_type: str) -> Path:
        if expert_type not in made:
            made[expert_type] = out / f"tiny-{expert_type}.gguf"
            export_gguf(source, made[expert_type], expert_type)
        return made[expert_type]

    return get


def stored(path: Path) -> dict[str, Any]:
    """GGUF name -> gguf-py's ReaderTensor."""
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def expected(src: Checkpoint, path: Path, tensors: dict[str, Any], name: str) -> torch.Tensor:
    """What reading spec tensor `name` back must give: the original for F32/F16/BF16, gguf.quants.dequantize
    of the stored data (of the whole stacked tensor, then the expert's slice) for a block type."""
    target = to_gguf(name)
    t = tensors[target.name]
    if t.tensor_type in (Q.F32, Q.BF16):
        return src.get(name)
    full = np.asarray(t.data) if t.tensor_type == Q.F16 else dequantize(np.asarray(t.data), t.tensor_type)
    return torch.from_numpy(np.array(full if target.expert is None else full[target.expert]))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, bit for bit (NaN-free data), whatever the float dtype."""
    return a.shape == b.shape and torch.equal(a.float(), b.float())


# ---- the reader ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_type", TYPES + MORE_TYPES)
def test_read_back_gives_the_originals_or_exactly_the_dequantized_data(source: Path, exports, expert_type: str):
    path = exports(expert_type)
    src, ckpt = Checkpoint.open(source), Checkpoint.open(path)
    cfg, ref = ckpt.config, src.config
    assert sorted(ckpt.names()) == sorted(src.names())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_local_experts", "num_experts_per_tok", "vocab_size", "rotary_dim", "layer_kinds",
                "postnorm", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "flavour", "model_type"):
        assert getattr(cfg, key) == getattr(ref, key), key
    assert cfg.mlp_alpha == cfg.full_attn_alpha == cfg.linear_attn_alpha == pytest.approx(ref.mlp_alpha, rel=1e-7)
    assert (cfg.mlp_beta, cfg.full_attn_beta, cfg.linear_attn_beta) == (1.0, 1.0, 1.0)
    assert cfg.block_size == 256  # not recorded by the export: the release default
    tensors = stored(path)
    for name in ckpt.names():
        got, info = ckpt.get(name), ckpt.info(name)
        assert tuple(got.shape) == info.shape == src.info(name).shape, name
        assert {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[got.dtype] == info.dtype, name
        assert info.nbytes == got.numel() * got.element_size(), name
        want = expected(src, path, tensors, name)
        assert same(got, want), name
        if expert_type in FLOAT:
            assert same(got, src.get(name)), name  # the original, exactly
    types = {ckpt.info(n).dtype for n in ckpt.names()}
    want = {"f32": {"F32"}, "f16": {"F32", "F16"}}.get(expert_type, {"F32", "BF16"})  # block types come back as F32
    assert types == want


def test_an_expert_is_read_as_its_slice_only(exports, monkeypatch: pytest.MonkeyPatch) -> None:
    path = exports("q4_0")
    ckpt = Checkpoint.open(path)
    seen: list[tuple[int, ...]] = []
    real = dequantize

    def spy(data: np.ndarray, qtype: Q) -> np.ndarray:
        seen.append(tuple(data.shape))
        return real(data, qtype)

    monkeypatch.setattr(gguf.quants, "dequantize", spy)
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    got = ckpt.get(name)
    rows, cols = got.shape
    assert seen == [(rows, cols // 32 * 18)]  # one expert's q4_0 blocks, not the 3-D stack


def test_a_checkpoint_pickles_without_its_memory_map(exports) -> None:
    ckpt = Checkpoint.open(exports("q8_0"))
    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    blob = pickle.dumps(ckpt)
    assert len(blob) < 200_000  # the tensors' bytes do not travel to a worker
    assert same(pickle.loads(blob).get(name), ckpt.get(name))


def test_synthesized_files(source: Path, exports, cache_home: Path) -> None:
    storage = GGUFStorage(exports("bf16"))
    assert storage.exists("config.json") and storage.exists("model.safetensors.index.json")
    index = json.loads(storage.read_bytes("model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == {"tiny-bf16.gguf"}
    assert len(index["weight_map"]) == len(Checkpoint.open(source).names())
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in storage.header("tiny-bf16.gguf").tensors.values())
    config = json.loads(storage.read_bytes("config.json"))
    assert config["attn_type_list"] == [0, 0, 0, 1] and config["rotary_dim"] == 8 and config["postnorm"] is True
    assert storage.extra_files() == ["tokenizer.json", "tokenizer_config.json"]
    path = storage.local_path("tokenizer.json")
    assert path.is_file() and cache_home in path.parents
    assert storage.local_path("tiny-bf16.gguf") == exports("bf16")
    identity = storage.identity(["config.json", "tiny-bf16.gguf", "nothing.gguf"])
    assert identity["config.json"] == identity["tiny-bf16.gguf"] == [exports("bf16").stat().st_size,
                                                                     exports("bf16").stat().st_mtime_ns]
    assert identity["nothing.gguf"] is None
    # The tokenizer rebuilt from tokenizer.ggml.* tokenizes as the source's tokenizer.json does.
    text = corpus_text("mr-niah")[:20000]
    ours = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    theirs = Tokenizer.from_file(str(source / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ours == theirs == list(text.encode())
    assert json.loads(storage.local_path("tokenizer_config.json").read_text())["model_max_length"] == 4096
    q4 = GGUFStorage(exports("q4_0")).stored_types()
    assert set(q4) == {"F32", "BF16", "Q4_0"} and q4["Q4_0"]["tensors"] == 3 * 4  # three stacks a layer
    assert sum(t["bytes"] for t in q4.values()) < exports("q4_0").stat().st_size


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe"])
def test_a_tokenizer_with_real_merges_and_special_tokens_comes_back(exports, tmp_path: Path, pre: str) -> None:
    """Trained BPE merges, a split regex other than GPT-2's, a special token: the tokenizer.json rebuilt from the
    GGUF's tokenizer.ggml.* keys tokenizes as the original does."""
    text = corpus_text("mr-niah", holdout=False)[:60000]
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre == "gpt-2")
    tok.pre_tokenizer = byte_level if pre == "gpt-2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(tokenizers_regex(PRE_TOKENIZERS[pre][0]), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=600, special_tokens=["<|eot|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    original = json.loads(tok.to_str())
    files = TokenizerFiles(original, {"eos_token": "<|eot|>", "add_bos_token": False}, None, "tokenizer.json")
    kvs, _ = tokenizer_metadata(files, n_rows=tok.get_vocab_size() + 4)
    path = tmp_path / "x.gguf"
    rewrite(exports("f32"), path, kvs=kvs, drop="tokenizer.")
    storage = GGUFStorage(path)
    back = Tokenizer.from_file(str(storage.local_path("tokenizer.json")))
    sample = corpus_text("mr-niah")[:20000] + "<|eot|>" + corpus_text("mr-niah")[20000:30000]
    assert back.encode(sample).ids == tok.encode(sample).ids
    assert len(original["model"]["merges"]) > 300
    config = json.loads(storage.read_bytes("tokenizer_config.json"))
    assert config["eos_token"] == "<|eot|>" and config["add_bos_token"] is False


def tokenizers_regex(pattern: str):  # noqa: ANN201
    from tokenizers import Regex

    return Regex(pattern)


# ---- the commands on a GGUF ------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_type", TYPES)
def test_inspect_integrity_and_convert_back(source: Path, exports, expert_type: str, tmp_path: Path, run) -> None:
    path = exports(expert_type)
    code, out, err = run("inspect", path)
    assert code == 0, err
    assert "MiniMax-M1" in out and "against the spec: complete, nothing unexpected" in out
    code, out, err = run("verify", "integrity", path, "--deep")
    assert code == 0 and "sound" in out, out + err

    back = tmp_path / "back"
    code, out, err = run("convert", path, back, "--to", "release", "--quiet")
    assert code == 0, err
    src, gg, imported = Checkpoint.open(source), Checkpoint.open(path), Checkpoint.open(back)
    assert imported.config == gg.config
    assert (back / "tokenizer.json").is_file() and (back / "tokenizer_config.json").is_file()
    tensors = stored(path)
    files = sorted(back.glob("*.safetensors"))
    loaded: dict[str, torch.Tensor] = {}
    for file in files:  # the safetensors library, not our reader
        with safe_open(str(file), "pt") as f:
            loaded.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    assert sorted(loaded) == sorted(src.names())
    for name, tensor in loaded.items():
        assert same(tensor, expected(src, path, tensors, name)), name
        if expert_type in FLOAT:
            assert same(tensor, src.get(name)), name
    # As stored, the GGUF's types are mixed (F32 norms beside bf16, F32 experts beside bf16 attention), which
    # integrity of a safetensors folder flags; one --dtype gives a uniform checkpoint, still exact.
    uniform = {"f32": None, "bf16": "bf16", "q8_0": "fp32", "q4_0": "fp32"}[expert_type]
    if uniform is not None:
        flat = tmp_path / "uniform"
        code, _, err = run("convert", path, flat, "--to", "release", "--dtype", uniform, "--quiet")
        assert code == 0, err
        code, out, err = run("verify", "integrity", flat)
        assert code == 0 and "sound" in out, out + err
        again = Checkpoint.open(flat)
        for name in ("model.layers.0.input_layernorm.weight", "model.layers.1.block_sparse_moe.experts.2.w3.weight"):
            assert same(again.get(name), expected(src, path, tensors, name)), name
    else:
        code, out, err = run("verify", "integrity", back)
        assert code == 0 and "sound" in out, out + err


def test_compare_and_perplexity_on_a_gguf_agree_with_the_imported_folder(source: Path, exports, tmp_path: Path,
                                                                          run) -> None:
    path = exports("q8_0")
    back = tmp_path / "back"
    assert run("convert", path, back, "--to", "release", "--quiet")[0] == 0
    code, out, err = run("verify", "compare", source, path, back, "--tokens", "512", "--ctx", "128", "--json",
                         "--quiet")
    assert code == 0, err
    result = json.loads(out)
    on_gguf, on_folder = (c["metrics"] for c in result["candidates"])
    assert on_gguf == on_folder
    assert on_gguf["tokens"] > 0 and on_gguf["kl_mean"] < 1e-3 and on_gguf["top1"] > 0.9
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(list(corpus_text("mr-niah").encode())[:512]))
    ppl = {}
    for what in (path, back):
        code, out, err = run("verify", "perplexity", what, "--token-ids", ids, "--ctx", "128", "--json", "--quiet")
        assert code == 0, err
        ppl[what] = json.loads(out)
    assert ppl[path]["ppl"] == ppl[back]["ppl"] and ppl[path]["tokens_scored"] == ppl[back]["tokens_scored"] > 0


# ---- split sets ------------------------------------------------------------------------------------------------


def fields_of(reader: gguf.GGUFReader) -> Iterator[tuple[str, Any, GGUFValueType, GGUFValueType | None]]:
    """Every key of a GGUF but the ones GGUFWriter writes itself: (key, value, type, element type)."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key.startswith("split."):
            continue
        vtype = field.types[0]
        sub = GGUFValueType(int(field.parts[3][0])) if vtype == GGUFValueType.ARRAY else None
        yield key, field.contents(), vtype, sub


def rewrite(src: Path, dest: Path, edit: Callable[[str, np.ndarray, Q], tuple[np.ndarray, Q] | None] | None = None,
            arch: str = ARCH, split_max_tensors: int = 0, kvs: list[KV] = (), drop: str | None = None) -> list[Path]:
    """A copy of the GGUF `src`, written by gguf-py's GGUFWriter: `edit(name, data, type)` may drop a tensor
    (None) or replace its data and type; `split_max_tensors` makes llama.cpp-style splits; `kvs` replace or add
    keys, and keys starting with `drop` are left out."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, arch, split_max_tensors=split_max_tensors)
    replaced = {kv.key for kv in kvs}
    for key, value, vtype, sub in fields_of(reader):
        if key not in replaced and not (drop and key.startswith(drop)):
            writer.add_key_value(key, value, vtype, sub_type=sub)
    apply(writer, kvs)
    for t in reader.tensors:
        data, qtype = np.asarray(t.data), t.tensor_type
        if edit is not None:
            changed = edit(t.name, data, qtype)
            if changed is None:
                continue
            data, qtype = changed
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=qtype)
    files = writer.format_shard_names(Path(dest))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return files


def test_a_split_set_is_read_whole_from_its_first_file(exports, tmp_path: Path, run) -> None:
    single = exports("q8_0")
    files = rewrite(single, tmp_path / "tiny.gguf", split_max_tensors=20)
    assert [f.name for f in files] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert gguf.GGUFReader(files[1]).fields["split.no"].contents() == 1
    one, split = Checkpoint.open(single), Checkpoint.open(files[0])
    assert split.files() == [f.name for f in files]
    assert sorted(split.names()) == sorted(one.names()) and split.config == one.config
    for name in one.names():
        assert same(split.get(name), one.get(name)), name
    assert {split.info(n).file for n in split.names()} == {f.name for f in files}
    code, out, err = run("verify", "integrity", files[0], "--deep")
    assert code == 0 and "3 shards" in out, out + err
    code, _, err = run("convert", files[0], tmp_path / "back", "--to", "release", "--quiet")
    assert code == 0, err

    with pytest.raises(CheckpointError, match="opened by its first file") as exc:
        Checkpoint.open(files[1])
    assert "tiny-00001-of-00003.gguf" in exc.value.one_line()
    files[2].rename(tmp_path / "elsewhere.gguf")
    code, out, err = run("verify", "integrity", files[0])
    assert code == 1 and "Traceback" not in out + err
    finding = [line for line in out.splitlines() if line.startswith("[")]
    assert len(finding) == 1 and "missing GGUF file" in finding[0] and "tiny-00003-of-00003.gguf" in finding[0]


def test_a_split_set_that_does_not_add_up_is_refused(exports, tmp_path: Path) -> None:
    files = rewrite(exports("q8_0"), tmp_path / "tiny.gguf", split_max_tensors=40)
    (tmp_path / "other").mkdir()
    other = rewrite(exports("q8_0"), tmp_path / "other" / "tiny.gguf", split_max_tensors=20)
    n = len(other)
    assert len(files) == 2 and n > 2
    shutil.copy(other[1], files[1])  # split 2 of n where 2 of 2 belongs
    says = rf"split.no 1 of split.count {n} where the name says 1 \(0-based\) of 2"
    with pytest.raises(CheckpointError, match=says) as exc:
        Checkpoint.open(files[0])
    assert "tiny-00002-of-00002.gguf" in exc.value.one_line()


# ---- errors: one line, naming the file and the tensor -----------------------------------------------------------


def one_line_finding(run, path: Path) -> str:
    code, out, err = run("verify", "integrity", path)
    assert code == 1 and "Traceback" not in out + err
    findings = [line for line in out.splitlines() if line.startswith("[")]
    assert len(findings) == 1, out
    return findings[0]


def test_another_architecture_is_refused(exports, tmp_path: Path, run) -> None:
    llama = tmp_path / "llama.gguf"
    rewrite(exports("f32"), llama, arch="llama")
    with pytest.raises(CheckpointError, match="a GGUF of architecture 'llama', not minimax-01") as exc:
        Checkpoint.open(llama)
    assert str(llama) in exc.value.one_line() and "\n" not in exc.value.one_line()
    code, out, err = run("inspect", llama)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1 and "llama" in err


def test_a_missing_tensor(exports, tmp_path: Path, run) -> None:
    path = tmp_path / "x.gguf"
    rewrite(exports("q8_0"), path, lambda name, d, q: None if name == "blk.1.attn_gate.weight" else (d, q))
    line = one_line_finding(run, path)
    assert line.startswith("[missing-tensor]") and "model.layers.1.self_attn.output_gate.weight" in line
    with pytest.raises(CheckpointError, match="tensor not in the GGUF") as exc:
        GGUFStorage(path).read_tensor("model.layers.1.self_attn.output_gate.weight")
    assert str(path) in exc.value.one_line() and "output_gate" in exc.value.one_line()
    code, _, err = run("convert", path, tmp_path / "back", "--to", "release")
    assert code == 1 and "output_gate" in err and len(err.strip().splitlines()) == 1


def test_a_tensor_of_the_wrong_shape(exports, tmp_path: Path, run) -> None:
    path = tmp_path / "x.gguf"
    rewrite(exports("q8_0"), path, lambda name, d, q: (d[:-32], q) if name == "blk.0.attn_gate.weight" else (d, q))
    line = one_line_finding(run, path)
    assert line.startswith("[shape]") and "x.gguf" in line and "model.layers.0.self_attn.output_gate.weight" in line
    with pytest.raises(CheckpointError, match=r"shape \[32, 64\] \(GGUF blk.0.attn_gate.weight\)") as exc:
        Checkpoint.open(path).get("model.layers.0.self_attn.output_gate.weight")
    assert "x.gguf" in exc.value.one_line() and "output_gate" in exc.value.one_line()


def test_tensors_of_the_wrong_type(exports, tmp_path: Path, run) -> None:
    f16_norm = tmp_path / "f16.gguf"
    rewrite(exports("q8_0"), f16_norm,
            lambda name, d, q: (d.astype(np.float16), Q.F16) if name == "blk.2.ffn_norm.weight" else (d, q))
    line = one_line_finding(run, f16_norm)
    assert line.startswith("[gguf-type]") and "model.layers.2.post_attention_layernorm.weight" in line
    assert Checkpoint.open(f16_norm).get("model.layers.2.post_attention_layernorm.weight").dtype == torch.float16
    ints = tmp_path / "i32.gguf"
    rewrite(exports("q8_0"), ints,
            lambda name, d, q: (d.astype(np.int32), Q.I32) if name == "output_norm.weight" else (d, q))
    with pytest.raises(CheckpointError, match="GGML type I32, which m1 cannot read back") as exc:
        Checkpoint.open(ints)
    assert "i32.gguf" in exc.value.one_line() and "output_norm.weight" in exc.value.one_line()
    assert "I32" in one_line_finding(run, ints)


@pytest.mark.parametrize("size", [0, 3, 30, 5000, -1000])
def test_a_truncated_gguf_is_one_finding(exports, tmp_path: Path, run, size: int) -> None:
    path = tmp_path / "x.gguf"
    data = exports("q4_0").read_bytes()
    path.write_bytes(data[:size])
    line = one_line_finding(run, path)
    assert line.startswith("[unreadable]") and str(path) in line and "not a readable GGUF" in line


def test_a_damaged_gguf_is_a_finding(exports, tmp_path: Path, run) -> None:
    src = exports("q4_0")
    path = tmp_path / src.name
    data = bytearray(src.read_bytes())
    data[:4] = b"GGUX"
    path.write_bytes(bytes(data))
    assert "GGUF magic invalid" in one_line_finding(run, path)
    # Damaged data: the m1 manifest written beside the export says so.
    data = bytearray(src.read_bytes())
    data[-1000] ^= 0xFF
    path.write_bytes(bytes(data))
    manifest = src.with_name(f"{src.stem}.m1-manifest.json")
    assert manifest.is_file()
    shutil.copy(manifest, tmp_path / manifest.name)
    line = one_line_finding(run, path)
    assert line.startswith("[sha256]") and src.name in line


# ---- GGUFs the pipeline writes ---------------------------------------------------------------------------------


def test_a_gguf_exported_again_from_a_gguf_is_the_same(exports, tmp_path: Path, run) -> None:
    path = exports("bf16")
    again = tmp_path / "again.gguf"
    code, _, err = run("convert", path, again, "--to", "gguf", "--quiet")
    assert code == 0, err
    a, b = gguf.GGUFReader(path), gguf.GGUFReader(again)
    assert [(t.name, t.tensor_type) for t in a.tensors] == [(t.name, t.tensor_type) for t in b.tensors]
    for t, u in zip(a.tensors, b.tensors, strict=True):
        assert np.array_equal(np.asarray(t.data), np.asarray(u.data)), t.name
    meta = lambda r: {k: f.contents() for k, f in r.fields.items() if k != "general.name"}  # noqa: E731
    assert meta(a) == meta(b)


def test_a_split_set_written_by_the_pipeline(source: Path, tmp_path: Path, run) -> None:
    folder = tmp_path / "out"
    code, out, err = run("convert", source, folder / "tiny.gguf", "--to", "gguf", "--split-max-size", "300KB",
                         "--quiet")
    assert code == 0, err
    files = sorted(folder.glob("tiny-*-of-*.gguf"))
    assert len(files) > 1 and files[0].name == f"tiny-00001-of-{len(files):05d}.gguf"
    src = Checkpoint.open(source)
    for opened in (Checkpoint.open(files[0]), Checkpoint.from_storage(GGUFStorage(folder / "tiny.gguf"))):
        assert opened.files() == [f.name for f in files]
        for name in src.names():
            assert same(opened.get(name), src.get(name)), name
    code, out, err = run("verify", "integrity", files[0], "--deep")
    assert code == 0 and f"{len(files)} shards" in out, out + err
    data = bytearray(files[1].read_bytes())
    data[-100] ^= 0x01
    files[1].write_bytes(bytes(data))
    line = one_line_finding(run, files[0])  # the manifest beside the set
    assert line.startswith("[sha256]") and files[1].name in line
