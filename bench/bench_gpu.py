"""The GPU checks of issue 13 as one short prepared command (about 5 minutes on one H100/H200):

    python bench/bench_gpu.py --json bench/out/gpu.json        # on a machine with a CUDA GPU
    python bench/bench_gpu.py --smoke                           # the same steps, small and on the CPU

1. quantize: one full-size M1 layer (32 experts x w1/w2/w3 [9216, 6144] bf16 = 10.9 GB of experts, plus
   attention, norms, router) written as a release checkpoint, then `m1 quantize --scheme nf4 --device cuda`
   timed by the job itself and split into read / quantize (host->device, bitsandbytes, device->host) /
   write (and hash), with raw `bitsandbytes.functional.quantize_4bit` on the same tensors in the same run
   for the ratio; the workers' device map (`--device cuda --workers N`: one GPU each, round robin).
2. identity: nf4 without double quant, CPU against CUDA, on full-size expert tensors: the output shards'
   sha256 and every tensor's bytes compared (with double quant too, for information).
3. engine: one full-size layer of each kind (lightning 0, softmax 7; random weights, real shapes) over
   8192 tokens in bf16 through the verify engine's `forward_layer`: seconds, tokens/s, peak GPU memory.

Each step prints one line as it ends and the whole is printed as JSON at the end (and written to --json).
The source is written to --dir (default: a temporary folder, removed at the end); it needs about 14 GB of
disk. Random data is made on the device, so building it takes seconds, not minutes. `--smoke` shrinks every
size and runs on the CPU: it checks the script itself where no GPU is present (nothing it prints is a GPU
figure).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

M1 = [sys.executable, "-m", "m1"]
FULL = dict(layers=1, experts=32, hidden=6144, intermediate=9216, heads=64, kv_heads=8, head_dim=128)
SMOKE = dict(layers=1, experts=2, hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64)


def log(line: str) -> None:
    print(line, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- sources --------------------------------------------------------------------------------------------


def build_source(dest: Path, dims: dict[str, int], device: str, experts_per_shard: int = 4) -> tuple[Any, list[str]]:
    """bench_quantize's random release checkpoint, its data drawn on `device` (fast on a GPU)."""
    from bench_quantize import write_random_release

    return write_random_release(dest, dims, device, experts_per_shard)


def m1_json(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([*M1, *args, "--json", "-q"], capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"m1 {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


# ---- 1. one full-size layer quantized on CUDA -----------------------------------------------------------


def raw_quantize_4bit(src: Path, names: list[str], device: str) -> dict[str, Any]:
    """bitsandbytes' quantize_4bit alone on the same tensors (read and moved to the device first, not timed)."""
    from m1.checkpoint import Checkpoint
    from m1.schemes.bnb_codec import bnb_functional

    F = bnb_functional()
    ckpt = Checkpoint.open(src)
    seconds = 0.0
    params = 0
    for name in names:
        w = ckpt.get(name).to(device)
        sync(device)
        start = time.perf_counter()
        F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        sync(device)
        seconds += time.perf_counter() - start
        params += w.numel()
        del w
    return {"params": params, "seconds": round(seconds, 3), "params_per_s": round(params / seconds)}


def step_quantize(work: Path, dims: dict[str, int], device: str, timeout: float) -> dict[str, Any]:
    from m1.devices import writer_devices

    src, dst = work / "layer", work / "layer-nf4"
    start = time.perf_counter()
    cfg, experts = build_source(src, dims, device)
    built = time.perf_counter() - start
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    expert_params = len(experts) * cfg.hidden_size * cfg.intermediate_size
    log(f"source: one layer, {len(experts)} expert tensors of {cfg.intermediate_size}x{cfg.hidden_size} bf16, "
        f"{source_bytes / 1e9:.2f} GB in {built:.1f} s")
    run = m1_json(["quantize", str(src), str(dst), "--scheme", "nf4", "--device", device, "--overwrite"], timeout)
    timing = run["timing"]
    raw = raw_quantize_4bit(src, experts, device)
    out = {
        "source_bytes": source_bytes, "expert_params": expert_params, "build_s": round(built, 1),
        "m1": {"seconds": run["seconds"], "read_s": timing["read_s"], "quantize_s": timing["quantize_s"],
               "write_s": timing["write_s"], "cpu_s": timing["cpu_s"],
               "expert_params_per_s": round(expert_params / run["seconds"]),
               "source_gb_per_s": round(source_bytes / run["seconds"] / 1e9, 2), "output_bytes": run["bytes"],
               "devices": run.get("devices")},
        "raw_quantize_4bit": raw,
        "m1_vs_raw": round(expert_params / run["seconds"] / raw["params_per_s"], 3),
        "note": "the source was just written, so reads come from the page cache",
    }
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        out["gpus"] = count
        out["workers_device_map"] = {f"--workers {n}": writer_devices("cuda", n) for n in (count, 2 * count)}
        n = max(2, count)
        multi = m1_json(["quantize", str(src), str(work / "layer-nf4-workers"), "--scheme", "nf4", "--device",
                         "cuda", "--workers", str(n), "--shard-size", str(max(1, run["bytes"] // (2 * n))),
                         "--overwrite"], timeout)
        out["workers"] = {"workers": multi["workers"], "writer_devices": multi["writer_devices"],
                          "seconds": multi["seconds"], "devices": multi["devices"]}
        shutil.rmtree(work / "layer-nf4-workers", ignore_errors=True)
    log(f"quantize: m1 --device {device} {out['m1']['seconds']:.2f} s (read {timing['read_s']:.2f} / quantize "
        f"{timing['quantize_s']:.2f} / write {timing['write_s']:.2f}), {out['m1']['expert_params_per_s'] / 1e9:.2f} "
        f"B expert params/s, {out['m1']['source_gb_per_s']} GB/s of source; raw quantize_4bit "
        f"{raw['params_per_s'] / 1e9:.2f} B params/s; m1/raw {out['m1_vs_raw']}")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(dst, ignore_errors=True)
    return out


# ---- 2. CPU vs CUDA byte identity -------------------------------------------------------------------------


def compare_outputs(a: Path, b: Path) -> dict[str, Any]:
    from safetensors import safe_open

    files = sorted(p.name for p in a.glob("*.safetensors"))
    same_files = [f for f in files if hashlib.sha256((a / f).read_bytes()).hexdigest()
                  == hashlib.sha256((b / f).read_bytes()).hexdigest()]
    tensors = differing = 0
    worst: list[dict[str, Any]] = []
    for f in files:
        with safe_open(str(a / f), "pt") as fa, safe_open(str(b / f), "pt") as fb:
            for name in fa.keys():
                x, y = fa.get_tensor(name), fb.get_tensor(name)
                tensors += 1
                bx = x.contiguous().view(-1).view(torch.uint8)
                by = y.contiguous().view(-1).view(torch.uint8)
                if bx.shape != by.shape or not torch.equal(bx, by):
                    differing += 1
                    diff = int((bx != by).sum()) if bx.shape == by.shape else -1
                    worst.append({"tensor": name, "bytes": bx.numel(), "differing_bytes": diff})
    return {"files": len(files), "identical_files": len(same_files), "tensors": tensors,
            "differing_tensors": differing, "examples": worst[:5], "identical": differing == 0 and
            len(same_files) == len(files)}


def step_identity(work: Path, dims: dict[str, int], device: str, experts: int, timeout: float) -> dict[str, Any]:
    src = work / "identity"
    d = dict(dims, experts=experts)
    build_source(src, d, device, experts_per_shard=experts)
    out: dict[str, Any] = {"experts": experts, "shape": [d["intermediate"], d["hidden"]]}
    for label, dq in (("nf4, no double quant", "--no-double-quant"), ("nf4, double quant", "--double-quant")):
        runs = {}
        for dev in ("cpu", device):
            dest = work / f"identity-{dev.replace(':', '')}-{dq}"
            runs[dev] = m1_json(["quantize", str(src), str(dest), "--scheme", "nf4", dq, "--device", dev,
                                 "--overwrite"], timeout)
        result = compare_outputs(work / f"identity-cpu-{dq}", work / f"identity-{device.replace(':', '')}-{dq}")
        result["seconds"] = {dev: r["seconds"] for dev, r in runs.items()}
        out[label] = result
        log(f"identity ({label}): CPU vs {device}: {result['identical_files']}/{result['files']} shards identical, "
            f"{result['differing_tensors']} of {result['tensors']} tensors differ")
    shutil.rmtree(src, ignore_errors=True)
    for p in work.glob("identity-*"):
        shutil.rmtree(p, ignore_errors=True)
    return out


# ---- 3. the engine on one full-size layer --------------------------------------------------------------------


def step_engine(cfg: Any, device: str, seq: int) -> dict[str, Any]:
    from m1.spec import inventory
    from m1.verify.engine import forward_layer, rope_tables

    out = {}
    for layer in (0, 1) if cfg.num_hidden_layers < 8 else (0, 7):  # one lightning, one softmax layer
        gen = torch.Generator(device=device).manual_seed(layer)
        weights = {}
        for t in inventory(cfg):
            if t.layer == layer:
                dtype = torch.float32 if t.dtype == "F32" else torch.bfloat16
                w = torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32)
                if t.name.endswith("norm.weight"):
                    w = 1 + 0.02 * w
                else:
                    w = w / max(1, t.shape[-1]) ** 0.5
                weights[t.name.split(f"model.layers.{layer}.", 1)[1]] = w.to(dtype)
        hidden = torch.randn(1, seq, cfg.hidden_size, generator=gen, device=device, dtype=torch.float32)
        hidden = hidden.to(torch.bfloat16)
        rope = rope_tables(cfg, seq, device)
        with torch.no_grad():
            forward_layer(cfg, layer, weights, hidden, dtype=torch.bfloat16, rope=rope)  # warm-up
            sync(device)
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            y = forward_layer(cfg, layer, weights, hidden, dtype=torch.bfloat16, rope=rope)
            sync(device)
            seconds = time.perf_counter() - start
        kind = cfg.layer_kind(layer)
        weight_bytes = sum(w.numel() * w.element_size() for w in weights.values())
        out[kind] = {"layer": layer, "tokens": seq, "seconds": round(seconds, 3), "tokens_per_s": round(seq / seconds),
                     "weight_bytes": weight_bytes, "finite": bool(torch.isfinite(y).all()),
                     "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device.startswith("cuda") else None}
        peak = out[kind]["peak_gpu_bytes"]
        log(f"engine: {kind} layer {layer}, {seq} tokens: {seconds:.3f} s, {seq / seconds:,.0f} tokens/s"
            + (f", peak GPU memory {peak / 1e9:.1f} GB (weights {weight_bytes / 1e9:.1f} GB)" if peak else ""))
        del weights, hidden, y
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--experts", type=int, default=None, help="experts in the quantized layer (default 32)")
    parser.add_argument("--identity-experts", type=int, default=2, help="full-size experts in the identity check")
    parser.add_argument("--seq", type=int, default=None, help="engine tokens (default 8192)")
    parser.add_argument("--only", choices=["quantize", "identity", "engine"], action="append",
                        help="run only these steps (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="small sizes on the CPU: checks the script, not a GPU")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each m1 run")
    opts = parser.parse_args()

    if opts.smoke:
        device, dims, seq = "cpu", dict(SMOKE), opts.seq or 256
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible (torch.cuda.is_available() is False); --smoke runs the steps on "
                             "the CPU")
        device, dims, seq = "cuda", dict(FULL), opts.seq or 8192
    if opts.experts:
        dims["experts"] = opts.experts
    steps = opts.only or ["quantize", "identity", "engine"]
    work = opts.dir or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    import bitsandbytes

    env = {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__, "device": device,
           "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
           "gpus": torch.cuda.device_count() if device == "cuda" else 0, "cpus": os.cpu_count(), "smoke": opts.smoke}
    log(f"bench_gpu: {env}")
    results: dict[str, Any] = {"env": env}
    started = time.perf_counter()
    try:
        if "quantize" in steps:
            results["quantize"] = step_quantize(work, dims, device, opts.timeout)
        if "identity" in steps:
            results["identity"] = step_identity(work, dims, device, opts.identity_experts, opts.timeout)
        if "engine" in steps:
            from m1.config import M1Config
            from m1.tiny import TinySpec, tiny_config

            if opts.smoke:
                cfg = M1Config.from_dict(tiny_config(TinySpec(layers=2, hidden=dims["hidden"], heads=dims["heads"],
                                                              kv_heads=dims["kv_heads"], head_dim=dims["head_dim"],
                                                              rotary_dim=dims["head_dim"] // 2,
                                                              intermediate=dims["intermediate"],
                                                              experts=4, top_k=2, softmax_every=2)))
            else:
                cfg = M1Config.from_dict(json.loads((ROOT / "tests/data/m1-release/config.json").read_text()))
            results["engine"] = step_engine(cfg, device, seq)
    finally:
        if opts.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if opts.json:
        opts.json.parent.mkdir(parents=True, exist_ok=True)
        opts.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
