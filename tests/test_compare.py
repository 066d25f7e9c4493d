"""m1 verify compare / perplexity / logits: agreement metrics, per-layer error, stored reference, exit codes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m1.tiny import TinySpec, make_tiny
from m1.verify.metrics import RefPositions, kl_from_top, perplexity

TOKENS = ["--tokens", "1024", "--ctx", "128", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("cmp") / "ref"
    make_tiny(dest, TinySpec(layers=4, seed=3))
    return dest


def damaged_copy(src: Path, dest: Path, tensor: str, scale: float = 4.0) -> Path:
    """A copy of `src` where one tensor is perturbed with noise of `scale` times its own RMS."""
    shutil.copytree(src, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    shard = dest / index["weight_map"][tensor]
    tensors = load_file(shard)
    w = tensors[tensor].float()
    gen = torch.Generator().manual_seed(0)
    tensors[tensor] = (w + scale * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=gen)).to(torch.bfloat16)
    save_file(tensors, shard, metadata={"format": "pt"})
    return dest


def test_kl_with_full_top_k_is_exact_and_a_lower_bound_otherwise() -> None:
    gen = torch.Generator().manual_seed(1)
    ref_lp = torch.log_softmax(torch.randn(50, 40, generator=gen) * 2, -1)
    cand_lp = torch.log_softmax(ref_lp + 0.3 * torch.randn(50, 40, generator=gen), -1)
    targets = torch.randint(0, 40, (50,), generator=gen)
    exact = torch.nn.functional.kl_div(cand_lp, ref_lp, log_target=True, reduction="none").sum(-1)
    full = kl_from_top(RefPositions.from_logprobs(ref_lp, targets, 40), cand_lp)
    assert torch.allclose(full, exact, atol=1e-6)
    # Grouping the tail into one bucket can only lose information (log-sum inequality).
    top8 = kl_from_top(RefPositions.from_logprobs(ref_lp, targets, 8), cand_lp)
    assert bool((top8 <= exact + 1e-6).all()) and float(top8.mean()) > 0.5 * float(exact.mean())


def test_perplexity_and_standard_error_by_hand() -> None:
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    ppl, err = perplexity(nll)
    assert ppl == pytest.approx(math.exp(2.5))
    sd = math.sqrt(sum((x - 2.5) ** 2 for x in (1, 2, 3, 4)) / 3)
    assert err == pytest.approx(math.exp(2.5) * sd / 2)


def test_compare_with_itself_is_perfect(ref_model: Path, run, tmp_path: Path) -> None:
    code, out, err = run("verify", "compare", ref_model, ref_model, *TOKENS, "--json", "--report", tmp_path / "r")
    assert code == 0, err
    cand = json.loads(out)["candidates"][0]
    m = cand["metrics"]
    assert m["kl_mean"] == 0 and m["kl_max"] == 0 and m["top1"] == 1.0 and m["ppl_ratio"] == 1.0
    assert m["rms_dp"] == 0 and m["tokens"] == 8 * 127
    assert all(row["isolated_rel_l2"] == 0 and row["drift_cos"] == pytest.approx(1.0) for row in cand["layers"])
    for name in ("report.json", "report.md", "layers.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0


def test_damaged_expert_shows_in_exactly_its_layer(ref_model: Path, run, tmp_path: Path) -> None:
    bad = damaged_copy(ref_model, tmp_path / "bad", "model.layers.2.block_sparse_moe.experts.1.w2.weight")
    code, out, err = run("verify", "compare", ref_model, bad, *TOKENS, "--json")
    assert code == 0, err
    cand = json.loads(out)["candidates"][0]
    isolated = [row["isolated_rel_l2"] for row in cand["layers"]]
    assert isolated[2] > 1e-2
    assert [i for i, e in enumerate(isolated) if e > 0] == [2]
    drift = [row["drift_rel_l2"] for row in cand["layers"]]
    assert drift[0] == drift[1] == 0 and drift[3] > 0  # the damage carries forward, never backward
    assert cand["metrics"]["kl_mean"] > 0 and cand["metrics"]["top1"] < 1.0


def test_thresholds_set_the_exit_code(ref_model: Path, run, tmp_path: Path) -> None:
    bad = damaged_copy(ref_model, tmp_path / "bad", "lm_head.weight", scale=2.0)
    code, out, err = run("verify", "compare", ref_model, bad, *TOKENS, "--no-layers", "--max-kl", "1e-6")
    assert code == 1 and "FAIL" in out and "KL mean" in out
    code, _, _ = run("verify", "compare", ref_model, bad, *TOKENS, "--no-layers", "--max-kl", "100",
                     "--min-top1", "0", "--max-ppl-ratio", "100")
    assert code == 0


def test_stored_reference_gives_the_same_agreement(ref_model: Path, run, tmp_path: Path) -> None:
    bad = damaged_copy(ref_model, tmp_path / "bad", "model.layers.1.self_attn.output_gate.weight", scale=0.5)
    saved = tmp_path / "ref-logits.safetensors"
    code, _, err = run("verify", "logits", ref_model, "--save", saved, *TOKENS)
    assert code == 0, err
    code, live, _ = run("verify", "compare", ref_model, bad, *TOKENS, "--json", "--no-layers")
    code2, stored, _ = run("verify", "compare", "--ref-logits", saved, bad, "--device", "cpu", "-q", "--json")
    assert code == code2 == 0
    a, b = json.loads(live)["candidates"][0]["metrics"], json.loads(stored)["candidates"][0]["metrics"]
    for key in ("tokens", "ppl_ref", "ppl_cand", "kl_mean", "kl_p99", "top1", "rms_dp"):
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    with open(saved, "rb") as f:
        assert f.read(8)  # a real safetensors file; its tensors are read back by the library in load_reference


def test_token_ids_input_matches_text(ref_model: Path, run, tmp_path: Path) -> None:
    from m1.verify.text import corpus_text

    ids = list(corpus_text("mr-niah").encode("utf-8"))[:1024]
    path = tmp_path / "ids.json"
    path.write_text(json.dumps(ids))
    _, a, _ = run("verify", "perplexity", ref_model, *TOKENS, "--json")
    _, b, _ = run("verify", "perplexity", ref_model, "--token-ids", path, *TOKENS, "--json")
    assert json.loads(a)["ppl"] == pytest.approx(json.loads(b)["ppl"], rel=1e-9)


def test_perplexity_matches_transformers(tmp_path: Path, run) -> None:
    """Independent check: transformers' own loss on the hf conversion (full-dim RoPE, so rotary == head_dim)."""
    transformers = pytest.importorskip("transformers")
    src = tmp_path / "full-rope"
    make_tiny(src, TinySpec(layers=4, rotary_dim=16, seed=5))
    hf = tmp_path / "hf"
    assert run("convert", src, hf, "--to", "hf", "--dtype", "fp32", "-q")[0] == 0
    code, out, err = run("verify", "perplexity", hf, "--tokens", "512", "--ctx", "128", "--device", "cpu", "-q",
                         "--json")
    assert code == 0, err
    ours = json.loads(out)
    from m1.verify.text import corpus_text

    ids = torch.tensor(list(corpus_text("mr-niah").encode("utf-8"))[:512]).reshape(4, 128)
    model = transformers.MiniMaxForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss for row in ids]
    theirs = math.exp(float(torch.stack(losses).mean()))
    assert ours["tokens_scored"] == 4 * 127
    assert ours["ppl"] == pytest.approx(theirs, rel=1e-4)


def test_second_half_scores_half_the_tokens(ref_model: Path, run) -> None:
    code, out, _ = run("verify", "perplexity", ref_model, *TOKENS, "--second-half", "--json")
    assert code == 0 and json.loads(out)["tokens_scored"] == 8 * 63


def test_bad_inputs(ref_model: Path, run, tmp_path: Path) -> None:
    code, _, err = run("verify", "compare", ref_model, *TOKENS)
    assert code == 2 and err.count("\n") == 1
    code, _, err = run("verify", "compare", "--ref-logits", tmp_path / "nope.safetensors", ref_model, "-q")
    assert code == 2 and "m1 verify logits" in err
    other = tmp_path / "other"
    make_tiny(other, TinySpec(layers=2))
    code, _, err = run("verify", "compare", ref_model, other, *TOKENS)
    assert code == 2 and "not the same model" in err
    code, _, err = run("verify", "perplexity", ref_model, "--ctx", "100000", "--device", "cpu", "-q")
    assert code == 2 and "--ctx" in err
    code, _, err = run("verify", "perplexity", ref_model, "--device", "cuda", "-q")
    if not torch.cuda.is_available():
        assert code == 2 and "cuda" in err
