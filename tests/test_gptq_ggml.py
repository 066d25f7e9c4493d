"""GPTQ rounding for the ggml K-quants (m1.schemes.ggml_gptq), checked against ggml's own decoder and llama.cpp.

For each of q2_k, q3_k, q4_k, q5_k and q6_k: the code layout writes back exactly the bytes ggml wrote (codes read
off ggml's own decoding), ggml's dequantizer decodes GPTQ's blocks to exactly the values GPTQ intended, every
byte but the codes is ggml's own (its scales and mins), and GPTQ's layer error beats ggml's rounding on a
calibrated layer. A `--rounding gptq` GGUF of the trained tiny8 runs in llama.cpp and agrees with the source
better than ggml's rounding at the same bytes (slow).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from calibrated import calibrated_layer

from m1.schemes import ggml_lib
from m1.schemes.ggml_gptq import LAYOUTS, quantize_gptq, value_table, with_codes
from m1.schemes.gptq import Rounding, layer_error

pytestmark = pytest.mark.skipif(not ggml_lib.available(), reason="llama-cpp-python (m1[gguf-k]) is not installed")
TRAINED8 = Path(__file__).parent / "data" / "tiny8-trained"


def codes_of(name: str, blocks: np.ndarray, cols: int) -> np.ndarray:
    """The code of every weight, read off ggml's own decoding: the one whose value it decodes to."""
    table = value_table(name, blocks, cols).numpy()
    decoded = ggml_lib.dequantize_rows(name, blocks, cols)
    codes = np.abs(table - decoded[None]).argmin(axis=0)
    assert np.array_equal(np.take_along_axis(table, codes[None], 0)[0], decoded)
    return codes


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_the_code_layout_is_where_ggml_reads_the_codes(name: str) -> None:
    w, _ = calibrated_layer(16, 512, samples=2048)
    w = w.float()
    blocks = ggml_lib.quantize_rows(name, w.numpy())
    codes = codes_of(name, blocks, 512)
    assert len(np.unique(codes)) > LAYOUTS[name].levels // 2  # the test covers most codes
    assert np.array_equal(with_codes(name, blocks, codes), blocks)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ggml_decodes_exactly_what_gptq_intended_within_ggmls_scales(name: str) -> None:
    w, h = calibrated_layer(24, 512, samples=2048)
    w = w.float()
    rtn = ggml_lib.quantize_rows(name, w.numpy())
    ours, intended = quantize_gptq(name, w, h, Rounding("gptq"), None)
    assert ours.dtype == np.uint8 and ours.shape == rtn.shape
    decoded = ggml_lib.dequantize_rows(name, ours, 512)
    assert np.array_equal(decoded, intended.numpy())
    # every byte but the codes is ggml's: GPTQ's blocks with ggml's codes put back are ggml's blocks
    assert np.array_equal(with_codes(name, ours, codes_of(name, rtn, 512)), rtn)
    assert not np.array_equal(ours, rtn)
    plain = torch.from_numpy(ggml_lib.dequantize_rows(name, rtn, 512))
    assert layer_error(w, torch.from_numpy(decoded), h) < 0.8 * layer_error(w, plain, h)


def test_rows_rounded_in_chunks_give_the_same_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from m1.schemes import ggml_gptq

    w, h = calibrated_layer(24, 512, seed=2, samples=2048)
    w = w.float()
    whole, _ = quantize_gptq("q4_k", w, h, Rounding("gptq"), None)
    monkeypatch.setattr(ggml_gptq, "TABLE_BYTES", 16 * 512 * 4 * 5)  # five rows a chunk
    chunked, _ = quantize_gptq("q4_k", w, h, Rounding("gptq"), None)
    assert np.array_equal(whole, chunked)


@pytest.mark.slow  # a Hessian pass and a GGUF job
def test_a_gptq_gguf_job_records_its_rounding_beside_the_file(make_tiny_ckpt: Callable[..., Path], tmp_path: Path,
                                                               run: Callable[..., tuple[int, str, str]]) -> None:
    src = make_tiny_ckpt("k", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, rotary_dim=32,
                         intermediate=512, experts=2, softmax_every=2)
    dest = tmp_path / "g.gguf"
    code, out, err = run("quantize", src, dest, "--format", "gguf", "--scheme", "q4_k", "--rounding", "gptq",
                         "--tokens", "512", "--ctx", "128")
    assert code == 0, err
    record = json.loads((tmp_path / "g.m1-rounding.json").read_text())
    assert record["rounding"]["method"] == "gptq"
    manifest = json.loads((tmp_path / "g.m1-manifest.json").read_text())
    assert manifest["job"]["rounding"]["method"] == "gptq" and "g.m1-rounding.json" in json.dumps(manifest)
    assert run("verify", "integrity", dest)[0] == 0
    code, _, err = run("quantize", src, tmp_path / "x.gguf", "--format", "gguf", "--scheme", "iq4_nl", "--rounding",
                       "gptq", "--dry-run")
    assert code == 2 and "q2_k, q3_k, q4_k, q5_k, q6_k" in err, err


@pytest.mark.slow
def test_a_gptq_q4_k_gguf_runs_in_llama_cpp_closer_to_its_source(tmp_path: Path,
                                                                 run: Callable[..., tuple[int, str, str]]) -> None:
    """tiny8-trained's experts at q4_k, ggml's rounding against GPTQ's within ggml's scales (4096 calibration
    tokens), judged in llama.cpp on 2048 held-out tokens against m1's engine on the source."""
    import warnings

    from m1.verify.runtime import compare_in_runtime
    from m1.verify.text import corpus_text, load_tokenizer, make_windows

    files = {}
    for rounding in ("nearest", "gptq"):
        files[rounding] = tmp_path / f"{rounding}.gguf"
        extra = ["--rounding", "gptq", "--tokens", "4096"] if rounding == "gptq" else []
        code, _, err = run("quantize", TRAINED8, files[rounding], "--format", "gguf", "--scheme", "q4_k", *extra, "-q")
        assert code == 0, err
    assert files["gptq"].stat().st_size == files["nearest"].stat().st_size
    tokens = load_tokenizer(str(TRAINED8)).encode(corpus_text("mr-niah"))  # its held-out 10%
    windows = make_windows(tokens, 256, 2048, False).tokens
    kl = {r: compare_in_runtime(str(TRAINED8), f, windows)["kl_mean"] for r, f in files.items()}
    warnings.warn(f"q4_k in llama.cpp, tiny8-trained, 2048 held-out tokens: KL nearest {kl['nearest']:.6f}, "
                  f"GPTQ {kl['gptq']:.6f} ({kl['gptq'] / kl['nearest']:.3f}x)", stacklevel=1)
    assert all(math.isfinite(v) for v in kl.values())
    assert kl["gptq"] < 0.8 * kl["nearest"], kl
