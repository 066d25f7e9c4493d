"""GGUF export (m1.gguf): name table, metadata, tokenizer keys, the file read back by gguf-py, and a real llama.cpp.

The llama.cpp tests load our GGUF in llama-cpp-python (0.3.36 vendors a llama.cpp with `minimax-01`) and
compare its logits with the project's reference engine on the source checkpoint. They are skipped when
llama_cpp is not importable (CI installs it with the test extra).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import quantize
from gguf_controls import write_gguf
from tokenizers import Tokenizer, decoders, models, trainers
from tokenizers.pre_tokenizers import ByteLevel

from m1.checkpoint import Checkpoint
from m1.config import M1Config
from m1.errors import UsageError
from m1.gguf import export_gguf, from_gguf, plan_tensors, to_gguf
from m1.gguf.llama_run import llama_logits as run_in_llama
from m1.gguf.metadata import model_metadata
from m1.gguf.tensor_plan import gguf_metadata
from m1.gguf.tokenizer import (
    CHAT_TEMPLATE_REWRITTEN,
    CHAT_TEMPLATE_WARNING,
    TokenizerFiles,
    read_tokenizer_files,
    tokenizer_metadata,
)
from m1.gguf.types import GGML_TYPES, K_TYPES, TypePolicy
from m1.spec import inventory
from m1.tiny import TinySpec, byte_tokenizer_json, random_weights, save_release, tiny_config
from m1.verify.engine import next_token_nll, run
from m1.verify.text import ByteTokenizer, corpus_text, make_windows

DATA = Path(__file__).parent / "data"
TRAINED = DATA / "tiny-trained"
CTX = 256

try:
    import llama_cpp
except ImportError:  # pragma: no cover - CI installs it
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed "
                                 "(pip install llama-cpp-python==0.3.36; `make setup` installs it with the test extra)")


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}


# ---- names, metadata, tokenizer: pure data ---------------------------------------------------------------------


def test_every_spec_tensor_has_a_gguf_name_and_back() -> None:
    cfg = M1Config.from_dict(tiny_config(TinySpec(layers=6, softmax_every=3)))
    specs = inventory(cfg)
    plan = plan_tensors(cfg, {}, TypePolicy("q8_0"))
    assert sorted(n for p in plan for n in p.sources) == sorted(t.name for t in specs)
    for p in plan:
        assert list(from_gguf(p.name, cfg.layer_kinds, cfg.num_local_experts)) == list(p.sources)
    assert to_gguf("model.layers.3.block_sparse_moe.experts.2.w3.weight").name == "blk.3.ffn_up_exps.weight"
    assert to_gguf("model.layers.3.block_sparse_moe.experts.2.w3.weight").expert == 2
    assert to_gguf("model.layers.2.self_attn.o_proj.weight").name == "blk.2.attn_output.weight"
    assert to_gguf("model.layers.1.self_attn.out_proj.weight").name == "blk.1.attn_output.weight"
    exps = {p.name: p for p in plan}["blk.0.ffn_down_exps.weight"]
    assert exps.shape == (cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size)
    assert exps.type == gguf.GGMLQuantizationType.Q8_0


def test_model_metadata_writes_the_layer_pattern_and_partial_rope() -> None:
    cfg = M1Config.from_dict(tiny_config(TinySpec(layers=6, softmax_every=3, rotary_dim=8, head_dim=16)))
    kvs = {kv.key: kv for kv in model_metadata(cfg)}
    pattern = kvs["minimax-01.attention.recurrent_layers"]
    assert pattern.value == [True, True, False, True, True, False]
    assert pattern.sub_type == gguf.GGUFValueType.BOOL
    assert kvs["minimax-01.rope.dimension_count"].value == 8
    assert kvs["minimax-01.attention.key_length"].value == 16
    assert kvs["minimax-01.residual_scale"].value == cfg.mlp_alpha


@pytest.mark.parametrize(("change", "says"), [
    ({"layernorm_mlp_alpha": 2.0}, "residual alphas differ"),
    ({"layernorm_full_attention_beta": 0.5}, "beta is not 1.0"),
    ({"postnorm": False}, "postnorm is false"),
    ({"num_attention_heads": 6, "num_key_value_heads": 2}, "not a power of two"),
    ({"attn_type_list": [0, 0, 0, 0]}, "every layer is lightning"),
    ({"attn_type_list": [1, 1, 1, 1]}, "every layer is softmax"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"shared_intermediate_size": 64}, "shared experts"),
])
def test_configs_llama_cpp_cannot_run_are_refused_in_one_line(change: dict, says: str) -> None:
    raw = {**tiny_config(TinySpec()), **change}
    with pytest.raises(UsageError, match=says) as err:
        model_metadata(M1Config.from_dict(raw))
    assert "\n" not in err.value.one_line() and "minimax-01" in err.value.one_line()


def byte_files(config: dict | None = None) -> TokenizerFiles:
    return TokenizerFiles(json.loads(byte_tokenizer_json()), config or {}, None, "tokenizer.json")


def test_tokenizer_keys_pad_to_the_embedding_and_suppress_zero_rows_as_int32() -> None:
    kvs, warns = tokenizer_metadata(byte_files(), n_rows=300, zero_rows=[7, 256, 299])
    got = {kv.key: kv for kv in kvs}
    tokens = got["tokenizer.ggml.tokens"].value
    assert len(tokens) == 300 and tokens[299] == "[PAD299]" and tokens[ord("a")] == "a"
    assert got["tokenizer.ggml.token_type"].value[299] == gguf.TokenType.UNUSED
    assert got["tokenizer.ggml.token_type"].value[0] == gguf.TokenType.NORMAL
    assert got["tokenizer.ggml.merges"].value == ["À Á"]
    assert got["tokenizer.ggml.pre"].value == "gpt-2" and got["tokenizer.ggml.model"].value == "gpt2"
    suppress = got["tokenizer.ggml.suppress_tokens"]
    assert suppress.value == [256, 299] and suppress.sub_type == gguf.GGUFValueType.INT32  # 7 is a real token
    assert warns == []


def test_tokenizer_that_does_not_fit_the_embedding_is_refused() -> None:
    with pytest.raises(UsageError, match="256 token ids but the embedding only 200 rows"):
        tokenizer_metadata(byte_files(), n_rows=200)


def test_unknown_split_regex_needs_the_override() -> None:
    files = byte_files()
    files.tokenizer["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\p{N}{1,7}"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    with pytest.raises(UsageError, match="--tokenizer-pre NAME"):
        tokenizer_metadata(files, n_rows=256)
    kvs, _ = tokenizer_metadata(files, n_rows=256, pre="qwen2")
    assert {kv.key: kv.value for kv in kvs}["tokenizer.ggml.pre"] == "qwen2"


def test_the_release_chat_template_is_embedded_rewritten_for_string_content_and_can_be_replaced() -> None:
    from m1.gguf.chat_template import string_content_template

    release = json.loads((DATA / "m1-release" / "tokenizer_config.json").read_text())
    kvs, warns = tokenizer_metadata(byte_files(release), n_rows=256)
    embedded = {kv.key: kv.value for kv in kvs}["tokenizer.chat_template"]
    assert embedded == string_content_template(release["chat_template"]) != release["chat_template"]
    assert warns == [CHAT_TEMPLATE_REWRITTEN] and "--chat-template FILE" in warns[0]
    # a list-only read the rewrite table does not know: kept as is, with the warning
    other = {**release, "chat_template": "{{ messages[0]['content'][0]['text'] | upper }}{{ content[0].text }}"}
    kvs, warns = tokenizer_metadata(byte_files(other), n_rows=256)
    assert {kv.key: kv.value for kv in kvs}["tokenizer.chat_template"] == other["chat_template"]
    assert warns == [CHAT_TEMPLATE_WARNING] and "--chat-template FILE" in warns[0]
    kvs, warns = tokenizer_metadata(byte_files(release), n_rows=256, chat_template="{{ messages[0]['content'] }}")
    assert {kv.key: kv.value for kv in kvs}["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert warns == []


def test_block_types_need_rows_that_split_into_blocks() -> None:
    cfg = M1Config.from_dict(tiny_config(TinySpec(intermediate=80)))
    with pytest.raises(UsageError, match="do not split into q4_0 blocks of 32"):
        plan_tensors(cfg, {}, TypePolicy("q4_0"))
    assert plan_tensors(cfg, {}, TypePolicy("bf16"))


# ---- the written file, read back by gguf-py --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    out = tmp_path_factory.mktemp("gguf")
    made: dict[str, Path] = {}

    def get(expert_type: str) -> Path:
        if expert_type not in made:
            made[expert_type] = out / f"trained-{expert_type}.gguf"
            export_gguf(TRAINED, made[expert_type], expert_type)
        return made[expert_type]

    return get


@pytest.mark.parametrize("expert_type", [t for t in GGML_TYPES if t not in K_TYPES])  # K: test_kquant.py
def test_gguf_reader_reads_every_tensor_as_declared(trained_exports, expert_type: str) -> None:
    path = trained_exports(expert_type)
    ckpt = Checkpoint.open(TRAINED)
    plan = plan_tensors(ckpt.config, {n: ckpt.info(n).dtype for n in ckpt.names()}, TypePolicy(expert_type))
    reader = gguf.GGUFReader(path)
    assert [t.name for t in reader.tensors] == [p.name for p in plan]
    for t, p in zip(reader.tensors, plan, strict=True):
        assert t.tensor_type == p.type, t.name
        assert tuple(int(d) for d in reversed(t.shape)) == p.shape, t.name  # ne is the reverse of torch's order
        source = torch.stack([ckpt.get(n) for n in p.sources]) if len(p.sources) > 1 else ckpt.get(p.sources[0])
        if p.type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.BF16):
            back = torch.from_numpy(gguf.quants.dequantize(t.data, p.type).copy()).reshape(p.shape)
            assert torch.equal(back, source.float()), t.name  # exact: f32 and bf16 keep a bf16/f32 source
        else:  # bit-exactly what gguf-py's quantizer gives for the source
            assert np.array_equal(np.asarray(t.data).reshape(-1), quantize(source.float().numpy(), p.type).reshape(-1))
    meta = fields(path)
    assert meta["general.architecture"] == "minimax-01"
    assert meta["minimax-01.attention.recurrent_layers"] == [True, True, True, False]
    assert meta["general.file_type"] == int(TypePolicy(expert_type).file_type)


def test_the_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import m1.ops

    real = m1.ops.OpRunner.__call__

    def failing(self, name: str):
        if name.startswith("blk.2."):
            raise OSError("disk gone")
        return real(self, name)

    monkeypatch.setattr(m1.ops.OpRunner, "__call__", failing)
    with pytest.raises(OSError, match="disk gone"):
        export_gguf(TRAINED, tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary file, no manifest


def test_export_refuses_a_folder_without_tokenizer(tiny: Path, tmp_path: Path) -> None:
    (tiny / "tokenizer.json").unlink()
    with pytest.raises(UsageError, match="no tokenizer.json"):
        export_gguf(tiny, tmp_path / "x.gguf")


# ---- a real llama.cpp ------------------------------------------------------------------------------------------


def llama(path: Path, **kw: object):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=CTX, n_batch=CTX, n_ubatch=CTX,
                           n_threads=2, verbose=False, **kw)


def llama_logits(path: Path, windows: torch.Tensor) -> torch.Tensor:
    return run_in_llama(path, windows)  # m1 verify llama's own runner: what users run is what is tested


def engine_logits(folder: Path, windows: torch.Tensor) -> torch.Tensor:
    ckpt = Checkpoint.open(folder)
    return run(ckpt.config, ckpt, [windows]).logits[0].double()


def agreement(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || cand) in nats, top-1 agreement) over every position."""
    ref_lp, cand_lp = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    kl = (ref_lp.exp() * (ref_lp - cand_lp)).sum(-1)
    top1 = (ref.argmax(-1) == cand.argmax(-1)).double().mean()
    return float(kl.mean()), float(top1)


def widest_flipped_margin(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """The largest reference logit margin (top-1 minus top-2) among the positions whose top-1 differs; 0 if none."""
    top2 = ref.topk(2, dim=-1).values
    margin = top2[..., 0] - top2[..., 1]
    flipped = ref.argmax(-1) != cand.argmax(-1)
    return float(margin[flipped].max()) if flipped.any() else 0.0


def heldout_windows(n_tokens: int) -> torch.Tensor:
    return make_windows(ByteTokenizer().encode(corpus_text("mr-niah")), CTX, n_tokens).tokens


@pytest.fixture(scope="module")
def trained_reference() -> tuple[torch.Tensor, torch.Tensor]:
    windows = heldout_windows(4 * CTX)
    return windows, engine_logits(TRAINED, windows)


@needs_llama
@pytest.mark.parametrize(("expert_type", "max_kl", "max_flipped_margin"), [
    # f32: every top-1 equal. bf16: the file is bit-exact (test above), but ggml's CPU BF16 matmul rounds the
    # activations to bf16 (vec_dot_type BF16), which may flip a top-1 the reference holds by a hair (near ties).
    ("f32", 1e-4, 0.0), ("bf16", 1e-4, 0.05), ("q8_0", 1e-3, None), ("q4_0", None, None), ("mxfp4", None, None),
])
def test_llama_cpp_logits_agree_with_the_engine(trained_exports, trained_reference, expert_type: str,
                                                 max_kl: float | None, max_flipped_margin: float | None) -> None:
    windows, ref = trained_reference
    path = trained_exports(expert_type)
    cand = llama_logits(path, windows)
    kl, top1 = agreement(ref, cand)
    flipped = widest_flipped_margin(ref, cand)
    figures = f"{expert_type}: KL {kl:.3g} top-1 {top1:.2%} over {ref.shape[0] * ref.shape[1]} positions " \
              f"(widest flipped reference margin {flipped:.3g}), {path.stat().st_size} bytes"
    warnings.warn(f"llama.cpp vs engine, trained tiny M1, {figures}", stacklevel=1)
    assert math.isfinite(kl)
    if max_kl is not None:
        assert kl < max_kl, figures
    if max_flipped_margin is not None:
        assert flipped <= max_flipped_margin, figures
    assert kl < 0.1 and top1 > 0.8, figures  # even 4-bit experts keep the trained model's predictions


@needs_llama
def test_softmax_layers_anywhere_and_partial_rope(make_tiny_ckpt, tmp_path: Path) -> None:
    src = make_tiny_ckpt("pattern", layers=6, softmax_every=3, head_dim=16, rotary_dim=8, block_size=16)
    cfg = Checkpoint.open(src).config
    assert cfg.layer_kinds.count("softmax") == 2 and cfg.rotary_dim < cfg.head_dim
    export_gguf(src, tmp_path / "pattern.gguf", "f32")
    windows = make_windows(list(corpus_text("mr-niah").encode())[: 2 * CTX], CTX, None).tokens
    ref = engine_logits(src, windows)
    kl, top1 = agreement(ref, llama_logits(tmp_path / "pattern.gguf", windows))
    assert kl < 1e-4 and top1 == 1.0, (kl, top1)

    # Controls, so the check has power: all-dims RoPE departs; llama.cpp's default pattern (a softmax layer
    # every 8th) does not even load this model.
    ckpt = Checkpoint.open(src)
    policy = TypePolicy("f32")
    kvs, _ = gguf_metadata(cfg, read_tokenizer_files(src), policy)
    plan = plan_tensors(cfg, {}, policy)
    wrong_rope = [dataclasses.replace(kv, value=cfg.head_dim) if kv.key == "minimax-01.rope.dimension_count"
                  else kv for kv in kvs]
    write_gguf(tmp_path / "rope.gguf", wrong_rope, plan, ckpt.get)
    kl_rope, _ = agreement(ref, llama_logits(tmp_path / "rope.gguf", windows))
    assert kl_rope > 100 * max(kl, 1e-7), (kl_rope, kl)
    no_pattern = [kv for kv in kvs if kv.key != "minimax-01.attention.recurrent_layers"]
    write_gguf(tmp_path / "no-pattern.gguf", no_pattern, plan, ckpt.get)
    with pytest.raises(ValueError, match="Failed to load model"):
        llama(tmp_path / "no-pattern.gguf")


@needs_llama
def test_random_tiny_f32_export_agrees(tiny: Path, tmp_path: Path) -> None:
    export_gguf(tiny, tmp_path / "tiny.gguf", "f32")
    windows = heldout_windows(CTX)
    kl, top1 = agreement(engine_logits(tiny, windows), llama_logits(tmp_path / "tiny.gguf", windows))
    assert kl < 1e-4 and top1 == 1.0, (kl, top1)


@needs_llama
def test_llama_cpp_perplexity_equals_m1_verify_perplexity(trained_exports, run) -> None:
    code, out, err = run("verify", "perplexity", TRAINED, "--tokens", "8192", "--ctx", str(CTX), "--json", "--quiet")
    assert code == 0, err
    ours = json.loads(out)
    windows = heldout_windows(8192)
    for expert_type in ("f32", "bf16"):
        logits = llama_logits(trained_exports(expert_type), windows)
        nll = next_token_nll(logits, windows)
        assert nll.numel() == ours["tokens_scored"]
        ppl = math.exp(float(nll.double().mean()))
        assert ppl == pytest.approx(ours["ppl"], rel=1e-3), (expert_type, ppl, ours["ppl"])


@needs_llama
def test_llama_cpp_tokenizes_the_corpus_as_tokenizers_does(tmp_path: Path, trained_exports) -> None:
    texts = [corpus_text("mr-niah", holdout=True), corpus_text("mr-niah", holdout=False)]
    # the trained tiny M1's byte tokenizer
    source = Tokenizer.from_file(str(TRAINED / "tokenizer.json"))
    vocab = llama_cpp.Llama(model_path=str(trained_exports("bf16")), vocab_only=True, verbose=False)
    for text in texts:
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == \
            source.encode(text, add_special_tokens=False).ids == list(text.encode())

    # a BPE with real merges, fewer tokens than embedding rows, zero rows past its vocabulary, an eos token
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([texts[1]], trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=ByteLevel.alphabet(), special_tokens=["<eos>"], show_progress=False))
    folder = tmp_path / "bpe"
    folder.mkdir()
    raw = tiny_config(TinySpec(vocab=512))
    weights = random_weights(M1Config.from_dict(raw))
    weights["model.embed_tokens.weight"][400:] = 0
    save_release(folder, raw, weights, 2, tokenizer_config={"eos_token": "<eos>", "tokenizer_class": "GPT2Tokenizer"})
    tok.save(str(folder / "tokenizer.json"))
    export_gguf(folder, tmp_path / "bpe.gguf")
    meta = fields(tmp_path / "bpe.gguf")
    assert meta["tokenizer.ggml.suppress_tokens"] == list(range(400, 512))
    assert len(meta["tokenizer.ggml.tokens"]) == 512 and len(meta["tokenizer.ggml.merges"]) > 100
    assert meta["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<eos>")
    vocab = llama_cpp.Llama(model_path=str(tmp_path / "bpe.gguf"), vocab_only=True, verbose=False)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert vocab.tokenize(text.encode(), add_bos=False, special=False) == ids
        assert len(ids) < 0.75 * len(text.encode())  # the merges are used
    shutil.rmtree(folder)


def test_padding_rows_are_scanned_in_blocks_not_read_whole(tmp_path: Path) -> None:
    """The zero-row scan behind suppress_tokens reads the embedding's tail a block at a time: a small
    tokenizer in front of M1's 200064 rows must not read 2.5 GB at once (bench_gguf_peer found 5 GB)."""
    from m1.planner import read_rows_from

    raw = tiny_config(TinySpec(vocab=512))
    weights = random_weights(M1Config.from_dict(raw))
    weights["model.embed_tokens.weight"][300:] = 0
    weights["model.embed_tokens.weight"][420, 3] = 1.0  # a live row among the padding
    src = tmp_path / "src"  # the GGUF goes beside it: a destination inside the source is refused
    src.mkdir()
    save_release(src, raw, weights, 2)
    ckpt = Checkpoint.open(src)
    name = "model.embed_tokens.weight"
    whole = weights[name]
    row_bytes = whole[0].numel() * whole.element_size()
    blocks = list(read_rows_from(ckpt, name, 100, block_bytes=7 * row_bytes))
    assert [first for first, _ in blocks] == list(range(100, 512, 7))
    assert max(rows.shape[0] for _, rows in blocks) == 7
    assert torch.equal(torch.cat([rows for _, rows in blocks]), whole[100:])
    assert list(read_rows_from(ckpt, name, 512)) == []
    export_gguf(src, tmp_path / "out.gguf")
    assert fields(tmp_path / "out.gguf")["tokenizer.ggml.suppress_tokens"] == \
        [i for i in range(256, 512) if i >= 300 and i != 420]
