"""The measured mix plans every group (issue 19): the experts' w1+w3 and w2, each layer's attention, the embedding
and the head, each with the candidates its runtime accepts (GGUF: rows that split into the type's blocks; the
head at q4_k's bits or more unless --head-candidates asks)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"
MODEL = DATA / "tiny-trained"  # rows of 128: the 32-value types (mxfp4 4.25 bits, q4_0 4.5, q8_0 8.5)
CANDS = "mxfp4,q4_0,q8_0"


def _mix(run, dest: Path, *extra: str) -> dict:
    code, _, err = run("quantize", MODEL, dest, "--format", "gguf", "--scheme", "q4_0", "--budget", "0.8MB",
                       "--candidates", CANDS, "--corpus", "mr-niah", "--tokens", "256", "--ctx", "128", "-q", *extra)
    assert code == 0, err
    return json.loads(dest.with_name(dest.stem + ".m1-recipe.json").read_text())


@pytest.mark.slow  # about 11 s on the shared box: it measures on calibration text, writes and replays
def test_a_tight_gguf_mix_quantizes_attention_and_head_and_reads_back_as_the_in_memory_mix(tmp_path: Path,
                                                                                          run) -> None:
    import gguf

    from m1.schemes import make_scheme
    from m1.verify.sensitivity import MixSource
    from m1.verify.sources import CheckpointWeights

    dest = tmp_path / "mix.gguf"
    doc = _mix(run, dest)
    groups = doc["groups"]
    assert {"embed", "head", "0.attn", "3.attn"} <= set(groups) and doc["metric"] == "kl"
    assert groups["head"] in ("q4_0", "q8_0")  # never mxfp4 (4.25 bits, below q4_k) unless asked
    below = [g for g in groups if not g.endswith(("w13", "w2")) and groups[g] != "keep"]
    assert below  # some attention / embedding / head group below the source precision
    assert dest.stat().st_size <= 0.8e6
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dest).tensors}
    for name, ggml in doc["weights"].items():
        assert types[name] == ggml.upper(), name
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.ffn_gate_inp.weight"] == "F32"
    cands = {c: make_scheme(c) for c in CANDS.split(",")}
    written = CheckpointWeights.open(str(dest))
    in_memory = MixSource(CheckpointWeights.open(str(MODEL)), groups, cands)
    for layer in (0, 3):  # a lightning and the softmax layer
        a, b = written.layer_weights(layer), in_memory.layer_weights(layer)
        for k in b:
            if "self_attn" in k:
                assert torch.equal(a[k].float(), b[k].float()), k
    ga, gb = written.global_weights(), in_memory.global_weights()
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(ga[k].float(), gb[k].float()), k
    again = tmp_path / "again" / "mix.gguf"  # the same stem: the GGUF's name is the file's
    again.parent.mkdir()
    code, _, err = run("quantize", MODEL, again, "--format", "gguf", "--scheme", "q4_0",
                       "--recipe", tmp_path / "mix.m1-recipe.json", "-q")
    assert code == 0, err
    assert again.read_bytes() == dest.read_bytes()


def test_the_head_goes_below_q4_k_only_when_asked_and_pins_take_groups_out(tmp_path: Path, run) -> None:
    args = ["quantize", MODEL, tmp_path / "x.gguf", "--format", "gguf", "--scheme", "q4_0", "--budget", "0.7MB",
            "--candidates", CANDS, "--dry-run", "--json"]
    code, out, err = run(*args)
    assert code == 0, err
    mix = json.loads(out)["mix"]
    assert "mxfp4" not in mix["group_candidates"]["head"] and "mxfp4" in mix["group_candidates"]["0.attn"]
    assert any("head: not mxfp4" in n for n in mix["notes"])
    code, out, err = run(*args, "--head-candidates", "mxfp4,q4_0")
    assert code == 0, err
    assert json.loads(out)["mix"]["group_candidates"]["head"] == ["mxfp4", "q4_0"]
    code, out, err = run(*[("0.9MB" if a == "0.7MB" else a) for a in args], "--attn-type", "q8_0")
    assert code == 0, err
    mix = json.loads(out)["mix"]
    assert not any(g.endswith(".attn") for g in mix["groups"]) and "embed" in mix["groups"]
    code, _, err = run("quantize", MODEL, tmp_path / "y", "--budget", "2MB", "--head-candidates", "int8",
                       "--dry-run")
    assert code == 2 and "does not plan the head" in err, err


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from bench_convert import RELEASE, write_replica

    from m1.config import M1Config
    from m1.spec import inventory

    dest = tmp_path_factory.mktemp("m1") / "m1"
    config = json.loads((RELEASE / "config.json").read_text())
    index = json.loads((RELEASE / "model.safetensors.index.json").read_text())
    write_replica(dest, config, index["weight_map"], {t.name: t for t in inventory(M1Config.from_dict(config))},
                  fill=False)
    return dest


@pytest.mark.slow
def test_full_scale_gguf_mix_of_every_group(replica: Path, tmp_path: Path, run) -> None:
    """M1-40k's index (headers only: the prior). With q2_k..q8_0 the smallest GGUF is 150.01 GB (q2_k everywhere,
    the head at q4_k): 110 GB and 150 GB are refused saying so; 160 GB gives a mix of all 242 groups."""
    cands = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0"
    base = ["quantize", replica, tmp_path / "mix.gguf", "--format", "gguf", "--scheme", "q4_k", "--candidates",
            cands, "--dry-run"]
    for budget in ("110GB", "150GB"):
        code, _, err = run(*base, "--budget", budget)
        assert code == 2 and "150.01 GB on disk" in err, err
    started = time.perf_counter()
    code, out, err = run(*base, "--budget", "160GB", "--json")
    seconds = time.perf_counter() - started
    assert code == 0, err
    mix = json.loads(out)["mix"]
    assert len(mix["groups"]) == 242 and mix["disk_bytes"] <= 160 * 10**9
    assert mix["groups"]["head"] in ("q4_k", "q5_k", "q6_k", "q8_0")
    assert any(mix["groups"][f"{i}.attn"] != "q2_k" for i in range(80))
    print(f"\nfull scale GGUF 160GB: {mix['disk_bytes'] / 1e9:.2f} GB ({mix['bpw']:.3f} bpw) in {seconds:.1f} s")
    assert seconds < 120
