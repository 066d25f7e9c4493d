"""ggml's quantization speed per type, in params/s on one core: the figures behind m1.schemes.ggml.THROUGHPUT
(what `m1 quantize --dry-run` turns into the full-scale time estimate).

    python bench/bench_lowbit_speed.py [--rows 64] [--cols 6144] [--repeat 3] [--json bench/out/lowbit_speed.json]

Every type m1 quantizes with llama.cpp's ggml (m1.schemes.ggml_lib: K-quants, i-quants, ternary) and the gguf-py
types (q8_0 ... mxfp4, as m1 quantizes them: gguf.quants), on the same Gaussian rows of `--cols` values (M1's
expert w1/w3 rows are 6144 wide), with a positive importance row where the type takes one (the lattice search of
the i-quants weighs every candidate by it). One thread (`ggml_quantize_chunk` over all rows in one call), best of
`--repeat` after one warm-up call that also builds the type's grids (`ggml_quantize_init`, not timed). The box's
load average is printed before and after: on a shared box the figures are a floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(name: str, rows: np.ndarray, importance: np.ndarray, repeat: int) -> float:
    """Best params/s of one type over `repeat` timed calls."""
    from m1.schemes import ggml_lib
    from m1.schemes.ggml import GGML_LIB_TYPES

    if name in GGML_LIB_TYPES:
        imp = importance if ggml_lib.takes_imatrix(name) else None

        def call() -> None:
            ggml_lib.quantize_rows(name, rows, imp, check_finite=False)
    else:
        from gguf.quants import quantize

        from m1.schemes.ggml import _qtype

        def call() -> None:
            quantize(rows, _qtype(name))
    call()  # warm-up: the grids, the pages of the output
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return rows.size / best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--cols", type=int, default=6144)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--types", default=None, help="comma-separated (default: every ggml type m1 writes)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "lowbit_speed.json")
    args = parser.parse_args(argv)
    from m1.schemes.ggml import BLOCK_TYPES

    types = args.types.split(",") if args.types else list(BLOCK_TYPES)
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32)
    importance = rng.gamma(2.0, 1.0, args.cols).astype(np.float32)
    load_before = os.getloadavg()
    results = {}
    print(f"{'type':10s} {'Mparams/s/core':>15s} {'s per 1B params':>16s}")
    for name in types:
        rate = measure(name, rows, importance, args.repeat)
        results[name] = rate
        print(f"{name:10s} {rate / 1e6:15.2f} {1e9 / rate:16.1f}", flush=True)
    load_after = os.getloadavg()
    box = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or platform.platform()}"
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {box}")
    print("THROUGHPUT = {" + ", ".join(f'"{n}": {r / 1e6:.3g}' for n, r in results.items()) + "}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "box": box,
        "load_before": load_before, "load_after": load_after, "rows": args.rows, "cols": args.cols,
        "repeat": args.repeat, "params_per_second_per_core": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
