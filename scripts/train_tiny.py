"""Train a tiny byte-level MiniMax-M1 that has learned something, and save it in the release layout.

    python scripts/train_tiny.py OUTDIR [--steps N] [--seed S] [--overwrite]
    python scripts/train_tiny.py tests/data/tiny8-trained --layers 8 --hidden 256 --heads 8 --kv-heads 4 \
        --head-dim 32 --rotary-dim 16 --intermediate 512 --experts 8 --shards 4 --max-positions 131072 ...

The model's sizes are options (defaults: the bundled 4-layer tests/data/tiny-trained); the README of each
bundled model gives the exact command that made it.

Why: random tiny models say nothing about whether a conversion or quantization kept the model's
behaviour (their next-byte distributions are near uniform). A trained one has peaked distributions and a
held-out perplexity far below 256, so a broken conversion shows up as a perplexity or KL jump.

The recipe is seeded and small (300 steps, about 2 minutes on 2 free CPU cores). It trains with the verify engine's own
layer function (`verify.engine.forward_layer`), so the saved model is exactly what the engine evaluates:
4 layers (3 lightning + 1 softmax, as layers 0-7 of the release), 4 experts top-2, partial RoPE
(rotary_dim = head_dim / 2), postnorm with the release's DeepNorm-style alpha, byte vocabulary (256).

Data: the English MR-NIAH haystacks in tests/data/corpus/mr-niah-en-2048.jsonl, every message content
concatenated; the last 10% of the bytes are held out. The haystacks repeat a small pool of messages, so the
held-out bytes are mostly text the model has seen: the perplexity measures a learned (largely memorised)
distribution, which is what the verify fixtures need, not generalisation. `overlap` in the report says how
much.

Saved: config.json (release flavour), bf16 tensors with an fp32 router, 3 zero-based shards with
model.safetensors.index.json, a byte-level tokenizer_config.json and the byte-level BPE tokenizer.json whose ids
are the bytes (m1.tiny's writer, as `m1 make-tiny`; GGUF export and llama.cpp need the tokenizer.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from m1.config import M1Config
from m1.manifest import prepare_destination
from m1.spec import Role, inventory
from m1.tiny import TinySpec, save_release, tiny_config
from m1.verify.engine import DictSource, embed, forward_layer, head, next_token_nll, rope_tables, run

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "corpus" / "mr-niah-en-2048.jsonl"

MODEL = TinySpec(
    layers=4, hidden=128, heads=4, kv_heads=2, head_dim=32, rotary_dim=16, intermediate=128,
    experts=4, top_k=2, vocab=256, softmax_every=4, block_size=64, shards=3, seed=0,
)


@dataclass(frozen=True)
class Recipe:
    steps: int = 300
    batch: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.01  # load balancing, so that every expert learns something
    clip: float = 1.0
    heldout_fraction: float = 0.1
    seed: int = 0


def load_corpus(path: Path = CORPUS) -> bytes:
    """Every message content of every line, newline-joined, as UTF-8 bytes."""
    parts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            parts.extend(m["content"] for m in json.loads(line)["messages"])
    return "\n".join(parts).encode("utf-8")


def split(data: bytes, heldout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(data) * (1 - heldout_fraction))
    as_ids = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_ids(data[:cut]), as_ids(data[cut:])


def init_weights(cfg: M1Config, gen: torch.Generator) -> dict[str, torch.nn.Parameter]:
    """fp32 trainable weights for every spec tensor: norms at 1, the rest N(0, 0.02) (the release's init range)."""
    std = float(cfg.raw.get("initializer_range", 0.02))
    params = {}
    for spec in inventory(cfg):
        if spec.role in (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM):
            value = torch.ones(spec.shape)
        else:
            value = torch.randn(spec.shape, generator=gen) * std
        params[spec.name] = torch.nn.Parameter(value)
    return params


def model_loss(
    cfg: M1Config, params: dict[str, torch.Tensor], tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-byte cross-entropy, Switch-style load-balancing loss) of a [B, T] batch."""
    prefixes = [f"model.layers.{i}." for i in range(cfg.num_hidden_layers)]
    hidden = embed(params, tokens)
    aux = hidden.new_zeros(())
    for layer, prefix in enumerate(prefixes):
        weights = {n[len(prefix) :]: p for n, p in params.items() if n.startswith(prefix)}
        trace: dict[str, torch.Tensor] = {}
        hidden = forward_layer(cfg, layer, weights, hidden, rope=rope, trace=trace)
        probs = torch.softmax(trace["router_logits"], dim=-1)
        chosen = torch.zeros_like(probs).scatter(1, trace["expert_ids"], 1.0)
        aux = aux + cfg.num_local_experts * (chosen.mean(0) / cfg.num_experts_per_tok * probs.mean(0)).sum()
    nll = next_token_nll(head(cfg, params, hidden), tokens).mean()
    return nll, aux / cfg.num_hidden_layers


def lr_at(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return r.lr * (step + 1) / r.warmup
    progress = (step - r.warmup) / max(1, r.steps - r.warmup)
    return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    cfg: M1Config, train_ids: torch.Tensor, r: Recipe, log: Callable[[str], None] = print
) -> dict[str, torch.Tensor]:
    torch.manual_seed(r.seed)
    gen = torch.Generator().manual_seed(r.seed)
    params = init_weights(cfg, gen)
    decay = [p for p in params.values() if p.dim() == 2 and p is not params["model.embed_tokens.weight"]]
    no_decay = [p for p in params.values() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=r.lr, betas=(0.9, 0.95),
    )
    rope = rope_tables(cfg, r.seq_len, "cpu")
    offsets = torch.arange(r.seq_len)
    start = time.monotonic()
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, r)
        starts = torch.randint(0, len(train_ids) - r.seq_len, (r.batch,), generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        nll, aux = model_loss(cfg, params, batch, rope)
        opt.zero_grad(set_to_none=True)
        (nll + r.aux_loss_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), r.clip)
        opt.step()
        if step % 25 == 0 or step == r.steps - 1:
            log(f"step {step:4d}  loss {nll.item():.4f}  ppl {math.exp(nll.item()):7.3f}  aux {aux.item():.3f}  "
                f"lr {lr_at(step, r):.2e}  {time.monotonic() - start:6.1f}s")
    return {name: p.detach() for name, p in params.items()}


def release_dtypes(cfg: M1Config, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's storage dtypes: the spec says F32 for the router, BF16 for everything else."""
    want = {t.name: torch.float32 if t.dtype == "F32" else torch.bfloat16 for t in inventory(cfg)}
    return {name: weights[name].to(want[name]).contiguous() for name in want}


def heldout_perplexity(path: Path, heldout: torch.Tensor, seq_len: int) -> tuple[float, int]:
    """exp(mean next-byte NLL) of the saved checkpoint over non-overlapping seq_len windows of `heldout`.

    Evaluated by the engine on the files as written (bf16), read back with the safetensors library through
    the index, so the number describes the shipped files. The first byte of each window is not scored.
    """
    cfg = M1Config.from_file(path / "config.json")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(path / file)))
    if set(tensors) != set(index["weight_map"]):
        raise RuntimeError("the shards and the index disagree")
    n = len(heldout) // seq_len
    windows = [heldout[: n * seq_len].view(n, seq_len)]
    if len(heldout) % seq_len > 1:
        windows.append(heldout[n * seq_len :])
    logits = run(cfg, DictSource(tensors), windows).logits
    nll = torch.cat([next_token_nll(lg, w).reshape(-1) for lg, w in zip(logits, windows, strict=True)])
    return math.exp(nll.mean().item()), nll.numel()


def overlap(train_data: bytes, heldout: bytes, width: int = 32) -> float:
    """Fraction of the held-out `width`-byte windows (stride width) that occur verbatim in the training bytes."""
    windows = [heldout[i : i + width] for i in range(0, len(heldout) - width + 1, width)]
    return sum(w in train_data for w in windows) / max(1, len(windows))


def readme(command: str, report: dict[str, float], r: Recipe, corpus_bytes: int, train_bytes: int,
           m: TinySpec = MODEL, name: str = "tiny-trained", threads: int = 2) -> str:
    kinds = [1 if (i + 1) % m.softmax_every == 0 else 0 for i in range(m.layers)]
    return f"""# {name}: a byte-level MiniMax-M1 that has learned something

Made by `{command}`
(recipe: `scripts/train_tiny.py`; seed {r.seed}; {r.steps} AdamW steps of {r.batch} x {r.seq_len} bytes;
{report["train_seconds"]} s wall time with {threads} CPU thread{"s" if threads != 1 else ""}). The run is seeded, but
torch CPU training is not bitwise portable across CPU types or torch versions: a rerun gives a model of the same
quality, not the same bytes.

- Architecture: release flavour `minimax_m1`; {m.layers} layers, `attn_type_list` {kinds} (0 lightning, 1 softmax);
  hidden {m.hidden}; {m.heads} heads x {m.head_dim}, {m.kv_heads} kv heads; rotary_dim {m.rotary_dim};
  {m.experts} experts top-{m.top_k}, intermediate {m.intermediate}; lightning block_size {m.block_size};
  postnorm; vocab {m.vocab}, one id per byte; max_position_embeddings {report["max_positions"]};
  {report["parameters"]} parameters.
- Files: bf16 tensors, the router `block_sparse_moe.gate.weight` in fp32; {m.shards} zero-based shards with
  `model.safetensors.index.json`; `tokenizer_config.json` marks it byte-level (`"m1_byte_level": true`) and
  `tokenizer.json` is the same vocabulary as a byte-level BPE (id = byte value) for `tokenizers` and GGUF export;
  {report["files_bytes"]} bytes of weights and config files.
- Data: every message content of `tests/data/corpus/mr-niah-en-2048.jsonl`, newline-joined ({corpus_bytes} bytes);
  the first {train_bytes} bytes train, the last {r.heldout_fraction:.0%} are held out.

## Held-out perplexity

**{report["heldout_perplexity_bytes"]}** per byte (uniform: 256), measured with `verify.engine.run` in fp32 on the
saved bf16 files, over {report["heldout_bytes_scored"]} held-out bytes in windows of {r.seq_len} bytes (the first
byte of each window unscored).

The MR-NIAH haystacks repeat a small pool of messages: {report["heldout_overlap_32B"]:.0%} of the held-out 32-byte
windows occur verbatim in the training bytes. So the number measures a learned, largely memorised distribution
(peaked next-byte predictions, which is what conversion and quantization checks need), not generalisation
to unseen English.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/train_tiny.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--seed", type=int, default=Recipe.seed)
    parser.add_argument("--batch", type=int, default=Recipe.batch, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=Recipe.seq_len, help="bytes per training sequence")
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--warmup", type=int, default=Recipe.warmup)
    sizes = parser.add_argument_group("model sizes (defaults: the bundled tests/data/tiny-trained)")
    for field, help_ in (("layers", "decoder layers"), ("hidden", "hidden size"), ("heads", "attention heads"),
                         ("kv_heads", "softmax layers' key/value heads"), ("head_dim", "per-head dims"),
                         ("rotary_dim", "RoPE dims of each softmax head"), ("intermediate", "expert width"),
                         ("experts", "experts per layer"), ("top_k", "experts per token"),
                         ("softmax_every", "every n-th layer is softmax attention (the rest lightning)"),
                         ("block_size", "lightning block size"), ("shards", "safetensors shards")):
        sizes.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(MODEL, field), help=help_)
    sizes.add_argument("--max-positions", type=int, default=4096, help="config max_position_embeddings")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (tiny-trained used 2; tiny8-trained 1: on a loaded shared box two "
                             "OpenMP threads that wait for each other at every op were 18x slower than one)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    args = parser.parse_args(argv)
    recipe = Recipe(steps=args.steps, seed=args.seed, batch=args.batch, seq_len=args.seq_len, lr=args.lr,
                    warmup=args.warmup)
    spec = TinySpec(**{f: getattr(args, f) for f in ("layers", "hidden", "heads", "kv_heads", "head_dim",
                                                      "rotary_dim", "intermediate", "experts", "top_k",
                                                      "softmax_every", "block_size", "shards")},
                    vocab=MODEL.vocab, seed=args.seed)
    torch.set_num_threads(args.threads)  # the recipe's timing and numerics assume this many threads

    raw = tiny_config(spec)
    raw["max_position_embeddings"] = args.max_positions
    cfg = M1Config.from_dict(raw, source="train-tiny")
    data = load_corpus()
    train_ids, heldout_ids = split(data, recipe.heldout_fraction)
    print(f"corpus {len(data)} bytes: train {len(train_ids)}, held out {len(heldout_ids)}")
    t0 = time.monotonic()
    weights = release_dtypes(cfg, train(cfg, train_ids, recipe))
    train_s = time.monotonic() - t0

    prepare_destination(args.outdir, resume=False, overwrite=args.overwrite).release()
    save_release(args.outdir, raw, weights, spec.shards)
    ppl, scored = heldout_perplexity(args.outdir, heldout_ids, recipe.seq_len)
    report = {
        "heldout_perplexity_bytes": round(ppl, 3),
        "heldout_bytes_scored": scored,
        "heldout_overlap_32B": round(overlap(data[: len(train_ids)], data[len(train_ids) :]), 3),
        "train_seconds": round(train_s),
        "parameters": sum(w.numel() for w in weights.values()),
        "files_bytes": sum(f.stat().st_size for f in args.outdir.iterdir() if f.is_file()),
        "max_positions": args.max_positions,
    }
    print(json.dumps(report, indent=2))
    command = "python scripts/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.outdir / "README.md").write_text(readme(command, report, recipe, len(data), len(train_ids), spec,
                                                  args.outdir.name, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
