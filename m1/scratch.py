"""Quantizing (or converting) straight from the Hub with bounded disk: `--scratch SIZE`.

The executor writes its output files one after another, and each file's tensors in plan order, so the
source shards are read in a sequence known before a byte moves: one step per tensor operation, each
step reading the shards its sources live in. A shard is needed from its first step to its last.

`schedule` picks the order of the output files whose live shards weigh least at their heaviest step
(the plan's order, or the files sorted by the source shards they read, whichever holds less), and says
how much scratch that needs (`peak`) and how much is downloaded (every shard the files read, once).

A layout whose files each read many shards (the release deals a layer's experts over dozens of shards,
so `--layout size` or `by-layer` output of M1-40k holds about 130 GB at once) can instead be written in
the source's own order (`in_source_order`, `--layout source`): the same tensors, grouped into files of
up to --shard-size in the order the source stores them, so about one source shard is live at a time.
With `--scratch` and no `--layout`, the CLI picks that grouping when the default one does not fit.

`Scratch` runs it: a thread downloads the shards with huggingface_hub (its retries, into the scratch
folder, never the Hugging Face cache) in the order they are first needed, each only once the shards held
plus it fit in the bound; a read waits until its shard is there; a shard is deleted as soon as the last
step that reads it is done. Reads then go through ordinary files (no kernel copies that could outlive the
step), so a deleted shard is never read again and the disk really is free.
"""

from __future__ import annotations

import re
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.errors import InternalError, M1Error, UsageError
from m1.plan import OutputFile
from m1.units import human_bytes

if TYPE_CHECKING:
    from m1.hub_read import HubStorage

# Per shard, beside its bytes: huggingface_hub's lock and metadata files (a few hundred bytes) and the
# filesystem's last partial block. The bound counts it, so what is on disk stays within it.
SLACK = 64 << 10
JOIN_S = 5.0  # how long closing waits for a download in flight after an error


def op_shards(file: OutputFile, sizes: dict[str, int]) -> list[frozenset[str]]:
    """For each op of `file`, the scratch-managed source shards it reads."""
    return [frozenset(s.file for s in op.sources if s.file in sizes) for op in file.ops]


@dataclass
class ScratchPlan:
    """The order the files are written in, and what streaming them holds and downloads."""

    order: list[str]  # output files, in the order they are written
    steps: list[tuple[str, int, frozenset[str]]]  # (output file, op index, shards it reads)
    sizes: dict[str, int]  # every shard read, with its size
    peak: int  # bytes held at once at the heaviest step (shards + SLACK each)
    bound: int | None = None
    heaviest: list[str] = field(default_factory=list)  # the shards held at that step

    @property
    def downloads(self) -> int:
        return sum(self.sizes.values())

    @property
    def fits(self) -> bool:
        return self.bound is None or self.peak <= self.bound

    @property
    def held(self) -> int:
        """What the scratch folder holds at most: the bound (shards are fetched ahead while they fit), or all
        shards when they fit in it together."""
        everything = self.downloads + SLACK * len(self.sizes)
        return everything if self.bound is None else min(self.bound, everything)

    def summary(self) -> dict[str, Any]:
        return {"bound": self.bound, "needed_bytes": self.peak, "held_at_most_bytes": self.held,
                "download_bytes": self.downloads, "shards": len(self.sizes), "each_once": True, "fits": self.fits,
                "order": self.order, "heaviest_step": self.heaviest}

    def lines(self) -> list[str]:
        bound = f" of the {human_bytes(self.bound)} bound" if self.bound is not None else ""
        out = [f"scratch: needs {human_bytes(self.peak)} at once (the shards its heaviest step reads), holds at "
               f"most {human_bytes(self.held)}{bound} (shards fetched ahead); downloads {human_bytes(self.downloads)} "
               f"({len(self.sizes)} shards, each once)"]
        if not self.fits:
            out.append(f"scratch: does not fit: {len(self.heaviest)} shards are needed at once at the heaviest step "
                       f"(e.g. {', '.join(self.heaviest[:3])}); the run would refuse: raise --scratch to at least "
                       f"{human_bytes(self.peak)} or use --layout source (files in the source's order)")
        return out


def _measure(files: list[OutputFile], sizes: dict[str, int]) -> tuple[int, list[str], list]:
    steps = [(f.name, i, shards) for f in files for i, shards in enumerate(op_shards(f, sizes))]
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for k, (_, _, shards) in enumerate(steps):
        for s in shards:
            first.setdefault(s, k)
            last[s] = k
    delta = [0] * (len(steps) + 1)
    for s, k in first.items():
        delta[k] += sizes[s] + SLACK
        delta[last[s] + 1] -= sizes[s] + SLACK
    peak, running, where = 0, 0, 0
    for k in range(len(steps)):
        running += delta[k]
        if running > peak:
            peak, where = running, k
    heaviest = sorted(s for s in first if first[s] <= where <= last[s])
    return peak, heaviest, steps


def schedule(files: list[OutputFile], sizes: dict[str, int], bound: int | None = None,
             last: list[OutputFile] | None = None) -> ScratchPlan:
    """The order to write `files` in (then `last`, which must come last), streaming from shards of `sizes`."""
    rank = {s: i for i, s in enumerate(sorted(sizes))}

    def key(item: tuple[int, OutputFile]) -> tuple[int, int, int]:
        used = [rank[s.file] for op in item[1].ops for s in op.sources if s.file in rank]
        return (min(used, default=-1), max(used, default=-1), item[0])

    candidates = [list(files), [f for _, f in sorted(enumerate(files), key=key)]]
    best: tuple[int, list[str], list, list[OutputFile]] | None = None
    for order in candidates:
        peak, heaviest, steps = _measure([*order, *(last or [])], sizes)
        if best is None or peak < best[0]:
            best = (peak, heaviest, steps, order)
    assert best is not None
    peak, heaviest, steps, order = best
    used = {s for _, _, shards in steps for s in shards}
    return ScratchPlan([f.name for f in [*order, *(last or [])]], steps, {s: sizes[s] for s in sorted(used)}, peak,
                       bound, heaviest)


def ordered(files: list[OutputFile], plan: ScratchPlan) -> list[OutputFile]:
    position = {name: i for i, name in enumerate(plan.order)}
    return sorted(files, key=lambda f: position[f.name])


def source_sizes(storage: Any) -> dict[str, int]:
    """The shard sizes of a Hub source (from the repo listing); a usage error for any other source."""
    sizes = storage.shard_sizes()
    if not storage.remote or sizes is None:
        raise UsageError("--scratch applies when the source is a Hub repo id",
                         hint="drop --scratch: a local source is read in place")
    return {name: size for name, size in sizes.items() if name.endswith(".safetensors")}


def dry_run(plan: Any, storage: Any, bound: int) -> ScratchPlan:
    """What `--scratch bound` would do for `plan` run by one process (what `--dry-run` states)."""
    from m1.sinks import get_sink

    sizes = source_sizes(storage)
    files = list(plan.files)
    last = files[:1] if get_sink(plan.sink).first_last and len(files) > 1 else []
    rest = files[len(last):]
    return schedule(ordered(rest, schedule(rest, sizes)), sizes, bound, last)


SHARDED = re.compile(r"model-\d+-of-\d+\.safetensors")


def in_source_order(plan: Any, ckpt: Any, shard_size: int) -> Any:
    """`plan` with its tensors regrouped into files of up to `shard_size` bytes in the order the source stores
    them (shard by shard, by offset): `--layout source`. Same tensors, same bytes each; other files."""
    from dataclasses import replace

    from m1.planner import pack

    if plan.sink != "safetensors" or not all(SHARDED.fullmatch(f.name) for f in plan.files):
        raise UsageError("--layout source applies to sharded safetensors output",
                         hint="a format that names its own files splits them by its own options (see --help); for "
                              "one file drop --layout source")
    rank = {name: i for i, name in enumerate(sorted(ckpt.files()))}

    def where(name: str, file: str) -> tuple[int, int]:
        try:
            start = ckpt.info(name).start
        except M1Error:
            start = 0
        return rank.get(file, len(rank)), start

    ops = [op for f in plan.files for op in f.ops]
    keyed = sorted(range(len(ops)), key=lambda i: (min((where(s.name, s.file) for s in ops[i].sources),
                                                       default=(len(rank), 0)), i))
    return replace(plan, files=pack([ops[i] for i in keyed], shard_size), job={**plan.job, "layout": "source"})


def arrange(plan: Any, ckpt: Any, layout: str | None, shard_size: int, bound: int | None) -> Any:
    """`plan` in the file grouping --layout and --scratch ask for (`source` order, or the one that fits)."""
    if layout == "source":
        return in_source_order(plan, ckpt, shard_size)
    if bound is not None:
        return choose_layout(plan, ckpt, bound, layout, shard_size)
    return plan


def choose_layout(plan: Any, ckpt: Any, bound: int, layout: str | None, shard_size: int) -> Any:
    """With --scratch: when no --layout was given and the default grouping does not fit the bound, the files in
    the source's order, if that fits (said in a warning); otherwise `plan` unchanged (the run then refuses)."""
    import warnings

    if layout is not None or plan.sink != "safetensors" or not all(SHARDED.fullmatch(f.name) for f in plan.files):
        return plan
    default = dry_run(plan, ckpt.storage, bound)
    if default.fits:
        return plan
    regrouped = in_source_order(plan, ckpt, shard_size)
    streamed = dry_run(regrouped, ckpt.storage, bound)
    if not streamed.fits:
        return plan
    warnings.warn(f"--scratch: the size layout's files would hold {human_bytes(default.peak)} of source shards at "
                  f"once; writing them in the source's order instead (as --layout source does), which holds "
                  f"{human_bytes(streamed.peak)}", stacklevel=2)
    return regrouped


def check_fits(plan: ScratchPlan) -> None:
    if plan.bound is not None and plan.bound < max(plan.sizes.values(), default=0) + SLACK:
        big = max(plan.sizes, key=lambda s: plan.sizes[s])
        raise UsageError(f"--scratch {human_bytes(plan.bound)} is smaller than the source shard {big} "
                         f"({human_bytes(plan.sizes[big])})", hint=f"use --scratch {human_bytes(plan.peak)} or more")
    if not plan.fits:
        raise UsageError(f"--scratch {human_bytes(plan.bound or 0)} is below what this job holds at once: "
                         f"{human_bytes(plan.peak)} ({len(plan.heaviest)} source shards needed together, e.g. "
                         f"{', '.join(plan.heaviest[:3])})",
                         hint=f"use --scratch {human_bytes(plan.peak)} or more, or --layout source (files in the "
                              "source's order)")


Download = Callable[[str, Path], Path]  # (shard, scratch folder) -> the downloaded file


class Scratch:
    """Downloads the shards of a `ScratchPlan` ahead of their use within the bound, deletes them after."""

    def __init__(self, plan: ScratchPlan, folder: Path, download: Download) -> None:
        if plan.bound is None:
            raise InternalError("a scratch area needs a bound")
        self.plan = plan
        self.folder = folder
        self.download = download
        self.bound = plan.bound
        self.step_shards = {(file, op): shards for file, op, shards in plan.steps}
        self.remaining = Counter(s for _, _, shards in plan.steps for s in shards)
        first: dict[str, int] = {}
        for k, (_, _, shards) in enumerate(plan.steps):
            for s in sorted(shards):
                first.setdefault(s, k)
        self.queue = sorted(first, key=lambda s: first[s])
        self.present: dict[str, Path] = {}
        self.deleted: set[str] = set()
        self.held = 0  # bytes reserved: shards downloading or on disk
        self.peak_held = 0
        self.downloaded: list[str] = []
        self.error: BaseException | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None

    def manages(self, shard: str) -> bool:
        return shard in self.remaining

    def start(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)  # what a killed run left
        self.folder.mkdir(parents=True, exist_ok=True)
        self.thread = threading.Thread(target=self._run, name="m1-scratch", daemon=True)
        self.thread.start()

    def _need(self, shard: str) -> int:
        return self.plan.sizes[shard] + SLACK

    def _run(self) -> None:
        try:
            for shard in self.queue:
                with self.cond:
                    while not self.closed and self.held + self._need(shard) > self.bound:
                        self.cond.wait()
                    if self.closed:
                        return
                    self.held += self._need(shard)
                    self.peak_held = max(self.peak_held, self.held)
                path = self.download(shard, self.folder)
                with self.cond:
                    self.present[shard] = path
                    self.downloaded.append(shard)
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the reader that waits
            with self.cond:
                self.error = exc
                self.cond.notify_all()

    def path(self, shard: str) -> Path:
        """The local file of `shard`, once downloaded (waits for it)."""
        with self.cond:
            if shard in self.deleted:
                raise InternalError("a source shard was read after its last planned use", file=shard)
            while shard not in self.present and self.error is None and not self.closed:
                self.cond.wait()
            if shard in self.present:
                return self.present[shard]
            if self.error is not None:
                error = self.error
                if isinstance(error, M1Error):
                    raise error
                raise M1Error(f"downloading {shard} failed ({type(error).__name__}: {error})",
                              hint="re-run with --resume") from error
            raise InternalError("the scratch area was closed while a shard was read", file=shard)

    def done(self, file: str, op: int) -> None:
        """Step (file, op) has read all it needs: delete the shards no later step reads."""
        for shard in self.step_shards.get((file, op), ()):
            with self.cond:
                self.remaining[shard] -= 1
                if self.remaining[shard] > 0:
                    continue
                path = self.present.pop(shard, None)
            if path is not None:
                _remove_download(self.folder, shard, path)
            with self.cond:
                self.deleted.add(shard)
                self.held -= self._need(shard)
                self.cond.notify_all()

    def abort(self) -> None:
        """Stop downloading and wake every reader waiting for a shard (they fail): the job is failing."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def close(self) -> None:
        self.abort()
        if self.thread is not None:
            self.thread.join(JOIN_S)
            self.thread = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def report(self) -> dict[str, Any]:
        """What streaming held and downloaded (a run's result states it)."""
        return {"bound": self.bound, "needed_bytes": self.plan.peak, "held_peak_bytes": self.peak_held,
                "downloaded": list(self.downloaded),
                "download_bytes": sum(self.plan.sizes[s] for s in self.downloaded)}


@contextmanager
def streaming(storage: HubStorage, plan: ScratchPlan, folder: Path, root: Path) -> Iterator[Scratch]:
    """`storage` reads the shards of `plan` from `folder` while the block runs, each downloaded ahead and
    deleted after its last read; then the folder goes, and `root` (which holds it) once empty: under
    torchrun every rank streams through its own folder there, and the last to finish removes it."""
    scratch = Scratch(plan, folder, storage.download_to)
    storage.scratch = scratch
    try:
        scratch.start()
        yield scratch
    finally:
        storage.scratch = None
        scratch.close()
        try:
            root.rmdir()
        except OSError:
            pass


def _remove_download(folder: Path, shard: str, path: Path) -> None:
    path.unlink(missing_ok=True)
    meta = folder / ".cache" / "huggingface" / "download"
    for extra in (meta / f"{shard}.metadata", meta / f"{shard}.lock"):
        extra.unlink(missing_ok=True)


class StepTracker:
    """Wraps an op runner for one output file: tells the scratch area when each op's reads are over.

    A sink asks for a file's tensors in plan order and consumes each tensor's bytes before asking for the
    next, so when it asks for a tensor of another op, the op before has read everything it reads.
    """

    def __init__(self, runner: Callable[[str], Any], file: OutputFile, scratch: Scratch) -> None:
        self.runner = runner
        self.file = file
        self.scratch = scratch
        self.op_of = {o.name: i for i, op in enumerate(file.ops) for o in op.outputs}
        self.current: int | None = None

    def __call__(self, name: str) -> Any:
        op = self.op_of.get(name)
        if op != self.current:
            if self.current is not None:
                self.scratch.done(self.file.name, self.current)
            self.current = op
        return self.runner(name)

    def finish(self) -> None:
        if self.current is not None:
            self.scratch.done(self.file.name, self.current)
            self.current = None
