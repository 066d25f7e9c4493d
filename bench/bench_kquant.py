"""Benchmark of m1's ggml K-quant wrapper (m1.schemes.ggml_lib.quantize_rows) against calling ggml's quantizer
directly, per worker (one thread), on the same full-size M1 expert tensor.

- direct: `ggml_quantize_chunk(type, src, dst, 0, rows, n_per_row, imatrix)` through ctypes on buffers made
  beforehand (the call and nothing else);
- m1: `quantize_rows(type, rows, imatrix)` from the same f32 array: type and shape checks, the finiteness
  check, the output allocation and the call;
- m1 from bf16 (information): what a pipeline worker does with a tensor read from the release, bf16 -> f32
  numpy first, then quantize_rows.

Target: m1 >= 0.9 x direct, in CPU seconds of the quantizing thread (steady on a shared box; wall time is
reported too). Interleaved repeats, best of each.

With --imatrix-tokens N it also times `m1 verify imatrix` (compute_imatrix, layer-streamed from disk) against
the engine's plain forward (`run`, the work of `m1 verify perplexity`) on a random M1 of 2 layers (one
lightning, one softmax), hidden 1024, 8 experts of 2048, over N tokens in chunks of 512, and reports seconds
per million tokens per layer.

    python bench/bench_kquant.py [--types q4_k,q6_k,iq4_xs] [--shape 9216x6144] [--repeat 3] [--json]
    python bench/bench_kquant.py --types none --imatrix-tokens 16384

9216x6144 is one full-size expert's w1 or w3 (56.6M weights, rows of hidden 6144); 6144x9216 is w2.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from m1.schemes import ggml_lib  # noqa: E402


# Each returns (wall seconds, CPU seconds of this thread): on a shared box the CPU time is the steady figure.
def direct(lib: ctypes.CDLL, qtype: int, x: np.ndarray, out: np.ndarray, imat: np.ndarray | None
           ) -> tuple[float, float]:
    fptr = ctypes.POINTER(ctypes.c_float)
    src, dst = x.ctypes.data_as(fptr), out.ctypes.data
    weights = imat.ctypes.data_as(fptr) if imat is not None else None
    wall, cpu = time.perf_counter(), time.thread_time()
    lib.ggml_quantize_chunk(qtype, src, dst, 0, x.shape[0], x.shape[1], weights)
    return time.perf_counter() - wall, time.thread_time() - cpu


def ours(qtype: int, x: np.ndarray, imat: np.ndarray | None) -> tuple[tuple[float, float], np.ndarray]:
    wall, cpu = time.perf_counter(), time.thread_time()
    out = ggml_lib.quantize_rows(qtype, x, imat)
    return (time.perf_counter() - wall, time.thread_time() - cpu), out


def ours_bf16(qtype: int, t: torch.Tensor, imat: np.ndarray | None) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    ggml_lib.quantize_rows(qtype, t.float().numpy(), imat)
    return time.perf_counter() - wall, time.thread_time() - cpu


def imatrix_timing(n_tokens: int, repeat: int) -> dict:
    import tempfile

    from m1.tiny import TinySpec, make_tiny
    from m1.verify.engine import run
    from m1.verify.imatrix import compute_imatrix
    from m1.verify.sources import CheckpointWeights

    spec = TinySpec(layers=2, hidden=1024, heads=8, kv_heads=2, head_dim=128, rotary_dim=64, intermediate=2048,
                    experts=8, vocab=256, softmax_every=2, block_size=256, shards=2)
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny(Path(tmp) / "m", spec)
        source = CheckpointWeights.open(Path(tmp) / "m")
        cfg = source.config
        tokens = torch.randint(0, 256, (n_tokens // 512, 512), generator=torch.Generator().manual_seed(0))
        best = {"engine_run": float("inf"), "imatrix": float("inf")}
        for _ in range(repeat):
            start = time.perf_counter()
            run(cfg, source, list(tokens.split(4)))
            best["engine_run"] = min(best["engine_run"], time.perf_counter() - start)
            start = time.perf_counter()
            compute_imatrix(cfg, source, tokens, batch_size=4)
            best["imatrix"] = min(best["imatrix"], time.perf_counter() - start)
    per = {k: v / cfg.num_hidden_layers / (tokens.numel() / 1e6) for k, v in best.items()}
    return {"model": "2 layers, hidden 1024, 8 experts x 2048, heads 8 x 128", "tokens": int(tokens.numel()),
            "threads": torch.get_num_threads(), **{f"{k}_s": round(v, 3) for k, v in best.items()},
            **{f"{k}_s_per_million_tokens_per_layer": round(v, 2) for k, v in per.items()},
            "imatrix_over_engine": round(best["imatrix"] / best["engine_run"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="q4_k,q6_k,iq4_xs")
    parser.add_argument("--shape", default="9216x6144")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-imatrix", action="store_true", help="Only without an importance matrix.")
    parser.add_argument("--imatrix-tokens", type=int, default=0, help="Also time m1 verify imatrix over this many.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary: dict = {"bench": "kquant", "repeat": args.repeat}
    if args.imatrix_tokens:
        summary["imatrix"] = imatrix_timing(args.imatrix_tokens, args.repeat)
        if not args.json:
            print(f"imatrix: {summary['imatrix']}", flush=True)
    torch.set_num_threads(1)
    rows, n_per_row = (int(d) for d in args.shape.split("x"))
    rng = np.random.default_rng(0)
    t = torch.from_numpy(rng.standard_normal((rows, n_per_row), dtype=np.float32) * 0.02).to(torch.bfloat16)
    x = t.float().numpy()  # the values a worker quantizes: bf16 weights as f32
    imat = (rng.random(n_per_row, dtype=np.float32) ** 4 * 100 + 1e-3).astype(np.float32)
    lib = ggml_lib.raw_library()
    results = []
    for name in [t for t in args.types.split(",") if t and t != "none"]:
        qtype = int(ggml_lib.type_of(name))
        for weights in ([None] if args.no_imatrix else [None, imat]):
            out = np.empty((rows, ggml_lib.row_size(qtype, n_per_row)), dtype=np.uint8)
            lib.ggml_quantize_init(qtype)
            inf = (float("inf"), float("inf"))
            wall = {"direct": inf[0], "m1": inf[0], "m1_from_bf16": inf[0]}
            cpu = dict(wall)
            for _ in range(args.repeat):  # interleaved, so the shared box's drift hits both alike
                timings = {"direct": direct(lib, qtype, x, out, weights)}
                timings["m1"], mine = ours(qtype, x, weights)
                timings["m1_from_bf16"] = ours_bf16(qtype, t, weights)
                for k, (w, c) in timings.items():
                    wall[k], cpu[k] = min(wall[k], w), min(cpu[k], c)
            assert np.array_equal(mine, out), "the wrapper's bytes differ from the direct call's"
            mparams = rows * n_per_row / 1e6
            row = {"type": name, "imatrix": weights is not None, "shape": [rows, n_per_row],
                   **{f"{k}_wall_s": round(v, 4) for k, v in wall.items()},
                   **{f"{k}_cpu_s": round(v, 4) for k, v in cpu.items()},
                   **{f"{k}_mparams_per_cpu_s": round(mparams / v, 2) for k, v in cpu.items()},
                   "ratio_m1_to_direct": round(cpu["direct"] / cpu["m1"], 3),
                   "ratio_m1_from_bf16_to_direct": round(cpu["direct"] / cpu["m1_from_bf16"], 3),
                   "wall_ratio_m1_to_direct": round(wall["direct"] / wall["m1"], 3)}
            results.append(row)
            if not args.json:
                print(f"{name:>7} imatrix={str(row['imatrix']):<5} direct {row['direct_mparams_per_cpu_s']:7.1f} "
                      f"Mparams per CPU-s, m1 {row['m1_mparams_per_cpu_s']:7.1f} (ratio "
                      f"{row['ratio_m1_to_direct']:.3f}; wall {row['wall_ratio_m1_to_direct']:.3f}), m1 from bf16 "
                      f"{row['m1_from_bf16_mparams_per_cpu_s']:7.1f} (ratio {row['ratio_m1_from_bf16_to_direct']:.3f})",
                      flush=True)
    if results:
        summary.update(threads=1, results=results,
                       min_ratio_m1_to_direct=min(r["ratio_m1_to_direct"] for r in results))
    if args.json:
        print(json.dumps(summary, indent=2))
    elif results:
        print(f"lowest m1/direct ratio: {summary['min_ratio_m1_to_direct']:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
