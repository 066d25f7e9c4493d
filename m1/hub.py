"""The Hub: `m1 push`, `m1 pull` of only the layers you need, `m1 verify remote`.

Every Hub call goes through huggingface_hub, which also finds the token (HF_TOKEN, the saved login);
m1 never reads, prints or stores it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m1.errors import M1Error, UsageError
from m1.hub_read import hub_errors
from m1.spec import classify
from m1.units import human_bytes

PUSH_IGNORE = [".*", "**/.*", "__pycache__/*"]


# ---- layers ---------------------------------------------------------------------------------------
def parse_layers(text: str) -> list[int]:
    """'0-3,79' -> [0, 1, 2, 3, 79]."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise UsageError(f"cannot read the layer list {text!r}", hint="write it like 0-3,79") from None
    if not out or min(out) < 0:
        raise UsageError(f"cannot read the layer list {text!r}", hint="write it like 0-3,79")
    return sorted(out)


def shards_for_layers(weight_map: dict[str, str], layers: list[int], with_globals: bool) -> list[str]:
    wanted = set(layers)
    files = set()
    for name, file in weight_map.items():
        layer = classify(name, file).layer
        if (layer is None and with_globals) or (layer is not None and layer in wanted):
            files.add(file)
    return sorted(files)


# ---- pull -----------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    dest: str
    shards: list[str]
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__


def pull(repo_id: str, dest: Path, layers: list[int] | None = None, with_globals: bool = False,
         revision: str | None = None) -> PullResult:
    """Download config, tokenizer, index and only the shards that hold `layers` (all when None)."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    from m1.checkpoint import INDEX_NAMES, is_extra_file, safe_relative
    from m1.config import M1Config

    api = HfApi()
    with hub_errors(repo_id, revision):
        files = api.list_repo_files(repo_id, revision=revision)
        index_name = next((n for n in INDEX_NAMES if n in files), None)
        if "config.json" not in files:
            raise M1Error(f"{repo_id} has no config.json", hint="is this a MiniMax-M1 checkpoint repo?")
        M1Config.from_file(hf_hub_download(repo_id, "config.json", revision=revision))
        if index_name:
            index_path = hf_hub_download(repo_id, index_name, revision=revision)
            weight_map = json.loads(Path(index_path).read_text())["weight_map"]
            for file in weight_map.values():
                safe_relative(file, f"{repo_id}/{index_name}")
        else:
            weight_map = {}
        if layers is None:
            shards = sorted(set(weight_map.values())) or [f for f in files if f.endswith((".safetensors", ".bin"))]
        else:
            if not weight_map:
                raise UsageError(f"{repo_id} is not sharded: --layers needs an index", hint="pull without --layers")
            shards = shards_for_layers(weight_map, layers, with_globals)
            if not shards:
                raise UsageError(f"no shard of {repo_id} holds layers {layers}", hint="check the layer numbers")
        small = ["config.json", *([index_name] if index_name else []), "m1-manifest.json",
                 *[f for f in files if "/" not in f and is_extra_file(f)]]
        allow = sorted({f for f in small if f in files} | set(shards))
        snapshot_download(repo_id, revision=revision, local_dir=str(dest), allow_patterns=allow)
    return PullResult(repo_id, revision, str(dest), shards, allow)


# ---- model card -----------------------------------------------------------------------------------
def render_card(folder: Path, repo_id: str, report: dict[str, Any] | None = None) -> str:
    """README.md for the repo, with huggingface_hub's ModelCard / ModelCardData."""
    from huggingface_hub import ModelCard, ModelCardData

    from m1.inspect import inspect_checkpoint
    from m1.writer import read_manifest

    info = inspect_checkpoint(str(folder))
    manifest = read_manifest(folder) or {}
    job = manifest.get("job", {})
    base_model = job.get("base_model")
    if not base_model and isinstance(job.get("source"), str) and not Path(job["source"]).exists() \
            and job["source"].count("/") == 1:
        base_model = job["source"]
    scheme = info["quantization"]
    tags = ["minimax-m1", "moe", "m1"]
    if scheme:
        tags += ["bitsandbytes", "8-bit" if scheme == "int8" else "4-bit", scheme]
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", tags=tags,
        base_model=base_model, base_model_relation="quantized" if (scheme and base_model) else None,
        pipeline_tag="text-generation",
    )
    rows = ["| part | tensors | parameters | bytes | stored as |", "|---|---:|---:|---:|---|"]
    quantized_roles = {"expert"} if scheme else set()
    for role, r in sorted(info["by_role"].items(), key=lambda kv: -kv[1]["bytes"]):
        stored = f"{scheme} (bitsandbytes)" if role in quantized_roles else "kept"
        rows.append(f"| {role} | {r['tensors']} | {r['params']:,} | {human_bytes(r['bytes'])} | {stored} |")
    what = (f"The MoE experts are quantized to **{scheme}** with bitsandbytes; the lightning and softmax attention, "
            "the routers (fp32), the norms, the embedding and the head are kept in their source precision."
            if scheme else "All tensors are stored unquantized.")
    load = [
        "## How to load",
        "",
        "- transformers 4.x with the release's remote code (release flavour):",
        "  `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True)`",
        "- transformers 5.x (experts stay quantized): `import m1; model = m1.load_pretrained(local_dir)`",
        "- llama.cpp: convert to GGUF first; stock Q4_K_M quantizes the attention too.",
    ]
    lines = [
        f"# {repo_id}",
        "",
        f"MiniMax-M1 checkpoint made with [m1](https://github.com/) ({manifest.get('tool', 'm1')}). {what}",
        "",
        f"{info['layers']} layers ({info['lightning_layers']} lightning attention, {info['softmax_layers']} softmax), "
        f"{info['experts']} experts top-{info['top_k']}; {info['tensors']} tensors in {info['shards']} shards, "
        f"{human_bytes(info['bytes'])}.",
        "",
        "## What was quantized and what was kept",
        "",
        *rows,
        "",
        *load,
    ]
    if base_model:
        lines[3:3] = [f"Base model: [{base_model}](https://huggingface.co/{base_model}).", ""]
    if report:
        lines += ["", "## Agreement with the original (m1 verify compare)", "",
                  "| candidate | tokens | PPL ratio | KL mean | KL p99 | top-1 |", "|---|---:|---:|---:|---:|---:|"]
        for cand in report.get("candidates", []):
            m = cand.get("metrics", cand)
            lines.append(f"| {cand.get('name', '')} | {m.get('tokens', '')} | {m.get('ppl_ratio', float('nan')):.4f} "
                         f"| {m.get('kl_mean', float('nan')):.5f} | {m.get('kl_p99', float('nan')):.5f} "
                         f"| {100 * m.get('top1', float('nan')):.2f}% |")
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n").content


# ---- push -----------------------------------------------------------------------------------------
def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         report_path: Path | None = None, message: str | None = None) -> dict[str, Any]:
    from huggingface_hub import HfApi

    from m1.safetensors_io import write_bytes_atomic
    from verify.integrity import check_integrity

    integrity = check_integrity(str(folder))
    if not integrity.ok:
        first = integrity.findings[0].line()
        raise M1Error(f"refusing to push: m1 verify integrity found {len(integrity.findings)} problems, first: {first}",
                      file=str(folder), hint="fix them (m1 verify integrity shows all) or re-run the job")
    report = None
    if report_path is not None:
        path = report_path / "report.json" if report_path.is_dir() else report_path
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UsageError("cannot read the verify report", file=str(path),
                             hint="give the report.json that m1 verify compare wrote") from None
    card = render_card(folder, repo_id, report)
    write_bytes_atomic(folder / "README.md", card.encode())
    api = HfApi()
    with hub_errors(repo_id, revision):
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
            commit_message=message or f"Upload {folder.name} with m1", ignore_patterns=PUSH_IGNORE,
        )
    return {"repo_id": repo_id, "url": str(url), "commit": commit.oid, "commit_url": commit.commit_url,
            "pr_url": commit.pr_url}


# ---- verify remote --------------------------------------------------------------------------------
def verify_remote(repo_id: str, revision: str | None = None, against: Path | None = None):  # -> IntegrityReport
    """Headers over range requests checked against the spec and the index; LFS sha256 against a local copy
    or manifest (`against`), or against the m1-manifest.json pushed with the repo."""
    from huggingface_hub import HfApi

    from verify.integrity import IntegrityReport, check_checkpoint

    report = IntegrityReport(repo_id)
    from m1.checkpoint import Checkpoint

    try:
        ckpt = Checkpoint.open(repo_id, revision=revision)
    except UsageError:
        raise
    except M1Error as exc:
        report.add("unreadable", exc.message, exc.file, exc.tensor)
        return report
    api = HfApi()
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    remote = {s.rfilename: s for s in info.siblings or []}
    check_checkpoint(ckpt, report)  # headers over range requests; truncation shows against the Hub's sizes
    expected_sha = _expected_hashes(api, repo_id, revision, against, remote, report)
    for file, sha in expected_sha.items():
        sibling = remote.get(file)
        lfs = getattr(sibling, "lfs", None)
        hub_sha = getattr(lfs, "sha256", None) if lfs is not None else None
        if sibling is None:
            report.add("missing-shard", "not in the Hub repo", file)
        elif hub_sha is None:
            report.add("sha256", "the Hub has no LFS sha256 for this file", file)
        elif hub_sha != sha:
            report.add("sha256", f"Hub LFS sha256 {hub_sha[:12]}... differs from {sha[:12]}...", file)
    report.stats.update(revision=info.sha, hashes_compared=len(expected_sha))
    return report


def _expected_hashes(api: Any, repo_id: str, revision: str | None, against: Path | None, remote: dict[str, Any],
                     report: Any) -> dict[str, str]:
    from m1.safetensors_io import file_sha256
    from m1.writer import MANIFEST, read_manifest

    if against is not None:
        if not against.is_dir():
            raise UsageError("--against must be a local checkpoint folder", file=str(against))
        # Local files are hashed (the real check); a shard not on disk is taken from the local manifest.
        recorded = {f: r["sha256"] for f, r in ((read_manifest(against) or {}).get("shards", {})).items()}
        shards = [f for f in remote if f.endswith((".safetensors", ".bin"))]
        out = {f: file_sha256(against / f).hexdigest() for f in shards if (against / f).exists()}
        out.update({f: sha for f, sha in recorded.items() if f not in out})
        if not out:
            report.add("sha256", "no local shard or manifest to compare with", str(against))
        return out
    if MANIFEST in remote:
        from huggingface_hub import hf_hub_download

        with hub_errors(repo_id, revision, MANIFEST):
            path = hf_hub_download(repo_id, MANIFEST, revision=revision)
        try:
            manifest = json.loads(Path(path).read_text())
        except ValueError:
            report.add("manifest", "the pushed m1-manifest.json is not valid JSON", MANIFEST)
            return {}
        return {f: r["sha256"] for f, r in manifest.get("shards", {}).items()}
    return {}
