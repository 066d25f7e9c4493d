"""K-quant experts through the pipeline (issue 11): written by llama.cpp's own ggml with our imatrix, read back
bit-exactly as ggml reads them, run in a real llama.cpp, and better than q4_0 at the same size."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from m1.schemes import ggml_lib

DATA = Path(__file__).parent / "data"
needs_ggml = pytest.mark.skipif(not ggml_lib.available(), reason="llama-cpp-python (m1[gguf-k]) is not installed")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second trained tiny M1 (hidden 256: K-quant rows fit) if bundled, else a random one of that shape."""
    trained = DATA / "tiny8-trained"
    if (trained / "config.json").exists():
        return trained
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("k") / "tiny256"
    make_tiny(root, TinySpec(layers=4, hidden=256, intermediate=512, heads=4, head_dim=64, rotary_dim=32, experts=4))
    return root


@pytest.fixture(scope="module")
def built(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from m1.cli import run_cli

    out = tmp_path_factory.mktemp("kq")
    imatrix = out / "imatrix.gguf"  # calibration: the first 90% of the corpus; evaluation below: the last 10%
    assert run_cli(["verify", "imatrix", str(model), str(imatrix), "--tokens", "4096", "--ctx", "256", "-q"]) == 0
    files = {}
    for label, args in {"q4_0": ["--scheme", "q4_0"], "q4_k": ["--scheme", "q4_k"],
                        "q4_k+imatrix": ["--scheme", "q4_k", "--imatrix", str(imatrix)]}.items():
        files[label] = out / f"{label.replace('+', '-')}.gguf"
        assert run_cli(["quantize", str(model), str(files[label]), "--format", "gguf", *args, "-q"]) == 0
    return files


@pytest.mark.slow
@needs_ggml
def test_k_quant_tensors_read_back_as_ggml_reads_them(built: dict[str, Path]) -> None:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(built["q4_k+imatrix"])
    stacked = [t for t in reader.tensors if t.name.endswith("_exps.weight")]
    assert stacked and all(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in stacked)
    for t in stacked[:3]:
        n_per_row = int(t.shape[0])
        ours = dequantize(np.asarray(t.data), t.tensor_type).reshape(-1, n_per_row)
        theirs = ggml_lib.dequantize_rows("q4_k", np.asarray(t.data), n_per_row)
        assert np.array_equal(ours, theirs), t.name


@pytest.mark.slow
@needs_ggml
def test_the_imatrix_changes_the_bytes_and_q4_0_ignores_it(built: dict[str, Path], model: Path, tmp_path: Path,
                                                           run) -> None:
    assert built["q4_k"].read_bytes() != built["q4_k+imatrix"].read_bytes()
    code, _, err = run("quantize", model, tmp_path / "q4_0-im.gguf", "--format", "gguf", "--scheme", "q4_0",
                       "--imatrix", built["q4_k"].parent / "imatrix.gguf", "-q")
    assert code == 0 and "ignored" in err
    import gguf

    with_im, without = (gguf.GGUFReader(p) for p in (tmp_path / "q4_0-im.gguf", built["q4_0"]))
    assert [t.name for t in with_im.tensors] == [t.name for t in without.tensors]
    assert all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
               for a, b in zip(with_im.tensors, without.tensors, strict=True))  # only general.name differs


def test_a_k_quant_refuses_rows_that_do_not_fit(make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt("small", hidden=64, intermediate=128)
    code, _, err = run("quantize", src, tmp_path / "x.gguf", "--format", "gguf", "--scheme", "q4_k", "-q")
    assert code in (1, 2) and "256" in err and ("blk." in err or "experts" in err), err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
@needs_ggml
def test_in_llama_cpp_q4_k_with_the_imatrix_beats_q4_0_and_q4_k_without(built: dict[str, Path], model: Path) -> None:
    import warnings

    from m1.verify.runtime import compare_in_runtime
    from m1.verify.text import corpus_text, load_tokenizer, make_windows

    tok = load_tokenizer(str(model))
    windows = make_windows(tok.encode(corpus_text("mr-niah")), 256, 2048, False).tokens  # held out
    results = {label: compare_in_runtime(str(model), path, windows) for label, path in built.items()}
    sizes = {label: path.stat().st_size for label, path in built.items()}
    table = "; ".join(f"{k}: {sizes[k]} B, KL {v['kl_mean']:.4g}, top-1 {v['top1']:.2%}, PPL ratio "
                      f"{v['ppl_ratio']:.4f}" for k, v in results.items())
    warnings.warn(f"K-quants in llama.cpp on {model.name}: {table}", stacklevel=1)
    assert all(math.isfinite(v["kl_mean"]) for v in results.values())
    assert sizes["q4_k+imatrix"] <= sizes["q4_0"]
    assert results["q4_k+imatrix"]["kl_mean"] < results["q4_0"]["kl_mean"], table
    assert results["q4_k+imatrix"]["kl_mean"] < results["q4_k"]["kl_mean"], table
