"""The verify engine against transformers' MiniMaxForCausalLM: tokens per second and peak memory, same model,
same tokens, same run, each side in its own process (so peak RSS is its own); and the engine alone at 64k
tokens against its stated memory bound.

Ours streams the checkpoint a layer at a time from disk on every pass; transformers loads the whole model
first (its loading time is reported apart and left out of its tokens per second, in its favour).

The two sides run as two live worker processes that take turns, one forward pass each, `--repeats` times
(the first pass of each is a warm-up, not counted): on a shared machine whose load changes from second to
second, both sides then see the same conditions, and the best and the median pass of each are compared.

    python bench/bench_engine.py                   # a mid-size random M1 on the CPU
    python bench/bench_engine.py --long-context    # the engine at 65536 tokens on tests/data/tiny8-trained
    python bench/bench_engine.py --layer-gpu       # one full-size M1 layer over 8192 tokens (needs CUDA)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """This process's peak RSS: VmHWM, the high-water mark of its own address space. (ru_maxrss is not: after
    fork and exec it starts from the parent's RSS at the fork, here the bench's own ~0.5 GB.)"""
    return _status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss() -> int:
    return _status_kb("VmRSS") or _peak_rss()


def _say(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def serve(which: str, path: Path, batch: int, seq: int) -> None:
    """A worker: set up, then one timed forward pass per `go` line on stdin; `stop` ends it with its peak RSS."""
    import torch

    torch.manual_seed(0)
    from m1.config import M1Config

    cfg = M1Config.from_file(path / "config.json")
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    idle_rss = _rss()
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

    logits = None
    _say({"ready": which, "load_s": load_s, "threads": torch.get_num_threads()})
    while sys.stdin.readline().strip() == "go":
        wall, cpu = time.perf_counter(), time.process_time()
        logits = forward()
        _say({"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu})
        del logits  # not held across the other side's turn
        logits = None
    final = forward()
    _say({"which": which, "tokens": batch * seq, "load_s": load_s, "idle_rss_bytes": idle_rss,
          "peak_rss_bytes": _peak_rss(), "logits_mean": float(final.float().mean())})


class Worker:
    def __init__(self, which: str, path: Path, batch: int, seq: int) -> None:
        self.which = which
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", which, "--path", str(path), "--batch",
                                      str(batch), "--seq", str(seq)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.ready = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.which} worker exited ({self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def step(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.close()
        out = self._read()
        self.proc.wait()
        return out


def _summary(passes: list[dict], tokens: int) -> dict:
    secs = [p["seconds"] for p in passes]
    cpu = [p["cpu_seconds"] for p in passes]
    best, median = min(secs), statistics.median(secs)
    return {"passes_s": [round(s, 3) for s in secs], "best_s": best, "median_s": median,
            "tokens_per_s_best": tokens / best, "tokens_per_s_median": tokens / median,
            "cpu_s_median": statistics.median(cpu)}


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
    shutil.rmtree(src)
    cfg = M1Config.from_file(hf / "config.json")
    layer_bytes = max(sum(t.numel * 4 for t in inventory(cfg) if t.layer == i) for i in range(cfg.num_hidden_layers))
    model_bytes = sum(t.numel * 4 for t in inventory(cfg))
    tokens = batch * seq
    workers = {"ours": Worker("ours", hf, batch, seq), "transformers": Worker("transformers", hf, batch, seq)}
    passes: dict[str, list[dict]] = {"ours": [], "transformers": []}
    try:
        for r in range(repeats + 1):  # pass 0 of each side is its warm-up
            order = ("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")
            for which in order:
                result = workers[which].step()
                if r:
                    passes[which].append(result)
        final = {which: w.stop() for which, w in workers.items()}
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
    shutil.rmtree(hf)
    ours = {**final["ours"], **_summary(passes["ours"], tokens)}
    theirs = {**final["transformers"], **_summary(passes["transformers"], tokens)}
    return {
        "model": {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "experts": cfg.num_local_experts,
                  "fp32_bytes": model_bytes, "largest_layer_fp32_bytes": layer_bytes},
        "tokens": tokens, "repeats": repeats, "ours": ours, "transformers": theirs,
        "same_logits_mean": abs(ours["logits_mean"] - theirs["logits_mean"]) < 1e-4,
        "speed_ratio_best": round(ours["tokens_per_s_best"] / theirs["tokens_per_s_best"], 3),
        "speed_ratio_median": round(ours["tokens_per_s_median"] / theirs["tokens_per_s_median"], 3),
        "peak_rss_ratio_ours_over_transformers": round(ours["peak_rss_bytes"] / theirs["peak_rss_bytes"], 3),
    }


# ---- long context -----------------------------------------------------------------------------------------


def long_context_worker(path: Path, tokens: int, chunk: int | None) -> dict:
    """One run of the engine over `tokens` positions of the MR-NIAH 10k haystacks (bytes) in one sequence."""
    import torch

    from m1.verify.engine import chunk_positions, run
    from m1.verify.sources import CheckpointWeights
    from m1.verify.text import corpus_text

    source = CheckpointWeights.open(str(path))
    cfg = source.config
    ids = list(corpus_text("mr-niah-10k").encode("utf-8"))[:tokens]
    assert len(ids) == tokens, f"the corpus has only {len(ids)} bytes"
    x = torch.tensor(ids)
    idle = _rss()
    start = time.perf_counter()
    logits = run(cfg, source, [x], chunk_size=chunk).logits[0]
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    nll = torch.nn.functional.cross_entropy(logits[:-1], x[1:]).item()
    return {"tokens": tokens, "chunk": chunk_positions(cfg, chunk), "seconds": seconds,
            "tokens_per_s": tokens / seconds, "idle_rss_bytes": idle, "peak_rss_bytes": peak, "nll_per_byte": nll}


def memory_bound(path: Path, tokens: int, chunk: int) -> dict:
    """What the chunked engine may hold at `tokens` positions, fp32 compute, one sequence, by component."""
    from m1.config import M1Config
    from m1.spec import inventory

    cfg = M1Config.from_file(path / "config.json")
    f32 = 4
    layer = max(sum(t.numel for t in inventory(cfg) if t.layer == i) for i in range(cfg.num_hidden_layers)) * f32
    globals_ = sum(t.numel for t in inventory(cfg) if t.layer is None) * f32
    hd, heads, kv, hidden = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    n_softmax = sum(k == "softmax" for k in cfg.layer_kinds)
    n_lightning = cfg.num_hidden_layers - n_softmax
    kv_one_layer = tokens * kv * hd * 2 * f32
    parts = {
        "one_layer_weights_fp32": layer,
        "globals_fp32 (embedding, final norm, head)": globals_,
        "hidden_states (layer input and output)": 2 * tokens * hidden * f32,
        "softmax_kv (all softmax layers, as the issue states it)": n_softmax * kv_one_layer,
        "lightning_state (all lightning layers)": n_lightning * heads * hd * hd * f32,
        "logits_output [T, vocab]": tokens * cfg.vocab_size * f32,
        # a chunk's projections, expert intermediates (k copies), attention output and head logits, twice over
        "chunk_workspace (2x one chunk's intermediates)": 2 * chunk * f32 * (
            3 * heads * hd + 2 * hidden + cfg.num_experts_per_tok * (2 * cfg.intermediate_size + 3 * hidden)
            + 2 * heads * hd + cfg.vocab_size),
    }
    return {"parts": parts, "total": sum(parts.values()),
            "note": "the engine holds one softmax layer's keys and values at a time (layer-major); the bound "
                    "counts all of them, as the issue words it"}


def bench_long_context(path: Path, tokens: int, chunk: int, compare_unchunked: bool) -> dict:
    def sub(chunk_arg: int | None) -> dict:
        out = subprocess.run([sys.executable, __file__, "--long-worker", "--path", str(path), "--tokens", str(tokens),
                              "--chunk", str(chunk_arg or 0)], check=True, capture_output=True, text=True, cwd=ROOT)
        return json.loads(out.stdout.strip().splitlines()[-1])

    bound = memory_bound(path, tokens, chunk)
    chunked = sub(chunk)
    result = {"model": str(path), "bound": bound, "chunked": chunked,
              "peak_over_idle_bytes": chunked["peak_rss_bytes"] - chunked["idle_rss_bytes"],
              "within_bound": chunked["peak_rss_bytes"] - chunked["idle_rss_bytes"] <= bound["total"]}
    if compare_unchunked:
        whole = sub(None)
        result["unchunked"] = whole
        result["unchunked_peak_over_idle_bytes"] = whole["peak_rss_bytes"] - whole["idle_rss_bytes"]
    return result


# ---- one full-size layer on a GPU -------------------------------------------------------------------------


def bench_layer_gpu(seq: int = 8192) -> dict:
    """One full-size M1 layer (random weights, real shapes) over `seq` tokens on CUDA: time and peak memory."""
    import torch

    from m1.config import M1Config
    from m1.spec import inventory
    from m1.verify.engine import forward_layer_chunked, stack_experts

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
        weights = stack_experts(cfg, weights, torch.bfloat16)
        hidden = torch.randn(1, seq, cfg.hidden_size, device="cuda", dtype=torch.bfloat16, generator=gen)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            forward_layer_chunked(cfg, layer, weights, hidden, dtype=torch.bfloat16)
            torch.cuda.synchronize()
            start = time.perf_counter()
            forward_layer_chunked(cfg, layer, weights, hidden, dtype=torch.bfloat16)
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
    parser.add_argument("--long-worker", action="store_true")
    parser.add_argument("--path", type=Path)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per side (after one warm-up each)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--layer-gpu", action="store_true")
    parser.add_argument("--long-context", action="store_true")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--chunk", type=int, default=4096)
    parser.add_argument("--model", type=Path, default=ROOT / "tests" / "data" / "tiny8-trained")
    parser.add_argument("--no-unchunked", action="store_true", help="--long-context: skip the one-call comparison")
    args = parser.parse_args()
    if args.worker:
        serve(args.worker, args.path, args.batch, args.seq)
        return
    if args.long_worker:
        print(json.dumps(long_context_worker(args.path, args.tokens, args.chunk or None)))
        return
    if args.layer_gpu:
        print(json.dumps({"layer_gpu": bench_layer_gpu()}, indent=2))
        return
    if args.long_context:
        print(json.dumps({"long_context": bench_long_context(args.model, args.tokens, args.chunk,
                                                             not args.no_unchunked)}, indent=2))
        return
    args.dir.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"engine_cpu": bench_cpu(args.dir, args.batch, args.seq, args.repeats)}, indent=2))


if __name__ == "__main__":
    main()
