"""Bad inputs to inspect / convert / verify: one error line naming the file (and tensor), the right exit code,
nothing written, no traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err
    return lines[0]


def edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def first_shard(root: Path) -> str:
    return sorted(p.name for p in root.glob("*.safetensors"))[0]


# Each case damages a make-tiny checkpoint and returns the words the error line must hold (file, tensor).
def no_config(root: Path) -> list[str]:
    (root / "config.json").unlink()
    return [str(root / "config.json"), "not found"]


def config_not_json(root: Path) -> list[str]:
    (root / "config.json").write_text('{"model_type": "minimax_m1",')
    return [str(root / "config.json"), "not valid JSON"]


def config_a_list(root: Path) -> list[str]:
    (root / "config.json").write_text("[1, 2]")
    return [str(root / "config.json"), "not a JSON object"]


def config_other_model(root: Path) -> list[str]:
    edit_json(root / "config.json", lambda c: c.update(model_type="qwen2"))
    return [str(root / "config.json"), "'qwen2'", "neither"]


def config_missing_key(root: Path) -> list[str]:
    edit_json(root / "config.json", lambda c: c.pop("num_local_experts"))
    return [str(root / "config.json"), "num_local_experts"]


def no_weights(root: Path) -> list[str]:
    for p in root.glob("model*"):
        p.unlink()
    return [str(root), "no model.safetensors"]


def index_not_json(root: Path) -> list[str]:
    (root / INDEX).write_text("weights please")
    return [str(root / INDEX), "not a valid index"]


def weight_map_not_a_dict(root: Path) -> list[str]:
    edit_json(root / INDEX, lambda i: i.update(weight_map=["a", "b"]))
    return [str(root / INDEX), "weight_map"]


def weight_map_value_not_a_name(root: Path) -> list[str]:
    edit_json(root / INDEX, lambda i: i["weight_map"].update({"lm_head.weight": 3}))
    return [str(root / INDEX), "lm_head.weight"]


def weight_map_escapes(root: Path) -> list[str]:
    edit_json(root / INDEX, lambda i: i["weight_map"].update({"lm_head.weight": "../../etc/passwd"}))
    return [str(root / INDEX), "lm_head.weight", "../../etc/passwd", "outside"]


def missing_shard(root: Path) -> list[str]:
    name = first_shard(root)
    (root / name).unlink()
    return [name, "missing shard"]


def truncated_shard(root: Path) -> list[str]:
    name = first_shard(root)
    (root / name).write_bytes((root / name).read_bytes()[:-1])
    return [name, "truncated", "tensor model."]


def garbage_shard(root: Path) -> list[str]:
    name = first_shard(root)
    (root / name).write_bytes(os.urandom(64))
    return [name, "corrupt header"]


def unknown_tensor(root: Path) -> list[str]:
    name = first_shard(root)
    tensors = load_file(str(root / name))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, str(root / name))
    edit_json(root / INDEX, lambda i: i["weight_map"].update({"model.layers.0.self_attn.rotary_emb.inv_freq": name}))
    return [name, "model.layers.0.self_attn.rotary_emb.inv_freq", "not a MiniMax-M1 tensor"]


CASES = [no_config, config_not_json, config_a_list, config_other_model, config_missing_key, no_weights,
         index_not_json, weight_map_not_a_dict, weight_map_value_not_a_name, weight_map_escapes, missing_shard,
         truncated_shard, garbage_shard, unknown_tensor]


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_convert_refuses_with_one_line(tiny: Path, tmp_path: Path, run, damage) -> None:
    words = damage(tiny)
    dest = tmp_path / "out"
    code, out, err = run("convert", tiny, dest, "--to", "hf", "-q")
    assert code == 1
    line = one_error(err)
    for w in words:
        assert w in line, (w, line)
    assert not dest.exists()  # refused before anything was written


@pytest.mark.parametrize("damage", CASES, ids=lambda f: f.__name__)
def test_verify_integrity_reports_it(tiny: Path, run, damage) -> None:
    words = damage(tiny)
    code, out, err = run("verify", "integrity", tiny, "-q")
    assert code == 1, err
    assert "Traceback" not in err and "internal error" not in err
    for w in words:
        assert w in out, (w, out)


@pytest.mark.parametrize("damage", [no_config, config_other_model, weight_map_escapes, no_weights],
                         ids=lambda f: f.__name__)
def test_inspect_refuses_with_one_line(tiny: Path, run, damage) -> None:
    words = damage(tiny)
    code, out, err = run("inspect", tiny)
    assert code == 1
    line = one_error(err)
    for w in words:
        assert w in line, (w, line)


def test_inspect_lists_unreadable_shards(tiny: Path, run) -> None:
    words = garbage_shard(tiny)
    code, out, err = run("inspect", tiny, "--json")
    assert code == 1
    info = json.loads(out)
    assert len(info["unreadable"]) == 1 and all(w in info["unreadable"][0] for w in words)


def test_source_is_not_a_folder(tmp_path: Path, run) -> None:
    file = tmp_path / "model.safetensors"
    save_file({"x": torch.ones(1)}, str(file))
    for args in (["inspect", file], ["convert", file, tmp_path / "out"], ["verify", "integrity", file]):
        code, out, err = run(*args)
        assert code == 2, args
        assert str(file) in one_error(err)
    assert not (tmp_path / "out").exists()


def test_destination_is_a_file(tiny: Path, tmp_path: Path, run) -> None:
    dest = tmp_path / "dest.txt"
    dest.write_text("keep me")
    for flags in ([], ["--overwrite"], ["--resume"]):
        code, out, err = run("convert", tiny, dest, "-q", *flags)
        assert code == 2
        assert str(dest) in one_error(err)
    assert dest.read_text() == "keep me"


def _bin_checkpoint(tiny: Path, tmp_path: Path, obj) -> Path:
    root = tmp_path / "bin"
    root.mkdir()
    shutil.copy(tiny / "config.json", root / "config.json")
    torch.save(obj, root / "pytorch_model.bin")
    return root


class _Payload:
    """Unpickling this would create a folder: a stand-in for arbitrary code in a .bin."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.makedirs, (self.target,))


def test_bin_with_code_is_refused_unexecuted(tiny: Path, tmp_path: Path, run) -> None:
    marker = tmp_path / "code-ran"
    weights = load_file(str(tiny / first_shard(tiny)))
    root = _bin_checkpoint(tiny, tmp_path, {**weights, "model.norm.weight": _Payload(marker)})
    for args in (["inspect", root], ["convert", root, tmp_path / "out", "-q"]):
        code, out, err = run(*args)
        assert code == 1
        line = one_error(err)
        assert str(root / "pytorch_model.bin") in line and "weights-only" in line
    code, out, err = run("verify", "integrity", root, "-q")
    assert code == 1 and "weights-only" in out
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("obj", [[torch.ones(2)], {"model.norm.weight": torch.ones(2), "step": 3}],
                         ids=["a-list", "not-all-tensors"])
def test_bin_that_is_not_a_state_dict(tiny: Path, tmp_path: Path, run, obj) -> None:
    root = _bin_checkpoint(tiny, tmp_path, obj)
    code, out, err = run("inspect", root)
    assert code == 1
    assert str(root / "pytorch_model.bin") in one_error(err)
