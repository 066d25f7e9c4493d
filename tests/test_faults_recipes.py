"""Issue 17, classes 5-7: imatrix files with a damaged shape or range, recipes that do not cover the model or
disagree with themselves, and budgets past what a float holds. Each is one line naming the file (and the
tensor or group) with exit 1 or 2, never 0 or an internal error, and nothing complete-looking is written."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from m1.errors import UsageError
from m1.gguf.imatrix import Entry, IMatrix, read_imatrix, write_imatrix
from m1.schemes import ggml_lib

needs_ggml = pytest.mark.skipif(not ggml_lib.available(), reason="llama-cpp-python (m1[gguf-k]) is not installed")
K_MODEL = {"layers": 2, "hidden": 256, "intermediate": 256, "heads": 4, "head_dim": 64, "rotary_dim": 32,
           "experts": 4, "softmax_every": 2}  # K-quant rows (256 values) fit


@pytest.fixture(scope="module")
def k_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, IMatrix]:
    """A tiny M1 whose rows fit the K-quants, and its imatrix from m1 verify imatrix."""
    from m1.cli import run_cli
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("kfault")
    make_tiny(root / "m", TinySpec(**K_MODEL))
    assert run_cli(["verify", "imatrix", str(root / "m"), str(root / "im.gguf"), "--tokens", "256", "--ctx", "64",
                    "-q"]) == 0
    return root / "m", read_imatrix(root / "im.gguf")


def refused(result: tuple[int, str, str], *words: str) -> str:
    code, out, err = result
    assert code in (1, 2), (code, err)
    errors = [x for x in err.splitlines() if not x.startswith("warning:")]
    assert len(errors) == 1 and "internal error" not in errors[0], err
    line = errors[0]
    for w in words:
        assert w in line, (w, line)
    return line


def quantize_with(k_model: tuple[Path, IMatrix], tmp_path: Path, run: Callable, imatrix: Path,
                  scheme: str = "q4_k") -> tuple[int, str, str]:
    src, _ = k_model
    result = run("quantize", src, tmp_path / "out.gguf", "--format", "gguf", "--scheme", scheme, "--imatrix",
                 imatrix, "-q")
    if result[0] != 0:
        assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "out.m1-manifest.json").exists()
    return result


def write_raw(path: Path, im: IMatrix, counts_of: Callable[[str, np.ndarray], np.ndarray]) -> Path:
    """An imatrix file written by hand, `counts_of(name, counts)` deciding each counts tensor."""
    w = gguf.GGUFWriter(path, "imatrix")
    w.kv_data[0].pop("general.architecture", None)
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(gguf.Keys.IMatrix.DATASETS, [])
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, 1)
    w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, 1)
    for name in sorted(im.entries):
        e = im.entries[name]
        w.add_tensor(name + ".in_sum2", e.sums.astype(np.float32))
        w.add_tensor(name + ".counts", counts_of(name, e.counts.astype(np.float32).reshape(e.n_mat, 1)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


DOWN = "blk.0.ffn_down_exps.weight"


# ---- class 5: a finite imatrix too large for ggml's sums --------------------------------------------------


@needs_ggml
@pytest.mark.parametrize("value", [3e38, 1e36])
def test_a_huge_finite_imatrix_is_refused_naming_file_and_tensor(k_model, tmp_path: Path, run, value: float) -> None:
    im = copy.deepcopy(k_model[1])
    im.entries[DOWN].sums[1] = value  # expert 1's statistics: finite in f32, far past what ggml can weigh
    path = tmp_path / "huge.gguf"
    write_imatrix(path, im)
    refused(quantize_with(k_model, tmp_path, run, path), str(path), DOWN)


@needs_ggml
def test_negative_or_non_finite_sums_are_refused_when_read(k_model, tmp_path: Path) -> None:
    for bad in (-1.0, float("inf"), float("nan")):
        im = copy.deepcopy(k_model[1])
        im.entries[DOWN].sums[0, 3] = bad
        path = tmp_path / "bad.gguf"
        write_imatrix(path, im)
        with pytest.raises(UsageError) as info:
            read_imatrix(path)
        assert str(path) in info.value.one_line() and DOWN in info.value.one_line()


@needs_ggml
def test_an_importance_ggml_cannot_weigh_with_these_weights_is_refused_before_quantizing() -> None:
    rows = np.full((2, 256), 1e3, dtype=np.float32)  # large weights: the bound scales with their cube
    fine = np.ones(256, dtype=np.float32)
    assert ggml_lib.quantize_rows("q4_k", rows, fine).shape == (2, 144)
    with pytest.raises(UsageError, match="importance") as info:
        ggml_lib.quantize_rows("q4_k", rows, fine * 1e25, tensor="blk.0.ffn_up_exps.weight")
    assert "blk.0.ffn_up_exps.weight" in info.value.one_line()


@needs_ggml
@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "q4_0", "q4_1", "q5_0",
                                  "q5_1", "q8_0"])
def test_the_output_check_finds_a_non_finite_block_scale(name: str) -> None:
    from gguf.quants import dequantize

    rows = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    blocks = ggml_lib.quantize_rows(name, rows)
    ggml_lib.check_blocks(name, blocks, tensor="t")  # sound output passes
    size = ggml_lib.type_size(name)
    for offset in ggml_lib.SCALE_OFFSETS[ggml_lib.type_of(name)]:
        bad = blocks.copy().reshape(-1, size)
        bad[1, offset : offset + 2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
        back = dequantize(bad.reshape(blocks.shape), ggml_lib.type_of(name))
        assert not np.isfinite(back).all()  # the offset is a scale's: ggml reads it so
        with pytest.raises(UsageError, match="not finite") as info:
            ggml_lib.check_blocks(name, bad.reshape(blocks.shape), tensor="blk.1.ffn_up_exps.weight")
        assert "blk.1.ffn_up_exps.weight" in info.value.one_line()


# ---- class 7: imatrix shapes and files that made internal errors -------------------------------------------


@needs_ggml
def test_counts_of_the_wrong_length_are_a_usage_error(k_model, tmp_path: Path, run) -> None:
    path = write_raw(tmp_path / "counts.gguf", k_model[1], lambda n, c: c[:2] if n == DOWN else c)
    refused(quantize_with(k_model, tmp_path, run, path), str(path), DOWN)


@needs_ggml
def test_an_imatrix_with_fewer_experts_than_the_model_is_a_usage_error(k_model, tmp_path: Path, run) -> None:
    im = copy.deepcopy(k_model[1])
    e = im.entries[DOWN]
    im.entries[DOWN] = Entry(DOWN, e.sums[:2], e.counts[:2])
    path = tmp_path / "few.gguf"
    write_imatrix(path, im)
    refused(quantize_with(k_model, tmp_path, run, path), str(path), DOWN, "experts")


@needs_ggml
def test_an_imatrix_of_the_wrong_column_count_is_a_usage_error(k_model, tmp_path: Path, run) -> None:
    im = copy.deepcopy(k_model[1])
    e = im.entries[DOWN]
    im.entries[DOWN] = Entry(DOWN, e.sums[:, :128], e.counts)
    path = tmp_path / "cols.gguf"
    write_imatrix(path, im)
    refused(quantize_with(k_model, tmp_path, run, path), str(path), DOWN)


@needs_ggml
@pytest.mark.parametrize("length", [40, 100, 1000])
def test_a_truncated_imatrix_is_a_usage_error(k_model, tmp_path: Path, run, length: int) -> None:
    good = tmp_path / "good.gguf"
    write_imatrix(good, k_model[1])
    path = tmp_path / "cut.gguf"
    path.write_bytes(good.read_bytes()[:length])
    refused(quantize_with(k_model, tmp_path, run, path), str(path))


@pytest.mark.parametrize("budget", ["1e400bpw", "inf bpw", "nanbpw", "9" * 400 + "GB", "1e400"])
def test_a_budget_past_what_a_float_holds_is_a_usage_error(tiny: Path, tmp_path: Path, run, budget: str) -> None:
    refused(run("quantize", tiny, tmp_path / "out", "--budget", budget, "--dry-run"), "budget")


# ---- class 6: a recipe covers exactly this model's groups and agrees with itself ---------------------------


@pytest.fixture(params=["release", "gguf"])
def recipe_case(request: pytest.FixtureRequest, make_tiny_ckpt, tmp_path: Path) -> tuple[Path, dict, list[str]]:
    """(source, a recipe document of a mix for it, the replay's format arguments)."""
    from m1.checkpoint import Checkpoint
    from m1.policy import Policy
    from m1.quantize.budget import plan_budget
    from m1.quantize.job import QuantizeOptions
    from m1.schemes import make_scheme

    fmt = request.param
    # Experts large enough that a bitsandbytes mix saves more than its config's list of weights costs (on the
    # default tiny M1 nf4 is not even smaller than int8), so the middle budget is a real mix of the two.
    tiny = make_tiny_ckpt("mixable", hidden=128, intermediate=256)
    ckpt = Checkpoint.open(tiny)
    scheme, cands = ("nf4", "nf4,int8") if fmt == "release" else ("q4_0", "q4_0,q8_0")
    opts = QuantizeOptions(scheme=make_scheme(scheme), policy=Policy.from_options([], []), by_layer=False,
                           shard_size=5 * 10**9, to=None if fmt == "release" else "gguf",
                           format_options={"stem": "out"} if fmt == "gguf" else {})
    uniform = plan_budget(ckpt, opts, budget="10GB", candidates=cands, fmt=fmt).recipe["predicted"]["uniform"]
    middle = sum(u["bytes"] for u in uniform.values()) // 2
    doc = plan_budget(ckpt, opts, budget=str(middle), candidates=cands, fmt=fmt).recipe
    assert len(set(doc["groups"].values())) == 2  # a real mix
    return tiny, doc, ([] if fmt == "release" else ["--format", "gguf"])


def replay(run: Callable, src: Path, tmp_path: Path, doc: dict, fmt_args: list[str]) -> tuple[int, str, str]:
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(doc))
    dest = tmp_path / ("out.gguf" if fmt_args else "out")
    return run("quantize", src, dest, "--recipe", path, "--dry-run", *fmt_args)


def test_an_intact_recipe_replays(recipe_case, tmp_path: Path, run) -> None:
    src, doc, fmt_args = recipe_case
    code, _, err = replay(run, src, tmp_path, doc, fmt_args)
    assert code == 0, err


def test_a_recipe_without_one_weight_is_refused_naming_it(recipe_case, tmp_path: Path, run) -> None:
    src, doc, fmt_args = recipe_case
    gone = sorted(doc["weights"])[5]
    del doc["weights"][gone]
    refused(replay(run, src, tmp_path, doc, fmt_args), str(tmp_path / "recipe.json"), gone)


def test_a_recipe_without_one_group_is_refused_naming_it(recipe_case, tmp_path: Path, run) -> None:
    src, doc, fmt_args = recipe_case
    from m1.checkpoint import Checkpoint
    from m1.verify.sensitivity import Group

    group = "2.w2"
    del doc["groups"][group]
    for name in Group(2, "w2").recipe_names(Checkpoint.open(src).config, "gguf" if fmt_args else "release"):
        del doc["weights"][name]
    refused(replay(run, src, tmp_path, doc, fmt_args), str(tmp_path / "recipe.json"), group)


def test_a_recipe_for_a_layer_the_model_lacks_is_refused(recipe_case, tmp_path: Path, run) -> None:
    src, doc, fmt_args = recipe_case
    extra = ("blk.9.ffn_down_exps.weight" if fmt_args else "model.layers.9.block_sparse_moe.experts.0.w2.weight")
    doc["weights"][extra] = doc["scheme"]
    refused(replay(run, src, tmp_path, doc, fmt_args), str(tmp_path / "recipe.json"), extra)
    del doc["weights"][extra]
    doc["groups"]["9.w2"] = doc["scheme"]
    refused(replay(run, src, tmp_path, doc, fmt_args), str(tmp_path / "recipe.json"), "9.w2")


def test_a_recipe_whose_weights_and_groups_disagree_is_refused(recipe_case, tmp_path: Path, run) -> None:
    src, doc, fmt_args = recipe_case
    group, scheme = next(iter(doc["groups"].items()))
    other = next(c for c in doc["candidates"] if c != scheme)
    doc["groups"][group] = other
    refused(replay(run, src, tmp_path, doc, fmt_args), str(tmp_path / "recipe.json"), group)
