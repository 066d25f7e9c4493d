"""GGUF export throughput: m1's gguf sink against raw `gguf.quants.quantize` on the same expert tensors.

One full-size M1 expert projection is [9216, 6144] (`--shape`); the source is a tiny M1 checkpoint whose experts
have that shape (`--experts` of them in one layer), exported with `m1 quantize --format gguf --scheme TYPE
--workers N` in a fresh process, against a loop of `gguf.quants.quantize` over the same tensors in this process.
Reported side by side as parameters per second and ratios (m1 / raw, per worker).

    python bench/bench_gguf.py --type q8_0 --shape 2048x1024 --experts 8 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
M1 = [sys.executable, "-m", "m1.cli"]


def build_source(dest: Path, rows: int, cols: int, experts: int) -> list[torch.Tensor]:
    from m1.tiny import TinySpec, make_tiny

    # intermediate = rows, hidden = cols: w1/w3 are [rows, cols], w2 is [cols, rows]
    make_tiny(dest, TinySpec(layers=2, hidden=cols, intermediate=rows, heads=4, head_dim=64, rotary_dim=32,
                             experts=experts, top_k=2, softmax_every=2, shards=1))
    from m1.checkpoint import Checkpoint

    ckpt = Checkpoint.open(dest)
    return [ckpt.get(n) for n in ckpt.names() if ".experts." in n]


def raw_seconds(tensors: list[torch.Tensor], qtype: str) -> float:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    t = GGMLQuantizationType[qtype.upper()]
    start = time.perf_counter()
    for w in tensors:
        quantize(w.to(torch.float32).numpy(), t)
    return time.perf_counter() - start


def m1_seconds(src: Path, out: Path, qtype: str, workers: int) -> float:
    if out.exists():
        shutil.rmtree(out)
    cmd = [*M1, "quantize", str(src), str(out), "--format", "gguf", "--scheme", qtype, "--split-max-size", "1",
           "--workers", str(workers), "--threads", "1", "-q", "--json"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", default="q8_0")
    parser.add_argument("--shape", default="2048x1024", help="an expert's rows x cols (full size: 9216x6144)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rows, cols = (int(x) for x in args.shape.split("x"))
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    try:
        tensors = build_source(work / "src", rows, cols, args.experts)
        params = sum(t.numel() for t in tensors)
        results: dict[str, float] = {"raw": min(raw_seconds(tensors, args.type) for _ in range(args.repeat))}
        for w in (int(x) for x in args.workers.split(",")):
            results[f"m1 {w}w"] = min(m1_seconds(work / "src", work / "out", args.type, w)
                                      for _ in range(args.repeat))
        print(f"{len(tensors)} expert tensors, {params / 1e6:.1f}M params, type {args.type}, best of {args.repeat}")
        print(f"{'config':12s} {'seconds':>8s} {'Mparams/s':>10s} {'vs raw':>7s}")
        for label, seconds in results.items():
            print(f"{label:12s} {seconds:8.2f} {params / seconds / 1e6:10.1f} {results['raw'] / seconds:7.2f}")
        print(json.dumps({k: round(v, 3) for k, v in results.items()}))
        print("m1's time includes starting the process, planning, reading, the whole file (other tensors too), "
              f"fsync and hashing; numpy {np.__version__}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
