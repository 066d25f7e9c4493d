"""`m1 push`, `m1 pull --layers` and `m1 verify remote` against the Hub-compatible test server (tests/hubserver.py),
driven in-process through `m1.cli.run_cli`, plus the verify-release workflow's command lines."""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hubserver import HubServer, SparseFile, hub_env

import m1.hub_read as hub_read
from m1.cli import app, run_cli

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT / "tests" / "data" / "m1-release"
WORKFLOW = ROOT / ".github" / "workflows" / "verify-release.yml"
BASE = "MiniMaxAI/MiniMax-M1-tiny"
SECRET = "hf_sEcReT_tOkEn_do_not_print_0123456789"


# ---- fixtures -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[HubServer]:
    with HubServer(valid_tokens=(SECRET, "hf_other_reader")) as s:
        yield s


@pytest.fixture
def hub(server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The module's server, wired to huggingface_hub with a valid write token; counters and faults reset."""
    server.reset_counters()
    server.clear_faults()
    server.require_auth_for_writes = True
    monkeypatch.setattr(hub_read, "RETRY_WAIT_S", 0.0)
    with hub_env(server, token=SECRET, home=tmp_path / "hf_home"):
        yield server
    assert not server.server_errors, server.server_errors[-1]


@pytest.fixture
def m1(request: pytest.FixtureRequest) -> Callable[..., tuple[int, str, str]]:
    """`m1(*argv)` -> (exit code, stdout, stderr), in-process; captured with capfd when the test asks for it
    (file-descriptor level: also what loggers and child libraries write), else capsys."""
    capture = request.getfixturevalue("capfd" if "capfd" in request.fixturenames else "capsys")

    def call(*args: object) -> tuple[int, str, str]:
        capture.readouterr()
        code = run_cli([str(a) for a in args])
        out, err = capture.readouterr()
        return code, out, err

    return call


def _quantize_available() -> bool:
    return any(c.name == "quantize" for c in app.registered_commands)


@pytest.fixture(scope="module")
def made(server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | None]:
    """A tiny M1 served as BASE; `conv`: m1 convert of it from the Hub (one shard per layer, manifest with
    base_model); `quant`: m1 quantize --scheme nf4 of that, when the quantize command exists."""
    from m1.tiny import make_tiny

    root = tmp_path_factory.mktemp("made")
    make_tiny(root / "tiny")
    server.add_repo(BASE, {p.name: p for p in (root / "tiny").iterdir()})
    with hub_env(server, token=SECRET, home=root / "hf_home"):
        assert run_cli(["convert", BASE, str(root / "conv"), "--to", "release", "--layout", "by-layer", "-q"]) == 0
    quant = None
    if _quantize_available():
        assert run_cli(["quantize", str(root / "conv"), str(root / "quant"), "--scheme", "nf4"]) == 0
        quant = root / "quant"
    return {"tiny": root / "tiny", "conv": root / "conv", "quant": quant}


def copy_of(folder: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    dest = tmp_path / name
    shutil.copytree(folder, dest)
    return dest


def one_error_line(err: str) -> str:
    """stderr holds exactly one `error:` line (retry warnings aside) and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and all(line.startswith(("error: ", "warning: ")) for line in lines), err
    assert "Traceback" not in err
    return errors[0]


def serve_folder(server: HubServer, repo_id: str, folder: Path, **kwargs: object) -> str:
    return server.add_repo(repo_id, {p.name: p for p in folder.iterdir() if p.is_file()}, **kwargs)


def shard_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- push -----------------------------------------------------------------------------------------------------------
def test_push_uploads_exact_files_and_card_then_reruns_and_opens_a_pr(hub, made, m1, tmp_path):
    from huggingface_hub import ModelCard

    folder = copy_of(made["conv"], tmp_path)
    repo = "my-org/MiniMax-M1-tiny-release"
    code, out, err = m1("push", folder, repo)
    assert code == 0, err
    assert f"pushed {folder}" in out
    local = sorted(p.name for p in folder.iterdir() if p.is_file())
    assert "README.md" in local and "m1-manifest.json" in local
    assert hub.list_files(repo) == sorted([".gitattributes", *local])
    for name in local:
        assert hub.file_content(repo, name) == (folder / name).read_bytes(), name
    assert len(hub.requests_for(kind="commit", repo_id=repo)) == 1
    assert hub.lfs_bytes_uploaded == sum((folder / f).stat().st_size for f in shard_files(folder))

    card = ModelCard.load(repo)  # read back through huggingface_hub
    assert card.data.base_model == BASE
    assert card.data.get("base_model_relation") is None  # converted, not quantized
    assert card.data.library_name == "transformers" and "minimax-m1" in card.data.tags
    assert "| part | tensors | parameters | size | stored as |" in card.text
    assert "| expert | 48 |" in card.text and "AutoModelForCausalLM" in card.text

    hub.reset_counters()
    code, out, err = m1("push", folder, repo)
    assert code == 0, err
    assert "nothing to push" in out
    assert hub.lfs_bytes_uploaded == 0 and not hub.lfs_uploads
    assert not hub.requests_for(kind="commit")

    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"candidates": [
        {"name": "nf4", "metrics": {"tokens": 4096, "ppl_ratio": 1.0123, "kl_mean": 0.0042, "kl_p99": 0.05,
                                    "top1": 0.964, "extra": [1, 2]}},
        {"name": "odd", "metrics": {"ppl_ratio": None, "top1": "n/a"}},
        "not a candidate",
    ]}))
    main_before = hub.head(repo)
    code, out, err = m1("push", folder, repo, "--create-pr", "--report", report, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["pr_url"] and result["changed"]
    assert "refs/pr/1" in hub.refs(repo) and hub.head(repo) == main_before
    assert hub.lfs_bytes_uploaded == 0  # only the card changed
    pr_card = hub.file_content(repo, "README.md", revision="refs/pr/1").decode()
    assert "| nf4 | 4,096 | 1.0123 | 0.00420 | 0.05000 | 96.40% |" in pr_card
    assert "| odd |" in pr_card

    code, out, err = m1("push", folder, repo, "--revision", "dev")  # a new branch, from main
    assert code == 0, err
    assert "dev" in hub.refs(repo)
    assert hub.file_content(repo, "README.md", revision="dev") == (folder / "README.md").read_bytes()


def test_push_keeps_a_readme_it_did_not_write_and_drops_stale_weights(hub, made, m1, tmp_path):
    folder = copy_of(made["conv"], tmp_path)
    (folder / "README.md").write_text("# my own card\n")
    repo = "my-org/own-card"
    hub.add_repo(repo, {"model-00001-of-00009.safetensors": b"\0" * 64, "notes.txt": b"kept\n"})  # an older push
    code, out, err = m1("push", folder, repo)
    assert code == 0 and "kept your README.md" in err
    assert hub.file_content(repo, "README.md") == b"# my own card\n"
    files = hub.list_files(repo)
    assert "model-00001-of-00009.safetensors" not in files and "notes.txt" in files
    assert {f for f in files if f.endswith(".safetensors")} == set(shard_files(folder))


def test_push_quantized_card(hub, made, m1, tmp_path):
    if made["quant"] is None:
        pytest.skip("m1 quantize is not available yet")
    folder = copy_of(made["quant"], tmp_path)
    repo = "my-org/MiniMax-M1-tiny-experts-nf4"
    code, out, err = m1("push", folder, repo)
    assert code == 0, err
    for name in (p.name for p in folder.iterdir() if p.is_file()):
        assert hub.file_content(repo, name) == (folder / name).read_bytes(), name
    readme = hub.file_content(repo, "README.md").decode()
    assert f"base_model: {BASE}" in readme and "base_model_relation: quantized" in readme
    assert "nf4 (bitsandbytes)" in readme and "| part | tensors |" in readme


def test_card_of_a_quantized_folder(made, tmp_path):
    """render_card alone, on a folder whose config says nf4 (what m1 quantize writes) and a manifest with a base."""
    from huggingface_hub import ModelCard

    from m1.hub import render_card

    folder = copy_of(made["conv"], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (folder / "config.json").write_text(json.dumps(config))
    card = ModelCard(render_card(folder, "org/q", {"candidates": {"nf4": {"ppl_ratio": 1.5, "top1": 97.0}}}))
    assert card.data.base_model == BASE and card.data.base_model_relation == "quantized"
    assert {"bitsandbytes", "4-bit", "nf4"} <= set(card.data.tags)
    assert "| expert | 48 | 294,912 |" in card.text and "nf4 (bitsandbytes)" in card.text
    assert "m1.load_pretrained" in card.text and "| nf4 |  | 1.5000 |" in card.text


def test_push_refuses_a_damaged_folder_without_a_request(hub, made, m1, tmp_path):
    folder = copy_of(made["conv"], tmp_path)
    flip_last_byte(folder / shard_files(folder)[2])
    code, out, err = m1("push", folder, "my-org/damaged")
    assert code == 1
    line = one_error_line(err)
    assert "refusing to push" in line and "sha256" in line and "m1 verify integrity" in line
    assert hub.requests == [] and not hub.has_repo("my-org/damaged")
    assert not (folder / "README.md").exists()


def test_push_resumes_after_an_interruption_and_never_prints_the_token(hub, made, m1, tmp_path, capfd):
    folder = copy_of(made["conv"], tmp_path)
    repo = "my-org/interrupted"
    hub.inject_fault(r"/commit/", mode=503, times=1, method="POST")
    code, out, err = m1("push", folder, repo)
    assert code == 1
    line = one_error_line(err)
    assert "HTTP 503" in line and "re-running resumes" in line
    sent = hub.lfs_bytes_uploaded
    assert sent == sum((folder / f).stat().st_size for f in shard_files(folder))
    hub.reset_counters()
    code, out2, err2 = m1("push", folder, repo, "--json")
    assert code == 0, err2
    assert hub.lfs_bytes_uploaded == 0 and len(hub.requests_for(kind="commit")) == 1
    assert hub.file_content(repo, "m1-manifest.json") == (folder / "m1-manifest.json").read_bytes()
    # a refused token: one line, and the token is in none of the output (fd-level capture included)
    with hub_env(hub, token="hf_wrong_" + SECRET[::-1]):
        code, out3, err3 = m1("push", folder, repo)
    assert code == 1 and "HF_TOKEN" in one_error_line(err3)
    for text in (out, err, out2, err2, out3, err3):
        assert SECRET not in text and SECRET[::-1] not in text


def test_push_usage_errors(hub, made, m1, tmp_path):
    folder = copy_of(made["conv"], tmp_path)
    for args, expect in [
        ((tmp_path / "nowhere", "my-org/x"), "not a checkpoint folder"),
        ((folder, "not a repo id"), "not a Hub repo id"),
        ((folder, "my-org/x", "--create-pr", "--revision", "dev"), "--create-pr"),
        ((folder, "my-org/x", "--report", tmp_path / "no-report"), "cannot read the verify report"),
    ]:
        code, out, err = m1("push", *args)
        assert code == 2 and expect in one_error_line(err), (args, err)
    assert hub.requests == []


# ---- pull -----------------------------------------------------------------------------------------------------------
def test_pull_layers_transfers_only_their_shards(hub, made, m1, tmp_path):
    conv = made["conv"]
    repo = "org/by-layer"
    serve_folder(hub, repo, conv)
    index = json.loads((conv / "model.safetensors.index.json").read_text())["weight_map"]
    wanted = sorted({f for n, f in index.items() if n.startswith(("model.layers.1.", "model.layers.2."))})
    assert len(wanted) == 2 and len(shard_files(conv)) == 6
    hub.reset_counters()
    dest = tmp_path / "partial"
    code, out, err = m1("pull", repo, dest, "--layers", "1-2", "--json")
    assert code == 0, err
    small = {"config.json", "model.safetensors.index.json", "m1-manifest.json", "tokenizer_config.json",
             "tokenizer.json", "generation_config.json"}
    assert hub.files_transferred(repo) == small | set(wanted)
    for shard in wanted:  # each shard sent once, whole
        assert hub.bytes_sent_by_file[(repo, shard)] == (conv / shard).stat().st_size
    assert sorted(p.name for p in dest.iterdir() if p.is_file()) == sorted(small | set(wanted))
    assert json.loads(out)["commit"] == hub.head(repo)

    code, out, err = m1("verify", "integrity", dest, "--layers", "1,2", "--deep")
    assert code == 0, out + err
    assert "sound" in out
    code, out, err = m1("verify", "remote", repo, "--against", dest)  # what the release workflow runs next
    assert code == 0, out + err

    hub.reset_counters()  # the embedding and head too, on request; what is there is not fetched again
    code, out, err = m1("pull", repo, dest, "--layers", "1-2", "--with-embeddings")
    assert code == 0, err
    assert {f for f in hub.files_transferred(repo) if f.endswith(".safetensors")} == {
        shard_files(conv)[0], shard_files(conv)[-1]}


def test_pull_revision_pins_a_commit(hub, made, m1, tmp_path):
    repo = "org/pinned"
    old = serve_folder(hub, repo, made["conv"])
    hub.add_repo(repo, {"generation_config.json": b'{"changed": true}\n'})
    code, out, err = m1("pull", repo, tmp_path / "old", "--layers", "0", "--revision", old)
    assert code == 0, err
    assert (tmp_path / "old" / "generation_config.json").read_bytes() == (
        made["conv"] / "generation_config.json").read_bytes()
    code, out, err = m1("pull", repo, tmp_path / "new", "--layers", "0")
    assert code == 0 and (tmp_path / "new" / "generation_config.json").read_bytes() == b'{"changed": true}\n'


def test_pull_retries_a_broken_transfer_then_fails_with_one_line(hub, made, m1, tmp_path):
    repo = "org/flaky"
    serve_folder(hub, repo, made["conv"])
    shard = shard_files(made["conv"])[1]
    fault = hub.inject_fault(rf"/resolve/.*/{shard}$", mode="truncate", times=1, method="GET")
    code, out, err = m1("pull", repo, tmp_path / "a", "--layers", "0")
    assert code == 0, err
    assert fault.hits == 1
    assert (tmp_path / "a" / shard).read_bytes() == (made["conv"] / shard).read_bytes()

    hub.inject_fault(rf"/resolve/.*/{shard}$", mode=503, times=None, method="GET")
    code, out, err = m1("pull", repo, tmp_path / "b", "--layers", "0")
    assert code == 1
    line = one_error_line(err)
    assert "HTTP 503" in line and "retry" in line


# ---- verify remote --------------------------------------------------------------------------------------------------
def test_verify_remote_catches_a_header_that_disagrees_with_the_index(hub, made, m1, tmp_path):
    conv = made["conv"]
    serve_folder(hub, "org/sound", conv)
    code, out, err = m1("verify", "remote", "org/sound")
    assert code == 0, out + err
    assert "org/sound: sound" in out

    index = json.loads((conv / "model.safetensors.index.json").read_text())
    moved = "model.layers.1.self_attn.out_proj.weight"
    wrong = shard_files(conv)[4]
    assert index["weight_map"][moved] != wrong
    index["weight_map"][moved] = wrong
    files = {p.name: p for p in conv.iterdir()}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    hub.add_repo("org/mismatch", files)
    hub.reset_counters()
    code, out, err = m1("verify", "remote", "org/mismatch", "--json")
    assert code == 1
    report = json.loads(out)
    hits = [f for f in report["findings"] if f["code"] == "index-mismatch" and f["tensor"] == moved]
    assert {f["file"] for f in hits} == {wrong, index["weight_map"]["model.layers.1.input_layernorm.weight"]}
    assert hub.tensor_bytes_sent == 0


def test_verify_remote_compares_sha256_with_a_local_copy_and_the_pushed_manifest(hub, made, m1, tmp_path):
    conv = made["conv"]
    repo = "org/hashes"
    serve_folder(hub, repo, conv)
    code, out, err = m1("verify", "remote", repo, "--against", conv, "--json")
    assert code == 0, out + err
    assert json.loads(out)["stats"]["hashes_compared"] == 2 * 6  # local copy + pushed manifest

    local = copy_of(conv, tmp_path, "local")
    changed = shard_files(local)[3]
    flip_last_byte(local / changed)
    code, out, err = m1("verify", "remote", repo, "--against", local, "--json")
    assert code == 1
    findings = json.loads(out)["findings"]
    assert [(f["code"], f["file"]) for f in findings] == [("sha256", changed)]
    assert "local copy" in findings[0]["message"]

    other = shard_files(conv)[4]  # the Hub's copy replaced by a different one; the pushed manifest still old
    replaced = tmp_path / other
    shutil.copy(conv / other, replaced)
    flip_last_byte(replaced)
    hub.add_repo(repo, {other: replaced})
    hub.reset_counters()
    code, out, err = m1("verify", "remote", repo)
    assert code == 1
    assert f"[sha256] file {other}: the Hub's LFS sha256" in out and "pushed m1-manifest.json" in out
    assert hub.tensor_bytes_sent == 0 and (repo, other) not in hub.bytes_sent_by_file or \
        hub.bytes_sent_by_file[(repo, other)] < 4096
    code, out, err = m1("verify", "remote", repo, "--against", conv / "m1-manifest.json")
    assert code == 1 and out.count(f"[sha256] file {other}") == 2  # the given manifest and the pushed one


def _replica_files() -> tuple[dict[str, object], int, int]:
    from m1.config import M1Config
    from m1.safetensors_io import encode_header
    from m1.spec import inventory

    config = json.loads((RELEASE / "config.json").read_text())
    weight_map = json.loads((RELEASE / "model.safetensors.index.json").read_text())["weight_map"]
    specs = {t.name: t for t in inventory(M1Config.from_dict(config))}
    by_file: dict[str, list] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(specs[name])
    files: dict[str, object] = {}
    total = 0
    for file, tensors in sorted(by_file.items()):
        header = encode_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], {"format": "pt"})
        size = sum(t.nbytes for t in tensors)
        total += size
        files[file] = SparseFile(header, len(header) + size, hashlib.sha256(file.encode()).hexdigest())
    files["config.json"] = (RELEASE / "config.json").read_bytes()
    files["tokenizer_config.json"] = (RELEASE / "tokenizer_config.json").read_bytes()
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}).encode()
    return files, len(by_file), len(weight_map)


def test_verify_remote_over_a_replica_of_m1_40k_reads_no_tensor_data(hub, m1):
    files, shards, tensors = _replica_files()
    assert shards == 413
    hub.add_repo("MiniMaxAI/MiniMax-M1-40k", files)
    hub.reset_counters()
    start = time.perf_counter()
    code, out, err = m1("verify", "remote", "MiniMaxAI/MiniMax-M1-40k", "--json")
    seconds = time.perf_counter() - start
    assert code == 0, out[-2000:] + err
    report = json.loads(out)
    assert report["ok"] and report["stats"]["shards"] == 413 and report["stats"]["tensors"] == tensors
    assert report["stats"]["bytes"] > 900e9
    assert hub.tensor_bytes_sent == 0 and hub.tensor_bytes_requested == 0
    assert len(hub.requests_for(kind="resolve", method="GET")) == 2 * 413 + 2  # length + header each; config, index
    assert seconds < 30, seconds


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_is_one_line_with_what_to_do(hub, made, m1, tmp_path):
    conv = made["conv"]
    serve_folder(hub, "org/private", conv, private=True)
    serve_folder(hub, "org/gated", conv, gated=True)
    hub.add_repo("org/llama", {"config.json": json.dumps({"model_type": "llama", "hidden_size": 8}).encode(),
                               "model.safetensors": b"\0" * 16})
    cases = [
        (("verify", "remote", "org/does-not-exist"), 2, ["not found", "check the name"]),
        (("pull", "org/does-not-exist", tmp_path / "x"), 2, ["not found", "check the name"]),
        (("verify", "remote", "org/private"), 2, ["not found (or private)", "HF_TOKEN"]),
        (("pull", "org/gated", tmp_path / "g", "--layers", "0"), 1, ["gated", "HF_TOKEN"]),
        (("verify", "remote", BASE, "--revision", "no-such-branch"), 2, ["revision 'no-such-branch' does not exist",
                                                                        "check the branch"]),
        (("pull", BASE, tmp_path / "r", "--revision", "no-such-branch"), 2, ["does not exist"]),
        (("pull", "org/llama", tmp_path / "l"), 1, ["config"]),
        (("pull", BASE, tmp_path / "n", "--layers", "0,9"), 2, ["no layer 9"]),
        (("pull", BASE, tmp_path / "n", "--layers", "x"), 2, ["0-3,79"]),
        (("verify", "remote", "not/a/repo"), 2, ["not a Hub repo id"]),
    ]
    with hub_env(hub, token=None):  # anonymous: private and gated repos are out of reach
        for args, exit_code, words in cases:
            code, out, err = m1(*args)
            line = one_error_line(err)
            assert code == exit_code and all(w in line for w in words), (args, code, line)
    assert not (tmp_path / "g" / "model-00001-of-00006.safetensors").exists()

    code, out, err = m1("verify", "remote", "org/llama")  # not an M1: a finding, like verify integrity
    assert code == 1 and "[unreadable]" in out and "Traceback" not in err


def test_verify_remote_reports_an_unparseable_header(hub, made, m1):
    conv = made["conv"]
    bad = shard_files(conv)[2]
    data = bytearray((conv / bad).read_bytes())
    data[8:12] = b"\xff\xfe{]"  # the header's JSON no longer parses
    files = {p.name: p for p in conv.iterdir()}
    files[bad] = bytes(data)
    hub.add_repo("org/bad-header", files)
    code, out, err = m1("verify", "remote", "org/bad-header")
    assert code == 1 and f"[corrupt-shard] file {bad}: corrupt header: not valid JSON" in out
    assert hub.tensor_bytes_sent == 0


def test_verify_remote_retries_then_stops_on_a_network_error(hub, made, m1):
    repo = "org/net"
    serve_folder(hub, repo, made["conv"])
    shard = shard_files(made["conv"])[3]
    fault = hub.inject_fault(rf"/resolve/.*/{shard}$", mode="reset", times=2, method="GET")
    code, out, err = m1("verify", "remote", repo)
    assert code == 0 and fault.hits == 2, out + err

    hub.inject_fault(rf"/resolve/.*/{shard}$", mode="disconnect", times=None, method="GET")
    code, out, err = m1("verify", "remote", repo)
    assert code == 1 and out == ""  # no verdict: nothing is known about the shard
    line = one_error_line(err)
    assert "network error" in line and shard in line and "re-run" in line


# ---- the workflow ---------------------------------------------------------------------------------------------------
def _workflow_commands() -> list[list[str]]:
    text = WORKFLOW.read_text()
    try:
        import yaml
    except ImportError:  # a text check instead
        assert "schedule:" in text and "workflow_dispatch:" in text and "upload-artifact" in text
        runs = [line.split("run:", 1)[1] for line in text.splitlines() if "run:" in line]
        runs += [line for line in text.splitlines() if line.strip().startswith("m1 ")]
    else:
        doc = yaml.safe_load(text)
        triggers = doc.get("on", doc.get(True))  # YAML 1.1 reads the key `on` as True
        assert "schedule" in triggers and "workflow_dispatch" in triggers
        steps = [s for job in doc["jobs"].values() for s in job["steps"]]
        upload = [s for s in steps if str(s.get("uses", "")).startswith("actions/upload-artifact")]
        assert upload and upload[0]["with"]["path"].rstrip("/") == "report" and upload[0]["if"] == "always()"
        runs = [s["run"] for s in steps if "run" in s]
    commands = []
    for run in runs:
        for line in run.splitlines():
            line = line.strip()
            if line.startswith("m1 "):
                argv = shlex.split(line.split(" > ")[0])[1:]
                commands.append([a.replace("$", "") for a in argv])
    return commands


def test_workflow_commands_exist_in_the_cli(m1):
    commands = _workflow_commands()
    names = [" ".join(c[:2]) if c[0] == "verify" else c[0] for c in commands]
    assert names == ["verify remote", "pull", "verify remote", "verify integrity"]
    assert "--layers" in commands[1] and "--against" in commands[2]
    assert "--deep" in commands[3] and "--layers" in commands[3]
    assert all("--json" in c for c in commands)
    for argv in commands:  # every option exists: click rejects an unknown one before --help exits
        code, out, err = m1(*argv, "--help")
        assert code == 0 and "Usage: m1" in out, (argv, err)
    code, out, err = m1("verify", "remote", "a/b", "--no-such-option", "--help")
    assert code != 0
