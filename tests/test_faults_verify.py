"""Verify never passes what is broken (issue 9): non-finite logits are always a finding, a stored reference
is refused for another model, options that cannot apply are usage errors, and bad numbers or paths give
one line, never a traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

T = ["--tokens", "512", "--ctx", "128", "--device", "cpu", "-q"]
INDEX = "model.safetensors.index.json"


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def nan_copy(src: Path, dest: Path, tensor: str, everywhere: bool = True) -> Path:
    """A copy of `src` with NaN written into `tensor` (all of it, or its first element)."""
    shutil.copytree(src, dest)
    shard = dest / json.loads((dest / INDEX).read_text())["weight_map"][tensor]
    tensors = load_file(shard)
    w = tensors[tensor].clone()
    if everywhere:
        w.fill_(float("nan"))
    else:
        w.view(-1)[0] = float("nan")
    tensors[tensor] = w
    save_file(tensors, shard, metadata={"format": "pt"})
    return dest


@pytest.fixture
def saved(tiny: Path, run, tmp_path: Path) -> Path:
    path = tmp_path / "ref-logits.safetensors"
    code, _, err = run("verify", "logits", tiny, "--save", path, *T)
    assert code == 0, err
    return path


NAN_CASES = {"lm_head": ("lm_head.weight", True),
             "one_weight_of_layer_1": ("model.layers.1.self_attn.out_proj.weight", False)}


# ---- non-finite logits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", NAN_CASES, ids=str)
@pytest.mark.parametrize("thresholds", [[], ["--max-kl", "100", "--min-top1", "0", "--max-ppl-ratio", "100"]],
                         ids=["no-thresholds", "lenient-thresholds"])
def test_nan_candidate_never_passes_compare(tiny: Path, tmp_path: Path, run, case, thresholds) -> None:
    bad = nan_copy(tiny, tmp_path / "nan", *NAN_CASES[case])
    code, out, err = run("verify", "compare", tiny, bad, *T, "--no-layers", *thresholds)
    assert code == 1, out + err
    assert f"FAIL {bad}: NaN or infinite logits at" in out and "| NO |" in out
    code, out, err = run("verify", "compare", tiny, bad, *T, "--no-layers", "--json", *thresholds)
    assert code == 1
    result = json.loads(out)
    assert result["passed"] is False and result["candidates"][0]["passed"] is False
    assert result["candidates"][0]["metrics"]["nonfinite"] > 0


def test_nan_candidate_never_passes_against_a_saved_reference(tiny: Path, tmp_path: Path, saved: Path, run) -> None:
    bad = nan_copy(tiny, tmp_path / "nan", "lm_head.weight")
    code, out, err = run("verify", "compare", "--ref-logits", saved, bad, "--device", "cpu", "-q")
    assert code == 1, out + err
    assert "NaN or infinite logits" in out
    code, out, err = run("verify", "compare", "--ref-logits", saved, bad, "--device", "cpu", "-q",
                         "--report", tmp_path / "report")
    assert code == 1
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] is False
    assert "NaN or infinite logits" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.parametrize("case", NAN_CASES, ids=str)
def test_perplexity_of_nan_exits_1(tiny: Path, tmp_path: Path, run, case) -> None:
    bad = nan_copy(tiny, tmp_path / "nan", *NAN_CASES[case])
    code, out, err = run("verify", "perplexity", bad, *T)
    assert code == 1
    line = one_error(err)
    assert str(bad) in line and "perplexity is nan" in line and "NaN or infinite logits" in line
    code, out, err = run("verify", "perplexity", bad, *T, "--json")
    assert code == 1 and json.loads(out)["nonfinite_positions"] > 0
    code, out, err = run("verify", "perplexity", tiny, *T)  # the sound model still passes
    assert code == 0, err


def test_nan_reference_is_refused(tiny: Path, tmp_path: Path, run) -> None:
    bad = nan_copy(tiny, tmp_path / "nan", "lm_head.weight")
    code, out, err = run("verify", "compare", bad, tiny, *T)
    assert code == 1 and "the reference gives NaN or infinite logits" in one_error(err) and str(bad) in err
    dest = tmp_path / "nan-logits.safetensors"
    code, out, err = run("verify", "logits", bad, "--save", dest, *T)
    assert code == 1 and "the reference gives NaN or infinite logits" in one_error(err)
    assert not dest.exists() and not list(tmp_path.glob(".nan-logits*"))


def test_stored_reference_with_nan_is_refused(saved: Path, tiny: Path, run) -> None:
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["target_logprob"][3] = float("nan")
    save_file(tensors, str(saved), metadata=meta)
    code, out, err = run("verify", "compare", "--ref-logits", saved, tiny, "--device", "cpu", "-q")
    assert code == 1
    line = one_error(err)
    assert str(saved) in line and "target_logprob" in line and "NaN" in line


def test_perplexity_overflow_is_inf_not_a_crash() -> None:
    from m1.verify.metrics import perplexity

    assert perplexity(torch.tensor([800.0, 900.0]))[0] == math.inf
    assert math.isnan(perplexity(torch.tensor([1.0, float("nan")]))[0])


# ---- a stored reference from another model -------------------------------------------------------------------
def test_saved_reference_from_another_vocab_is_refused(tiny: Path, make_tiny_ckpt, saved: Path, tmp_path: Path,
                                                       run) -> None:
    big = make_tiny_ckpt("big", vocab=512)
    code, out, err = run("verify", "compare", tiny, big, *T)  # the REF CAND path refuses it ...
    assert code == 2 and "vocab_size 512 vs 256" in one_error(err)
    code, out, err = run("verify", "compare", "--ref-logits", saved, big, "--device", "cpu", "-q")  # ... and this
    line = one_error(err)
    assert code == 2 and str(big) in line and str(saved) in line and "vocab_size 512 vs 256" in line
    big_saved = tmp_path / "big-logits.safetensors"
    assert run("verify", "logits", big, "--save", big_saved, *T)[0] == 0
    code, out, err = run("verify", "compare", "--ref-logits", big_saved, tiny, "--device", "cpu", "-q")
    assert code == 2 and "vocab_size 256 vs 512" in one_error(err)


def test_reference_without_a_model_signature_is_checked_by_its_ids(tiny: Path, make_tiny_ckpt, tmp_path: Path,
                                                                   run) -> None:
    """A file from before the signature was stored (version 1): ids past the candidate's vocab refuse it."""
    big = make_tiny_ckpt("big", vocab=512)
    path = tmp_path / "old.safetensors"
    assert run("verify", "logits", big, "--save", path, *T)[0] == 0
    with safe_open(str(path), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                   "layer_kinds")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={**meta, "m1_ref_logits_version": "1"})
    code, out, err = run("verify", "compare", "--ref-logits", path, tiny, "--device", "cpu", "-q")
    assert code == 2 and "outside vocab_size 256" in one_error(err)


# ---- options that cannot apply with --ref-logits -------------------------------------------------------------
@pytest.mark.parametrize("extra", [["--ctx", "64"], ["--tokens", "100"], ["--corpus", "mr-niah-10240"],
                                   ["--text", "TEXT"], ["--token-ids", "IDS"], ["--second-half"], ["--top-k", "8"]],
                         ids=lambda e: e[0])
def test_options_ignored_with_ref_logits_are_usage_errors(tiny: Path, saved: Path, tmp_path: Path, run,
                                                          extra) -> None:
    (tmp_path / "t.txt").write_text("some other text " * 100)
    (tmp_path / "ids.json").write_text(json.dumps(list(range(200)) * 4))
    extra = [{"TEXT": tmp_path / "t.txt", "IDS": tmp_path / "ids.json"}.get(e, e) for e in extra]
    code, out, err = run("verify", "compare", "--ref-logits", saved, tiny, "--device", "cpu", "-q", *extra)
    assert code == 2
    line = one_error(err)
    assert extra[0] in line and "does not apply with --ref-logits" in line and str(saved) in line


def test_options_that_agree_with_the_saved_reference_are_accepted(tiny: Path, saved: Path, run) -> None:
    code, out, err = run("verify", "compare", "--ref-logits", saved, tiny, "--device", "cpu", "-q",
                         "--ctx", "128", "--tokens", "512", "--corpus", "mr-niah", "--top-k", "256", "--no-layers")
    assert code == 0, err


# ---- bad numbers and paths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("ids", [[1, 2, 300] * 200, [1, 2, 10**20] * 200, "[1, 2, 1e20]", [1, True, 2] * 200,
                                 [1, -2, 3] * 200], ids=["out-of-vocab", "huge-int", "huge-float", "bool", "negative"])
@pytest.mark.parametrize("command", ["perplexity", "compare", "logits"])
def test_bad_token_ids_are_one_line(tiny: Path, tmp_path: Path, run, ids, command) -> None:
    path = tmp_path / "ids.json"
    path.write_text(ids if isinstance(ids, str) else json.dumps(ids))
    models = {"perplexity": [tiny], "compare": [tiny, tiny], "logits": [tiny, "--save", tmp_path / "r.safetensors"]}
    code, out, err = run("verify", command, *models[command], "--token-ids", path, *T)
    assert code == 2
    line = one_error(err)
    assert str(path) in line
    if ids == [1, 2, 300] * 200:
        assert "token id 300 at position 2" in line and "vocab_size 256" in line
    assert not (tmp_path / "r.safetensors").exists()


BAD_NUMBERS = [["--batch-size", "0"], ["--batch-size", "-1"], ["--top-k", "0"], ["--tokens", "0"], ["--tokens", "-5"]]


@pytest.mark.parametrize(("command", "option"), [(c, o) for c in ("perplexity", "compare", "logits")
                                                 for o in BAD_NUMBERS if not (c == "perplexity" and o[0] == "--top-k")],
                         ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_bad_numbers_are_usage_errors(tiny: Path, tmp_path: Path, run, command, option) -> None:
    models = {"perplexity": [tiny], "compare": [tiny, tiny], "logits": [tiny, "--save", tmp_path / "r.safetensors"]}
    code, out, err = run("verify", command, *models[command], *T, *option)
    assert code == 2
    assert option[0] in one_error(err)


def test_logits_save_to_a_folder_or_nowhere(tiny: Path, tmp_path: Path, run) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    code, out, err = run("verify", "logits", tiny, "--save", folder, *T)
    assert code == 2 and str(folder) in one_error(err) and "folder" in err
    assert folder.is_dir() and not list(folder.iterdir()) and not list(tmp_path.glob(".out*"))
    code, out, err = run("verify", "logits", tiny, "--save", tmp_path / "no" / "such" / "r.safetensors", *T)
    assert code == 2 and "does not exist" in one_error(err)
    assert not (tmp_path / "no").exists()


def test_report_that_is_a_file_is_a_usage_error(tiny: Path, tmp_path: Path, run) -> None:
    report = tmp_path / "report.txt"
    report.write_text("keep me")
    code, out, err = run("verify", "compare", tiny, tiny, *T, "--report", report)
    assert code == 2 and str(report) in one_error(err)
    assert report.read_text() == "keep me"


@pytest.mark.parametrize("command", ["perplexity", "compare", "logits"])
def test_a_config_the_engine_cannot_run_is_one_line(tiny: Path, tmp_path: Path, run, command) -> None:
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "shared_intermediate_size": 8}))
    models = {"perplexity": [tiny], "compare": [tiny, tiny], "logits": [tiny, "--save", tmp_path / "r.safetensors"]}
    code, out, err = run("verify", command, *models[command], *T)
    assert code == 1
    line = one_error(err)
    assert str(tiny / "config.json") in line and "shared_intermediate_size" in line
    assert not (tmp_path / "r.safetensors").exists()
