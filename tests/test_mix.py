"""A measured mix needs a plan whose weights have different schemes: the planner takes a recipe (weight ->
scheme), and every reader (integrity, the loader, dequantizing convert, the GGUF reader, llama.cpp) reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m1.checkpoint import Checkpoint
from m1.planner import JobRequest, plan_checkpoint
from m1.run import RunOptions, execute
from m1.schemes import make_scheme

INT8 = ["model.layers.0.block_sparse_moe.experts.1.w2.weight", "model.layers.2.block_sparse_moe.experts.0.w1.weight"]
KEPT = "model.layers.3.block_sparse_moe.experts.3.w3.weight"


def quantize_mix(src: Path, dest: Path, request: JobRequest) -> Checkpoint:
    ckpt = Checkpoint.open(src)
    execute(plan_checkpoint(ckpt, request), dest, ckpt, RunOptions(show_progress=False))
    return Checkpoint.open(dest)


def test_a_bnb_mix_of_nf4_and_int8_is_read_by_every_reader(make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt("src", hidden=64, intermediate=128)
    recipe = {**dict.fromkeys(INT8, "int8"), KEPT: "keep"}
    out = quantize_mix(src, tmp_path / "mix", JobRequest("quantize", scheme=make_scheme("nf4"), recipe=recipe))
    assert f"{INT8[0][: -len('weight')]}SCB" in out.weight_map
    assert f"{INT8[0]}.absmax" not in out.weight_map and f"{KEPT}.absmax" not in out.weight_map
    qc = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["m1_mix"]["weights"] == dict.fromkeys(INT8, "int8")
    assert KEPT[: -len(".weight")] in qc["llm_int8_skip_modules"]
    assert run("verify", "integrity", tmp_path / "mix")[0] == 0
    code, _, err = run("convert", tmp_path / "mix", tmp_path / "deq", "--dtype", "fp32", "-q")
    assert code == 0, err
    original, deq = Checkpoint.open(src), Checkpoint.open(tmp_path / "deq")
    for name, tol in ((INT8[0], 0.02), ("model.layers.1.block_sparse_moe.experts.2.w1.weight", 0.25), (KEPT, 0)):
        ref = original.get(name).float()
        assert (deq.get(name) - ref).abs().max() <= tol * ref.abs().max(), name
    pytest.importorskip("transformers")
    from m1.quantize.loader import load_pretrained

    model = load_pretrained(str(tmp_path / "mix"), dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts.experts
    assert experts[1]["w2"].kind == "int8" and experts[1]["w1"].kind == "4bit"
    assert model.model.layers[3].mlp.experts.experts[3]["w3"].kind == "plain"


def test_a_gguf_mix_gives_each_stacked_tensor_its_type(tmp_path: Path, run) -> None:
    import gguf

    src = Path(__file__).parent / "data" / "tiny-trained"
    recipe = {"blk.0.ffn_down_exps.weight": "q8_0", "blk.3.ffn_up_exps.weight": "keep"}
    options = {"stem": "mix"}
    ckpt = Checkpoint.open(src)
    plan = plan_checkpoint(ckpt, JobRequest("quantize", "gguf", scheme=make_scheme("q4_0"), recipe=recipe,
                                            format_options=options))
    execute(plan, tmp_path / "mix.gguf", ckpt, RunOptions(show_progress=False))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "mix.gguf").tensors}
    assert types["blk.0.ffn_down_exps.weight"] == "Q8_0" and types["blk.3.ffn_up_exps.weight"] == "BF16"
    assert types["blk.1.ffn_down_exps.weight"] == "Q4_0"
    assert run("verify", "integrity", tmp_path / "mix.gguf")[0] == 0
    code, out, err = run("verify", "compare", src, tmp_path / "mix.gguf", "--tokens", "512", "--ctx", "128", "-q",
                         "--json")
    assert code == 0, err


def _on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.parametrize("fmt, candidates", [("release", "int8,keep"), ("gguf", "q4_0,q8_0")])
def test_a_budget_is_a_promise_about_every_byte_on_disk(make_tiny_ckpt, tmp_path: Path, run, fmt: str,
                                                        candidates: str) -> None:
    """Shards with their headers, the index, config and copied files, the manifest and the recipe: all of it
    fits the budget, and the budget is not wasted (under-used by at most two groups' steps between candidates)."""
    src = make_tiny_ckpt("six", layers=6, softmax_every=3, hidden=64, intermediate=128)
    fmt_args = ["--format", "gguf"] if fmt == "gguf" else []
    probe = str(int(0.9 * _on_disk(src)))  # below keeping every group: a mix, whose summary sizes the uniforms
    code, out, err = run("quantize", src, tmp_path / "probe", "--budget", probe, "--candidates", candidates,
                         "--dry-run", "--json", *fmt_args)
    assert code == 0, err
    uniform = json.loads(out)["mix"]["predicted"]["uniform"]
    small, big = sorted(u["bytes"] for u in uniform.values())
    step = (big - small) / 12  # 6 layers x 2 groups
    for i, budget in enumerate(small + (big - small) * f // 4 for f in (1, 2, 3)):
        folder = tmp_path / f"out{i}"
        dest = folder / "x.gguf" if fmt == "gguf" else folder
        folder.mkdir()
        code, _, err = run("quantize", src, dest, "--budget", str(budget), "--candidates", candidates, "-q",
                           *fmt_args)
        assert code == 0, err
        written = _on_disk(folder)
        assert written <= budget, (budget, written)
        assert budget - written <= 2 * step, (budget, written, step)
        recipe = json.loads(next(folder.glob("*m1-recipe.json")).read_text())
        assert len(set(recipe["groups"].values())) == 2  # a real mix at each budget
        assert recipe["disk_bytes"] >= written  # the bound it was planned with


def test_the_dry_run_of_a_mix_shows_the_mix_and_its_bytes_on_disk(make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt("six", layers=6, softmax_every=3, hidden=64, intermediate=128)
    # 45% of the bf16 source: the mix plans attention, embedding and head too, so the experts must mix below it
    args = ["quantize", src, tmp_path / "x.gguf", "--format", "gguf", "--candidates", "q4_0,q8_0", "--dry-run"]
    code, out, err = run(*args, "--budget", str(int(0.45 * _on_disk(src))))
    assert code == 0, err
    plan_part = out[out.index("plan for"):]
    scheme_line = next(x for x in plan_part.splitlines() if "scheme:" in x)
    assert "a mix" in scheme_line and "q4_0" in scheme_line and "q8_0" in scheme_line, scheme_line
    assert "q4_0 (ggml" in plan_part and "q8_0 (ggml" in plan_part
    mix_line = next(x for x in out.splitlines() if x.startswith("mix: "))
    assert "on disk" in mix_line
    code, out, err = run(*args, "--budget", str(int(0.45 * _on_disk(src))), "--json")
    assert code == 0, err
    found = json.loads(out)
    assert set(found["expert_schemes"]) == {"q4_0", "q8_0"} and sum(found["expert_schemes"].values()) == 18
    assert found["mix"]["disk_bytes"] <= int(0.45 * _on_disk(src))
