"""The Hub: `m1 push`, `m1 pull` of only the layers you need, `m1 verify remote`.

Every Hub call goes through huggingface_hub, which also finds the token (HF_TOKEN, the saved login);
m1 never reads, prints or stores it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.errors import CheckpointError, M1Error, UsageError
from m1.hub_read import _call, check_repo_id, hub_errors, quiet_hub_logs, with_retries
from m1.spec import classify
from m1.units import human_bytes

if TYPE_CHECKING:
    pass

PUSH_IGNORE = (".*", "**/.*", "__pycache__/*", "*.tmp", "*.partial")
CARD_MARKER = "<!-- m1:model-card: m1 push rewrites this file while this line is here; delete it to keep your edits -->"
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def push_delete() -> tuple[str, ...]:
    """Remote files that a push replaces as a whole: weights left over from an older push would not match the
    index."""
    from m1.index import weight_file_suffixes

    return (*(f"*{s}" for s in weight_file_suffixes()), "*.index.json", "m1-manifest.json")


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
    """The files that hold any tensor of `layers` (and of the embedding, final norm and head with `with_globals`).
    Names the spec does not know are skipped here; `m1 verify integrity` reports them."""
    wanted = set(layers)
    files = set()
    for name, file in weight_map.items():
        try:
            layer = classify(name, file).layer
        except M1Error:
            continue
        if (layer is None and with_globals) or (layer is not None and layer in wanted):
            files.add(file)
    return sorted(files)


# ---- pull -----------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    revision: str | None
    commit: str | None
    dest: str
    shards: list[str]
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pull(repo_id: str, dest: Path, layers: list[int] | None = None, with_globals: bool = False,
         revision: str | None = None) -> PullResult:
    """Download config, tokenizer, index and only the shards that hold `layers` (all when None).

    Everything is read at one commit (the one `revision` names now); snapshot_download keeps its
    resume state in `dest`, so a re-run after an interruption fetches only what is missing.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    from m1.hub_read import model_info, remote_config
    from m1.index import INDEX_NAMES, parse_index, weight_file_suffixes
    from m1.storage import is_extra_file

    if dest.exists() and not dest.is_dir():
        raise UsageError("the destination is a file", file=str(dest), hint="give a folder")
    with quiet_hub_logs():
        info = model_info(repo_id, revision, files_metadata=True)
        sha = info.sha or revision
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        files = sorted(sizes)
        if "config.json" not in sizes:
            raise CheckpointError(f"{repo_id} has no config.json", hint="is this a MiniMax-M1 checkpoint repo?")
        config = remote_config(repo_id, sha, revision)
        index_name = next((n for n in INDEX_NAMES if n in sizes), None)
        weight_map: dict[str, str] = {}
        if index_name:
            index_path = _call(repo_id, revision, lambda: hf_hub_download(repo_id, index_name, revision=sha),
                               index_name)
            weight_map = parse_index(Path(index_path).read_bytes(), f"{repo_id}/{index_name}").weight_map
        if layers is None:
            shards = sorted(set(weight_map.values())) or [f for f in files if f.endswith(weight_file_suffixes())]
        else:
            n_layers = config.num_hidden_layers
            beyond = [i for i in layers if i >= n_layers]
            if beyond:
                raise UsageError(f"{repo_id} has {n_layers} layers (0-{n_layers - 1}); there is no layer "
                                 f"{','.join(map(str, beyond))}", hint="check the layer numbers")
            if not weight_map:
                raise UsageError(f"{repo_id} is not sharded: --layers needs an index", hint="pull without --layers")
            shards = shards_for_layers(weight_map, layers, with_globals)
            if not shards:
                raise CheckpointError(f"the index of {repo_id} maps no tensor of layers {layers}",
                                      hint="m1 verify remote shows what is wrong with it")
        missing = [f for f in shards if f not in sizes]
        if missing:
            raise CheckpointError(f"the index names {len(missing)} shards the repo lacks, e.g. {missing[0]}",
                                  file=f"{repo_id}/{index_name}", hint="m1 verify remote shows all; re-upload them")
        small = ["config.json", *([index_name] if index_name else []), "m1-manifest.json",
                 *[f for f in files if "/" not in f and is_extra_file(f)]]
        allow = sorted({f for f in small if f in sizes} | set(shards))
        with hub_errors(repo_id, revision):
            with_retries(lambda: snapshot_download(repo_id, revision=sha, local_dir=str(dest), allow_patterns=allow),
                         f"download of {repo_id}")
    return PullResult(repo_id, revision, sha, str(dest), shards, allow, sum(sizes.get(f) or 0 for f in allow))


# ---- model card -----------------------------------------------------------------------------------
def base_model_of(manifest: dict[str, Any]) -> str | None:
    """What the folder was made from: the manifest's job.base_model, else job.source when that was a Hub repo."""
    from m1.hub_read import REPO_ID

    job = manifest.get("job") if isinstance(manifest.get("job"), dict) else {}
    base = job.get("base_model")
    if isinstance(base, str) and REPO_ID.match(base):
        return base
    source = job.get("source")
    # A Hub source is recorded with the commit it was read at; a local folder has no revision.
    if isinstance(source, str) and REPO_ID.match(source) and job.get("revision"):
        return source
    return None


def _num(value: Any, fmt: str, scale: float = 1.0) -> str:
    try:
        x = float(value) * scale
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return "" if math.isnan(x) else format(x, fmt)


def _metric_rows(report: Any) -> list[str]:
    """Rows of the verify-compare table; tolerant of what report.json holds."""
    candidates = report.get("candidates", []) if isinstance(report, dict) else report
    if isinstance(candidates, dict):
        candidates = [{"name": k, **v} if isinstance(v, dict) else {"name": k} for k, v in candidates.items()]
    rows = []
    for cand in candidates if isinstance(candidates, list) else []:
        if not isinstance(cand, dict):
            continue
        m = cand.get("metrics") if isinstance(cand.get("metrics"), dict) else cand
        top1 = m.get("top1")
        rows.append(f"| {cand.get('name', cand.get('path', ''))} | {_num(m.get('tokens'), ',.0f')} "
                    f"| {_num(m.get('ppl_ratio'), '.4f')} | {_num(m.get('kl_mean'), '.5f')} "
                    f"| {_num(m.get('kl_p99'), '.5f')} "
                    f"| {_num(top1, '.2f', 100 if isinstance(top1, (int, float)) and top1 <= 1 else 1)}"
                    f"{'%' if top1 is not None else ''} |")
    return rows


def _recipe_lines(folder: Path) -> list[str]:
    """The measured mix (m1 quantize --budget), when its m1-recipe.json is in the folder: map, sizes, loading."""
    from m1.formats import all_formats

    paths = [folder / "m1-recipe.json", *sorted(folder.glob("*.m1-recipe.json"))]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return []
    try:
        doc = json.loads(path.read_text())
        groups, layer_map = dict(doc["groups"]), list(doc.get("layer_map", []))
    except (OSError, ValueError, KeyError, TypeError):
        return []
    counts: dict[str, int] = {}
    for c in groups.values():
        counts[c] = counts.get(c, 0) + 1
    how = ("errors from a stated prior (nothing measured)" if doc.get("metric") == "prior" else
           f"each group's isolated error ({doc.get('metric')}) measured on {doc.get('calibration')}")
    lines = ["", "## Mixed precision (m1 quantize --budget)", "",
             f"A mix of {', '.join(f'{c} ({n} groups)' for c, n in counts.items())} over {len(groups)} expert tensor "
             f"groups (per layer: w1+w3, w2), chosen to minimise the predicted error within "
             f"{doc.get('budget', {}).get('text', '?')} ({how}); {human_bytes(doc.get('bytes', 0))}. "
             f"Recipe: `{path.name}` (replay with `m1 quantize SRC DST --recipe {path.name}`).", "",
             "```", *layer_map, "```"]
    fmt = next((f for f in all_formats() if f.name == doc.get("format")), None)
    if (fmt is None or fmt.mix_reader is None) and len([c for c in counts if c != "keep"]) > 1:
        lines += ["", "**Loading:** a bitsandbytes mix of several schemes runs only through `m1.load_pretrained`; "
                  "stock transformers 4.x takes one bitsandbytes scheme per model (plus unquantized modules)."]
    return lines


def render_card(folder: Path, repo_id: str, report: Any = None) -> str:
    """README.md for the repo, with huggingface_hub's ModelCard / ModelCardData."""
    from huggingface_hub import ModelCard, ModelCardData

    from m1.formats import all_formats
    from m1.inspect import inspect_checkpoint
    from m1.manifest import read_manifest

    info = inspect_checkpoint(str(folder))
    manifest = read_manifest(folder) or {}
    base_model = base_model_of(manifest)
    scheme = info.get("quantization")
    quantized = bool(scheme)
    tags = ["minimax-m1", "minimax", "moe", "m1"]
    if quantized:
        tags += ["bitsandbytes", "8-bit" if scheme == "int8" else "4-bit", str(scheme)]
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", tags=tags, pipeline_tag="text-generation",
        base_model=base_model, base_model_relation="quantized" if (quantized and base_model) else None,
    )
    qc = info.get("quantization_config") or {}
    mix = qc.get("m1_mix") if isinstance(qc, dict) else None
    mixed = f"a mix of {scheme} and {', '.join(mix['schemes'])}" if isinstance(mix, dict) and mix.get("schemes") \
        else None
    rows = ["| part | tensors | parameters | size | stored as |", "|---|---:|---:|---:|---|"]
    for role, r in sorted(info.get("by_role", {}).items(), key=lambda kv: -kv[1]["bytes"]):
        stored = f"{mixed or scheme} (bitsandbytes)" if quantized and role == "expert" else "kept"
        rows.append(f"| {role} | {r['tensors']} | {r['params']:,} | {human_bytes(r['bytes'])} | {stored} |")
    rows.append(f"| **total** | {info['tensors']} | {sum(r['params'] for r in info.get('by_role', {}).values()):,} "
                f"| {human_bytes(info['bytes'])} | |")
    dtypes = ", ".join(f"{d} {human_bytes(r['bytes'])}" for d, r in sorted(info.get("by_dtype", {}).items()))
    what = (f"The MoE experts are quantized to **{scheme}** with bitsandbytes; the lightning and softmax attention, "
            "the routers (fp32), the norms, the embedding and the head are kept in their source precision."
            if quantized else "No tensor is quantized: every tensor is stored in its source precision.")
    release = info.get("flavour") == "release"
    load = [
        "## How to load",
        "",
        "```bash",
        f"m1 pull {repo_id} local-dir/            # or only some layers: --layers 0-3,79",
        "m1 verify integrity local-dir/ --deep",
        "```",
        "",
        *(["- **transformers 4.x** with the release's remote code: "
            "`AutoModelForCausalLM.from_pretrained(local_dir, trust_remote_code=True)`",
            "- **transformers' built-in MiniMax**: `m1 convert local-dir/ hf-dir/ --to hf` first"]
          if release else
          ["- **transformers** (built-in MiniMax): `AutoModelForCausalLM.from_pretrained(local_dir)`",
           "- **transformers 4.x with the release's remote code**: `m1 convert local-dir/ release-dir/ --to release` "
           "first"]),
        *(["- **m1** (transformers 5.x, the experts stay quantized): "
           "`import m1; model = m1.load_pretrained(local_dir)`"] if quantized else []),
        # a format with its own runtime: how to run its files in the folder, or why these are not its files
        *(f.card_line(sorted(p.name for p in folder.glob(f"*{f.file_suffix}")) if f.file_suffix else [])
          for f in all_formats() if f.card_line is not None),
    ]
    lines = [
        CARD_MARKER,
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        *([f"Made from [{base_model}](https://huggingface.co/{base_model}).", ""] if base_model else []),
        f"MiniMax-M1 checkpoint written by m1 ({manifest.get('tool', 'm1')}). {what}",
        "",
        f"{info['layers']} layers ({info['lightning_layers']} lightning attention, {info['softmax_layers']} "
        f"softmax), {info['experts']} experts, top-{info['top_k']}; {info['tensors']} tensors in {info['shards']} "
        f"shards, {human_bytes(info['bytes'])} ({dtypes}). Layout: {info.get('flavour', '?')}.",
        "",
        "## What was quantized and what was kept",
        "",
        *rows,
        "",
        *load,
    ]
    metric_rows = _metric_rows(report) if report is not None else []
    if metric_rows:
        lines += ["", "## Agreement with the original (m1 verify compare)", "",
                  "| candidate | tokens | PPL ratio | KL mean | KL p99 | top-1 |", "|---|---:|---:|---:|---:|---:|",
                  *metric_rows]
    lines += _recipe_lines(folder)
    job = manifest.get("job") if isinstance(manifest.get("job"), dict) else {}
    if isinstance(job.get("recipe"), dict):  # a mix's per-weight table: its summary is above
        job = {**job, "recipe": f"{len(job['recipe'])} weights, see the mixed precision section"}
    if job:
        lines += ["", "## How it was made", "", "```json", json.dumps(job, indent=2, default=str), "```"]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    return str(card)


def _read_report(report_path: Path) -> Any:
    path = report_path / "report.json" if report_path.is_dir() else report_path
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError("cannot read the verify report", file=str(path),
                         hint="give the report/ folder (or report.json) that m1 verify compare wrote") from None


# ---- push -----------------------------------------------------------------------------------------
def push(folder: Path, repo_id: str, private: bool = False, revision: str | None = None, create_pr: bool = False,
         report_path: Path | None = None, message: str | None = None) -> dict[str, Any]:
    """Check the folder, write its model card, and upload it in one commit (or pull request).

    An interrupted push is resumed by running it again: files the Hub already holds (LFS objects
    included) are not sent again. Weights, index and manifest left on the Hub by an older push and absent
    from the folder are deleted in the same commit. (With hf_xet active, huggingface_hub's folder upload
    may split a very large folder into several commits; without it, the upload is one commit.)
    """
    from huggingface_hub import HfApi

    from m1.atomic_io import write_bytes_atomic
    from m1.integrity import check_integrity

    check_repo_id(repo_id)
    if not folder.is_dir():
        raise UsageError("not a checkpoint folder", file=str(folder), hint="give the folder an m1 job wrote")
    if create_pr and revision not in (None, "main"):
        raise UsageError("--create-pr opens a pull request against main; it does not go with --revision",
                         hint="drop one of them (to add to an open PR use --revision refs/pr/N)")
    if revision and COMMIT_SHA.match(revision):
        raise UsageError("push --revision takes a branch name (or refs/pr/N), not a commit sha")
    integrity = check_integrity(str(folder))
    if not integrity.ok:
        first = integrity.findings[0].line()
        raise M1Error(f"refusing to push: m1 verify integrity found {len(integrity.findings)} problems, first: {first}",
                      file=str(folder), hint="m1 verify integrity shows them all; fix them or re-run the job")
    report = _read_report(report_path) if report_path is not None else None
    readme = folder / "README.md"
    card_written = not readme.exists() or CARD_MARKER in readme.read_text(errors="replace")
    if card_written:
        write_bytes_atomic(readme, render_card(folder, repo_id, report).encode())
    api = HfApi()
    with hub_errors(repo_id, revision), quiet_hub_logs():
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        before = api.repo_info(repo_id, revision=revision if not create_pr else None).sha
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=revision, create_pr=create_pr,
            commit_message=message or f"Upload {folder.resolve().name} with m1",
            ignore_patterns=list(PUSH_IGNORE), delete_patterns=list(push_delete()),
        )
    changed = bool(commit.pr_url) or commit.oid != before
    return {"repo_id": repo_id, "url": str(url), "revision": revision or "main", "commit": commit.oid,
            "commit_url": commit.commit_url, "pr_url": commit.pr_url, "changed": changed,
            "model_card": "written" if card_written else "kept (README.md has no m1 marker)"}
