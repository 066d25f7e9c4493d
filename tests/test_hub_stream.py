"""Issue 13: quantizing (and converting) straight from a Hub repo id with bounded disk (`--scratch`), against
the loopback Hub server of the tests: the scratch folder never holds more than the bound (measured while the
job runs), each shard is downloaded once and never into the Hugging Face cache, and the output has the
bytes of the same job run on a local copy."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hubserver import HubServer, hub_env

import m1.hub_read as hub_read
from m1.cli import run_cli

REPO = "org/tiny-by-layer"
SPREAD = "org/tiny-spread"  # make-tiny's layout: every layer's tensors dealt over all three shards


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubServer, Path]]:
    """A tiny M1 whose shards each hold one layer (as the release's hold consecutive layers), served as REPO."""
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("served")
    make_tiny(root / "tiny", TinySpec(layers=6, hidden=64, intermediate=128))
    assert run_cli(["convert", str(root / "tiny"), str(root / "local"), "--layout", "by-layer", "-q"]) == 0
    (root / "local" / "m1-manifest.json").unlink()  # a plain checkpoint, as a publisher uploads it
    with HubServer() as server:
        server.add_repo(REPO, {p.name: p for p in (root / "local").iterdir()})
        server.add_repo(SPREAD, {p.name: p for p in (root / "tiny").iterdir()})
        yield server, root / "local"


@pytest.fixture
def hub(served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HubServer, Path]]:
    server, local = served
    server.reset_counters()
    server.clear_faults()
    monkeypatch.setattr(hub_read, "RETRY_WAIT_S", 0.0)
    with hub_env(server, home=tmp_path / "hf_home"):
        yield server, local
    assert not server.server_errors, server.server_errors[-1]


def shard_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}


def weights(folder: Path, pattern: str = "*") -> dict[str, bytes]:
    """What a job wrote, but the manifest (it names the source, which differs: a repo id or a folder)."""
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))
            if p.is_file() and not p.name.endswith("m1-manifest.json")}


class DiskWatch:
    """The bytes under a folder, sampled every millisecond while a job runs and right after every download
    (when the most is held), so the peak on disk is measured, not assumed."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
        self.folder = folder
        self.peak = 0
        self.samples = 0
        self.after_download: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if monkeypatch is None:  # downloads in other processes: sampling alone
            return
        real = hub_read.download_file

        def watched(*args: object, **kwargs: object) -> Path:
            path = real(*args, **kwargs)  # type: ignore[arg-type]
            if kwargs.get("local_dir") is not None or len(args) > 3:
                self.after_download.append(self.measure())
            return path

        monkeypatch.setattr(hub_read, "download_file", watched)

    def measure(self) -> int:
        total = 0
        for top, _, names in os.walk(self.folder):  # a folder or file deleted while looking is skipped
            for name in names:
                try:
                    total += os.stat(os.path.join(top, name)).st_size
                except OSError:
                    pass
        self.peak = max(self.peak, total)
        self.samples += 1
        return total

    def _run(self) -> None:
        while not self.stop.is_set():
            self.measure()
            time.sleep(0.001)

    def __enter__(self) -> DiskWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def full_downloads(server: HubServer, file: str, repo: str = REPO) -> int:
    return len([r for r in server.requests_for(kind="resolve", method="GET", repo_id=repo)
                if r.filename == file and r.range is None])


@pytest.mark.parametrize("layout", ["size", "by-layer"])
def test_quantize_from_the_hub_within_scratch_gives_the_local_bytes(hub, tmp_path: Path, monkeypatch, layout) -> None:
    server, local = hub
    sizes = shard_sizes(local)
    bound = 2 * max(sizes.values()) + (256 << 10)  # two layers' shards and their slack: well below the sum
    assert bound < sum(sizes.values()) * 0.5
    dest = tmp_path / "stream"
    with DiskWatch(dest / ".m1-scratch", monkeypatch) as watch:
        code = run_cli(["quantize", REPO, str(dest), "--scheme", "nf4", "--layout", layout, "--scratch", str(bound),
                        "--json", "-q"])
    assert code == 0
    assert watch.samples > 100 and len(watch.after_download) == len(sizes)
    assert 0 < watch.peak <= bound, (watch.peak, bound)
    assert max(watch.after_download) >= max(sizes.values())  # it did see a shard on disk
    for file in sizes:
        assert full_downloads(server, file) == 1, file  # each shard once (its header aside, by range reads)
    cache = tmp_path / "hf_home" / "hub"
    assert sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) < 64 << 10  # config, index, tokenizer
    assert not (dest / ".m1-scratch").exists()

    ref = tmp_path / "local-run"
    assert run_cli(["quantize", str(local), str(ref), "--scheme", "nf4", "--layout", layout, "-q"]) == 0
    assert weights(dest) == weights(ref)
    assert json.loads((dest / "m1-manifest.json").read_text())["shards"] == \
        json.loads((ref / "m1-manifest.json").read_text())["shards"]


def test_convert_to_gguf_from_the_hub_within_scratch(hub, tmp_path: Path, monkeypatch) -> None:
    """Stacked experts read a layer's experts one by one: the first split is still written last."""
    server, local = hub
    sizes = shard_sizes(local)
    bound = 2 * max(sizes.values()) + (256 << 10)
    (tmp_path / "stream").mkdir()
    with DiskWatch(tmp_path / "stream" / ".tiny.m1-scratch", monkeypatch) as watch:
        code = run_cli(["convert", REPO, str(tmp_path / "stream" / "tiny.gguf"), "--to", "gguf", "--split-max-size",
                        "400KB", "--scratch", str(bound), "-q"])
    assert code == 0
    assert 0 < watch.peak <= bound
    assert all(full_downloads(server, f) == 1 for f in sizes)
    (tmp_path / "ref").mkdir()
    assert run_cli(["convert", str(local), str(tmp_path / "ref" / "tiny.gguf"), "--to", "gguf", "--split-max-size",
                    "400KB", "-q"]) == 0
    assert weights(tmp_path / "stream") == weights(tmp_path / "ref") and len(weights(tmp_path / "ref")) >= 3


def test_dry_run_states_peak_scratch_and_downloads(hub, tmp_path: Path, capsys) -> None:
    server, local = hub
    sizes = shard_sizes(local)
    capsys.readouterr()
    assert run_cli(["quantize", REPO, str(tmp_path / "q"), "--scheme", "nf4", "--scratch", "1MB", "--dry-run",
                    "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["scratch"]
    assert plan["download_bytes"] == sum(sizes.values()) and plan["shards"] == len(sizes) and plan["each_once"]
    assert max(sizes.values()) < plan["needed_bytes"] <= plan["held_at_most_bytes"] == 1_000_000 and plan["fits"]
    assert run_cli(["quantize", REPO, str(tmp_path / "q"), "--scheme", "nf4", "--scratch", "1MB", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "scratch: needs" in text and "holds at most 1.00 MB of the 1.00 MB bound" in text
    assert f"({len(sizes)} shards, each once)" in text
    assert not (tmp_path / "q").exists()
    assert not [r for r in server.requests_for(kind="resolve", method="GET") if r.range is None
                and r.filename.endswith(".safetensors")]  # a dry run downloads no shard


def test_a_bound_that_cannot_work_is_refused_before_anything_is_written(hub, tmp_path: Path, capsys) -> None:
    server, local = hub
    dest = tmp_path / "q"
    capsys.readouterr()
    assert run_cli(["quantize", REPO, str(dest), "--scheme", "nf4", "--scratch", "100KB", "-q"]) == 2
    err = capsys.readouterr().err
    assert "smaller than the source shard" in err and "use --scratch" in err, err
    assert not dest.exists()
    assert run_cli(["quantize", REPO, str(dest), "--scheme", "nf4", "--scratch", "100KB", "--dry-run"]) == 0
    assert "does not fit" in capsys.readouterr().out
    spread = sorted(p.stat().st_size for p in (local.parent / "tiny").glob("*.safetensors"))
    two = str(spread[-1] + spread[-2] + (200 << 10))  # every file of these layouts reads all three shards
    for layout in ("size", "by-layer"):  # a layout asked for is kept: then the bound cannot work
        assert run_cli(["quantize", SPREAD, str(dest), "--scheme", "nf4", "--scratch", two, "--layout", layout,
                        "-q"]) == 2
        err = capsys.readouterr().err
        assert "below what this job holds at once" in err and "3 source shards needed together" in err, err
        assert "--layout source" in err and not dest.exists()
        assert run_cli(["quantize", SPREAD, str(dest), "--scheme", "nf4", "--scratch", two, "--layout", layout,
                        "--dry-run"]) == 0
        assert "does not fit" in capsys.readouterr().out
    for args, says in [([str(local), str(dest), "--scratch", "1MB"], "applies when the source is a Hub repo id"),
                       ([REPO, str(dest), "--scratch", "1MB", "--workers", "2"], "one writer per process")]:
        assert run_cli(["quantize", *args, "--scheme", "nf4", "-q"]) == 2
        assert says in capsys.readouterr().err
        assert not dest.exists()


def test_a_layout_that_does_not_fit_gets_the_source_order(hub, tmp_path: Path, monkeypatch, capsys) -> None:
    """make-tiny deals every layer over all three shards, so any file of the size layout reads all of them at
    once; with no --layout the files are written in the source's order instead (one shard live at a time),
    which a local run gives with --layout source."""
    server, local = hub
    spread = local.parent / "tiny"
    sizes = shard_sizes(spread)
    bound = max(sizes.values()) + (128 << 10)  # one shard and slack
    dest = tmp_path / "stream"
    with DiskWatch(dest / ".m1-scratch", monkeypatch) as watch:
        code = run_cli(["quantize", SPREAD, str(dest), "--scheme", "nf4", "--scratch", str(bound), "-q"])
    assert code == 0
    assert "writing them in the source's order" in capsys.readouterr().err
    assert 0 < watch.peak <= bound
    assert all(full_downloads(server, f, SPREAD) == 1 for f in sizes)
    ref = tmp_path / "ref"
    assert run_cli(["quantize", str(spread), str(ref), "--scheme", "nf4", "--layout", "source", "-q"]) == 0
    assert weights(dest) == weights(ref)
    assert json.loads((ref / "m1-manifest.json").read_text())["job"]["layout"] == "source"
    plain = tmp_path / "plain"  # the same tensors, grouped otherwise
    assert run_cli(["quantize", str(spread), str(plain), "--scheme", "nf4", "-q"]) == 0
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, bytes]:
        return {k: v.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                for p in folder.glob("model-*.safetensors") for k, v in load_file(p).items()}

    assert tensors(ref) == tensors(plain)


def test_resume_of_a_stream_downloads_only_what_is_missing(hub, tmp_path: Path) -> None:
    server, local = hub
    sizes = shard_sizes(local)
    dest = tmp_path / "stream"
    args = ["convert", REPO, str(dest), "--layout", "by-layer", "--scratch", "1MB", "-q"]
    assert run_cli(args) == 0
    manifest = json.loads((dest / "m1-manifest.json").read_text())
    (dest / "m1-manifest.json").unlink()  # as if stopped after three files
    keep = sorted(manifest["shards"])[:3]
    (dest / ".m1-progress.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"],
                                                        "shards": {n: manifest["shards"][n] for n in keep}}))
    for name in sorted(manifest["shards"])[3:]:
        (dest / name).unlink()
    (dest / ".m1-scratch").mkdir()
    (dest / ".m1-scratch" / "left-by-a-killed-run").write_bytes(b"x" * 1000)
    server.reset_counters()
    assert run_cli([*args, "--resume"]) == 0
    fetched = {f for f in sizes if full_downloads(server, f)}
    assert fetched == {f for f in sizes if f not in keep}  # by-layer: output i reads source shard i
    assert not (dest / ".m1-scratch").exists()
    ref = tmp_path / "ref"
    assert run_cli(["convert", str(local), str(ref), "--layout", "by-layer", "-q"]) == 0
    assert weights(dest) == weights(ref)


@pytest.mark.slow
def test_torchrun_ranks_stream_their_shares_within_the_bound_per_node(hub, tmp_path: Path) -> None:
    """Under torchrun every rank streams its own contiguous share through its own scratch folder, the node's
    bound split between its ranks; together they give the bytes of one process."""
    import subprocess
    import sys

    server, local = hub
    sizes = shard_sizes(local)
    bound = 2 * (max(sizes.values()) + (128 << 10))  # one shard (and slack) per rank
    dest = tmp_path / "stream"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--standalone", "--nnodes", "1", "--nproc-per-node", "2", "-m", "m1", "quantize", REPO,
           str(dest), "--scheme", "nf4", "--layout", "by-layer", "--scratch", str(bound), "-q"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    with DiskWatch(dest / ".m1-scratch") as watch:  # the ranks download in their own processes: sampled
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                              cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 0 < watch.peak <= bound, (watch.peak, bound)
    assert all(full_downloads(server, f) == 1 for f in sizes)  # contiguous shares: no shard read by two ranks
    ref = tmp_path / "ref"
    assert run_cli(["quantize", str(local), str(ref), "--scheme", "nf4", "--layout", "by-layer", "-q"]) == 0
    assert weights(dest) == weights(ref)
    assert not list(dest.glob(".*"))


@pytest.mark.slow
def test_m1_40k_from_the_hub_fits_40gb_in_the_source_order(hub, tmp_path: Path, capsys) -> None:
    """The real index (413 shards, 912 GB) served sparse: the release deals a layer's experts over dozens of
    shards, so the size layout would hold ~130 GB of shards at once; --scratch 40GB picks the source order,
    which holds one shard at a time, and downloads every shard once. Headers only: no tensor byte is read."""
    from test_hub import _replica_files

    server, _ = hub
    files, shards, _ = _replica_files()
    server.add_repo("MiniMaxAI/MiniMax-M1-40k", files)
    server.reset_counters()
    capsys.readouterr()
    args = ["quantize", "MiniMaxAI/MiniMax-M1-40k", str(tmp_path / "q"), "--scheme", "nf4", "--scratch", "40GB",
            "--dry-run", "--json"]
    assert run_cli(args) == 0
    out, err = capsys.readouterr()
    plan = json.loads(out)
    assert "writing them in the source's order" in err and "130.45 GB" in err
    assert plan["job"]["layout"] == "source" and plan["shards"] == 54
    scratch = plan["scratch"]
    assert scratch["fits"] and scratch["shards"] == shards == 413 and scratch["download_bytes"] > 912e9
    assert scratch["needed_bytes"] < 4.5e9  # the largest shard (4.41 GB with its slack): one at a time
    assert scratch["held_at_most_bytes"] == 40e9  # fetched ahead up to the bound
    assert run_cli([*args[:-1], "--layout", "by-layer"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert server.tensor_bytes_sent == 0


def test_a_failed_download_fails_the_job_in_one_line_and_resume_finishes_it(hub, tmp_path: Path, capsys,
                                                                           monkeypatch) -> None:
    import huggingface_hub.utils._http as hf_http

    class NoWait:  # huggingface_hub's own backoff (1, 2, 4, 8, 8 s), without the waiting
        sleep = staticmethod(lambda seconds: None)

        def __getattr__(self, name: str) -> object:
            return getattr(time, name)

    monkeypatch.setattr(hf_http, "time", NoWait())
    server, local = hub
    dest = tmp_path / "stream"
    args = ["quantize", REPO, str(dest), "--scheme", "nf4", "--layout", "by-layer", "--scratch", "1MB", "-q"]
    fault = server.inject_fault(r"/resolve/[^/]+/model-00004-of-00008\.safetensors$", mode=503, times=None,
                                method="HEAD")  # hf_hub_download's metadata request; headers are range GETs
    capsys.readouterr()
    assert run_cli(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "cannot reach the Hub" in err[0] and "model-00004-of-00008" in err[0], err
    assert fault.hits >= 5  # huggingface_hub retried before giving up
    assert not (dest / "m1-manifest.json").exists() and not (dest / ".m1-scratch").exists()
    assert 1 <= len(list(dest.glob("model-*.safetensors"))) < 8  # what came before the shard is kept
    server.clear_faults()
    assert run_cli([*args, "--resume"]) == 0
    ref = tmp_path / "ref"
    assert run_cli(["quantize", str(local), str(ref), "--scheme", "nf4", "--layout", "by-layer", "-q"]) == 0
    assert weights(dest) == weights(ref)
