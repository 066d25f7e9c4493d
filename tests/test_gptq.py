"""GPTQ rounding for the bitsandbytes schemes (m1.schemes.gptq, m1.schemes.bnb_gptq, m1.quantize.hessian).

Every GPTQ tensor is decoded by bitsandbytes' own dequantizer and must equal the values GPTQ intended exactly;
GPTQ's layer error must beat round-to-nearest's on a calibrated layer; the Hessians' diagonals over the routed
token counts must equal the imatrix `m1 verify imatrix` writes for the same text; a GPTQ nf4 hf checkpoint loads
in transformers (m1.load_pretrained: transformers' model, bitsandbytes' decoder) with the engine's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from calibrated import calibrated_layer

from m1.cli import run_cli
from m1.schemes.bnb import BnbScheme
from m1.schemes.bnb_codec import dequantize_pieces, quantize_weight
from m1.schemes.bnb_gptq import quantize_gptq
from m1.schemes.gptq import Rounding, layer_error

TRAINED = Path(__file__).parent / "data" / "tiny-trained"
CPU = torch.device("cpu")


@pytest.mark.parametrize(("name", "double_quant", "shape"), [
    ("nf4", True, (48, 128)), ("nf4", False, (48, 128)), ("fp4", True, (48, 128)), ("int8", None, (48, 128)),
    ("nf4", True, (24, 40)),  # rows of 40: bitsandbytes' blocks of 64 straddle rows
])
def test_bitsandbytes_decodes_exactly_what_gptq_intended(name: str, double_quant: bool | None,
                                                         shape: tuple[int, int]) -> None:
    scheme = BnbScheme.make(name, double_quant=double_quant, rounding=Rounding("gptq"))
    w, h = calibrated_layer(*shape)
    pieces, intended = quantize_gptq(scheme, w, h, scheme.rounding, CPU)
    decoded = dequantize_pieces(dict(pieces), "cpu", scheme=scheme, shape=shape)  # bitsandbytes' dequantizer
    assert decoded.dtype == intended.dtype
    assert torch.equal(decoded, intended)
    rtn = dict(quantize_weight(scheme, w, CPU))
    for suffix, t in pieces:  # the scales and state are bitsandbytes' own; only the codes differ
        if suffix != "weight":
            assert torch.equal(t, rtn[suffix]), suffix
    assert not torch.equal(dict(pieces)["weight"], rtn["weight"])


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_gptq_layer_error_is_below_round_to_nearest(name: str) -> None:
    scheme = BnbScheme.make(name, rounding=Rounding("gptq"))
    w, h = calibrated_layer(64, 128, seed=1)
    pieces, _ = quantize_gptq(scheme, w, h, scheme.rounding, CPU)
    ours = dequantize_pieces(dict(pieces), "cpu", scheme=scheme, shape=(64, 128))
    rtn = dequantize_pieces(dict(quantize_weight(scheme, w, CPU)), "cpu", scheme=scheme, shape=(64, 128))
    # ||WX - QX||^2 = tr((W-Q) H (W-Q)^T), checked once against X itself below
    assert layer_error(w, ours, h) < 0.8 * layer_error(w, rtn, h)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.3 + torch.randn(1024, 128,
                                                                                                    generator=g)
    direct = float(((x @ w.float().T - x @ ours.float().T) ** 2).sum())
    assert abs(direct - layer_error(w, ours, x.T @ x)) < 1e-3 * direct


def test_hessian_diagonal_over_counts_is_the_imatrix(tmp_path: Path) -> None:
    from m1.checkpoint import Checkpoint
    from m1.gguf.imatrix import read_imatrix
    from m1.quantize.hessian import run_pass
    from m1.schemes.gptq import load_hessian
    from m1.verify.sources import CheckpointWeights
    from m1.verify.text import read_windows

    out = tmp_path / "imatrix.gguf"
    assert run_cli(["verify", "imatrix", str(TRAINED), str(out), "--tokens", "1024", "--ctx", "128", "--quiet"]) == 0
    ckpt = Checkpoint.open(TRAINED)
    cfg = ckpt.config
    windows, _ = read_windows(str(TRAINED), None, "mr-niah", None, 128, 1024, False, cfg.vocab_size, holdout=False)
    done = run_pass(cfg, CheckpointWeights(ckpt), windows, tmp_path / "h", "k")
    imatrix = read_imatrix(out)
    for layer in range(cfg.num_hidden_layers):
        for kind, w in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            entry = imatrix.entries[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert entry.counts.tolist() == done.tokens[layer]
            for e in range(cfg.num_local_experts):
                h, n = load_hessian(tmp_path / "h", f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight")
                assert n == entry.counts[e] > 0 and h is not None
                np.testing.assert_allclose(torch.diagonal(h).double().numpy() / n, entry.sums[e] / n, rtol=1e-5)
                assert torch.allclose(h, h.T)


@pytest.fixture(scope="module")
def gptq_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gptq")
    assert run_cli(["quantize", str(TRAINED), str(root / "hf"), "--scheme", "nf4", "--rounding", "gptq", "--format",
                    "hf", "--tokens", "1024", "--ctx", "128", "--quiet"]) == 0
    return root / "hf"


@pytest.mark.slow  # ~10 s: a whole job
def test_the_job_records_the_rounding_and_its_calibration(gptq_hf: Path) -> None:
    qc = json.loads((gptq_hf / "config.json").read_text())["quantization_config"]
    assert qc["m1_rounding"]["method"] == "gptq" and qc["m1_rounding"]["calibration_tokens"] == 1024
    assert "token ids sha256" in qc["m1_rounding"]["calibration"]
    record = json.loads((gptq_hf / "m1-rounding.json").read_text())
    assert sum(record["routed_tokens"]["0"]) == 1024 * 2  # top-2 routing
    manifest = json.loads((gptq_hf / "m1-manifest.json").read_text())
    assert manifest["job"]["rounding"]["method"] == "gptq"
    assert "m1-rounding.json" in json.dumps(manifest)
    assert not (gptq_hf.parent / f".{gptq_hf.name}.m1-hessians").exists()  # removed once the job finished


def test_plan_fingerprint_includes_rounding_and_calibration(tmp_path: Path) -> None:
    from m1.quantize.job import quantize

    def fp(**kw: object) -> str:
        opts = {"calibration_tokens": 512, "calibration_ctx": 128, **kw}
        return quantize(str(TRAINED), tmp_path / "x", scheme="nf4", dry_run=True, **opts).plan.fingerprint()

    base = fp(rounding="gptq")
    assert base == fp(rounding="gptq")
    assert len({base, fp(), fp(rounding="gptq", damp=0.05), fp(rounding="gptq", act_order=False),
                fp(rounding="gptq", calibration="mr-niah", calibration_tokens=1024)}) == 5


@pytest.mark.slow  # three jobs
def test_resume_reuses_the_hessian_pass_and_finishes_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    from m1.quantize import hessian
    from m1.schemes import bnb_gptq

    def args(dest: Path) -> list[str]:
        return ["quantize", str(TRAINED), str(dest), "--scheme", "nf4", "--rounding", "gptq", "--tokens", "512",
                "--ctx", "128", "--shard-size", "200KB", "--quiet"]

    assert run_cli(args(tmp_path / "whole")) == 0
    passes, rounded = [], []
    real_pass, real_round = hessian.run_pass, bnb_gptq.quantize_gptq

    def counted_pass(*a: object, **k: object) -> object:
        passes.append(1)
        return real_pass(*a, **k)

    def failing_round(*a: object, **k: object) -> object:
        rounded.append(1)
        if len(rounded) == 30:
            raise KeyboardInterrupt  # the job stops in the middle of the experts
        return real_round(*a, **k)

    monkeypatch.setattr(hessian, "run_pass", counted_pass)
    monkeypatch.setattr(bnb_gptq, "quantize_gptq", failing_round)
    dest = tmp_path / "out"
    assert run_cli(args(dest)) != 0  # "interrupted; run the same command with --resume to finish"
    assert (hessian.hessian_folder(dest) / hessian.META).is_file()
    monkeypatch.setattr(bnb_gptq, "quantize_gptq", real_round)
    assert run_cli(args(dest) + ["--resume"]) == 0
    assert len(passes) == 1  # the finished Hessian pass was reused
    whole = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert whole == sorted(p.name for p in dest.glob("*.safetensors")) and len(whole) > 1
    for name in whole:
        assert (dest / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_rounding_options_need_gptq_and_a_scheme_that_takes_it(tmp_path: Path, run) -> None:  # noqa: ANN001
    assert run_cli(["quantize", str(TRAINED), str(tmp_path / "a"), "--damp", "0.1", "--quiet"]) != 0
    for scheme, fmt in (("iq4_nl", "gguf"), ("fp8-dynamic", "compressed-tensors"), ("fp8", "hf")):
        code, _, err = run("quantize", TRAINED, tmp_path / "b", "--scheme", scheme, "--format", fmt, "--rounding",
                           "gptq", "--dry-run")
        assert code == 2 and f"--rounding gptq does not apply to {scheme}" in err, err  # not an internal error
        assert "nf4, fp4, int8" in err and "q4_k" in err and "w4a16" in err, err
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


@pytest.mark.slow
def test_gptq_nf4_hf_loads_in_transformers_with_the_engines_logits(tmp_path: Path) -> None:
    import m1
    from m1.tiny import TinySpec, make_tiny
    from m1.verify.engine import run
    from m1.verify.sources import CheckpointWeights

    # rotary over the whole head: the one case where transformers' MiniMax computes what the release computes
    make_tiny(tmp_path / "src", TinySpec(intermediate=128, rotary_dim=16))
    gptq_hf = tmp_path / "hf"
    assert run_cli(["quantize", str(tmp_path / "src"), str(gptq_hf), "--scheme", "nf4", "--rounding", "gptq",
                    "--format", "hf", "--tokens", "512", "--ctx", "64", "--min-tokens", "1", "--quiet"]) == 0
    assert json.loads((gptq_hf / "config.json").read_text())["quantization_config"]["m1_rounding"]["method"] == "gptq"

    model = m1.load_pretrained(str(gptq_hf), dtype=torch.float32)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = model(input_ids=tokens, use_cache=False).logits.float()
    ours = run(CheckpointWeights.open(str(gptq_hf)).config, CheckpointWeights.open(str(gptq_hf)), [tokens]).logits
    ours = torch.cat([o.float() for o in ours]) if isinstance(ours, list) else ours.float()
    assert theirs.std() > 0.5
    assert (theirs - ours.reshape(theirs.shape)).abs().max() < 1e-3


TRANSFORMERS_4 = ("transformers==4.57.1", "huggingface-hub==0.36.0", "tokenizers==0.22.1")  # 4.57's own pins
LOAD_IN_TRANSFORMERS_4 = '''
import json, sys, torch, transformers
from bitsandbytes.nn import Linear4bit
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
layer = model.model.layers[0]
kinds = {"version": transformers.__version__, "expert": type(layer.block_sparse_moe.experts[0].w1).__name__,
         "experts_4bit": all(isinstance(m, Linear4bit) for n, m in model.named_modules() if ".experts." in n
                             and n.endswith((".w1", ".w2", ".w3"))),
         "others_4bit": [n for n, m in model.named_modules() if isinstance(m, Linear4bit) and ".experts." not in n]}
import bitsandbytes.functional as F
experts = {f"{n}.weight": F.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
           for n, m in model.named_modules() if isinstance(m, Linear4bit)}  # bitsandbytes' decoder, in 4.57
tokens = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save({"logits": model(input_ids=tokens, use_cache=False).logits.float(), "experts": experts}, sys.argv[3])
print(json.dumps(kinds))
'''


def transformers_4_python() -> Path:
    """A Python with stock transformers 4.57 (a venv under build/ beside this one's packages, made once); the
    test is skipped where the package registry cannot be reached."""
    import subprocess
    import sys
    import sysconfig

    venv = Path(__file__).parents[1] / "build" / "transformers-4.57"
    python = venv / "bin" / "python"
    ok = venv / ".installed"
    if not ok.is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
        (site / "m1-test-base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, bitsandbytes, ...
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *TRANSFORMERS_4],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot install {' '.join(TRANSFORMERS_4)}: {proc.stderr.strip()[-300:]}")
        ok.write_text("\n".join(TRANSFORMERS_4) + "\n")
    return python


@pytest.mark.slow
def test_gptq_nf4_hf_loads_in_stock_transformers_4_with_the_engines_logits(tmp_path: Path) -> None:
    """Stock transformers 4.57 (its own MiniMax, bitsandbytes' Linear4bit for every expert and nothing else, no
    m1 code) loads a GPTQ nf4 hf checkpoint: bitsandbytes decodes its experts there to m1's dequantization bit
    for bit, and it runs with the logits of m1's engine within bf16 arithmetic (bitsandbytes' CPU 4-bit matmul
    computes in the quant state's bf16; the dense checkpoint agrees with the engine to 3e-6 in 4.57)."""
    import subprocess

    from m1.tiny import TinySpec, make_tiny
    from m1.verify.engine import run
    from m1.verify.sources import CheckpointWeights

    python = transformers_4_python()
    make_tiny(tmp_path / "src", TinySpec(intermediate=128, rotary_dim=16))
    gptq_hf = tmp_path / "hf"
    assert run_cli(["quantize", str(tmp_path / "src"), str(gptq_hf), "--scheme", "nf4", "--rounding", "gptq",
                    "--format", "hf", "--tokens", "512", "--ctx", "64", "--min-tokens", "1", "--quiet"]) == 0
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, tmp_path / "tokens.pt")
    (tmp_path / "load.py").write_text(LOAD_IN_TRANSFORMERS_4)
    proc = subprocess.run([str(python), str(tmp_path / "load.py"), str(gptq_hf), str(tmp_path / "tokens.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = json.loads(proc.stdout.strip().splitlines()[-1])
    assert kinds["version"] == "4.57.1" and kinds["expert"] == "Linear4bit" and kinds["experts_4bit"], kinds
    assert kinds["others_4bit"] == [], kinds
    out = torch.load(tmp_path / "logits.pt", weights_only=True)
    theirs, experts = out["logits"], out["experts"]
    from m1.checkpoint import Checkpoint
    from m1.quantized import dequantize_weight

    ckpt = Checkpoint.open(str(gptq_hf))
    assert len(experts) == 4 * 4 * 3  # layers x experts x w1-w3
    for name, value in experts.items():  # the weights transformers 4.57 runs are m1's dequantization
        assert torch.equal(value, dequantize_weight(ckpt, name).float()), name
    weights = CheckpointWeights.open(str(gptq_hf))
    ours = run(weights.config, weights, [tokens]).logits
    ours = torch.cat([o.float() for o in ours]) if isinstance(ours, list) else ours.float()
    ours = ours.reshape(theirs.shape)
    assert theirs.std() > 0.5
    assert (theirs - ours).abs().max() < 0.05 * theirs.std()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() > 0.95


@pytest.mark.slow
def test_a_measured_mix_written_with_gptq_is_the_same_bytes_and_closer_to_its_source(tmp_path: Path, run) -> None:  # noqa: ANN001
    """--budget with --rounding gptq: the mix is allocated on the schemes' own rounding and written with GPTQ's
    for every scheme of it (nf4 and int8 here): the same groups and bytes, a lower KL in m1's engine."""
    args = ["--budget", "1.45MB", "--candidates", "nf4,int8", "--tokens", "2048", "-q"]
    assert run("quantize", TRAINED, tmp_path / "nearest", *args)[0] == 0
    code, _, err = run("quantize", TRAINED, tmp_path / "gptq", *args, "--rounding", "gptq")
    assert code == 0, err
    recipes = [json.loads((tmp_path / d / "m1-recipe.json").read_text())["weights"] for d in ("nearest", "gptq")]
    assert recipes[0] == recipes[1] and len(set(recipes[0].values())) == 2
    shards = sorted((tmp_path / "gptq").glob("*.safetensors"))
    assert [p.stat().st_size for p in shards] == [p.stat().st_size for p in sorted((tmp_path / "nearest").glob(
        "*.safetensors"))]
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["m1_rounding"]["method"] == "gptq" and qc["m1_rounding"]["schemes"] == ["int8", "nf4"]
    recipe = json.loads((tmp_path / "gptq" / "m1-recipe.json").read_text())
    assert recipe["rounding"] == qc["m1_rounding"]
    code, out, err = run("verify", "compare", TRAINED, tmp_path / "nearest", tmp_path / "gptq", "--tokens", "4096",
                         "--json", "-q")
    assert code == 0, err
    kl = {Path(c["name"]).name: c["metrics"]["kl_mean"] for c in json.loads(out)["candidates"]}
    assert kl["gptq"] < 0.8 * kl["nearest"], kl


def test_gptq_with_a_budget_needs_a_candidate_that_takes_it(tmp_path: Path, run) -> None:  # noqa: ANN001
    from m1.tiny import TinySpec, make_tiny

    make_tiny(tmp_path / "k", TinySpec(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, rotary_dim=32,
                                       intermediate=512, experts=2, softmax_every=2))
    code, _, err = run("quantize", tmp_path / "k", tmp_path / "x.gguf", "--format", "gguf", "--budget", "5bpw",
                       "--candidates", "q4_0,q8_0", "--rounding", "gptq", "--dry-run")
    assert code == 2 and "no scheme of this mix takes it" in err and len(err.strip().splitlines()) == 1, err
