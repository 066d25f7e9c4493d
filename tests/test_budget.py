"""Measured mixed precision under a size budget (`m1 quantize --budget`): sensitivity, allocation, recipes.

On both trained tiny M1s (tests/data/tiny-trained, 4 layers, and tiny8-trained, 8 layers; see SETTINGS), the
sensitivities are measured on calibration text from the training part of the corpus and every mix is judged
on the held-out part: at equal size the measured mix beats every uniform scheme that fits and llama.cpp's
layer pattern, and the predicted and measured KL of the candidate mixes are reported side by side with
their rank correlation, for both predictors (KL at the head, rel. L2 of the layer output). `pytest -s`
prints the tables of the README's "Measured mixed precision" section.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from m1.allocate import allocate, rule_of_thumb
from m1.checkpoint import Checkpoint
from m1.errors import DiskFullError
from m1.quantize.budget import _fixed_bytes, group_sizes
from m1.quantize.job import QuantizeOptions, plan_from_checkpoint
from m1.schemes import make_scheme
from m1.verify.compare import Model, Thresholds, compare
from m1.verify.sensitivity import MixSource, RoundtripCache, groups_of, measure, rank_correlation
from m1.verify.sources import CheckpointWeights
from m1.verify.text import ByteTokenizer, Windows, corpus_text, make_windows

DATA = Path(__file__).parent / "data"
MODEL = DATA / "tiny-trained"  # the CLI and recipe tests run on the 4-layer model
CANDIDATES = ("nf4", "int8")
CTX = 256


@dataclass(frozen=True)
class Setting:
    """How one trained tiny M1 is studied: calibration tokens, in windows spread evenly over the corpus's
    training part (what `m1 quantize --corpus mr-niah` reads), and held-out tokens to judge the mixes on.
    On the 8-layer model nf4 is nearly lossless (KL ~0.0013): one stretch of 2048 calibration tokens with 4096
    held-out tokens left the mixes' KL inside the noise (upgrading one group could raise the held-out KL), while
    8192 spread calibration tokens and 40960 held-out ones (84% of the held-out part) rank the mixes alike."""

    calibration_tokens: int
    eval_tokens: int


SETTINGS = {"tiny-trained": Setting(2048, 4096), "tiny8-trained": Setting(8192, 40960)}


def calibration_windows(setting: Setting) -> Windows:
    """From the training 90% of the corpus, never the held-out text the mixes are judged on; the product's own
    window choice (`make_windows(spread=True)`, as `--corpus` takes it)."""
    ids = ByteTokenizer().encode(corpus_text("mr-niah", holdout=False))
    return make_windows(ids, CTX, setting.calibration_tokens, spread=True)


@functools.cache
def run_study(model: str) -> dict:
    """Sensitivities on calibration text, the candidate mixes, and each mix judged on held-out text."""
    setting = SETTINGS[model]
    torch.manual_seed(0)
    ckpt = Checkpoint.open(DATA / model)
    cfg = ckpt.config
    source = CheckpointWeights(ckpt)
    cands = {c: make_scheme(c) for c in CANDIDATES}
    calib = calibration_windows(setting)
    held_out = make_windows(ByteTokenizer().encode(corpus_text("mr-niah")), CTX, setting.eval_tokens)
    assert not set(map(tuple, calib.tokens.tolist())) & set(map(tuple, held_out.tokens.tolist()))
    started = time.perf_counter()
    sens = measure(source, calib, cands)
    measure_s = time.perf_counter() - started
    groups = [g.key for g in groups_of(cfg)]
    sizes = group_sizes(ckpt, groups_of(cfg), cands, "release")
    fixed = _fixed_bytes(plan_from_checkpoint(ckpt, QuantizeOptions(scheme=cands["nf4"])))
    errors = {m: {g: {c: sens.error(g, c, m) for c in cands} for g in groups} for m in ("kl", "rel_l2")}

    def size(assign: dict[str, str]) -> int:
        return fixed + sum(sizes[g][c] for g, c in assign.items())

    mixes: dict[str, dict[str, str]] = {f"uniform {c}": dict.fromkeys(groups, c) for c in cands}
    rot = rule_of_thumb(groups, cfg.num_hidden_layers, "nf4", "int8")
    mixes["llama.cpp pattern"] = rot
    mixes["measured mix @ pattern size"] = allocate(sizes, errors["kl"], size(rot) - fixed).assignment
    low, high = size(mixes["uniform nf4"]), size(mixes["uniform int8"])
    for frac in (0.25, 0.5, 0.75):
        budget = int(low + frac * (high - low))
        mixes[f"measured mix @ {frac:.0%}"] = allocate(sizes, errors["kl"], budget - fixed).assignment
        mixes[f"rel_l2 mix @ {frac:.0%}"] = allocate(sizes, errors["rel_l2"], budget - fixed).assignment
    rng = random.Random(0)
    for i in range(6):
        mixes[f"random {i}"] = {g: rng.choice(CANDIDATES) for g in groups}
    unique: dict[str, dict[str, str]] = {}
    for name, assign in mixes.items():  # equal mixes run once, under their first name
        if all(assign != other for other in unique.values()):
            unique[name] = assign
    cache = RoundtripCache(cands)
    models = [Model("ref", source)] + [Model(n, MixSource(source, a, cands, cache)) for n, a in unique.items()]
    started = time.perf_counter()
    _, results = compare(models, held_out, torch.device("cpu"), Thresholds(), per_layer=False)
    judge_s = time.perf_counter() - started
    measured = {r.name: r.metrics for r in results}
    rows = []
    for name, assign in mixes.items():
        ran = next(n for n, a in unique.items() if a == assign)
        m = measured[ran]
        rows.append({"name": name, "bytes": size(assign), "assign": assign, "kl": m.kl_mean, "top1": m.top1,
                     "ppl_ratio": m.ppl_ratio, "pred_kl": sens.predict(assign, "kl"),
                     "pred_rel_l2": sens.predict(assign, "rel_l2")})
    return {"model": model, "setting": setting, "ckpt": ckpt, "cfg": cfg, "sens": sens, "sizes": sizes,
            "fixed": fixed, "rows": rows, "cands": cands, "measure_s": measure_s, "judge_s": judge_s,
            "errors": errors}


@pytest.fixture(scope="module")
def study() -> dict:
    return run_study(MODEL.name)


@pytest.fixture(scope="module", params=list(SETTINGS))
def claims(request: pytest.FixtureRequest) -> dict:
    """The claims hold on both trained tiny M1s."""
    return run_study(request.param)


def _row(study: dict, name: str) -> dict:
    return next(r for r in study["rows"] if r["name"] == name)


@pytest.mark.slow
def test_measured_mix_beats_uniform_and_the_llama_cpp_pattern_at_equal_size(claims: dict) -> None:
    study = claims
    mix, rot = _row(study, "measured mix @ pattern size"), _row(study, "llama.cpp pattern")
    assert mix["bytes"] <= rot["bytes"]
    assert mix["kl"] < rot["kl"], (mix, rot)
    for frac in ("25%", "50%", "75%"):
        m = _row(study, f"measured mix @ {frac}")
        for c in CANDIDATES:
            u = _row(study, f"uniform {c}")
            if u["bytes"] <= m["bytes"]:  # every uniform scheme of the same or smaller size
                assert m["kl"] < u["kl"], (m["name"], u["name"], m["kl"], u["kl"])


@pytest.mark.slow
def test_predicted_and_measured_kl_side_by_side(claims: dict) -> None:
    study = claims
    setting = study["setting"]
    rows = study["rows"]
    rho_kl = rank_correlation([r["pred_kl"] for r in rows], [r["kl"] for r in rows])
    rho_l2 = rank_correlation([r["pred_rel_l2"] for r in rows], [r["kl"] for r in rows])
    print(f"\nmodel {study['model']}: sensitivities of {len(study['sens'].groups)} groups x {len(CANDIDATES)} "
          f"candidates measured in {study['measure_s']:.1f} s on {setting.calibration_tokens} calibration tokens "
          f"(spread windows); {len(rows)} mixes judged on {setting.eval_tokens} "
          f"held-out tokens in {study['judge_s']:.1f} s")
    print("| scheme / mix | size | KL mean | top-1 | PPL ratio | predicted KL | predicted rel-L2² |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: r["bytes"]):
        print(f"| {r['name']} | {r['bytes']:,} | {r['kl']:.6f} | {r['top1']:.2%} | {r['ppl_ratio']:.4f} | "
              f"{r['pred_kl']:.6f} | {r['pred_rel_l2']:.3g} |")
    print(f"rank correlation with the measured KL over {len(rows)} mixes: KL-at-head predictor {rho_kl:.3f}, "
          f"rel-L2 predictor {rho_l2:.3f}")
    assert rho_kl > 0.8
    assert rho_kl >= rho_l2 - 0.05  # the default predictor is the better one (or as good)


def _midway_budget(study: dict, sens_file: Path, tmp_path: Path, run) -> int:
    """Bytes on disk halfway between uniform nf4 and uniform int8 (whole outputs: a budget is a promise about
    every byte on disk, so the study's tensor bytes are not a budget)."""
    code, out, err = run("quantize", MODEL, tmp_path / "never", "--budget", "1TB", "--candidates", "nf4,int8",
                         "--sensitivity", sens_file, "--dry-run", "--json")
    assert code == 0, err
    uniform = json.loads(out)["mix"]["predicted"]["uniform"]
    return (uniform["nf4"]["bytes"] + uniform["int8"]["bytes"]) // 2


def test_a_written_mix_reads_back_as_the_in_memory_mix_and_its_recipe_replays(study: dict, tmp_path: Path,
                                                                              run) -> None:
    sens_file = tmp_path / "sens.json"
    study["sens"].save(sens_file)
    budget = _midway_budget(study, sens_file, tmp_path, run)
    code, out, err = run("quantize", MODEL, tmp_path / "mix", "--budget", f"{budget}B", "--candidates", "nf4,int8",
                         "--sensitivity", sens_file, "-q")
    assert code == 0, err
    doc = json.loads((tmp_path / "mix" / "m1-recipe.json").read_text())
    assert len(set(doc["groups"].values())) == 2  # a real mix
    assert sum(p.stat().st_size for p in (tmp_path / "mix").iterdir()) <= budget  # every byte on disk
    manifest = json.loads((tmp_path / "mix" / "m1-manifest.json").read_text())  # the recipe is part of the output
    recipe_sha = hashlib.sha256((tmp_path / "mix" / "m1-recipe.json").read_bytes()).hexdigest()
    assert manifest["files"]["m1-recipe.json"] == recipe_sha
    assert run("verify", "integrity", tmp_path / "mix")[0] == 0
    written = CheckpointWeights.open(str(tmp_path / "mix"))
    in_memory = MixSource(CheckpointWeights.open(str(MODEL)), doc["groups"], study["cands"])
    for layer in (0, study["cfg"].num_hidden_layers - 1):
        a, b = written.layer_weights(layer), in_memory.layer_weights(layer)
        assert a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)
    code, _, err = run("quantize", MODEL, tmp_path / "again", "--recipe", tmp_path / "mix" / "m1-recipe.json", "-q")
    assert code == 0, err
    for f in (tmp_path / "mix").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "again" / f.name).read_bytes()
    from m1.hub import render_card

    card = render_card(tmp_path / "mix", "me/tiny-mix")
    assert "Mixed precision" in card and "m1.load_pretrained" in card and doc["layer_map"][0] in card


def test_calibration_windows_spread_over_the_text() -> None:
    ids = list(range(1000))
    first = make_windows(ids, 10, 30)
    spread = make_windows(ids, 10, 30, spread=True)
    assert first.tokens[:, 0].tolist() == [0, 10, 20]
    assert spread.tokens[:, 0].tolist() == [0, 330, 660]  # whole windows, evenly spaced, in text order
    assert all(row == list(range(row[0], row[0] + 10)) for row in spread.tokens.tolist())
    assert torch.equal(make_windows(ids[:25], 10, 30, spread=True).tokens, make_windows(ids[:25], 10, 30).tokens)
    assert make_windows(ids, 10, None, spread=True).tokens.shape == (100, 10)


def test_the_cli_measures_on_the_calibration_part_and_allocates_the_studied_mix(study: dict, tmp_path: Path,
                                                                               run) -> None:
    """`--corpus mr-niah` reads the corpus's first 90% (never the held-out part the mixes are judged on) in
    spread windows, and measures what the study did in memory: at one budget it allocates what the study's own
    sensitivities allocate."""
    setting = study["setting"]
    sens_file = tmp_path / "sens.json"
    study["sens"].save(sens_file)
    budget = f"{_midway_budget(study, sens_file, tmp_path, run)}B"
    code, out, err = run("quantize", MODEL, tmp_path / "never", "--budget", budget, "--candidates",
                         "nf4,int8", "--corpus", "mr-niah", "--tokens", setting.calibration_tokens,
                         "--ctx", CTX, "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)["mix"]
    code, out, err = run("quantize", MODEL, tmp_path / "never", "--budget", budget, "--candidates", "nf4,int8",
                         "--sensitivity", sens_file, "--dry-run", "--json")
    assert code == 0, err
    studied = json.loads(out)["mix"]
    assert len(set(studied["groups"].values())) == 2  # a real mix
    assert doc["groups"] == studied["groups"] and doc["metric"] == "kl"
    assert "first 90%" in doc["calibration"] and "spread" in doc["calibration"], doc["calibration"]
    assert doc["calibration_tokens"] == setting.calibration_tokens


def test_dry_run_prints_the_mix_its_size_and_the_uniform_schemes(study: dict, tmp_path: Path, run) -> None:
    sens_file = tmp_path / "sens.json"
    study["sens"].save(sens_file)
    budget = _midway_budget(study, sens_file, tmp_path, run)
    code, out, err = run("quantize", MODEL, tmp_path / "never", "--budget", f"{budget}B", "--candidates",
                         "nf4,int8", "--sensitivity", sens_file, "--dry-run")
    assert code == 0, err
    for needle in ("layer map:", " w13 ", "  w2 ", "uniform nf4", "uniform int8", "(over the budget)",
                   "m1.load_pretrained", "llama.cpp's layer pattern", "allocation: DP"):
        assert needle in out, needle
    assert not (tmp_path / "never").exists()
    code, out, _ = run("quantize", MODEL, tmp_path / "never", "--budget", f"{budget}B", "--candidates",
                       "nf4,int8", "--sensitivity", sens_file, "--dry-run", "--json")
    mix = json.loads(out)["mix"]
    assert mix["disk_bytes"] <= budget and mix["metric"] == "kl"
    assert len(mix["groups"]) == 2 * study["cfg"].num_hidden_layers


def test_a_gguf_mix_writes_its_recipe_beside_the_file(tmp_path: Path, run) -> None:
    import gguf

    src = DATA / "tiny-trained"  # rows of 128: the 32-value block types
    # 1.0 MB: between uniform q4_0 (0.67 MB) and q8_0 (1.24 MB), attention, embedding and head in the mix too
    code, out, err = run("quantize", src, tmp_path / "mix.gguf", "--format", "gguf", "--scheme", "q4_0",
                         "--budget", "1.0MB", "--candidates", "q4_0,q8_0", "-q")
    assert code == 0, err
    doc = json.loads((tmp_path / "mix.m1-recipe.json").read_text())
    assert doc["format"] == "gguf" and doc["metric"] == "prior"
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "mix.gguf").tensors}
    for name, ggml in doc["weights"].items():
        assert types[name] == ggml.upper(), name
    assert len(set(doc["weights"].values())) == 2
    assert (tmp_path / "mix.gguf").stat().st_size <= 1.0e6 + 64 * 1024  # tensor bytes within; metadata beside
    code, _, err = run("quantize", src, tmp_path / "again.gguf", "--recipe", tmp_path / "mix.m1-recipe.json", "-q")
    assert code != 0 and "--format gguf" in err
    code, _, err = run("quantize", src, tmp_path / "again.gguf", "--format", "gguf", "--scheme", "q4_0",
                       "--recipe", tmp_path / "mix.m1-recipe.json", "-q")
    assert code == 0, err
    assert (tmp_path / "again.m1-recipe.json").exists()
    assert "again.m1-recipe.json" in json.loads((tmp_path / "again.m1-manifest.json").read_text())["files"]


def test_a_run_that_dies_writing_the_recipe_leaves_no_manifest_and_resumes(tmp_path: Path, run,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe is written before the index and the manifest: a mix never looks complete without it."""
    import m1.run.journal

    real = m1.run.journal.write_bytes_atomic

    def full_disk(path: Path, data: bytes) -> None:
        if path.name == "m1-recipe.json":
            raise DiskFullError("disk full while writing", file=str(path), hint="free space, then --resume")
        real(path, data)

    args = ["quantize", DATA / "tiny-trained", tmp_path / "mix", "--budget", "1.5MB", "--candidates", "nf4,int8", "-q"]
    monkeypatch.setattr(m1.run.journal, "write_bytes_atomic", full_disk)
    code, _, err = run(*args)
    assert code == 1 and "disk full" in err, err
    assert not (tmp_path / "mix" / "m1-manifest.json").exists() and not (tmp_path / "mix" / "m1-recipe.json").exists()
    assert not (tmp_path / "mix" / "model.safetensors.index.json").exists()
    monkeypatch.setattr(m1.run.journal, "write_bytes_atomic", real)
    code, _, err = run(*args, "--resume")
    assert code == 0, err
    assert "m1-recipe.json" in json.loads((tmp_path / "mix" / "m1-manifest.json").read_text())["files"]


@pytest.mark.slow
def test_full_scale_dry_run_over_the_sparse_replica(tmp_path: Path, run) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from bench_convert import RELEASE, write_replica

    from m1.config import M1Config
    from m1.spec import inventory

    config = json.loads((RELEASE / "config.json").read_text())
    index = json.loads((RELEASE / "model.safetensors.index.json").read_text())
    specs = {t.name: t for t in inventory(M1Config.from_dict(config))}
    write_replica(tmp_path / "m1", config, index["weight_map"], specs, fill=False)
    started = time.perf_counter()
    code, out, err = run("quantize", tmp_path / "m1", tmp_path / "mix.gguf", "--format", "gguf", "--scheme", "q4_k",
                         "--budget", "240GB", "--candidates", "q3_k,q4_k,q5_k,q6_k,q8_0", "--dry-run", "--json")
    seconds = time.perf_counter() - started
    assert code == 0, err
    mix = json.loads(out)["mix"]
    assert len(mix["groups"]) == 242 and mix["bytes"] <= 240 * 10**9 and mix["metric"] == "prior"  # 80 x 3 + 2
    # 242 groups of unlike sizes: sizes in rounded units, optimal for a budget some tens of MB smaller (0.02%)
    assert mix["allocation"]["exact"] or mix["allocation"]["slack_bound"] < 10**-3 * 240 * 10**9
    print(f"\nfull scale GGUF 240GB: {mix['bytes'] / 1e9:.2f} GB ({mix['bpw']:.3f} bpw), "
          f"{dict((c, list(mix['groups'].values()).count(c)) for c in mix['candidates'])} in {seconds:.1f} s")
    assert seconds < 120
    code, _, err = run("quantize", tmp_path / "m1", tmp_path / "mix", "--budget", "240GB", "--candidates",
                       "nf4,int8", "--dry-run")
    assert code == 2 and "266.85 GB on disk" in err  # nf4 everywhere, headers and all: 240 GB cannot be met


def test_allocate_is_the_exact_optimum() -> None:
    rng = random.Random(1)
    for trial in range(30):
        groups = [f"{i}.w13" for i in range(6)]
        sizes = {g: {c: rng.randrange(1, 50) * 1000 + rng.randrange(0, 3) for c in "abc"} for g in groups}
        errors = {g: {c: rng.random() for c in "abc"} for g in groups}
        budget = sum(min(s.values()) for s in sizes.values()) + rng.randrange(0, 150_000)
        best = min((sum(errors[g][c] for g, c in zip(groups, combo, strict=True)), combo)
                   for combo in itertools.product("abc", repeat=len(groups))
                   if sum(sizes[g][c] for g, c in zip(groups, combo, strict=True)) <= budget)
        got = allocate(sizes, errors, budget, max_units=10**7 if trial % 2 else 300)
        assert got.bytes <= budget
        if got.exact:
            assert got.predicted == pytest.approx(best[0]), trial
        else:  # rounded: never worse than the optimum of the budget less the stated slack
            tighter = [sum(errors[g][c] for g, c in zip(groups, combo, strict=True))
                       for combo in itertools.product("abc", repeat=len(groups))
                       if sum(sizes[g][c] for g, c in zip(groups, combo, strict=True)) <= budget - got.slack_bound]
            assert not tighter or got.predicted <= min(tighter) + 1e-12


def test_budget_usage_errors(tmp_path: Path, run) -> None:
    src = DATA / "tiny-trained"
    code, _, err = run("quantize", src, tmp_path / "x", "--budget", "1.3MB", "--keep", "re:layers\\.0\\.", "--dry-run")
    assert code == 2 and "--keep" in err
    code, _, err = run("quantize", src, tmp_path / "x", "--candidates", "nf4,int8", "--dry-run")
    assert code != 0 and "--budget" in err
    code, _, err = run("quantize", src, tmp_path / "x", "--budget", "lots", "--dry-run")
    assert code != 0 and "4.6bpw" in err
    (tmp_path / "bad.json").write_text("{}")
    code, _, err = run("quantize", src, tmp_path / "x", "--recipe", tmp_path / "bad.json", "--dry-run")
    assert code != 0 and "not an m1 recipe" in err


def test_the_budget_reads_its_text_with_the_options_every_command_uses(tmp_path: Path, run) -> None:
    """--corpus/--text/--token-ids name one calibration text, as in verify perplexity and compare; the old
    --calibration spelling still works and counts as one of them; without --budget they are refused."""
    text = tmp_path / "calib.txt"
    text.write_text("hello " * 100)
    code, _, err = run("quantize", MODEL, tmp_path / "a", "--budget", "2MB", "--corpus", "mr-niah", "--text", text,
                       "--dry-run")
    assert code == 2 and "name one text" in err, err
    code, _, err = run("quantize", MODEL, tmp_path / "b", "--budget", "2MB", "--calibration", "mr-niah", "--text",
                       text, "--dry-run")
    assert code == 2 and "name one text" in err, err
    code, _, err = run("quantize", MODEL, tmp_path / "c", "--scheme", "nf4", "--corpus", "mr-niah", "--dry-run")
    assert code == 2 and "apply with --budget only" in err, err
    assert not any(tmp_path.glob("[abc]"))
