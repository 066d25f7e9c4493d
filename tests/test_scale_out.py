"""Issue 13, scale out as properties of the one executor: a device per worker (with the device list mocked
where no GPU is present), and torchrun jobs over 2 and 3 CPU processes (gloo, loopback only) that give the
bytes one process gives, for convert, quantize and GGUF export; a rank killed with -9 fails the job without
a complete-looking output, and --resume with another world size finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m1.errors import UsageError

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")
# torchrun's console script is torch.distributed.run: a venv without the script still has the module
LAUNCH = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]
QUANTIZABLE = {"hidden": 64, "intermediate": 128}  # rows of whole 64-value blocks

# Runs m1 commands one after another in one process (under torchrun: one rank), each given as a JSON list of
# arguments, and writes what each execute() call of this rank wrote to OUT/rank<RANK>.json.
DRIVER = """
import json, os, sys, time
from pathlib import Path
import m1.convert.job as convert_job, m1.quantize.job as quantize_job

results = []
for module in (convert_job, quantize_job):
    def wrapped(*args, _real=module.execute, **kwargs):
        run = _real(*args, **kwargs)
        results.append({"rank": run.rank, "world": run.world, "written": run.written})
        return run
    module.execute = wrapped
slow = float(os.environ.get("M1_TEST_SLOW", "0"))
if slow:
    import m1.ops
    real = m1.ops.OpRunner.__call__
    def slowly(self, name):
        time.sleep(slow)
        return real(self, name)
    m1.ops.OpRunner.__call__ = slowly
from m1.cli import run_cli

out = Path(sys.argv[1])
codes = [run_cli(json.loads(arg)) for arg in sys.argv[2:]]
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"codes": codes, "results": results}))
sys.exit(max(codes, default=0))
"""


def torchrun(n: int, *args: str, env: dict[str, str] | None = None, **popen: object) -> subprocess.Popen:
    cmd = [*LAUNCH, "--standalone", "--nnodes", "1", "--nproc-per-node", str(n), *args]
    full_env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def driver(tmp_path: Path, n: int, commands: list[list[object]], **kwargs: object) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    reports = tmp_path / f"reports-{n}"
    reports.mkdir(exist_ok=True)
    return torchrun(n, str(script), str(reports), *[json.dumps([str(a) for a in c]) for c in commands], **kwargs)


def reports(tmp_path: Path, n: int) -> list[dict]:
    return [json.loads((tmp_path / f"reports-{n}" / f"rank{r}.json").read_text()) for r in range(n)]


def outputs(folder: Path, glob: str = "*") -> dict[str, bytes]:
    """Every file, the manifest without its creation time (the one thing two runs may differ in)."""
    out = {}
    for p in sorted(folder.glob(glob)):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name.endswith("m1-manifest.json"):
            manifest = json.loads(data)
            manifest.pop("created")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[p.name] = data
    return out


# ---- a device per worker --------------------------------------------------------------------------------


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_writer_devices_round_robin_over_visible_gpus_or_a_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from m1.devices import resolve_device, writer_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert writer_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert writer_devices("cuda", 6) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert writer_devices("auto", 1) == ["cuda:0"]
    assert writer_devices("cuda:0,cuda:3", 3) == ["cuda:0", "cuda:3", "cuda:0"]
    assert writer_devices("cuda", 2, first=4) == ["cuda:0", "cuda:1"]  # torchrun: local rank 2 of 2 workers each
    assert writer_devices("cuda", 1, first=3) == ["cuda:3"]
    assert writer_devices("cuda:2", 3) == ["cuda:2"] * 3  # one device named: every worker on it
    assert writer_devices("cpu", 2) == ["cpu", "cpu"]
    assert resolve_device("cuda:1,cuda:2") == torch.device("cuda:1")
    for bad, says in [("cuda:4", "not visible"), ("cuda:0,cuda:9", "not visible"), ("cuda:0,cuda:0", "twice"),
                      ("gpu", "must be"), ("cpu,cuda:0", "cuda:N devices only")]:
        with pytest.raises(UsageError, match=says):
            writer_devices(bad, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert writer_devices("auto", 2) == ["cpu", "cpu"]
    with pytest.raises(UsageError, match="no CUDA GPU"):
        writer_devices("cuda", 2)


def test_two_workers_on_device_cuda_take_two_devices_and_report_each(two_gpus, make_tiny_ckpt, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`--workers 2 --device cuda` with two (mocked) GPUs: each worker process takes its own device, progress
    has a row per device with its bytes, results carry per-device throughput, and the bytes are the bytes of
    one process. A convert plan moves no tensor to the device, so this runs where no GPU is present."""
    import m1.progress
    from m1.checkpoint import Checkpoint
    from m1.convert.job import ConvertOptions, plan_convert
    from m1.run import RunOptions, execute

    src = make_tiny_ckpt("src")
    ckpt = Checkpoint.open(src)
    plan = plan_convert(ckpt, ConvertOptions(by_layer=True))
    seen: dict[str, object] = {}
    real = m1.progress.lane_progress

    def spy(total: int, description: str, lanes: list[str], enabled: bool = True):
        seen["lanes"] = lanes
        seen["bytes"] = {}
        with real(total, description, lanes, enabled=False) as advance:
            def count(n: int, lane: str | None = None) -> None:
                seen["bytes"][lane] = seen["bytes"].get(lane, 0) + n  # type: ignore[index]
                advance(n, lane)
            yield count

    monkeypatch.setattr(m1.progress, "lane_progress", __import__("contextlib").contextmanager(spy))
    run = execute(plan, tmp_path / "out", ckpt, RunOptions(workers=2, device="cuda", show_progress=True))
    assert sorted(run.writer_devices) == ["cuda:0", "cuda:1"]
    assert seen["lanes"] == ["cuda:0", "cuda:1"]
    lane_bytes = seen["bytes"]
    assert sum(v for k, v in lane_bytes.items() if k is not None) == plan.total_bytes  # type: ignore[union-attr]
    assert set(run.devices) <= {"cuda:0", "cuda:1"} and sum(d["files"] for d in run.devices.values()) == 6
    assert all(d["bytes_per_s"] for d in run.devices.values())
    one = execute(plan, tmp_path / "one", ckpt, RunOptions())
    assert one.writer_devices == ["cpu"]
    assert outputs(tmp_path / "out") == outputs(tmp_path / "one")


def test_a_device_set_larger_than_the_workers_warns(two_gpus, make_tiny_ckpt, tmp_path: Path) -> None:
    from m1.checkpoint import Checkpoint
    from m1.convert.job import ConvertOptions, plan_convert
    from m1.run import RunOptions, execute

    ckpt = Checkpoint.open(make_tiny_ckpt("src"))
    plan = plan_convert(ckpt, ConvertOptions())
    with pytest.warns(UserWarning, match="cuda:1 stay idle"):
        run = execute(plan, tmp_path / "out", ckpt, RunOptions(device="cuda:0,cuda:1", show_progress=False))
    assert run.writer_devices == ["cuda:0"] and list(run.devices) == ["cuda:0"]


def test_split_is_contiguous_balanced_and_deterministic() -> None:
    from m1.distributed import split

    assert split([1] * 6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert split([1] * 6, 1) == [(0, 6)]
    assert split([5, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 6)]
    assert split([1, 1], 3) == [(0, 1), (1, 2), (2, 2)]  # a rank may get nothing
    assert split([], 2) == [(0, 0), (0, 0)]
    sizes = [7, 3, 9, 1, 4, 4, 8, 2, 6, 5]
    runs = split(sizes, 4)
    assert runs == split(list(sizes), 4)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(sizes)))
    assert max(sum(sizes[a:b]) for a, b in runs) <= sum(sizes) / 4 + max(sizes)


def test_resume_reads_the_progress_records_of_every_rank(make_tiny_ckpt, tmp_path: Path, run) -> None:
    """What ranks of an interrupted torchrun run recorded (one file each) is what a later --resume, here by
    one process, trusts after re-checking, and the records are gone once the manifest is written."""
    src = make_tiny_ckpt("src")
    clean, dest = tmp_path / "clean", tmp_path / "dest"
    assert run("convert", src, clean, "--layout", "by-layer", "-q")[0] == 0
    assert run("convert", src, dest, "--layout", "by-layer", "-q")[0] == 0
    manifest = json.loads((dest / "m1-manifest.json").read_text())
    shards = manifest["shards"]
    names = sorted(shards)
    (dest / "m1-manifest.json").unlink()
    (dest / "model.safetensors.index.json").unlink()
    (dest / ".m1-progress.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"], "shards": {}}))
    for rank, part in enumerate((names[:2], names[2:4])):
        (dest / f".m1-progress.rank{rank}.json").write_text(json.dumps(
            {"fingerprint": manifest["fingerprint"], "shards": {n: shards[n] for n in part}}))
    (dest / names[1]).write_bytes(b"damaged")  # recorded, but no longer what was recorded: written again
    for n in names[4:]:
        (dest / n).unlink()  # rank 2 died before finishing any
    before = {n: (dest / n).stat().st_mtime_ns for n in (names[0], names[2], names[3])}
    assert run("convert", src, dest, "--layout", "by-layer", "--resume", "-q")[0] == 0
    assert {n: (dest / n).stat().st_mtime_ns for n in before} == before  # kept, not rewritten
    assert outputs(dest) == outputs(clean)
    assert not list(dest.glob(".m1-progress*"))


# ---- torchrun -----------------------------------------------------------------------------------------------


def commands(src: Path, out: Path) -> dict[str, list[object]]:
    return {
        "convert": ["convert", src, out / "conv", "--layout", "by-layer", "-q"],
        "quantize": ["quantize", src, out / "quant", "--scheme", "nf4", "--layout", "by-layer", "-q"],
        "gguf": ["convert", src, out / "gguf" / "tiny.gguf", "--to", "gguf", "--split-max-size", "250KB", "-q"],
    }


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny M1 and what one process writes from it for each command."""
    from m1.cli import run_cli
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("single")
    make_tiny(root / "src", TinySpec(layers=5, **QUANTIZABLE))
    (root / "out" / "gguf").mkdir(parents=True)
    for args in commands(root / "src", root / "out").values():
        assert run_cli([str(a) for a in args]) == 0, args
    assert len(list((root / "out" / "gguf").glob("tiny-*.gguf"))) >= 4  # splits: the first one written last
    return root / "src", root / "out"


def same_as_single(out: Path, single_out: Path) -> None:
    for sub in ("conv", "quant", "gguf"):
        got, want = outputs(out / sub), outputs(single_out / sub)
        assert got == want, (sub, sorted(set(got) ^ set(want)) or [k for k in got if got[k] != want[k]])
        assert not list((out / sub).glob(".*")), sub  # no progress record, temporary file or scratch left


@pytest.mark.parametrize("n", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_torchrun_ranks_write_the_bytes_one_process_writes(single, tmp_path: Path, n: int) -> None:
    src, single_out = single
    out = tmp_path / "out"
    (out / "gguf").mkdir(parents=True)
    cmds = commands(src, out)
    procs = []
    if n == 2:  # the documented entry point, for one of them: torchrun ... -m m1 quantize ...
        code, text = finish(torchrun(n, "-m", "m1", *[str(a) for a in cmds.pop("quantize")], "--json"))
        assert code == 0, text
        printed = json.loads(text[text.index("{"): text.rindex("}") + 1])  # rank 0 alone prints the result
        assert printed["world"] == 2 and text.count('"dest"') == 1
    wrong = ["convert", src, out / "conv", "-q"]  # into a finished destination without --resume: refused alike
    procs.append(driver(tmp_path, n, [*cmds.values(), wrong]))
    code, text = finish(procs[0])
    assert code != 0, text
    ranks = reports(tmp_path, n)
    assert [r["codes"] for r in ranks] == [[0] * len(cmds) + [2]] * n, text
    refused = [line for line in text.splitlines() if line.startswith("error: ") and "destination is not empty" in line]
    assert len(refused) == n and "internal error" not in text, text  # every rank says it, in one line
    same_as_single(out, single_out)
    for k in range(len(cmds)):  # each command: every output file written by exactly one rank
        written = [name for r in ranks for name in r["results"][k]["written"]]
        assert len(written) == len(set(written)), written
        assert all(r["results"][k]["world"] == n for r in ranks)
    conv = [r["results"][0]["written"] for r in ranks]
    assert all(conv) and sorted(sum(conv, [])) == sorted(outputs(single_out / "conv", "model-*"))


def _rank_pid(parent: int, rank: int) -> int | None:
    import psutil

    for child in psutil.Process(parent).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "python" in child.name().lower():
                return child.pid
        except psutil.Error:
            continue
    return None


def _recorded(dest: Path) -> int:
    count = 0
    for p in dest.glob(".m1-progress.rank*.json"):
        try:
            count += len(json.loads(p.read_text())["shards"])
        except (ValueError, KeyError, OSError):
            pass
    return count


@pytest.mark.slow
def test_a_rank_killed_mid_run_fails_the_job_and_resume_with_another_world_size_finishes_it(
        make_tiny_ckpt, tmp_path: Path) -> None:
    from m1.cli import run_cli

    src = make_tiny_ckpt("src", layers=8, softmax_every=4, **QUANTIZABLE)
    dest, clean = tmp_path / "dest", tmp_path / "clean"
    args = ["quantize", src, dest, "--scheme", "int8", "--layout", "by-layer", "-q"]
    proc = driver(tmp_path, 3, [args], env={"M1_TEST_SLOW": "0.05"})
    victim = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if victim is None:
            victim = _rank_pid(proc.pid, 1)
        if victim is not None and _recorded(dest) >= 1:
            break
        time.sleep(0.05)
    assert victim is not None and proc.poll() is None, finish(proc)[1]
    os.kill(victim, signal.SIGKILL)
    code, text = finish(proc, timeout=120)
    assert code != 0, text
    assert not (dest / "m1-manifest.json").exists() and not (dest / "model.safetensors.index.json").exists()
    finished = _recorded(dest)
    assert 1 <= finished < 10, text

    code, text = finish(driver(tmp_path, 2, [[*args, "--resume"]]))  # two ranks finish what three began
    assert code == 0, text
    again = reports(tmp_path, 2)
    redone = sorted(n for r in again for n in r["results"][0]["written"])
    assert len(redone) == 10 - finished  # only what was missing
    assert run_cli([str(a) for a in [*args[:2], clean, *args[3:]]]) == 0
    assert outputs(dest) == outputs(clean)
    assert not list(dest.glob(".*"))


def _open_temporary(pid: int, dest: Path) -> str | None:
    """The temporary file a rank is writing into now (None between files)."""
    import psutil

    try:
        files = psutil.Process(pid).open_files()
    except psutil.Error:
        return None
    return next((Path(f.path).name for f in files if Path(f.path).parent == dest and f.path.endswith(".tmp")), None)


@pytest.mark.slow
@pytest.mark.parametrize("resume_world", [1, 2, 3])
def test_a_rank_killed_mid_file_then_resumed_with_1_2_or_3_ranks_gives_the_one_process_bytes(
        make_tiny_ckpt, tmp_path: Path, resume_world: int) -> None:
    """The tiny model finishes before a kill can land, so each tensor is slowed (M1_TEST_SLOW in the driver):
    every rank then stays inside one file for seconds. Rank 1 is killed -9 while it holds a temporary file
    open; the job fails without a complete-looking output, and --resume with 1, 2 or 3 ranks writes exactly
    what one process writes."""
    from m1.cli import run_cli

    src = make_tiny_ckpt("src", layers=8, softmax_every=4, **QUANTIZABLE)
    dest, clean = tmp_path / "dest", tmp_path / "clean"
    args = ["quantize", src, dest, "--scheme", "int8", "--layout", "by-layer", "-q"]
    proc = driver(tmp_path, 3, [args], env={"M1_TEST_SLOW": "0.3"})
    victim, inside = None, None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        victim = victim or _rank_pid(proc.pid, 1)
        if victim is not None and (tmp := _open_temporary(victim, dest)) is not None:
            time.sleep(1.0)  # well inside the file: it is still the one open
            if _open_temporary(victim, dest) == tmp:
                inside = tmp
                break
        time.sleep(0.05)
    assert inside is not None and proc.poll() is None, finish(proc)[1]
    os.kill(victim, signal.SIGKILL)
    code, text = finish(proc, timeout=120)
    assert code != 0, text
    assert not (dest / "m1-manifest.json").exists() and not (dest / "model.safetensors.index.json").exists()
    assert not (dest / inside[1:-len(".tmp")]).exists()  # the file it was inside never appeared

    code, text = finish(driver(tmp_path, resume_world, [[*args, "--resume"]]))
    assert code == 0, text
    assert run_cli([str(a) for a in [*args[:2], clean, *args[3:]]]) == 0
    assert outputs(dest) == outputs(clean)
    assert not list(dest.glob(".*"))  # no progress record, and the killed rank's temporary file is gone


COUNT_PASSES = """
import os, sys
from pathlib import Path
import m1.quantize.hessian as hessian

real = hessian.run_pass
def counted(*args, **kwargs):
    Path(sys.argv[1], f"pass-rank{os.environ['RANK']}").write_text("ran")
    return real(*args, **kwargs)
hessian.run_pass = counted
from m1.cli import run_cli
sys.exit(run_cli(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_gptq_job_under_torchrun_measures_once_and_writes_the_bytes_of_one_process(single, tmp_path: Path) -> None:
    """Rank 0 runs the Hessian pass, every rank rounds its files from it, and the Hessians are removed only when
    every rank is done: the same files as one process writes."""
    from m1.cli import run_cli

    src, _ = single
    args = ["--scheme", "nf4", "--rounding", "gptq", "--tokens", "512", "--ctx", "64", "--layout", "by-layer", "-q"]
    assert run_cli(["quantize", str(src), str(tmp_path / "one"), *args]) == 0
    script = tmp_path / "count_passes.py"  # m1's CLI, each rank noting whether it ran the Hessian pass
    script.write_text(COUNT_PASSES)
    code, text = finish(torchrun(2, str(script), str(tmp_path), "quantize", str(src), str(tmp_path / "two"), *args))
    assert code == 0, text
    assert sorted(p.name for p in tmp_path.glob("pass-rank*")) == ["pass-rank0"], text  # rank 0's pass alone
    for glob in ("*.safetensors", "*.json"):  # the record's own timing aside (and so the manifest's sha256 of it)
        want = {k: v for k, v in outputs(tmp_path / "one", glob).items() if not k.endswith(("m1-manifest.json",
                                                                                          "m1-rounding.json"))}
        assert {k: v for k, v in outputs(tmp_path / "two", glob).items() if k in want or k.endswith(".safetensors")} \
            == want
    one, two = (json.loads((tmp_path / d / "m1-rounding.json").read_text()) for d in ("one", "two"))
    assert {**one, "hessian_seconds": 0} == {**two, "hessian_seconds": 0}
    shards = [json.loads((tmp_path / d / "m1-manifest.json").read_text())["shards"] for d in ("one", "two")]
    assert shards[0] == shards[1]
    assert len(list((tmp_path / "two").glob("model-*.safetensors"))) >= 4  # files for both ranks
    assert not list(tmp_path.glob(".*m1-hessians*")), list(tmp_path.iterdir())
    assert text.count("GPTQ rounding from Hessians") <= 1, text  # said once, by rank 0
