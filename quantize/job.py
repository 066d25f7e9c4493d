"""`m1 quantize`: plan, then stream one tensor at a time through bitsandbytes into new shards.

Planning is pure (config + tensor inventory in, shard plan and a by-role size report out), so the plan
for the full M1 can be made from its config and index alone. Running writes whole shards, either in
this process or in `--workers` processes (each writes whole shards; the main process records finished
shards in the writer's progress file, so `--resume` skips them), then lets `m1.writer.execute` write
the index and manifest last: an interrupted run never looks complete.

Memory: a worker holds the source tensor being quantized (on a GPU also the next one, read ahead) and
one weight's quantized pieces; on CPU bitsandbytes works on a few million values at a time (its
float32 temporaries would otherwise be ~9x the tensor); kept tensors are copied in row chunks. Peak
RSS is bounded by the largest tensor (per worker), not by the model.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from m1.quantize.policy import Policy, skip_modules
from m1.quantize.schemes import Scheme

from m1 import safetensors_io
from m1.checkpoint import Checkpoint
from m1.config import M1Config
from m1.errors import CheckpointError, M1Error, UsageError
from m1.safetensors_io import DTYPE_NAMES, Produced, tensor_bytes, write_json_atomic
from m1.spec import DTYPE_BYTES, Role, classify, spec_by_name
from m1.units import human_bytes, human_count
from m1.writer import PROGRESS, OutTensor, ShardPlan, WritePlan, execute, plan_shards, prepare_destination, shard_name


class RowBlockWarning(UserWarning):
    """4-bit blocks that span two rows: a bitsandbytes CPU-kernel limitation, not a format problem."""


# ---- the source inventory ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SrcTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    role: Role
    layer: int | None
    file: str | None = None
    companion: bool = False  # a bitsandbytes tensor: the source is already quantized

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def checkpoint_tensors(ckpt: Checkpoint) -> list[SrcTensor]:
    """Every tensor of a checkpoint from its headers, in spec order (an unknown name is an error)."""
    from m1.convert.job import ordered_names

    out = []
    for name in ordered_names(ckpt):
        info = ckpt.info(name)
        c = classify(name, info.file)
        out.append(SrcTensor(name, info.dtype, info.shape, c.rule.role, c.layer, info.file, c.companion is not None))
    return out


def index_tensors(cfg: M1Config, weight_map: dict[str, str]) -> list[SrcTensor]:
    """The inventory from a config and an index alone (dtypes and shapes from the spec): no data, no headers."""
    specs = spec_by_name(cfg)
    position = {name: i for i, name in enumerate(specs)}
    out = []
    for name, file in weight_map.items():
        c = classify(name, file)
        spec = specs.get(c.weight_name)
        if spec is None:
            raise CheckpointError("not part of this config's M1 (layer or expert out of range)", file=file, tensor=name)
        out.append(SrcTensor(name, spec.dtype, spec.shape, spec.role, spec.layer, file, c.companion is not None))
    out.sort(key=lambda t: (position[classify(t.name).weight_name], t.companion))
    return out


# ---- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: Scheme
    policy: Policy = field(default_factory=Policy)
    by_layer: bool = False
    shard_size: int = 5 * 10**9


@dataclass
class QuantPlan:
    write: WritePlan
    how: dict[str, tuple[str, str, str]]  # out name -> (copy|quantize|piece, source name, piece suffix)
    scheme: Scheme
    roles: dict[str, dict[str, int]]  # role -> tensors, quantized, params, bytes_before, bytes_after
    shard_params: dict[str, int]  # shard file -> source parameters it holds (for progress and resume)

    @property
    def params(self) -> int:
        return sum(self.shard_params.values())

    def totals(self) -> dict[str, dict[str, int]]:
        quantized = {"tensors": 0, "params": 0, "bytes_before": 0, "bytes_after": 0}
        kept = dict(quantized)
        for r in self.roles.values():
            quantized["tensors"] += r["quantized"]
            quantized["params"] += r["quantized_params"]
            quantized["bytes_before"] += r["quantized_before"]
            quantized["bytes_after"] += r["quantized_after"]
            kept["tensors"] += r["tensors"] - r["quantized"]
            kept["params"] += r["params"] - r["quantized_params"]
            kept["bytes_before"] += r["bytes_before"] - r["quantized_before"]
            kept["bytes_after"] += r["bytes_after"] - r["quantized_after"]
        total = {k: quantized[k] + kept[k] for k in quantized}
        return {"quantized": quantized, "kept": kept, "total": total}

    def summary(self) -> dict[str, Any]:
        return {**self.write.summary(), "scheme": self.scheme.name, "blocksize": self.scheme.blocksize,
                "double_quant": self.scheme.double_quant, "params": self.params, "by_role": self.roles,
                **self.totals()}

    def lines(self) -> Iterator[str]:
        from m1.writer import iter_plan_lines

        totals = self.totals()
        yield f"scheme: {self.scheme.describe()}"
        yield f"{'role':16s} {'tensors':>8s} {'quantized':>9s} {'params':>9s} {'before':>11s} {'after':>11s}"
        for role, r in sorted(self.roles.items(), key=lambda kv: -kv[1]["bytes_before"]):
            yield (f"{role:16s} {r['tensors']:8d} {r['quantized']:9d} {human_count(r['params']):>9s} "
                   f"{human_bytes(r['bytes_before']):>11s} {human_bytes(r['bytes_after']):>11s}")
        q, k, t = totals["quantized"], totals["kept"], totals["total"]
        yield (f"quantized: {q['tensors']} weights, {human_count(q['params'])} params, "
               f"{human_bytes(q['bytes_before'])} -> {human_bytes(q['bytes_after'])}")
        yield f"kept:      {k['tensors']} tensors at their source dtype, {human_bytes(k['bytes_after'])}"
        yield f"total:     {human_bytes(t['bytes_before'])} -> {human_bytes(t['bytes_after'])}"
        yield from iter_plan_lines(self.write)


def plan_quantize(cfg: M1Config, tensors: list[SrcTensor], opts: QuantizeOptions, *, source: str,
                  extra_files: Iterable[str] = (), base_model: str | None = None,
                  revision: str | None = None) -> QuantPlan:
    """What `m1 quantize` will write, with sizes before and after; raises before anything is written."""
    scheme = opts.scheme
    config_file = f"{source}/config.json"
    if cfg.quantization_config is not None:
        try:
            what = Scheme.from_quantization_config(cfg.quantization_config).describe()
        except M1Error:
            what = str(cfg.quantization_config.get("quant_method", "unknown method"))
        raise UsageError(f"the source is already quantized ({what}, per its quantization_config)", file=config_file,
                         hint="quantize the original checkpoint, or dequantize first: m1 convert SRC DST --dtype bf16")
    for t in tensors:
        if t.companion:
            raise UsageError("the source holds bitsandbytes tensors: it is already quantized", file=t.file,
                             tensor=t.name, hint="quantize the original checkpoint, or dequantize it first with "
                             "m1 convert SRC DST --dtype bf16")
    chosen = opts.policy.select(((t.name, t.role) for t in tensors), source)
    straddling = []
    for t in tensors:
        if t.name in chosen:
            scheme.check_weight(t.name, t.dtype, t.shape, t.file)
            if scheme.straddles_rows(t.shape):
                straddling.append(t)
    if straddling:
        rows = sorted({t.shape[-1] for t in straddling})
        warnings.warn(f"{len(straddling)} weights have rows of {'/'.join(map(str, rows))} values, not a multiple of "
                      f"--blocksize {scheme.blocksize} (e.g. {straddling[0].name}): bitsandbytes 0.50's CPU kernels "
                      "(dequantize_4bit of the 2-D shape, Linear4bit on CPU) read such blocks back wrong; CUDA and "
                      "m1 (convert --dtype, load_pretrained) read them right. A blocksize dividing the rows avoids it",
                      RowBlockWarning, stacklevel=2)

    roles: dict[str, dict[str, int]] = {}
    groups: list[tuple[int, list[OutTensor]]] = []  # (source params, out tensors) kept together in one shard
    how: dict[str, tuple[str, str, str]] = {}
    for t in tensors:
        r = roles.setdefault(t.role.value, {"tensors": 0, "quantized": 0, "params": 0, "bytes_before": 0,
                                            "bytes_after": 0, "quantized_params": 0, "quantized_before": 0,
                                            "quantized_after": 0})
        r["tensors"] += 1
        r["params"] += t.numel
        r["bytes_before"] += t.nbytes
        if t.name in chosen:
            module = t.name[: -len(".weight")]
            outs = []
            for piece in scheme.pieces(t.dtype, t.shape):
                name = f"{module}.{piece.suffix}"
                shape = piece.shape if piece.exact else (piece.nbytes,)
                outs.append(OutTensor(name, piece.dtype, shape, piece.nbytes, t.layer, piece.exact))
                how[name] = ("quantize" if piece.suffix == "weight" else "piece", t.name, piece.suffix)
            after = sum(o.nbytes for o in outs)
            r["quantized"] += 1
            r["quantized_params"] += t.numel
            r["quantized_before"] += t.nbytes
            r["quantized_after"] += after
            r["bytes_after"] += after
        else:
            outs = [OutTensor(t.name, t.dtype, t.shape, t.nbytes, t.layer)]
            how[t.name] = ("copy", t.name, "")
            r["bytes_after"] += t.nbytes
        groups.append((t.numel, outs))

    shards = _pack([g for _, g in groups], opts.shard_size, opts.by_layer)
    first_out = {g[0].name: params for params, g in groups}
    shard_params = {s.file: sum(first_out.get(t.name, 0) for t in s.tensors) for s in shards}

    kept_experts = [t.name for t in tensors if t.role == Role.EXPERT and t.name not in chosen]
    qconfig = scheme.quantization_config(skip_modules(kept_experts))
    config = cfg.with_raw(quantization_config=qconfig).to_dict(cfg.flavour)
    job = {"command": "quantize", "source": source, "revision": revision, "scheme": scheme.name,
           "blocksize": scheme.blocksize, "double_quant": scheme.double_quant, **opts.policy.describe(),
           "layout": "by-layer" if opts.by_layer else f"shard-size {opts.shard_size}", "base_model": base_model}
    return QuantPlan(WritePlan(shards, config, list(extra_files), job), how, scheme, roles, shard_params)


def _pack(groups: list[list[OutTensor]], shard_size: int, by_layer: bool) -> list[ShardPlan]:
    """Shards that never split a quantized weight from its companions (they are produced together)."""
    if by_layer:  # every piece of a weight has the weight's layer, so per-layer shards keep groups whole
        return plan_shards([t for g in groups for t in g], by_layer=True)
    packed: list[list[OutTensor]] = []
    current: list[OutTensor] = []
    size = 0
    for g in groups:
        nbytes = sum(t.nbytes for t in g)
        if current and size + nbytes > shard_size:
            packed.append(current)
            current, size = [], 0
        current.extend(g)
        size += nbytes
    if current:
        packed.append(current)
    return [ShardPlan(shard_name(i, len(packed)), tuple(g)) for i, g in enumerate(packed)]


def plan_from_checkpoint(ckpt: Checkpoint, opts: QuantizeOptions) -> QuantPlan:
    from m1.convert.job import base_model_of

    return plan_quantize(ckpt.config, checkpoint_tensors(ckpt), opts, source=str(ckpt.root),
                         extra_files=ckpt.extra_files(), base_model=base_model_of(ckpt), revision=ckpt.revision)


# ---- producing tensors (in this process or a worker) ------------------------------------------------


@dataclass
class Timing:
    read_s: float = 0.0
    quantize_s: float = 0.0  # bitsandbytes, including host<->device copies on CUDA
    write_s: float = 0.0  # writing and hashing: the shard's time minus read and quantize
    cpu_s: float = 0.0  # CPU time of the writing processes (all their threads): unaffected by other load

    def add(self, other: dict[str, float]) -> None:
        for key, value in other.items():
            setattr(self, key, getattr(self, key) + value)


@dataclass
class _Context:
    ckpt: Checkpoint
    plan: QuantPlan
    device: str
    dest: str


_WORKER: dict[str, Any] = {}  # this process's context and progress reporter


class _Producer:
    """`produce(name)` for write_shard: quantizing a weight yields its pieces one call at a time.

    On a GPU, while one weight is quantized and written, the next one of the shard is read by a helper
    thread (the read releases the GIL), so the disk and bitsandbytes overlap. On CPU, where reading is a
    few percent of the time, it is not worth a second tensor in memory.
    """

    def __init__(self, ctx: _Context, shard: ShardPlan, timing: Timing, report: Callable[[int], None]) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.ctx = ctx
        self.timing = timing
        self.report = report
        self.device = torch.device(ctx.device)
        self.targets = {t.name: t for t in shard.tensors}
        self.sources = [ctx.plan.how[t.name][1] for t in shard.tensors if ctx.plan.how[t.name][0] == "quantize"]
        self.position = {source: i for i, source in enumerate(self.sources)}
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="m1-read-ahead")
        self.ahead: tuple[str, Future] | None = None
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_for = ""

    def __call__(self, name: str) -> Produced:
        mode, source, suffix = self.ctx.plan.how[name]
        if mode == "copy":
            out = self.targets[name]
            return Produced(out.dtype, out.shape, self._copy(source))
        if mode == "quantize":
            started = time.perf_counter()
            weight = self._read(source)
            read = time.perf_counter()
            pieces = self._quantize(weight, source)
            self.timing.read_s += read - started
            self.timing.quantize_s += time.perf_counter() - read
            del weight
            self.pending, self.pending_for = dict(pieces), source
            self.report(self._numel(source))
        if self.pending_for != source or suffix not in self.pending:
            raise CheckpointError(f"piece {suffix} was not produced with its weight", tensor=name,
                                  hint="this is a bug in m1; please report it")
        t = self.pending.pop(suffix)
        return Produced(DTYPE_NAMES[t.dtype], tuple(t.shape), [tensor_bytes(t)])

    def _read(self, source: str) -> torch.Tensor:
        ahead, self.ahead = self.ahead, None
        weight = ahead[1].result() if ahead and ahead[0] == source else self.ctx.ckpt.get(source)
        following = self.position.get(source, len(self.sources)) + 1
        if following < len(self.sources) and self.device.type != "cpu":
            nxt = self.sources[following]
            self.ahead = (nxt, self.reader.submit(self.ctx.ckpt.get, nxt))
        return weight

    def close(self) -> None:
        self.ahead = None
        self.reader.shutdown(wait=True, cancel_futures=True)

    def _quantize(self, weight: torch.Tensor, name: str) -> list[tuple[str, torch.Tensor]]:
        from m1.quantize.codec import quantize_weight

        return quantize_weight(self.ctx.plan.scheme, weight, self.device, name)

    def _numel(self, source: str) -> int:
        return self.ctx.ckpt.info(source).numel

    def _copy(self, source: str) -> Iterator[memoryview]:
        chunks = self.ctx.ckpt.iter_chunks(source)
        while True:
            started = time.perf_counter()
            try:
                _, chunk = next(chunks)
            except StopIteration:
                break
            finally:
                self.timing.read_s += time.perf_counter() - started
            yield chunk
        self.report(self._numel(source))


def _write_shard(shard: ShardPlan) -> dict[str, Any]:
    """Write one whole shard (a module-level function so a worker process can run it)."""
    ctx: _Context = _WORKER["ctx"]
    timing = Timing()
    started, cpu = time.perf_counter(), time.process_time()
    producer = _Producer(ctx, shard, timing, _WORKER["report"])
    try:
        sha, size = safetensors_io.write_shard(
            Path(ctx.dest) / shard.file, [(t.name, t.dtype, t.shape, t.nbytes, t.exact) for t in shard.tensors],
            producer,
        )
    finally:
        producer.close()
    seconds = time.perf_counter() - started
    timing.write_s = max(0.0, seconds - timing.read_s - timing.quantize_s)
    timing.cpu_s = time.process_time() - cpu
    return {"file": shard.file, "sha256": sha, "size": size, "seconds": round(seconds, 3), "timing": asdict(timing)}


def _init_worker(ctx: _Context, threads: int, queue: Any) -> None:
    torch.set_num_threads(threads)  # one core a worker: two workers must not fight over two cores
    _WORKER.update(ctx=ctx, report=queue.put)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _ShardRunner:
    """Writes shards in this process, or in worker processes that each write whole shards."""

    def __init__(self, ctx: _Context, workers: int, threads: int) -> None:
        self.ctx = ctx
        self.workers = workers
        self.threads = threads
        self.pool: ProcessPoolExecutor | None = None
        self.queue: Any = None
        self.futures: list[Future] = []
        self.todo: list[ShardPlan] = []
        self.pool_used = False

    def start(self, todo: list[ShardPlan]) -> None:
        """Start the workers now, before any progress-bar thread exists (fork copies only this thread)."""
        self.todo = todo
        if self.workers <= 1 or len(todo) <= 1:
            return
        # fork is fast and safe when each child runs one thread (GNU OpenMP hangs in a forked child that
        # starts a thread team); otherwise, and for CUDA, a fresh interpreter per worker.
        method = "fork" if (self.threads == 1 and self.ctx.device == "cpu"
                            and "fork" in multiprocessing.get_all_start_methods()) else "spawn"
        mp = multiprocessing.get_context(method)
        self.queue = mp.Queue()
        ctx = self.ctx
        if method == "spawn" and ctx.ckpt._bin:  # .bin tensors are reloaded by each worker, not pickled
            import dataclasses

            ctx = dataclasses.replace(ctx, ckpt=dataclasses.replace(ctx.ckpt, _bin={}, _headers={}))
        self.pool_used = True
        self.pool = ProcessPoolExecutor(min(self.workers, len(todo)), mp_context=mp, initializer=_init_worker,
                                        initargs=(ctx, self.threads, self.queue))
        self.futures = [self.pool.submit(_write_shard, shard) for shard in todo]

    def results(self, advance: Callable[[int], None]) -> Iterator[dict[str, Any]]:
        if self.pool is None:
            _WORKER.update(ctx=self.ctx, report=advance)
            try:
                with _torch_threads(self.threads):
                    for shard in self.todo:
                        yield _write_shard(shard)
            finally:
                _WORKER.clear()  # do not keep the checkpoint and plan alive after the run
            return
        pending = set(self.futures)
        error: BaseException | None = None
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            self._drain(advance)
            for future in done:
                if future.cancelled():
                    continue
                exc = future.exception()
                if exc is None:
                    yield future.result()
                elif error is None:
                    error = exc
                    for other in pending:  # shards already being written finish and are recorded
                        other.cancel()
        self._drain(advance)
        if isinstance(error, BrokenProcessPool):
            raise M1Error("a worker process died (out of memory?)",
                          hint="run again with fewer --workers and --resume") from None
        if error is not None:
            raise error

    def _drain(self, advance: Callable[[int], None]) -> None:
        import queue as queue_module

        while True:
            try:
                advance(self.queue.get_nowait())
            except queue_module.Empty:
                return

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


# ---- running ----------------------------------------------------------------------------------------


def _never(name: str) -> Produced:
    raise CheckpointError("shard not written before the index", tensor=name,
                          hint="this is a bug in m1; please report it")


def run_quantize(ckpt: Checkpoint, dest: Path, opts: QuantizeOptions, *, device: str = "auto", workers: int = 1,
                 threads: int | None = None, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True, plan: QuantPlan | None = None) -> dict[str, Any]:
    """Quantize `ckpt` into `dest`; returns what was written and how fast."""
    from m1.quantize.codec import check_supported

    from m1.devices import resolve_device
    from m1.progress import count_progress
    from m1.writer import _load_progress

    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    dev = resolve_device(device)
    check_supported(opts.scheme, dev)
    if not ckpt.remote and Path(dest).resolve() == Path(ckpt.root).resolve():
        raise UsageError("the destination is the source folder", file=str(dest), hint="write to a new folder")
    qplan = plan or plan_from_checkpoint(ckpt, opts)
    threads = threads or max(1, available_cpus() // workers)

    prepare_destination(dest, resume, overwrite)
    fingerprint = qplan.write.fingerprint()
    done = _load_progress(dest, fingerprint) if resume else {}
    write_json_atomic(dest / "config.json", qplan.write.config)
    records: dict[str, dict[str, Any]] = {}
    todo: list[ShardPlan] = []
    for shard in qplan.write.shards:
        record = done.get(shard.file)
        path = dest / shard.file
        if record and path.exists() and path.stat().st_size == record["size"]:
            records[shard.file] = record
        else:
            todo.append(shard)

    timing = Timing()
    started = time.perf_counter()
    runner = _ShardRunner(_Context(ckpt, qplan, str(dev), str(dest)), workers, threads)
    runner.start(todo)
    try:
        with count_progress(qplan.params, "quantize", "params", show_progress) as advance:
            advance(sum(qplan.shard_params[f] for f in records))
            for result in runner.results(advance):
                records[result["file"]] = {k: result[k] for k in ("sha256", "size", "seconds")}
                write_json_atomic(dest / PROGRESS, {"fingerprint": fingerprint, "shards": records})
                timing.add(result["timing"])
    finally:
        runner.close()
    seconds = time.perf_counter() - started

    manifest = execute(qplan.write, dest, _never, source_root=None if ckpt.remote else ckpt.root,
                       fetch_extra=(lambda f: _fetch_remote(ckpt, f)) if ckpt.remote else None, resume=True)
    params_done = sum(qplan.shard_params[s.file] for s in todo)
    return {
        "dest": str(dest),
        "scheme": qplan.scheme.name,
        "device": str(dev),
        "workers": min(runner.workers, len(todo)) if runner.pool_used else (1 if todo else 0),
        "threads": threads,
        "shards": manifest["shards"],
        "bytes": sum(s["size"] for s in manifest["shards"].values()),
        "params": params_done,
        "seconds": round(seconds, 3),
        "params_per_s": round(params_done / seconds) if seconds > 0 else None,
        "timing": {k: round(v, 3) for k, v in asdict(timing).items()},
        **qplan.totals(),
    }


def _fetch_remote(ckpt: Checkpoint, name: str) -> Path:
    from m1.hub_read import download_file

    return download_file(ckpt.root, name, ckpt.revision)
