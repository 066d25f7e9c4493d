"""m1.schemes.ggml_lib: ggml's own quantizers through ctypes, read back by gguf-py and by ggml's own dequantizer.

Skipped when llama-cpp-python 0.3.36 is not installed (CI installs it with the test extra), except the test
that the missing library is one clear line.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from m1.errors import UsageError
from m1.schemes import ggml_lib

needs_ggml = pytest.mark.skipif(not ggml_lib.available(), reason=f"libggml not available ({ggml_lib.INSTALL_HINT})")

N_PER_ROW = 512  # two K-quant super-blocks
# ggml builds these types' lattice tables on first use: 5.4 s for iq1_s/iq1_m (one grid), 2.6 s iq2_s, 1.2 s iq2_xs
# on this box, once per process. Their cases run in the slow suite (tests/test_imatrix.py quantizes them too).
GRID_HEAVY = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_S, Q.IQ2_XS})
TYPES = [pytest.param(t, id=ggml_lib.type_name(t), marks=[pytest.mark.slow] if t in GRID_HEAVY else [])
         for t in ggml_lib.SUPPORTED]


def weights(rows: int = 32, n_per_row: int = N_PER_ROW, seed: int = 0) -> np.ndarray:
    """Weight-like rows: normal values with a few large outliers, as trained matrices have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n_per_row)).astype(np.float32) * 0.02
    x[rng.random(x.shape) < 0.002] *= 30
    return x


def importance(n_per_row: int = N_PER_ROW, seed: int = 1) -> np.ndarray:
    """A strongly uneven column importance, like the mean squared activations of a real layer."""
    rng = np.random.default_rng(seed)
    return (rng.random(n_per_row) ** 4 * 100 + 1e-3).astype(np.float32)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@needs_ggml
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_gguf_py_dequantizes_our_bytes_exactly_as_ggml_does(qtype: Q, with_imatrix: bool) -> None:
    x = weights()
    if not with_imatrix and ggml_lib.needs_imatrix(qtype):
        with pytest.raises(UsageError, match=f"{ggml_lib.type_name(qtype)} needs an importance matrix"):
            ggml_lib.quantize_rows(qtype, x, tensor="t")
        return
    blocks = ggml_lib.quantize_rows(qtype, x, importance() if with_imatrix else None, tensor="t")
    assert blocks.shape == (x.shape[0], ggml_lib.row_size(qtype, N_PER_ROW)) and blocks.dtype == np.uint8
    ours = dequantize(blocks, qtype)  # gguf-py's numpy reader, what m1 and gguf users read the file with
    theirs = ggml_lib.dequantize_rows(qtype, blocks, N_PER_ROW)  # ggml's own to_float (type traits)
    assert same_bits(ours, theirs)
    assert np.abs(theirs - x).max() < np.abs(x).max()  # and it is a quantization of x, not noise


@needs_ggml
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.MXFP4], ids=ggml_lib.type_name)
def test_ggml_bytes_equal_gguf_py_bytes_for_the_types_gguf_py_quantizes(qtype: Q) -> None:
    x = weights(rows=48, n_per_row=96 * 4)
    assert np.array_equal(ggml_lib.quantize_rows(qtype, x).reshape(-1), quantize(x, qtype).reshape(-1))


@needs_ggml
@pytest.mark.parametrize("qtype", [t for t in ggml_lib.SUPPORTED if ggml_lib.block_size(t) == 256],
                         ids=ggml_lib.type_name)
def test_k_quants_refuse_rows_that_are_not_multiples_of_256_naming_the_tensor(qtype: Q) -> None:
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    with pytest.raises(UsageError, match=f"rows of 128 values do not split into {ggml_lib.type_name(qtype)} "
                                         "super-blocks of 256") as err:
        ggml_lib.quantize_rows(qtype, weights(n_per_row=128), tensor=name)
    assert f"tensor {name}" in err.value.one_line() and "\n" not in err.value.one_line()
    with pytest.raises(UsageError, match="do not split"):
        ggml_lib.row_size(qtype, 256 + 32, tensor=name)
    # M1's expert rows: hidden 6144 (w1, w3) and intermediate 9216 (w2) are whole super-blocks
    assert ggml_lib.row_size(qtype, 6144) == 24 * ggml_lib.type_size(qtype)
    assert ggml_lib.row_size(qtype, 9216) == 36 * ggml_lib.type_size(qtype)


@needs_ggml
def test_small_block_types_take_rows_of_32() -> None:
    with pytest.raises(UsageError, match="rows of 48 values do not split into q4_0 blocks of 32"):
        ggml_lib.quantize_rows("q4_0", weights(n_per_row=48), tensor="x")
    assert ggml_lib.quantize_rows("q4_0", weights(n_per_row=96)).shape == (32, 3 * 18)


@needs_ggml
@pytest.mark.parametrize("qtype", TYPES)
def test_an_imatrix_changes_the_result_exactly_for_the_types_that_take_one(qtype: Q) -> None:
    x, imat = weights(rows=64), importance()
    # a type refused without an imatrix is compared with a flat one (every column equally important)
    flat = np.ones_like(imat) if ggml_lib.needs_imatrix(qtype) else None
    plain, weighted = ggml_lib.quantize_rows(qtype, x, flat), ggml_lib.quantize_rows(qtype, x, imat)
    if not ggml_lib.takes_imatrix(qtype):  # q8_0, mxfp4, tq1_0, tq2_0: ggml never reads the weights
        assert np.array_equal(plain, weighted)
        return
    assert not np.array_equal(plain, weighted)

    # ... and in the right direction: the importance-weighted error drops.
    def err(blocks: np.ndarray) -> float:
        return float((((ggml_lib.dequantize_rows(qtype, blocks, N_PER_ROW) - x) ** 2) * imat).sum())

    assert err(weighted) < 0.95 * err(plain), ggml_lib.type_name(qtype)


@needs_ggml
def test_which_types_take_an_imatrix() -> None:
    takes = {ggml_lib.type_name(t) for t in ggml_lib.SUPPORTED if ggml_lib.takes_imatrix(t)}
    assert {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs"} <= takes
    assert not any(ggml_lib.takes_imatrix(t) for t in ("q8_0", "mxfp4", "tq1_0", "tq2_0"))
    # ggml's q4_0 does use one; the project's gguf-py q4_0 (m1.gguf export) has no imatrix input at all.
    assert ggml_lib.takes_imatrix("q4_0")
    # ggml aborts without one for these three (asked from the library itself) ...
    assert {ggml_lib.type_name(t) for t in ggml_lib.SUPPORTED if ggml_lib.requires_imatrix(t)} == {
        "iq1_s", "iq2_xxs", "iq2_xs"}
    # ... and m1 refuses, as llama-quantize does, these six
    assert {ggml_lib.type_name(t) for t in ggml_lib.SUPPORTED if ggml_lib.needs_imatrix(t)} == {
        "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs"}


@needs_ggml
def test_the_grids_are_built_once_per_type_and_freed_at_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    import atexit

    lib = ggml_lib.raw_library()
    calls: list[int] = []
    registered: list[object] = []
    real_init = lib.ggml_quantize_init
    monkeypatch.setattr(lib, "ggml_quantize_init", lambda t: (calls.append(t), real_init(t))[1])
    monkeypatch.setattr(atexit, "register", lambda fn, *args: registered.append((fn, args)))
    monkeypatch.setattr(ggml_lib, "_INITIALISED", set())
    x, imat = weights(rows=4), importance()
    for _ in range(3):
        for t in ("iq2_xxs", "iq3_s", "q4_k"):
            ggml_lib.quantize_rows(t, x, imat)
    assert sorted(calls) == sorted(int(ggml_lib.type_of(t)) for t in ("iq2_xxs", "iq3_s", "q4_k"))  # once each
    assert registered == [(ggml_lib._free, (lib,))]  # one ggml_quantize_free at exit, for every type
    assert ggml_lib.initialised() == {Q.IQ2_XXS, Q.IQ3_S, Q.Q4_K}


@needs_ggml
def test_threads_give_the_same_bytes() -> None:
    x, imat = weights(rows=37), importance()
    assert np.array_equal(ggml_lib.quantize_rows("q4_k", x, imat), ggml_lib.quantize_rows("q4_k", x, imat, threads=3))


@needs_ggml
def test_a_bf16_torch_tensor_is_quantized_as_its_f32_values() -> None:
    import torch

    t = torch.from_numpy(weights()).to(torch.bfloat16)
    assert np.array_equal(ggml_lib.quantize_rows("q5_k", t), ggml_lib.quantize_rows("q5_k", t.float().numpy()))
    with pytest.raises(UsageError, match="float values"):
        ggml_lib.quantize_rows("q5_k", torch.zeros(2, 256, dtype=torch.int32))


@needs_ggml
def test_bad_inputs_are_one_line_usage_errors_not_aborts() -> None:
    x = weights()
    with pytest.raises(UsageError, match="importance matrix has 256 values for rows of 512"):
        ggml_lib.quantize_rows("q4_k", x, importance(256), tensor="w")
    bad = x.copy()
    bad[3, 7] = np.nan
    with pytest.raises(UsageError, match="NaN or infinite") as err:
        ggml_lib.quantize_rows("q6_k", bad, tensor="blk.0.ffn_up_exps.weight")
    assert "tensor blk.0.ffn_up_exps.weight" in err.value.one_line()
    with pytest.raises(UsageError, match="negative"):
        ggml_lib.quantize_rows("q4_k", x, -importance())
    with pytest.raises(UsageError, match="not one m1 quantizes with ggml"):
        ggml_lib.quantize_rows("q7_k", x)
    with pytest.raises(UsageError, match="2-D array"):
        ggml_lib.quantize_rows("q4_k", x[None])
    assert ggml_lib.type_of("IQ4_XS") == ggml_lib.type_of(int(Q.IQ4_XS)) == Q.IQ4_XS


def test_without_llama_cpp_python_one_line_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.delenv("M1_GGML_LIB", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    ggml_lib._lib.cache_clear()
    try:
        assert not ggml_lib.available()
        with pytest.raises(UsageError) as err:
            ggml_lib.quantize_rows("q4_k", weights())
        line = err.value.one_line()
        assert "\n" not in line and "llama_cpp is not installed" in line
        assert "pip install 'm1[gguf-k]'" in line and "llama-cpp-python==0.3.36" in line
    finally:
        monkeypatch.undo()
        ggml_lib._lib.cache_clear()


def test_another_llama_cpp_python_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    monkeypatch.delenv("M1_GGML_LIB", raising=False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.3.99")
    ggml_lib._lib.cache_clear()
    try:
        with pytest.raises(UsageError, match="version 0.3.99 is installed, m1 is tested with 0.3.36 only"):
            ggml_lib.block_size("q4_k")
    finally:
        monkeypatch.undo()
        ggml_lib._lib.cache_clear()
