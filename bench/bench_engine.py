"""The verify engine against transformers' MiniMaxForCausalLM: tokens per second and peak memory, same model,
same tokens, same run, each side in its own process (so peak RSS is its own).

Ours streams the checkpoint a layer at a time from disk; transformers loads the whole model first (its
loading time is reported apart and left out of its tokens per second, in its favour).

    python bench/bench_engine.py                   # a mid-size random M1 on the CPU
    python bench/bench_engine.py --layer-gpu       # one full-size M1 layer over 8192 tokens (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(which: str, path: Path, batch: int, seq: int, repeats: int) -> dict:
    import torch

    torch.manual_seed(0)
    from m1.config import M1Config

    cfg = M1Config.from_file(path / "config.json")
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    load_s = 0.0
    if which == "ours":
        from m1.verify.engine import run
        from m1.verify.sources import CheckpointWeights

        def forward() -> torch.Tensor:  # opens the checkpoint and streams it, every time
            return run(cfg, CheckpointWeights.open(str(path)), [tokens]).logits[0]
    else:
        import transformers

        start = time.perf_counter()
        model = transformers.MiniMaxForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        load_s = time.perf_counter() - start

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return model(input_ids=tokens).logits

    forward()  # warm-up (allocator, kernels, page cache)
    start = time.perf_counter()
    for _ in range(repeats):
        logits = forward()
    seconds = (time.perf_counter() - start) / repeats
    return {"which": which, "tokens": batch * seq, "seconds": seconds, "tokens_per_s": batch * seq / seconds,
            "load_s": load_s, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "logits_mean": float(logits.float().mean())}


def bench_cpu(workdir: Path, batch: int, seq: int, repeats: int) -> dict:
    from m1.config import M1Config
    from m1.spec import inventory
    from m1.tiny import TinySpec, make_tiny

    src, hf = workdir / "engine-src", workdir / "engine-hf"
    for p in (src, hf):
        shutil.rmtree(p, ignore_errors=True)
    spec = TinySpec(layers=8, hidden=512, heads=8, kv_heads=4, head_dim=64, rotary_dim=64, intermediate=1024,
                    experts=8, top_k=2, vocab=8192, softmax_every=4, block_size=256, shards=4)
    make_tiny(src, spec)
    subprocess.run([sys.executable, "-m", "m1.cli", "convert", str(src), str(hf), "--to", "hf", "--dtype", "fp32",
                    "-q"], check=True, cwd=ROOT)
    cfg = M1Config.from_file(hf / "config.json")
    layer_bytes = max(sum(t.numel * 4 for t in inventory(cfg) if t.layer == i) for i in range(cfg.num_hidden_layers))
    model_bytes = sum(t.numel * 4 for t in inventory(cfg))
    results = {}
    for which in ("ours", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--worker", which, "--path", str(hf), "--batch", str(batch),
                              "--seq", str(seq), "--repeats", str(repeats)], check=True, capture_output=True,
                             text=True, cwd=ROOT)
        results[which] = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(src)
    shutil.rmtree(hf)
    ours, theirs = results["ours"], results["transformers"]
    return {
        "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "experts": cfg.num_local_experts,
                  "fp32_bytes": model_bytes, "largest_layer_fp32_bytes": layer_bytes},
        "tokens": batch * seq, "ours": ours, "transformers": theirs,
        "speed_ratio_ours_over_transformers": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
        "peak_rss_ratio_ours_over_transformers": round(ours["peak_rss_bytes"] / theirs["peak_rss_bytes"], 3),
    }


def bench_layer_gpu(seq: int = 8192) -> dict:
    """One full-size M1 layer (random weights, real shapes) over `seq` tokens on CUDA: time and peak memory."""
    import torch

    from m1.config import M1Config
    from m1.spec import inventory
    from m1.verify.engine import forward_layer, rope_tables

    raw = json.loads((ROOT / "tests/data/m1-release/config.json").read_text())
    cfg = M1Config.from_dict(raw)
    out = {}
    for layer in (0, 7):  # one lightning, one softmax layer
        gen = torch.Generator(device="cuda").manual_seed(layer)
        weights = {}
        for t in inventory(cfg):
            if t.layer == layer:
                dtype = torch.float32 if t.dtype == "F32" else torch.bfloat16
                w = torch.randn(t.shape, generator=gen, device="cuda", dtype=dtype) / max(1, t.shape[-1]) ** 0.5
                weights[t.name.split(f"model.layers.{layer}.", 1)[1]] = w
        hidden = torch.randn(1, seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        rope = rope_tables(cfg, seq, "cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        forward_layer(cfg, layer, weights, hidden, dtype=torch.bfloat16, rope=rope)
        torch.cuda.synchronize()
        start = time.perf_counter()
        forward_layer(cfg, layer, weights, hidden, dtype=torch.bfloat16, rope=rope)
        torch.cuda.synchronize()
        out[cfg.layer_kind(layer)] = {"seconds": time.perf_counter() - start, "tokens": seq,
                                      "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                                      "weight_bytes": sum(w.numel() * w.element_size() for w in weights.values())}
        del weights
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["ours", "transformers"])
    parser.add_argument("--path", type=Path)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--layer-gpu", action="store_true")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.batch, args.seq, args.repeats)))
        return
    if args.layer_gpu:
        print(json.dumps({"layer_gpu": bench_layer_gpu()}, indent=2))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"engine_cpu": bench_cpu(args.dir, args.batch, args.seq, args.repeats)}, indent=2))


if __name__ == "__main__":
    main()
