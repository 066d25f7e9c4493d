"""GGUF bf16 export against llama.cpp's own converter, on the dense full-size slice, in one run.

Source: the dense slice of bench/bench_convert.py (two full-size layers of MiniMax-M1-40k, one lightning and one
softmax, plus embedding and head, real shapes and shard assignment, about 27 GB), filled with random *finite* bf16
(random bytes hold NaNs, which llama.cpp's bf16 rounding quiets, so the bytes of the two outputs could not be
compared), and beside the release's tokenizer_config.json a tokenizer.json: a synthetic byte-level BPE of 200000
tokens plus 4 special ones; the last 60 of the 200064 embedding rows are zeroed as in the release. Both tools get
the same folder.

m1:   `m1 convert SRC OUT.gguf --to gguf --quiet`
peer: llama.cpp's `convert_hf_to_gguf.py SRC --outfile OUT.gguf --outtype bf16`, run as an external program with
      the project's python and PYTHONPATH at its own vendored gguf-py (which knows MINIMAX01). llama.cpp identifies
      a BPE pre-tokenizer by hashing the token ids of a check text and refuses hashes it does not know; the slice's
      tokenizer has none it knows, so the peer runs through a small wrapper (written to --dir at run time) that
      makes `TextModel.get_vocab_base_pre` return "gpt-2" (the split regex the tokenizer really uses). That skips
      only the tokenizer identity check; tensor conversion is untouched.

Runs alternate m1 / peer (`--repeat`), page cache dropped before each (when root). Time is the process's wall
time; "+sync" adds a `sync` right after it (m1 fsyncs its files, llama.cpp's writer does not). Peak RSS from
/usr/bin/time -v. Source and two 27 GB outputs do not fit on this disk together, so each output is summarized
(names, types, shapes, sha256 of every tensor's bytes, metadata keys) with the published gguf package's GGUFReader
and deleted before the next run; the summaries are then compared.

    python bench/bench_gguf_peer.py [--repeat 1] [--llama-cpp DIR] [--small]

Writes bench/out/gguf_peer.json (or --dir).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import M1, ROOT, dense_slice, drop_caches, write_replica  # noqa: E402
from llama_converter import PEER_VERSION, ConverterMissing, converter_command, converter_env, converter_tree  # noqa: E402

from m1.config import M1Config  # noqa: E402
from m1.spec import inventory  # noqa: E402
from m1.tiny import byte_tokenizer_json  # noqa: E402

PADDING_ROWS = 60  # embedding rows past the tokenizer, zeroed: both converters list them as suppress_tokens
SPECIAL_TOKENS = ["<beginning_of_sentence>", "<end_of_sentence>", "<end_of_document>", "<begin_of_document>"]
# --small: the same slice with scaled-down shapes (for checking the script, not for figures).
SMALL = {"hidden_size": 512, "intermediate_size": 768, "num_local_experts": 4, "num_experts_per_tok": 2,
         "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "rotary_dim": 32}



def finite_bf16_block(nbytes: int = 64 << 20) -> bytes:
    """Random bytes in which no 16-bit unit has an all-ones bf16 exponent: finite as bf16, and as fp32 too."""
    u = np.frombuffer(os.urandom(nbytes), dtype=np.uint16).copy()
    u[(u & 0x7F80) == 0x7F80] ^= 0x4000
    return u.tobytes()


def slice_tokenizer_json(base_vocab: int) -> str:
    """A byte-level BPE of `base_vocab` tokens (GPT-2 split regex) plus the special tokens the release's config names.

    m1's tiny byte tokenizer (ids 0-255 are bytes) grown with synthetic merges, pairs of byte characters and then
    pairs with a third, to the size of M1's own vocabulary: both converters then build the same 200k-entry token
    list and merges as for the real model, and scan only the embedding rows past the vocabulary for zero rows.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    from m1.tiny import gpt2_byte_alphabet

    byte_tok = json.loads(byte_tokenizer_json())["model"]
    vocab: dict[str, int] = dict(byte_tok["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in byte_tok["merges"]]
    alphabet = [c for c in gpt2_byte_alphabet() if c in vocab]  # byte 0xFF's slot holds the tiny merge
    pairs = ((a, b) for a in alphabet for b in alphabet)
    triples = ((a + b, c) for a in alphabet for b in alphabet for c in alphabet)
    for left, right in (*pairs, *triples):
        if len(vocab) >= base_vocab:
            break
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n"


def zero_padding_rows(src: Path, start: int) -> int:
    """Zero the embedding rows from `start` on, as the release pads its 200064 rows; returns how many."""
    from m1.safetensors_io import read_header

    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    info = read_header(src / index[name]).tensors[name]
    rows, row_bytes = info.shape[0], info.nbytes // info.shape[0]
    with open(src / index[name], "r+b") as f:
        f.seek(info.start + start * row_bytes)
        f.write(bytes((rows - start) * row_bytes))
    return rows - start


def build_source(src: Path, layers: list[int], small: bool) -> int:
    config, weight_map, specs = dense_slice(layers)
    if small:
        config = dict(config, **SMALL)
        specs = {t.name: t for t in inventory(M1Config.from_dict(config))}
        weight_map = {n: f for n, f in weight_map.items() if n in specs}
    if src.exists():
        shutil.rmtree(src)
    total = write_replica(src, config, weight_map, specs, fill=True, block=finite_bf16_block())
    base = config["vocab_size"] - PADDING_ROWS - len(SPECIAL_TOKENS)
    (src / "tokenizer.json").write_text(slice_tokenizer_json(base), encoding="utf-8")
    zero_padding_rows(src, base + len(SPECIAL_TOKENS))
    return total


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_timed(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Wall seconds, seconds including a sync after it, peak RSS (/usr/bin/time -v); raises on a non-zero exit."""
    prefix = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    before = load()
    start = time.perf_counter()
    proc = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
    subprocess.run(["sync"], check=True)
    with_sync = time.perf_counter() - start
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return {"s": round(seconds, 2), "s_plus_sync": round(with_sync, 2),
            "peak_rss_bytes": int(m.group(1)) * 1024 if m else None,
            "load_before": before, "load_after": load(), "stderr_tail": proc.stderr.strip()[-1500:]}


def summarize(path: Path) -> dict:
    """Every tensor's type, shape and sha256, and the metadata (arrays as length + sha256), via the published gguf."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    tensors = {}
    for t in reader.tensors:
        digest = hashlib.sha256(memoryview(np.ascontiguousarray(t.data)).cast("B")).hexdigest()
        tensors[t.name] = {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape],
                           "nbytes": int(t.n_bytes), "sha256": digest}
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception as exc:  # a field this reader cannot decode: keep its type only
            value = f"<{type(exc).__name__}>"
        if field.types and field.types[0] == GGUFValueType.ARRAY and isinstance(value, list):
            value = {"len": len(value), "sha256": hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]}
        elif isinstance(value, str) and len(value) > 120:
            value = {"len": len(value), "sha256": hashlib.sha256(value.encode()).hexdigest()[:16]}
        meta[key] = value
    return {"bytes": path.stat().st_size, "tensors": tensors, "metadata": meta}


def compare(a: dict, b: dict) -> dict:
    """m1 (a) against the peer (b): name sets, types, shapes, bytes, metadata keys."""
    ta, tb = a["tensors"], b["tensors"]
    both = sorted(set(ta) & set(tb))
    same_bytes, type_diff, shape_diff, byte_diff = [], [], [], []
    for n in both:
        x, y = ta[n], tb[n]
        if x["type"] != y["type"]:
            type_diff.append(f"{n}: m1 {x['type']}, llama.cpp {y['type']}")
        elif x["shape"] != y["shape"]:
            shape_diff.append(f"{n}: m1 {x['shape']}, llama.cpp {y['shape']}")
        elif x["sha256"] != y["sha256"]:
            byte_diff.append(n)
        else:
            same_bytes.append(n)
    ma, mb = a["metadata"], b["metadata"]

    def by_type(tensors: dict) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in tensors.values():
            out[t["type"]] = out.get(t["type"], 0) + 1
        return out

    return {
        "tensors_m1": len(ta), "tensors_peer": len(tb), "in_both": len(both),
        "types_m1": by_type(ta), "types_peer": by_type(tb),
        "f32_in_both": sorted(n for n in both if ta[n]["type"] == tb[n]["type"] == "F32"),
        "only_m1": sorted(set(ta) - set(tb)), "only_peer": sorted(set(tb) - set(ta)),
        "identical_bytes": len(same_bytes), "type_differs": type_diff, "shape_differs": shape_diff,
        "bytes_differ_same_type_and_shape": byte_diff,
        "metadata_only_m1": sorted(set(ma) - set(mb)), "metadata_only_peer": sorted(set(mb) - set(ma)),
        "metadata_values_differ": sorted(k for k in set(ma) & set(mb) if ma[k] != mb[k]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", type=Path, default=None,
                        help="llama.cpp source tree (default: found as bench/llama_converter.py says, else fetched "
                        "into --dir)")
    parser.add_argument("--dir", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--layers", default="0,7", help="release layers of the slice (default 0,7)")
    parser.add_argument("--repeat", type=int, default=1, help="alternating m1 / peer runs; the best of each counts")
    parser.add_argument("--small", action="store_true", help="scaled-down shapes, to check the script quickly")
    parser.add_argument("--keep-source", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        llama = converter_tree(args.dir, args.llama_cpp)
    except ConverterMissing as exc:
        raise SystemExit(str(exc)) from None
    env = converter_env(llama)

    layers = [int(x) for x in args.layers.split(",")]
    src = args.dir / "gguf-peer-src"
    start = time.perf_counter()
    total = build_source(src, layers, args.small)
    build_s = time.perf_counter() - start
    shard_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"source: {src} ({total / 1e9:.2f} GB of tensors in {len(list(src.glob('*.safetensors')))} shards, "
          f"written in {build_s:.0f} s); peer: {llama}", flush=True)

    runs: dict[str, list[dict]] = {"m1": [], "peer": []}
    summaries: dict[str, dict] = {}
    cache_dropped = []
    for i in range(args.repeat):
        for tool in ("m1", "peer"):
            out = args.dir / f"gguf-peer-{tool}.gguf"
            out.unlink(missing_ok=True)
            if tool == "m1":
                cmd = M1 + ["convert", str(src), str(out), "--to", "gguf", "--quiet"]
            else:
                cmd = converter_command(llama, args.dir, src, out)
            cache_dropped.append(drop_caches())
            r = run_timed(cmd, env=env if tool == "peer" else None)
            r["output_bytes"] = out.stat().st_size
            runs[tool].append(r)
            print(f"run {i + 1} {tool}: {r['s']} s ({r['s_plus_sync']} s with sync), peak RSS "
                  f"{(r['peak_rss_bytes'] or 0) / 1e9:.2f} GB; load {r['load_before'].split('load average: ')[-1]}",
                  flush=True)
            if i == 0:
                start = time.perf_counter()
                summaries[tool] = summarize(out)
                print(f"  summarized {len(summaries[tool]['tensors'])} tensors in {time.perf_counter() - start:.0f} s",
                      flush=True)
            out.unlink()
            for extra in args.dir.glob(f"gguf-peer-{tool}*.m1-manifest.json"):
                extra.unlink()
    if not args.keep_source:
        shutil.rmtree(src)

    best = {tool: min(runs[tool], key=lambda r: r["s"]) for tool in runs}
    best_sync = {tool: min(r["s_plus_sync"] for r in runs[tool]) for tool in runs}
    peak = {tool: max(r["peak_rss_bytes"] or 0 for r in runs[tool]) for tool in runs}
    cmp = compare(summaries["m1"], summaries["peer"])
    results = {
        "source": {"layers": layers, "small": args.small, "tensor_bytes": total, "shard_bytes": shard_bytes,
                   "build_s": round(build_s, 1), "fill": "random finite bf16"},
        "peer": {"llama_cpp": str(llama), "version": f"llama-cpp-python {PEER_VERSION} sdist",
                 "tokenizer_check": "get_vocab_base_pre patched to return 'gpt-2' (wrapper); tensors untouched"},
        "page_cache_dropped": all(cache_dropped), "repeat": args.repeat, "runs": runs,
        "m1_s": best["m1"]["s"], "peer_s": best["peer"]["s"],
        "m1_s_plus_sync": best_sync["m1"], "peer_s_plus_sync": best_sync["peer"],
        "m1_GBps": round(shard_bytes / best["m1"]["s"] / 1e9, 3),
        "peer_GBps": round(shard_bytes / best["peer"]["s"] / 1e9, 3),
        "throughput_ratio_m1_over_peer": round(best["peer"]["s"] / best["m1"]["s"], 3),
        "throughput_ratio_m1_over_peer_with_sync": round(best_sync["peer"] / best_sync["m1"], 3),
        "m1_peak_rss_bytes": peak["m1"], "peer_peak_rss_bytes": peak["peer"],
        "peak_rss_ratio_m1_over_peer": round(peak["m1"] / peak["peer"], 3) if peak["peer"] else None,
        "output_bytes": {"m1": summaries["m1"]["bytes"], "peer": summaries["peer"]["bytes"]},
        "comparison": cmp,
        "metadata": {"m1": summaries["m1"]["metadata"], "peer": summaries["peer"]["metadata"]},
        "load_at_end": load(),
    }
    (args.dir / "gguf_peer.json").write_text(json.dumps(results, indent=2) + "\n")

    print()
    if not results["page_cache_dropped"]:
        print("page cache NOT dropped between runs (not root): later runs may read the source from memory")
    print(f"{'tool':10s} {'seconds':>8s} {'+sync':>8s} {'GB/s':>6s} {'peak RSS GB':>12s}")
    for tool, label in (("m1", "m1"), ("peer", "llama.cpp")):
        print(f"{label:10s} {best[tool]['s']:8.1f} {best_sync[tool]:8.1f} {shard_bytes / best[tool]['s'] / 1e9:6.3f} "
              f"{peak[tool] / 1e9:12.2f}")
    print(f"throughput m1 / llama.cpp: {results['throughput_ratio_m1_over_peer']}x "
          f"({results['throughput_ratio_m1_over_peer_with_sync']}x with sync); peak RSS m1 / llama.cpp: "
          f"{results['peak_rss_ratio_m1_over_peer']}x")
    print(f"tensors: m1 {cmp['tensors_m1']} {cmp['types_m1']}, llama.cpp {cmp['tensors_peer']} {cmp['types_peer']}, "
          f"in both {cmp['in_both']}, identical bytes {cmp['identical_bytes']}; only m1 {cmp['only_m1']}; "
          f"only llama.cpp {cmp['only_peer']}")
    for label in ("type_differs", "shape_differs", "bytes_differ_same_type_and_shape"):
        if cmp[label]:
            print(f"{label}: {cmp[label]}")
    print(f"metadata only m1: {cmp['metadata_only_m1']}\nmetadata only llama.cpp: {cmp['metadata_only_peer']}\n"
          f"metadata values differ: {cmp['metadata_values_differ']}")
    print(f"load: {results['load_at_end']}; figures in {args.dir / 'gguf_peer.json'}")
    if cmp["bytes_differ_same_type_and_shape"]:
        raise SystemExit(f"{len(cmp['bytes_differ_same_type_and_shape'])} tensors stored in the same type and shape "
                         "differ in bytes")


if __name__ == "__main__":
    main()
