"""`m1 verify imatrix`: llama.cpp's GGUF imatrix format from the layer-streamed engine, and llama.cpp's own
`llama-imatrix` on our f32 GGUF of the same model over the same tokens.

The llama-imatrix comparison needs the binary that bench/build_llama_imatrix.sh builds from the llama.cpp
sources vendored in the llama-cpp-python 0.3.36 sdist (at build/llama-imatrix/llama-imatrix, or wherever
$M1_LLAMA_IMATRIX points); it is skipped when the binary is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from m1.checkpoint import Checkpoint
from m1.gguf.imatrix import IMatrix, from_stats, importance, read_imatrix, write_imatrix
from m1.gguf.names import to_gguf
from m1.verify.engine import DictSource, forward_layer, run
from m1.verify.imatrix import compute_imatrix, layer_inputs, routed_counts
from m1.verify.sources import CheckpointWeights
from m1.verify.text import ByteTokenizer, corpus_text, make_windows


def ggml_available() -> bool:
    from m1.schemes import ggml_lib

    return ggml_lib.available()

ROOT = Path(__file__).parents[1]
DATA = ROOT / "tests" / "data"
TRAINED = DATA / "tiny-trained"
RELEASE = DATA / "m1-release"
CTX = 256

LLAMA_IMATRIX = Path(os.environ.get("M1_LLAMA_IMATRIX", ROOT / "build" / "llama-imatrix" / "llama-imatrix"))
needs_llama_imatrix = pytest.mark.skipif(
    not LLAMA_IMATRIX.is_file(), reason=f"no llama-imatrix at {LLAMA_IMATRIX} (build it: bench/build_llama_imatrix.sh)")


def calibration_windows(n_tokens: int, ctx: int = CTX) -> torch.Tensor:
    return make_windows(ByteTokenizer().encode(corpus_text("mr-niah", holdout=False)), ctx, n_tokens).tokens


def expected_names(cfg) -> dict[str, int]:  # noqa: ANN001
    """GGUF weight name -> n_mat, for every linear of every layer."""
    out = {}
    for layer in range(cfg.num_hidden_layers):
        for name in layer_inputs(cfg, layer):
            target = to_gguf(f"model.layers.{layer}.{name}")
            out[target.name] = cfg.num_local_experts if target.expert is not None else 1
    return out


@pytest.fixture(scope="module")
def trained_imatrix(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from m1.cli import run_cli

    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    assert run_cli(["verify", "imatrix", str(TRAINED), str(out), "--tokens", "2048", "--ctx", str(CTX),
                    "--quiet"]) == 0
    return out, {}


def test_our_file_is_llama_cpps_imatrix_format_read_back_by_gguf_py(trained_imatrix) -> None:
    path, _ = trained_imatrix
    cfg = Checkpoint.open(TRAINED).config
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.type"] == "imatrix"
    assert "general.architecture" not in fields  # llama-imatrix writes none
    assert fields["imatrix.datasets"] == ["corpus mr-niah (first 90%, calibration)"]
    assert fields["imatrix.chunk_count"] == 2048 // CTX and fields["imatrix.chunk_size"] == CTX
    assert reader.fields["imatrix.chunk_count"].types == [gguf.GGUFValueType.UINT32]
    names = [t.name for t in reader.tensors]
    weights = [n.rsplit(".", 1)[0] for n in names[::2]]
    assert weights == sorted(weights)  # llama-imatrix's order: weight names sorted, each its in_sum2 then counts
    assert names == [n for w in weights for n in (w + ".in_sum2", w + ".counts")]
    want = expected_names(cfg)
    assert sorted({n.rsplit(".", 1)[0] for n in names}) == sorted(want)
    assert "blk.3.attn_q.weight" in want and "blk.0.attn_qkv.weight" in want  # layer 3 is softmax, 0 lightning
    tensors = {t.name: t for t in reader.tensors}
    for name, n_mat in want.items():
        sums, counts = tensors[name + ".in_sum2"], tensors[name + ".counts"]
        assert sums.tensor_type == counts.tensor_type == gguf.GGMLQuantizationType.F32
        n_cols = cfg.intermediate_size if "ffn_down" in name else (
            cfg.num_attention_heads * cfg.head_dim if "attn_output" in name else cfg.hidden_size)
        assert [int(d) for d in sums.shape] == [n_cols, n_mat], name  # ne order: [n_cols, n_mat]
        assert [int(d) for d in counts.shape] == [1, n_mat], name
        assert (np.asarray(sums.data) >= 0).all() and np.isfinite(np.asarray(sums.data)).all()


def test_counts_are_the_engines_routing_counts_and_sums_its_squared_inputs(trained_imatrix) -> None:
    path, _ = trained_imatrix
    ours = read_imatrix(path)
    ckpt = Checkpoint.open(TRAINED)
    cfg = ckpt.config
    windows = calibration_windows(2048)
    hidden = run(cfg, ckpt, [windows], capture_hidden=True).hidden
    assert hidden is not None
    n_tokens = windows.numel()
    for layer in range(cfg.num_hidden_layers):
        weights = ckpt.layer_weights(layer)
        routed = routed_counts(cfg, layer, weights, hidden[layer][0])
        assert routed.sum() == n_tokens * cfg.num_experts_per_tok
        for kind in ("gate", "up", "down"):
            assert ours.entries[f"blk.{layer}.ffn_{kind}_exps.weight"].counts.tolist() == routed.tolist()
        for name, entry in ours.entries.items():
            if name.startswith(f"blk.{layer}.") and "_exps" not in name:
                assert entry.counts.tolist() == [n_tokens], name
        # the sums: the normed attention input and the MoE input, squared and summed over every token
        trace: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            forward_layer(cfg, layer, weights, hidden[layer][0], trace=trace)
        attn_in = trace["attn_in"].reshape(-1, cfg.hidden_size).double().square().sum(0).numpy()
        mlp_in = trace["mlp_in"].reshape(-1, cfg.hidden_size).double().square().sum(0).numpy()
        first = "attn_qkv" if cfg.layer_kind(layer) == "lightning" else "attn_q"
        np.testing.assert_allclose(ours.entries[f"blk.{layer}.{first}.weight"].sums[0], attn_in, rtol=1e-5)
        np.testing.assert_allclose(ours.entries[f"blk.{layer}.ffn_gate_inp.weight"].sums[0], mlp_in, rtol=1e-5)
        ids = trace["expert_ids"]
        for e in range(cfg.num_local_experts):
            rows = (ids == e).any(-1)
            np.testing.assert_allclose(ours.entries[f"blk.{layer}.ffn_up_exps.weight"].sums[e],
                                       trace["mlp_in"].reshape(-1, cfg.hidden_size)[rows].double().square().sum(0),
                                       rtol=1e-5)


def test_observing_does_not_change_the_engine(make_tiny_ckpt) -> None:
    src = make_tiny_ckpt("obs")
    ckpt = Checkpoint.open(src)
    cfg = ckpt.config
    h = torch.randn(2, 32, cfg.hidden_size)
    for layer in range(cfg.num_hidden_layers):
        w = ckpt.layer_weights(layer)
        seen: list[str] = []
        observed = forward_layer(cfg, layer, w, h, observe=lambda n, x, seen=seen: seen.append(n))
        assert torch.equal(forward_layer(cfg, layer, w, h), observed)
        routed = {n.split(".")[2] for n in seen if ".experts." in n}
        assert seen[0] in ("self_attn.qkv_proj.weight", "self_attn.q_proj.weight") and routed


def test_experts_that_saw_no_token_are_reported_and_weigh_one(make_tiny_ckpt, run, tmp_path: Path) -> None:
    src = make_tiny_ckpt("sparse", experts=8, top_k=2)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([72, 105]))  # two tokens: at most 4 of the 8 experts of a layer see one
    out = tmp_path / "im.gguf"
    code, text, err = run("verify", "imatrix", src, out, "--token-ids", ids, "--ctx", "2", "--quiet")
    assert code == 0, err
    ours = read_imatrix(out)
    unseen = ours.unseen_experts()
    assert sorted(unseen) == [0, 1, 2, 3] and all(len(v) >= 4 for v in unseen.values())
    for layer, experts in unseen.items():
        assert f"layer {layer}: no token was routed to experts {', '.join(map(str, experts))}" in text
        imp = importance(ours, f"blk.{layer}.ffn_down_exps.weight")
        entry = ours.entries[f"blk.{layer}.ffn_down_exps.weight"]
        assert (imp[experts] == 1).all()  # llama-quantize's rule for a matrix with no data
        seen = [e for e in range(8) if e not in experts]
        np.testing.assert_allclose(imp[seen], entry.sums[seen] / entry.counts[seen, None], rtol=1e-6)
    code, text, _ = run("verify", "imatrix", src, out, "--token-ids", ids, "--ctx", "2", "--quiet", "--json",
                        "--overwrite")
    assert code == 0 and json.loads(text)["unseen_experts"] == {str(k): v for k, v in unseen.items()}


def test_write_and_read_back_keep_every_value(tmp_path: Path) -> None:
    cfg = Checkpoint.open(TRAINED).config
    source = CheckpointWeights.open(TRAINED)
    im = from_stats(compute_imatrix(cfg, source, calibration_windows(512, 128), datasets=["a", "b"],
                                    process_output=True))
    assert "output.weight" in im.entries and im.entries["output.weight"].counts.tolist() == [512]
    write_imatrix(tmp_path / "x.gguf", im)
    back = read_imatrix(tmp_path / "x.gguf")
    assert isinstance(back, IMatrix) and back.datasets == ["a", "b"] and (back.chunk_count, back.chunk_size) == (4, 128)
    assert list(back.entries) == list(im.entries)
    for name, e in im.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums.astype(np.float32).astype(np.float64)), name
        assert np.array_equal(back.entries[name].counts, e.counts), name
    assert not list(tmp_path.glob("*.tmp"))


def test_a_dict_source_works_too() -> None:
    ckpt = Checkpoint.open(TRAINED)
    tensors = {n: ckpt.get(n) for n in ckpt.names()}
    a = compute_imatrix(ckpt.config, DictSource(tensors), calibration_windows(512))
    b = compute_imatrix(ckpt.config, CheckpointWeights.open(TRAINED), calibration_windows(512))
    assert list(a.weights) == list(b.weights)
    assert all(np.array_equal(a.weights[n].sums, b.weights[n].sums) for n in a.weights)


def test_dry_run_plans_the_full_model_from_its_config_and_index_without_data(run) -> None:
    # tests/data/m1-release is the real M1-40k config and index with no shards: any data read would fail
    code, out, err = run("verify", "imatrix", RELEASE, "/nonexistent/imatrix.gguf", "--dry-run", "--tokens", "200000",
                         "--ctx", "2048", "--batch-size", "1", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert [lp["layer"] for lp in plan["layers"]] == list(range(80))
    assert [lp["kind"] for lp in plan["layers"]].count("softmax") == 10
    assert plan["sizes_from"] == "config"
    biggest = max(lp["weight_bytes"] for lp in plan["layers"])
    assert 11e9 < biggest < 12e9  # one layer of M1 in bf16: 32 experts x 3 x 9216 x 6144 x 2 bytes + attention
    assert plan["hidden_bytes"] == 2 * (200000 // 2048) * 2048 * 6144 * 4
    assert plan["peak_bytes"] >= biggest + plan["hidden_bytes"] and plan["peak_bytes"] < 30e9
    code, out, err = run("verify", "imatrix", RELEASE, "x.gguf", "--dry-run", "--tokens", "200000", "--ctx", "2048")
    assert code == 0, err
    assert "peak memory about" in out and "layer  79 softmax" in out and "no tensor data read" in out


def test_dry_run_of_a_checkpoint_reads_its_headers_and_sizes_the_output(run, trained_imatrix) -> None:
    code, out, err = run("verify", "imatrix", TRAINED, "x.gguf", "--dry-run", "--tokens", "2048", "--ctx", str(CTX),
                         "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["sizes_from"] == "shard headers"
    ckpt = Checkpoint.open(TRAINED)
    for lp in plan["layers"]:
        assert lp["weight_bytes"] == sum(ckpt.info(n).nbytes for n in ckpt.names_in_layer(lp["layer"]))
    actual = trained_imatrix[0].stat().st_size
    assert 0.8 * actual < plan["output_bytes"] < 1.25 * actual


def test_usage_errors(run, tmp_path: Path) -> None:
    out = tmp_path / "im.gguf"
    out.write_bytes(b"x")
    code, _, err = run("verify", "imatrix", TRAINED, out, "--tokens", "512", "--ctx", "256")
    assert code == 2 and "OUT exists" in err and "--overwrite" in err
    code, _, err = run("verify", "imatrix", TRAINED, tmp_path, "--tokens", "512")
    assert code == 2 and "names a folder" in err
    code, _, err = run("verify", "imatrix", TRAINED, tmp_path / "a.gguf", "--corpus-part", "middle")
    assert code == 2 and "--corpus-part" in err
    bad = tmp_path / "bad.gguf"
    write_imatrix(bad, IMatrix({}, [], 0, 0))
    gguf_file = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(gguf_file, "minimax-01")
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    from m1.errors import UsageError

    with pytest.raises(UsageError, match="not an imatrix file"):
        read_imatrix(gguf_file)


# ---- llama.cpp's own llama-imatrix --------------------------------------------------------------------------


@needs_llama_imatrix
def test_llama_imatrix_on_our_f32_gguf_agrees_with_m1_verify_imatrix(tmp_path: Path, run) -> None:
    from m1.gguf import export_gguf

    chunks = 8
    export_gguf(TRAINED, tmp_path / "f32.gguf", "f32")
    text = tmp_path / "calibration.txt"
    text.write_text(corpus_text("mr-niah", holdout=False)[: 40 * CTX], encoding="utf-8")
    proc = subprocess.run(
        [str(LLAMA_IMATRIX), "-m", str(tmp_path / "f32.gguf"), "-f", str(text), "-o", str(tmp_path / "llama.gguf"),
         "-c", str(CTX), "-b", str(CTX), "-ub", str(CTX), "--chunks", str(chunks), "--no-ppl", "--process-output",
         "-t", "2", "-ngl", "0"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code, _, err = run("verify", "imatrix", TRAINED, tmp_path / "ours.gguf", "--text", text, "--ctx", str(CTX),
                       "--tokens", str(chunks * CTX), "--process-output", "--quiet", "--device", "cpu")
    assert code == 0, err
    theirs, ours = read_imatrix(tmp_path / "llama.gguf"), read_imatrix(tmp_path / "ours.gguf")
    assert list(ours.entries) == list(theirs.entries)  # the same weights, router and head included
    assert (ours.chunk_count, ours.chunk_size) == (theirs.chunk_count, theirs.chunk_size) == (chunks, CTX)
    near_ties = router_near_ties(chunks * CTX)
    worst = (0.0, "")
    for name, t in theirs.entries.items():
        o = ours.entries[name]
        # A token whose 2nd and 3rd router probabilities are within float32 noise may pick another expert in
        # llama.cpp: say so if it happens (these tokens hold none; see router_near_ties).
        assert o.counts.tolist() == t.counts.tolist(), f"{name}: {o.counts} vs llama.cpp {t.counts}; router " \
            f"near-ties (2nd-3rd probability gap < 1e-4) per layer: {near_ties}"
        assert o.sums.shape == t.sums.shape, name
        rel = float(np.max(np.abs(o.sums - t.sums) / np.maximum(np.abs(t.sums), 1e-30)))
        worst = max(worst, (rel, name))
    warnings.warn(f"m1 verify imatrix vs llama-imatrix, trained tiny M1, {chunks} chunks of {CTX}: "
                  f"{len(theirs.entries)} entries, counts equal, worst in_sum2 relative difference {worst[0]:.3g} "
                  f"({worst[1]})", stacklevel=1)
    assert worst[0] < 1e-3, f"worst relative difference {worst[0]:.3g} in {worst[1]}"


def router_near_ties(n_tokens: int) -> dict[int, int]:
    """Per layer, the calibration tokens whose 2nd and 3rd expert probabilities differ by less than 1e-4."""
    ckpt = Checkpoint.open(TRAINED)
    cfg = ckpt.config
    windows = torch.tensor(list(corpus_text("mr-niah", holdout=False).encode()[:n_tokens])).reshape(-1, CTX)
    hidden = run(cfg, ckpt, [windows], capture_hidden=True).hidden
    assert hidden is not None
    out = {}
    for layer in range(cfg.num_hidden_layers):
        trace: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            forward_layer(cfg, layer, ckpt.layer_weights(layer), hidden[layer][0], trace=trace)
        p = torch.softmax(trace["router_logits"], -1).sort(-1, descending=True).values
        k = cfg.num_experts_per_tok
        out[layer] = int((p[:, k - 1] - p[:, k] < 1e-4).sum())
    return out


LLAMA_QUANTIZE = Path(os.environ.get("M1_LLAMA_QUANTIZE", LLAMA_IMATRIX.with_name("llama-quantize")))


needs_llama_quantize = pytest.mark.skipif(not LLAMA_QUANTIZE.is_file() or not ggml_available(),
                                          reason=f"no llama-quantize at {LLAMA_QUANTIZE} "
                                                 "(bench/build_llama_imatrix.sh) or no libggml")
# Q4_K (issue 11) and every type issue 19 added; the lattice types take seconds each in ggml, so they are slow.
LOW_BIT = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_nl", "tq1_0", "tq2_0")
QUANTIZE_TYPES = [pytest.param("q4_k", id="q4_k"), *(pytest.param(t, id=t, marks=pytest.mark.slow) for t in LOW_BIT)]


@pytest.fixture(scope="module")
def llama_quantize_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(a tiny M1 with K-quant rows, its f32 GGUF, m1's imatrix of it) for the llama-quantize comparisons."""
    from m1.cli import run_cli
    from m1.gguf import export_gguf
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("lq")
    src = root / "kq"
    make_tiny(src, TinySpec(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, rotary_dim=32, intermediate=512,
                            experts=4, softmax_every=2))  # K-quant rows: 256 and 512
    export_gguf(src, root / "f32.gguf", "f32")
    assert run_cli(["verify", "imatrix", str(src), str(root / "im.gguf"), "--tokens", "1024", "--ctx", "128",
                    "--quiet", "--corpus-part", "calibration"]) == 0
    return src, root / "f32.gguf", root / "im.gguf"


@needs_llama_quantize
@pytest.mark.parametrize("qtype", QUANTIZE_TYPES)
def test_llama_quantize_takes_our_imatrix_and_gives_the_bytes_of_m1s_ggml_quantizer(
        qtype: str, llama_quantize_source: tuple[Path, Path, Path], tmp_path: Path, run) -> None:
    """llama.cpp's own llama-quantize --imatrix OUR_FILE on our f32 GGUF writes, for every tensor of the type,
    exactly the bytes ggml_lib.quantize_rows gives with m1.gguf.imatrix.importance (per expert for the stacked
    experts), and exactly the expert tensors `m1 quantize --format gguf --scheme TYPE --imatrix` writes."""
    from m1.gguf.names import from_gguf
    from m1.gguf.types import FILE_TYPES
    from m1.schemes import ggml_lib

    src, f32, imatrix = llama_quantize_source
    qt = gguf.GGMLQuantizationType[qtype.upper()]
    # llama-quantize's name for the file type m1 records: the ftype whose default tensor type is `qtype`
    # (Q4_K_M for q4_k, IQ2_M for iq2_s); --pure then gives every quantizable tensor that type.
    ftype = FILE_TYPES[qtype].name.removeprefix("MOSTLY_")
    labels = {"imatrix": ["--imatrix", str(imatrix)]}
    if not ggml_lib.needs_imatrix(qtype):  # llama-quantize refuses the others without one, as m1 does
        labels["plain"] = []
    outputs = {}
    for label, extra in labels.items():
        # token_embd has no imatrix entry (llama-imatrix never collects it): q8_0, as llama.cpp's presets put it
        proc = subprocess.run([str(LLAMA_QUANTIZE), *extra, "--pure", "--token-embedding-type", "q8_0",
                               "--output-tensor-type", "q8_0", str(f32), str(tmp_path / f"{label}.gguf"),
                               ftype, "2"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        # every blk.* name it looks up is in our file (the head and embedding are not: no --process-output, and
        # llama-imatrix never has token_embd either)
        assert "did not find weights for blk." not in proc.stdout + proc.stderr
        outputs[label] = {t.name: t for t in gguf.GGUFReader(tmp_path / f"{label}.gguf").tensors}
    code, _, err = run("quantize", src, tmp_path / "m1.gguf", "--format", "gguf", "--scheme", qtype, "--imatrix",
                       imatrix, "-q")
    assert code == 0, err
    m1_reader = gguf.GGUFReader(tmp_path / "m1.gguf")
    m1_file = {t.name: t for t in m1_reader.tensors}
    theirs_reader = gguf.GGUFReader(tmp_path / "imatrix.gguf")
    for key in ("general.file_type", "general.quantization_version", "general.type", "general.size_label"):
        assert m1_reader.fields[key].contents() == theirs_reader.fields[key].contents(), key
    ours = read_imatrix(imatrix)
    ckpt = Checkpoint.open(src)
    cfg = ckpt.config
    checked = stacked = 0
    for name, t in outputs["imatrix"].items():
        if t.tensor_type != qt or not name.startswith("blk."):
            continue
        theirs_all = np.asarray(t.data).reshape(-1)
        if name.endswith("_exps.weight"):  # m1's own GGUF: the same bytes, tensor for tensor
            assert m1_file[name].tensor_type == qt and np.array_equal(np.asarray(m1_file[name].data).reshape(-1),
                                                                      theirs_all), name
            stacked += 1
        sources = from_gguf(name, cfg.layer_kinds, cfg.num_local_experts)
        imp = importance(ours, name)
        for slot, spec_name in enumerate(sources):
            weight = ckpt.get(spec_name).float().numpy()
            mine = ggml_lib.quantize_rows(qtype, weight, imp[slot] if len(sources) > 1 else imp[0])
            theirs = theirs_all.reshape(len(sources), -1)[slot]
            assert np.array_equal(mine.reshape(-1), theirs), (name, slot)
            if "plain" in outputs:
                plain = np.asarray(outputs["plain"][name].data).reshape(len(sources), -1)[slot]
                assert np.array_equal(ggml_lib.quantize_rows(qtype, weight).reshape(-1), plain), (name, slot)
                if ggml_lib.takes_imatrix(qtype):
                    assert not np.array_equal(plain, theirs), (name, slot)  # the imatrix mattered
        checked += 1
    n_exps = 3 * cfg.num_hidden_layers
    assert stacked == n_exps and checked >= n_exps + 5, checked  # the stacked experts and the attention


def test_the_engine_collects_by_m1_weight_names_and_the_gguf_file_stacks_the_experts() -> None:
    from m1.spec import inventory

    cfg = Checkpoint.open(TRAINED).config
    stats = compute_imatrix(cfg, CheckpointWeights.open(TRAINED), calibration_windows(512, 128), process_output=True)
    spec = {s.name for s in inventory(cfg)}
    assert set(stats.weights) <= spec and "lm_head.weight" in stats.weights
    assert not any(n.startswith("blk.") for n in stats.weights)
    im = from_stats(stats)
    assert sorted(im.entries) == sorted({to_gguf(n).name for n in stats.weights})
    for layer in range(cfg.num_hidden_layers):
        routed = stats.routed_tokens(layer)
        assert routed.sum() == 512 * cfg.num_experts_per_tok and routed.tolist() == im.routed_tokens(layer).tolist()
        for e in range(cfg.num_local_experts):
            mine = stats.weights[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
            entry = im.entries[f"blk.{layer}.ffn_down_exps.weight"]
            assert np.array_equal(entry.sums[e], mine.sums) and entry.counts[e] == mine.rows
    assert stats.unseen_experts() == im.unseen_experts()
